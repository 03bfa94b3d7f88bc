#!/usr/bin/env bash
# Installs anon-ticket (venv + the Debian monero package) and runs the server.
# Extra arguments go to `anon-ticket serve`; settings come from flags, the environment
# (MONERO_RPC_URL, ...) or a TOML file (ANON_TICKET_CONFIG), see README.md.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/setup.sh
exec .venv/bin/anon-ticket serve "$@"
