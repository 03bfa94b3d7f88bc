"""Chaos on the session chain: the real server killed with SIGKILL at random moments (one of
them mid catch-up) while payments arrive and clients redeem; then `db check` and the wallet's
side prove nothing was lost, doubled or answered with another token (tests/chaos.py).

CI runs a short version; the benchmark's soak (`-m slow`, or `python -m tests.chaos --kills
1000 --out chaos.json` on a chain of its own) runs many more kills.
"""

from __future__ import annotations

import os
import random
import time
from pathlib import Path

import pytest

from anon_ticket.devchain import DevChainInfo
from tests.chaos import run_chaos

pytestmark = [pytest.mark.chain, pytest.mark.process]


def _seed() -> int:
    """Random unless ANON_TICKET_CHAOS_SEED pins it; a failure's report names it."""
    return int(os.environ.get("ANON_TICKET_CHAOS_SEED") or random.randrange(2**32))


def test_kill_9_at_random_moments_loses_nothing_doubles_nothing(
        tmp_path: Path, regtest_chain: DevChainInfo) -> None:
    started = time.monotonic()
    report = run_chaos(tmp_path / "chaos", regtest_chain, kills=5, seed=_seed(),
                       max_seconds=300)
    log = tmp_path / "chaos" / "server-all.log"
    assert report.ok, report.to_json() + f"server logs: {log}"
    assert (report.lost, report.doubled, report.mismatched) == (0, 0, 0)
    assert report.kills >= 5 and report.kills_during_catch_up >= 1, report.to_json()
    assert report.db_check_ok and report.db_summary["transfers"] >= report.payments
    assert report.payments >= 5 and report.successes >= 1 and report.redeems >= 1
    assert report.restarts > report.kills  # each kill restarted, and the final run
    assert time.monotonic() - started < 600


@pytest.mark.slow
def test_chaos_soak(tmp_path: Path, regtest_chain: DevChainInfo) -> None:
    """The benchmark's long run: ANON_TICKET_CHAOS_KILLS kills (1,000), at most
    ANON_TICKET_CHAOS_MINUTES of chaos (unlimited); the JSON report goes to
    ANON_TICKET_CHAOS_OUT (default: the test's temporary directory)."""
    kills = int(os.environ.get("ANON_TICKET_CHAOS_KILLS", "1000"))
    minutes = os.environ.get("ANON_TICKET_CHAOS_MINUTES")
    report = run_chaos(tmp_path / "chaos", regtest_chain, kills=kills, seed=_seed(),
                       max_seconds=None if not minutes else float(minutes) * 60)
    out = Path(os.environ.get("ANON_TICKET_CHAOS_OUT") or tmp_path / "chaos.json")
    out.write_text(report.to_json())
    assert report.ok, report.to_json()
    assert (report.lost, report.doubled, report.mismatched) == (0, 0, 0)
