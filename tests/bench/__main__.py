"""`python -m tests.bench [--quick] [--out report.json] ...` (what `scripts/bench.sh` runs)."""

from __future__ import annotations

import argparse
import sys

from tests.bench import configure, run_bench


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.bench",
                                description="Benchmark the real server (issue 5).")
    configure(p)
    return run_bench(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
