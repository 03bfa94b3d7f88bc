"""The command line the side-by-side benchmarks share (`tests.bench.workers`,
`tests.bench.nodes`): a quick or full plan, its repetitions and seconds overridden, a JSON
report and a table."""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol, TypeVar

from tests.bench import wrk


class _Plan(Protocol):
    @property
    def pairs(self) -> int: ...

    @property
    def seconds(self) -> int: ...


P = TypeVar("P", bound=_Plan)


def parser(prog: str, description: str, quick: _Plan, repetitions: str
           ) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--quick", action="store_true",
                   help=f"a smoke test: {quick.pairs} {repetitions} of {quick.seconds} s runs")
    p.add_argument("--out", metavar="FILE.json", help="write the JSON report here")
    p.add_argument("--pairs", type=int, help="repetitions of each measurement")
    p.add_argument("--seconds", type=int, help="seconds a run")
    p.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    return p


def plan_from(args: argparse.Namespace, quick: P, full: P, fresh: str) -> P:
    """The plan asked for; with other repetitions or seconds, its `fresh` count (ids that
    new claims use up) scaled so that they do not run out."""
    plan = quick if args.quick else full
    if args.pairs or args.seconds:
        pairs, seconds = args.pairs or plan.pairs, args.seconds or plan.seconds
        scale = max(1.0, pairs * seconds / (plan.pairs * plan.seconds))
        plan = dataclasses.replace(plan, pairs=pairs, seconds=seconds,  # type: ignore[type-var]
                                   **{fresh: math.ceil(getattr(plan, fresh) * scale)})
    return plan


def main(argv: Sequence[str] | None, p: argparse.ArgumentParser,
         run: Callable[[argparse.Namespace, Path | None], dict[str, Any]],
         render: Callable[[dict[str, Any]], str]) -> int:
    """Parse, check for wrk, run, print the table (and where the report went)."""
    args = p.parse_args(argv)
    if wrk.wrk_binary() is None:
        print("needs wrk (scripts/setup.sh installs it; Debian: apt-get install wrk)",
              file=sys.stderr)
        return 1
    out = Path(args.out) if args.out else None
    report = run(args, out)
    print(render(report))
    if out is not None:
        print(f"report written to {out}")
    return 0
