"""`python -m tests.adversary`: run the attack catalog against a server.

Without --url it starts one of its own (the real `anon-ticket serve` process on a fresh data
directory, with paid tickets imported for the redeem races and short deadlines so the slow
attacks finish quickly) and stops it afterwards. Writes a JSON report and prints a table;
exits 1 if any attack did harm, 0 otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import trio

from tests.adversary.suite import Target, report, run_suite, table

# Deadlines of a server the suite starts itself: short, so slow attacks end in seconds.
OWN_SERVER_ARGS = ("--read-timeout-secs", "2", "--keep-alive-secs", "3",
                   "--write-timeout-secs", "2", "--watch-send-timeout-secs", "2")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.adversary", description=__doc__)
    p.add_argument("--url", help="a running server's public URL (default: start one)")
    p.add_argument("--internal-socket", type=Path, help="its internal unix socket")
    p.add_argument("--server-pid", type=int, help="its process id (descriptors, memory)")
    p.add_argument("--claimable", default="", help="paid, unclaimed PIDs to race on, "
                   "comma-separated")
    p.add_argument("--read-timeout", type=float, default=10.0)
    p.add_argument("--keep-alive", type=float, default=30.0)
    p.add_argument("--write-timeout", type=float, default=10.0)
    p.add_argument("--watch-send-timeout", type=float, default=10.0)
    p.add_argument("--full", action="store_true", help="the long run (default: bounded)")
    p.add_argument("--only", help="comma-separated sections of the catalog")
    p.add_argument("--out", type=Path, default=Path("adversary-report.json"))
    p.add_argument("--database-url", help="the server started here stores in this "
                   "PostgreSQL database (default: its SQLite file)")
    args = p.parse_args(argv)
    only = set(args.only.split(",")) if args.only else None
    if args.url:
        host, _, port = args.url.removeprefix("http://").rstrip("/").rpartition(":")
        target = Target(host, int(port), args.internal_socket, args.server_pid,
                        [x for x in args.claimable.split(",") if x], args.read_timeout,
                        args.keep_alive, args.write_timeout, args.watch_send_timeout,
                        full=args.full)
        return _run(target, only, args.out)
    from tests.process.proc import start_server
    from tests.process.test_process import prepared

    env = {"DATABASE_URL": args.database_url} if args.database_url else None
    with tempfile.TemporaryDirectory(prefix="adversary-") as tmp:
        data, pids = prepared(Path(tmp), 10, env=env)
        server = start_server(data, args=OWN_SERVER_ARGS, env=env)
        try:
            target = Target("127.0.0.1", server.port, server.internal_socket, server.proc.pid,
                            pids, 2.0, 3.0, 2.0, 2.0, full=args.full)
            return _run(target, only, args.out)
        finally:
            server.stop()


def _run(target: Target, only: set[str] | None, out: Path) -> int:
    outcomes = trio.run(run_suite, target, only)
    result = report(outcomes, target)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(table(outcomes))
    print(f"\n{len(outcomes) - len(result['failed'])} passed, {len(result['failed'])} failed; "
          f"report: {out}")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
