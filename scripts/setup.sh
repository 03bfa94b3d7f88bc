#!/usr/bin/env bash
# Installs what anon-ticket needs on a fresh Debian 12 machine: the Debian `monero` package
# (monerod + monero-wallet-rpc, for the local regtest chain), `wrk` (for the benchmark) and a
# virtualenv in .venv with the project and, with --test, its test tools. Idempotent: a second
# run only checks.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
WITH_TEST=0
for a in "$@"; do case "$a" in --test) WITH_TEST=1;; *) echo "setup.sh: unknown argument $a" >&2; exit 2;; esac; done

# monerod + monero-wallet-rpc run the local regtest chain; wrk drives `anon-ticket bench`.
missing=()
command -v monerod >/dev/null && command -v monero-wallet-rpc >/dev/null || missing+=(monero)
command -v wrk >/dev/null || missing+=(wrk)
if [ "${#missing[@]}" -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "setup: installing Debian packages: ${missing[*]}" >&2
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  else
    echo "setup: missing ${missing[*]}; install with: sudo apt-get install ${missing[*]}" >&2
  fi
fi

PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check --upgrade "pip>=23.2"
if [ "$WITH_TEST" = 1 ]; then
  .venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'
else
  .venv/bin/python -m pip install -q --disable-pip-version-check -e .
fi
