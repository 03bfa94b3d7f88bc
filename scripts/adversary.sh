#!/usr/bin/env bash
# Runs the adversary suite (tests/adversary): a catalog of attacks on the public port, the
# websocket and the internal socket, with a JSON report and a table; exits 1 if any attack
# did harm. Without --url it starts a server of its own. Add --full for the long run.
#   scripts/adversary.sh [--full] [--out report.json]
#   scripts/adversary.sh --url http://127.0.0.1:8080 --internal-socket data/internal.sock \
#       --server-pid PID --claimable PID1,PID2
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/setup.sh --test
exec .venv/bin/python -m tests.adversary "$@"
