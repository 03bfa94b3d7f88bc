#!/usr/bin/env bash
# Runs the performance benchmark (tests/bench, a development tool: not installed with the
# package) against the real server, from this checkout; wrk is its load generator.
#   scripts/bench.sh [--quick] [--out report.json] [--profile DIR] [--only SECTION,...]
# (--workers 2 against --workers 1: .venv/bin/python -m tests.bench.workers [--quick] [--out F])
# Relative paths are taken from the checkout's root.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/setup.sh --test
exec .venv/bin/python -m tests.bench "$@"
