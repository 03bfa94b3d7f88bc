"""`anon-ticket bench [--quick] [--out report.json]`: the performance benchmark (issue 5).

It starts the real server as a subprocess on a database loaded through `db import-legacy`,
pins the server and the load generator (wrk with a Lua script) to different cores, drives
the redeem and token paths over loopback next to two ceilings of the same stack (a trivial
quart-trio endpoint and a raw ASGI app on the same hypercorn trio worker, same pinning),
measures the storage actor alone (group commit vs one transaction a claim vs raw APSW),
ingestion through the record-transfers path, and memory and start-up with 1M recorded PIDs;
then writes a JSON report (every figure, ratios, targets, pass/fail) and prints a table.

`--quick` is a smoke test of under a minute (64 connections only, one 2 s run a scenario,
small databases; the 1M database is written by bulk SQL instead of the import): its ratios
move by +-0.2 on a shared machine. The full run (four connection levels, three repetitions of
5 s runs and five at 64 connections, the ceiling between every two scenarios there) takes
about twenty minutes and is the one the targets are judged on.
`--profile DIR` also samples the server with py-spy (when installed) during the redeem and
token paths and summarises where the time goes.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

__all__ = ["SECTIONS", "add_bench_parser", "run_bench"]

SECTIONS = ("http", "websocket", "storage", "ingestion", "memory_startup")


def _configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true",
                   help="a smoke test of under a minute: 64 connections only, one short run "
                        "a scenario, smaller databases")
    p.add_argument("--out", metavar="REPORT.json", help="write the JSON report here")
    p.add_argument("--profile", metavar="DIR",
                   help="also sample the server with py-spy (if installed) and summarise "
                        "where the time goes; raw stacks go to DIR")
    p.add_argument("--only", metavar="SECTION[,SECTION]",
                   help="run only these sections: " + ", ".join(SECTIONS))
    p.add_argument("--keep", action="store_true",
                   help="keep the temporary work directory (databases, server logs)")


def add_bench_parser(subparsers: Any) -> None:
    """Add `bench [--quick] [--out report.json] [--profile DIR] [--keep]`."""
    p = subparsers.add_parser(
        "bench", help="benchmark the real server against the stack's ceilings")
    _configure(p)


def run_bench(args: argparse.Namespace) -> int:
    """Run the benchmark; 0 when it ran (whatever the targets say), 1 when it could not."""
    import sys

    from anon_ticket.bench import report, runner, wrk

    if wrk.wrk_binary() is None:
        print("anon-ticket: bench needs wrk (Debian: apt-get install wrk)", file=sys.stderr)
        return 1
    only = tuple(x for x in (getattr(args, "only", None) or "").split(",") if x)
    unknown = [x for x in only if x not in SECTIONS]
    if unknown:
        print(f"anon-ticket: bench: no section {', '.join(unknown)} "
              f"(sections: {', '.join(SECTIONS)})", file=sys.stderr)
        return 2
    out = Path(args.out) if getattr(args, "out", None) else None
    profile = Path(args.profile) if getattr(args, "profile", None) else None
    result = runner.run("quick" if args.quick else "full", out, profile,
                        keep=bool(getattr(args, "keep", False)), only=only or SECTIONS)
    print(report.render(result))
    if out is not None:
        print(f"report written to {out}")
    return 0
