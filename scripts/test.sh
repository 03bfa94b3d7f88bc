#!/usr/bin/env bash
# Installs everything the tests need, lints, type-checks and runs the whole test suite.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/setup.sh --test
# setup.sh installed PostgreSQL's server binaries: without them the PostgreSQL tests fail here
# instead of skipping, so a run that cannot test that store does not pass (tests/pgserver.py).
export ANON_TICKET_REQUIRE_POSTGRES=1
.venv/bin/ruff check anon_ticket mailboxes actors supervisors tests
.venv/bin/mypy
.venv/bin/python -m pytest "$@"
# A full run goes on with the chain tests once more, every in-process server now in front of
# two worker processes (the process tests already run one worker per core)...
if [ "$#" -eq 0 ]; then
  ANON_TICKET_TEST_WORKERS=2 .venv/bin/python -m pytest -q -m "chain and not slow" tests/e2e
  # ...and with the contract suites once more, every in-process server now on a fresh
  # PostgreSQL database instead of its SQLite file (tests/harness.py); a test about SQLite
  # itself (its file, its disk) skips there and says why.
  ANON_TICKET_TEST_DATABASE=postgres exec .venv/bin/python -m pytest -q \
    tests/actors/test_public.py tests/actors/test_watch.py tests/actors/test_internal.py \
    tests/test_hostile.py tests/e2e/test_chain.py tests/e2e/test_chain_watch.py
fi
