"""How many of each fixture a run needs, from the rates measured in the same run.

A fresh-PID redeem run claims every PID it sends, so its lines must outlast it: a run's lines
are `per_run(rate, seconds, connections)`, the rate being the fastest this run has measured
so far at that connection level (the quart-trio ceiling's or a claims run's) times
`PER_RUN_MARGIN`. The lines a run did not send go back to their pool (`wrk.split_sent`),
so a generous run costs nothing. The database's unclaimed tickets (fresh PIDs) and claimed
ones (asked once each) are sized before it is written, from short runs of the quart-trio
ceiling at the targets' level (the rate probe, `Bench.probe`): every run the plan will make,
at that rate, each with its margin, and `POOL_MARGIN` over. What the margins do not cover
ends a run early, cleanly (`wrk.run_wrk(once=True)`), and the report lists it as short
(`short_runs`).

Before, the runs were sized from constants (3,000 req/s for a level's first run, 1,500 for
the websocket section's when the http one had not run, 1,500 a second for the profile) in a
database of a fixed 200,000 unclaimed tickets: on a day the ceiling ran at 866 req/s the
websocket section found 390 fresh PIDs left for 7,357 wanted, and wrk, handed an empty file,
exited 1.

The ingestion section's catch-up is sized the same way: `ingest_s` seconds of the rate at
which `db import-legacy` wrote the same run's tickets and transfers (`ingest_transfers`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from tests.bench.report import TARGET_LEVEL

if TYPE_CHECKING:
    from tests.bench.runner import Plan

# A run's lines: this much more than the rate it was sized by would claim. The ceiling ranged
# from 358 to 741 req/s within one full run on this machine; a run's lines are sized from the
# fastest run measured so far at its level, so this covers a run faster than any before it.
PER_RUN_MARGIN = 1.5
# The database's fresh (and uncached claimed) tickets: every planned run's lines at the
# probe's rate, this much over. A run takes back what it did not send, so the pool pays for
# what runs claim (about rate x seconds each): this and the runs' own margin cover a machine
# that runs 40% faster than the probe said with every fourth run repeated (a run at >= 16
# connections whose server got too little of its core runs again), or every other run
# repeated at the probe's rate (tests/test_bench.py replays both).
POOL_MARGIN = 1.25
MIN_INGEST_TRANSFERS = 1000


def per_run(rate: float, seconds: float, connections: int,
            margin: float = PER_RUN_MARGIN) -> int:
    """Lines for one run of `seconds` at `connections` that may go `margin` times faster than
    `rate` (req/s): at most `connections` more are in flight when a timed run ends."""
    return math.ceil(max(0.0, rate) * seconds * margin) + connections + 1


@dataclass(frozen=True)
class ClaimRun:
    """One planned run that claims what it sends (new claims, or claimed tickets asked once)."""

    section: str
    scenario: str
    connections: int
    seconds: float


def shared_server_runs(plan: Plan, sections: Iterable[str], profile: bool) -> list[ClaimRun]:
    """The fresh-PID runs the http and websocket sections' server will make (first attempts:
    a repeated run takes its pool's lines again, less what it sent)."""
    only = set(sections)
    runs: list[ClaimRun] = []
    if "http" in only:
        for level in plan.levels:
            reps = plan.target_reps if level == TARGET_LEVEL else plan.reps
            runs += [ClaimRun("http", "new_claims", level, plan.seconds[level])] * reps
        if profile:
            runs.append(ClaimRun("profile", "new_claims", TARGET_LEVEL, plan.profile_s))
    if "websocket" in only:
        seconds = plan.seconds[TARGET_LEVEL]
        runs += [ClaimRun("websocket", "idle_cost", TARGET_LEVEL, seconds)] * (2 * plan.ws_reps)
        runs += [ClaimRun("websocket", "stuck_cost", TARGET_LEVEL, seconds)] * (
            2 * plan.ws_stuck_reps)
    return runs


def uncached_runs(plan: Plan, sections: Iterable[str]) -> list[ClaimRun]:
    """The http section's runs of claimed tickets asked once each (storage answers them)."""
    if "http" not in set(sections) or "already_claimed_uncached" in plan.skip \
            or TARGET_LEVEL not in plan.levels:
        return []
    return [ClaimRun("http", "already_claimed_uncached", TARGET_LEVEL,
                     plan.seconds[TARGET_LEVEL])] * plan.target_reps


def storage_runs(plan: Plan, sections: Iterable[str]) -> list[ClaimRun]:
    """Each storage server's runs (each has its own copy of every unclaimed ticket)."""
    if "storage" not in set(sections):
        return []
    return [ClaimRun("storage", "new_claims", TARGET_LEVEL,
                     plan.seconds[TARGET_LEVEL])] * plan.storage_reps


def lines_for(runs: Iterable[ClaimRun], rate: float, margin: float = 1.0) -> int:
    return math.ceil(margin * sum(per_run(rate, r.seconds, r.connections) for r in runs))


@dataclass(frozen=True)
class Needs:
    """The database a run prepares, from `rate` (req/s, the probe's): what its runs need,
    and what it holds (never less than the plan's own sizes: the storage measurements are
    made on a database that large)."""

    rate: float
    fresh: int  # unclaimed tickets the shared server's runs may claim, fan-out included
    storage: int  # unclaimed tickets each storage server's runs may claim
    uncached: int  # claimed tickets the uncached already_claimed runs may ask
    unclaimed: int  # unclaimed tickets written
    claimed: int  # claimed tickets written
    runs: dict[str, int]  # planned runs by section

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def needs(plan: Plan, rate: float, sections: Iterable[str], profile: bool = False) -> Needs:
    sections = tuple(sections)
    shared = shared_server_runs(plan, sections, profile)
    uncached = uncached_runs(plan, sections)
    storage = storage_runs(plan, sections)
    fresh = lines_for(shared, rate, POOL_MARGIN) + (
        plan.ws_fanout if "websocket" in sections else 0)
    storage_lines = lines_for(storage, rate)  # (no storage run is repeated)
    uncached_lines = lines_for(uncached, rate, POOL_MARGIN)
    floor_claims = plan.floor_claims if "storage" in sections else 0
    runs: dict[str, int] = {}
    for r in (*shared, *uncached, *storage):
        runs[r.section] = runs.get(r.section, 0) + 1
    return Needs(
        rate=round(rate, 1), fresh=fresh, storage=storage_lines, uncached=uncached_lines,
        unclaimed=max(plan.unclaimed, fresh, storage_lines, floor_claims),
        claimed=max(plan.claimed, plan.tokens + uncached_lines), runs=runs)


def ingest_transfers(plan: Plan, rows_per_s: float) -> int:
    """The catch-up's transfers: `plan.ingest_s` seconds at the rate `db import-legacy` wrote
    this run's tickets (the same kind of work: a ticket and a transfer a row, random ids)."""
    return max(MIN_INGEST_TRANSFERS, math.ceil(rows_per_s * plan.ingest_s))
