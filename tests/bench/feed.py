"""The cluster feed between two nodes: notifications against polling.

`python -m tests.bench.feed [--quick] [--out FILE.json]`

Two nodes in one process (`tests.actors.core.run_core`: each its storage, filter and cluster
actor, as in the tree) on one real PostgreSQL server (`tests.pgserver.PgServer(fsync=True)`),
a fresh database per run. In each run, first the nodes stand idle for `idle_s` and the feed
reads of both are counted; then node A records `payments` new ids one after the other, and
each one's time from the request to its answer is taken: the answer waits until node B has
applied the entry (the barrier, docs/architecture.md §9), so it measures how soon B hears of
A's commits and A of B's progress. `notify` runs LISTEN/NOTIFY (the default), `poll` the same
with `listen=False` (the feed read every 20 ms, the barrier checked every 10 ms). The modes
alternate, `reps` runs each; the ratios are taken within a pair.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import trio

from anon_ticket.domain.ids import PaymentId
from tests.actors.core import run_core
from tests.pgserver import PgServer

MODES = {"notify": True, "poll": False}


async def _run(dsn: str, tmp: Path, listen: bool, payments: int,
               idle_s: float) -> dict[str, Any]:
    async with run_core(tmp / "a", pg=dsn, node="a", cluster=True, listen=listen) as a, \
            run_core(tmp / "b", pg=dsn, node="b", cluster=True, listen=listen) as b:
        followers = [a.made["cluster"], b.made["cluster"]]
        with trio.fail_after(10):
            while listen and not all(f.listening for f in followers):
                await trio.sleep(0.01)
        await trio.sleep(0.3)
        before = sum(f.rounds for f in followers)
        await trio.sleep(idle_s)
        idle_reads = (sum(f.rounds for f in followers) - before) / idle_s
        took = []
        for _ in range(payments):
            started = time.perf_counter()
            await a.pay(PaymentId.generate())
            took.append((time.perf_counter() - started) * 1000)
    took.sort()
    return {"idle_reads_per_s": round(idle_reads, 1),
            "ack_ms_median": round(statistics.median(took), 2),
            "ack_ms_p90": round(took[int(len(took) * 0.9)], 2),
            "ack_ms_p99": round(took[min(len(took) - 1, int(len(took) * 0.99))], 2)}


def run(reps: int, payments: int, idle_s: float, out: Path | None) -> dict[str, Any]:
    started = time.perf_counter()
    runs: list[dict[str, Any]] = []
    server = PgServer(fsync=True).start()
    try:
        with tempfile.TemporaryDirectory(prefix="bench-feed-") as work:
            for rep in range(reps):
                order = list(MODES) if rep % 2 == 0 else list(MODES)[::-1]
                for mode in order:
                    dsn = server.create_database(server.fresh_name())
                    tmp = Path(work) / f"{rep}-{mode}"
                    figures = trio.run(_run, dsn, tmp, MODES[mode], payments, idle_s)
                    runs.append({"rep": rep, "mode": mode, **figures})
                    print(f"  {mode:6} rep {rep}: {figures}", file=sys.stderr)
    finally:
        server.close()
    summary: dict[str, Any] = {}
    for key in ("idle_reads_per_s", "ack_ms_median", "ack_ms_p99"):
        by_rep = [(r[key], p[key]) for r in runs if r["mode"] == "notify"
                  for p in runs if p["mode"] == "poll" and p["rep"] == r["rep"]]
        summary[key] = {
            "notify": statistics.median(n for n, _ in by_rep),
            "poll": statistics.median(p for _, p in by_rep),
            "poll_over_notify": round(statistics.median(p / n for n, p in by_rep if n), 2)}
    report = {"meta": {"reps": reps, "payments": payments, "idle_s": idle_s,
                       "elapsed_s": round(time.perf_counter() - started, 1)},
              "summary": summary, "runs": runs}
    if out is not None:
        out.write_text(json.dumps(report, indent=2) + "\n")
    return report


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.bench.feed", description=__doc__)
    p.add_argument("--quick", action="store_true", help="1 run a mode, 50 payments")
    p.add_argument("--out", type=Path, help="write the JSON report here")
    args = p.parse_args(argv)
    reps, payments, idle_s = (1, 50, 1.0) if args.quick else (5, 300, 3.0)
    report = run(reps, payments, idle_s, args.out)
    for key, figures in report["summary"].items():
        print(f"{key:18} notify {figures['notify']:8}  poll {figures['poll']:8}  "
              f"poll/notify {figures['poll_over_notify']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
