"""`python -m anon_ticket.bench [--quick] [--out report.json]` (same as `anon-ticket bench`)."""

from __future__ import annotations

import argparse
import sys

from anon_ticket.bench import _configure, run_bench


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="anon-ticket bench",
                                description="Benchmark the real server (issue 5).")
    _configure(p)
    return run_bench(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
