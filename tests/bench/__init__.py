"""`scripts/bench.sh [--quick] [--out report.json]` (or `python -m tests.bench` from the
checkout): the performance benchmark (issue 5), a development tool that is not installed.

It drives the real server only from outside, as an operator or a client would: it starts
`anon-ticket serve` as a subprocess (the test suite's `tests.process.proc.start_server`) on a
database loaded through `db import-legacy`, feeds it payments through a fake wallet-rpc, pins
the server and the load generator (wrk with a Lua script) to different cores, drives the
public HTTP API and the watch websocket over loopback next to two ceilings of the same stack
(a trivial quart-trio endpoint and a raw ASGI app on the same hypercorn trio worker, same
pinning), and reads the server's CPU time in /proc and its /metrics over the internal socket.
Sections: `http`; `websocket` (idle subscribers, claim → event latency, a watcher that stops
reading); `storage` (group commit against one transaction a claim and against the same SQL
on a bare connection); `ingestion` (a catch-up from the wallet, against the same SQL bare);
`memory_startup` (1M recorded PIDs). It writes a JSON report (every figure, ratios, targets,
pass/fail) and prints a table.

Fixtures are sized from rates measured in the same run (`tests.bench.sizing`): a short run
of the quart-trio ceiling before anything else sizes the database's fresh and claimed
tickets, each claims run takes lines for the fastest rate seen at its level (1.5x, the unsent
ones back), and the catch-up lasts `ingest_s` seconds of the import's rate. Lines that must
not repeat (fresh PIDs) are sent once: a run that runs out of them stops early, cleanly, and
the report lists it under `short_runs`.

`--quick` is a smoke test of about a minute (64 connections only, one 2 s run a scenario,
small databases; the 1M database is written by bulk SQL instead of the import): its ratios
move by +-0.2 on a shared machine. The full run (four connection levels, three repetitions of
5 s runs and five at 64 connections, the ceiling between every two scenarios there) takes
about twenty minutes and is the one the targets are judged on.
`--profile DIR` also samples the server with py-spy (when installed) during the redeem and
token paths and summarises where the time goes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

__all__ = ["SECTIONS", "configure", "run_bench"]

SECTIONS = ("http", "websocket", "storage", "ingestion", "memory_startup")


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true",
                   help="a smoke test of about a minute: 64 connections only, one short run "
                        "a scenario, smaller databases")
    p.add_argument("--out", metavar="REPORT.json", help="write the JSON report here")
    p.add_argument("--profile", metavar="DIR",
                   help="also sample the server with py-spy (if installed) and summarise "
                        "where the time goes; raw stacks go to DIR")
    p.add_argument("--only", metavar="SECTION[,SECTION]",
                   help="run only these sections: " + ", ".join(SECTIONS))
    p.add_argument("--keep", action="store_true",
                   help="keep the temporary work directory (databases, server logs)")


def run_bench(args: argparse.Namespace) -> int:
    """Run the benchmark; 0 when it ran (whatever the targets say), 1 when it could not."""
    from tests.bench import report, runner, wrk

    if wrk.wrk_binary() is None:
        print("bench: needs wrk (scripts/setup.sh installs it; Debian: apt-get install wrk)",
              file=sys.stderr)
        return 1
    only = tuple(x for x in (args.only or "").split(",") if x)
    unknown = [x for x in only if x not in SECTIONS]
    if unknown:
        print(f"bench: no section {', '.join(unknown)} (sections: {', '.join(SECTIONS)})",
              file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else None
    profile = Path(args.profile) if args.profile else None
    result = runner.run("quick" if args.quick else "full", out, profile, keep=args.keep,
                        only=only or SECTIONS)
    print(report.render(result))
    if out is not None:
        print(f"report written to {out}")
    return 0
