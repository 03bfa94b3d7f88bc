#!/usr/bin/env bash
# Installs anon-ticket (venv + the Debian monero package) and runs the server.
# Without MONERO_RPC_URL it runs on its own local regtest chain (--dev-chain): monerod and
# monero-wallet-rpc as child processes under the data directory, a funded dev wallet, and a
# watch-only wallet the service watches. Extra arguments go before `serve` (global flags).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/setup.sh
if [ -n "${MONERO_RPC_URL:-}" ]; then
  exec .venv/bin/anon-ticket "$@" serve
fi
exec .venv/bin/anon-ticket --dev-chain "$@" serve
