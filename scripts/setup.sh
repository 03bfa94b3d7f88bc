#!/usr/bin/env bash
# Installs what anon-ticket needs on a fresh Debian 12 machine: the Debian `monero` package
# (monerod + monero-wallet-rpc, for the local regtest chain), `wrk` (for the benchmark), with
# --test `prometheus` (for `promtool`, which checks config/prometheus/; on a machine run by
# systemd, Debian starts prometheus.service too), `chromium` + `chromium-driver` (the
# checkout page's browser tests) and `postgresql` (the PostgreSQL store's tests start servers of
# their own from its binaries, tests/pgserver.py), and a virtualenv in .venv with the project
# and, with --test, its test tools. Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
WITH_TEST=0
for a in "$@"; do case "$a" in --test) WITH_TEST=1;; *) echo "setup.sh: unknown argument $a" >&2; exit 2;; esac; done

# monerod + monero-wallet-rpc run the local regtest chain; wrk drives scripts/bench.sh.
missing=()
command -v monerod >/dev/null && command -v monero-wallet-rpc >/dev/null || missing+=(monero)
command -v wrk >/dev/null || missing+=(wrk)
# promtool (Debian's `prometheus` package) checks the alert rules in tests/test_operator_files.py;
# without its recommends (prometheus-node-exporter), which the tests do not need.
bare=()
[ "$WITH_TEST" = 0 ] || command -v promtool >/dev/null || bare+=(prometheus)
# Headless Chromium and its driver run the checkout page's browser tests (selenium is pointed
# at /usr/bin/chromium and /usr/bin/chromedriver and never downloads a browser or a driver).
[ "$WITH_TEST" = 0 ] || [ -x /usr/bin/chromium ] || bare+=(chromium)
[ "$WITH_TEST" = 0 ] || [ -x /usr/bin/chromedriver ] || bare+=(chromium-driver)
# PostgreSQL's server binaries (initdb, pg_ctl, postgres under /usr/lib/postgresql/<version>/bin,
# not on PATH): the tests initdb and run throwaway servers of their own in temporary directories
# (tests/pgserver.py). The package's own `main` cluster is not used; where no init system runs
# it stays down, which is fine. Without its recommends (sysstat, logrotate), which they do not need.
[ "$WITH_TEST" = 0 ] || compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null ||
  bare+=(postgresql)
all=("${missing[@]}" "${bare[@]}")
if [ "${#all[@]}" -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "setup: installing Debian packages: ${all[*]}" >&2
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    [ "${#missing[@]}" = 0 ] ||
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    [ "${#bare[@]}" = 0 ] ||
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        "${bare[@]}" >/dev/null
  else
    echo "setup: missing ${all[*]}; install with: sudo apt-get install ${all[*]}" >&2
  fi
fi

PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# The install is redone only when what it depends on changed: pyproject.toml, the extras asked
# for (a test install covers a plain one), the interpreter. A second run only checks a stamp in
# the venv, in well under a second.
extras=$([ "$WITH_TEST" = 1 ] && echo test || echo plain)
base="$(sha256sum pyproject.toml | cut -d' ' -f1) $(.venv/bin/python -V 2>&1)"
stamp=.venv/.anon-ticket-installed
have_base=$(sed -n 1p "$stamp" 2>/dev/null || true)
have_extras=$(sed -n 2p "$stamp" 2>/dev/null || true)
if [ "$have_base" != "$base" ] || { [ "$have_extras" != "$extras" ] && [ "$have_extras" != test ]; }; then
  spec=$([ "$WITH_TEST" = 1 ] && echo '.[test]' || echo '.')
  # pip's and setuptools' chatter (an editable-install banner) stays out of the server's log.
  log=$(mktemp)
  if ! { .venv/bin/python -m pip install -q --disable-pip-version-check --upgrade "pip>=23.2" \
         && .venv/bin/python -m pip install -q --disable-pip-version-check -e "$spec"; } \
       >"$log" 2>&1; then
    cat "$log" >&2; rm -f "$log"; exit 1
  fi
  rm -f "$log"
  printf '%s\n%s\n' "$base" "$extras" > "$stamp"
fi
