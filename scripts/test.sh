#!/usr/bin/env bash
# Installs everything the tests need, lints, type-checks and runs the whole test suite.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/setup.sh --test
.venv/bin/ruff check anon_ticket mailboxes actors supervisors tests
.venv/bin/mypy
exec .venv/bin/python -m pytest "$@"
