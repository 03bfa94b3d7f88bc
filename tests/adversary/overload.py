"""`python -m tests.adversary.overload`: honest redeems under an unknown-PID spray.

Behind Tor every client has the same address, so nothing can single out the sprayer: what
keeps honest clients served is that a spray of unknown payment ids costs the server as little
as possible (the Bloom filter answers, no storage work) and that the listener shares its time
fairly between connections. This measures it on the real process, pinned to one core, with
wrk (Debian's) spraying from the other:

1. capacity: the spray alone at 64 connections (requests a second the server serves);
2. honest alone: a client redeeming paid payment ids (a first claim, then a retry) at a steady
   pace, its latencies;
3. overload: the spray at 4 x 64 connections, a closed loop that keeps every connection busy
   (offered load far past capacity: the server's accept queue always holds more), with the
   same honest client beside it;
once with answers about unknown ids never held (`--unknown-rate-per-sec 0`) and once held
past a rate (the default), and reports the honest client's p50/p99 with and without the
spray, its errors, the spray's served rate, and the server's memory before, at the peak and
after. A benchmark, not a test: the numbers go in the README.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from tests.bench import wrk
from tests.bench.procs import memory_kib
from tests.process.proc import start_server
from tests.process.test_process import prepared


def rss_mb(pid: int) -> float:
    return memory_kib(pid)["VmRSS"] / 1024


def honest(url: str, pids: list[str], pace: float, stop: threading.Event) -> dict[str, Any]:
    """Redeem each id twice (a claim, then `already_claimed`), one request every `pace` s."""
    latencies: list[float] = []
    errors: dict[str, int] = {}
    with httpx.Client(base_url=url, timeout=30) as client:
        for pid in pids:
            for _ in range(2):
                if stop.is_set():
                    break
                started = time.perf_counter()
                try:
                    r = client.post("/api/v1/redeem", json={"pid": pid})
                    ok = r.status_code == 200
                    key = "ok" if ok else str(r.status_code)
                except httpx.HTTPError as exc:
                    key = type(exc).__name__
                    ok = False
                if ok:
                    latencies.append((time.perf_counter() - started) * 1000)
                else:
                    errors[key] = errors.get(key, 0) + 1
                time.sleep(max(0.0, pace - (time.perf_counter() - started)))
    latencies.sort()

    def q(p: float) -> float | None:
        return round(latencies[min(len(latencies) - 1, int(p * len(latencies)))], 2) \
            if latencies else None
    return {"redeems": len(latencies), "errors": errors, "p50_ms": q(0.5), "p99_ms": q(0.99),
            "max_ms": round(latencies[-1], 2) if latencies else None,
            "mean_ms": round(statistics.fmean(latencies), 2) if latencies else None}


def measure(work: Path, seconds: int, rate: float, cpus: tuple[set[int] | None, set[int] | None]
            ) -> dict[str, Any]:
    """One server with `--unknown-rate-per-sec rate`: the spray alone, the honest client
    alone, then both."""
    server_cpu, load_cpu = cpus
    data, pids = prepared(work, 4000)
    server = start_server(data, args=("--unknown-rate-per-sec", str(rate)), cpus=server_cpu)
    try:
        script = wrk.write_script(work)
        lines = wrk.write_lines(work / "spray.txt", [
            json.dumps({"pid": os.urandom(8).hex()}, separators=(",", ":"))
            for _ in range(200_000)])

        def spray(connections: int) -> wrk.WrkResult:
            return wrk.run_wrk(server.url, script=script, method="POST",
                               path="/api/v1/redeem", lines_file=lines,
                               connections=connections, duration_s=seconds,
                               threads=2, cpus=load_cpu)

        rss_start = rss_mb(server.proc.pid)
        alone_spray = spray(64)
        pace = 0.02
        per_run = int(seconds / pace / 2)
        alone = honest(server.url, pids[:per_run], pace, threading.Event())
        result: dict[str, Any] = {}
        stop = threading.Event()
        peak = [rss_start]

        def honest_beside() -> None:
            time.sleep(1.0)  # past wrk's start-up burst
            result["honest"] = honest(server.url, pids[per_run:2 * per_run], pace, stop)

        def sample() -> None:
            while not stop.is_set():
                peak[0] = max(peak[0], rss_mb(server.proc.pid))
                time.sleep(0.2)
        threads = [threading.Thread(target=honest_beside), threading.Thread(target=sample)]
        for t in threads:
            t.start()
        try:
            overload = spray(256)
        finally:
            stop.set()
            for t in threads:
                t.join()
        time.sleep(2.0)
        return {
            "unknown_rate_per_sec": rate,
            "spray_alone_64": {"served_rps": round(alone_spray.rps), "p99_ms": alone_spray.p99_ms},
            "spray_256": {"served_rps": round(overload.rps), "p50_ms": overload.p50_ms,
                          "p99_ms": overload.p99_ms, "counts": overload.counts,
                          "socket_errors": overload.socket_errors,
                          "generator_cpu": overload.generator_cpu},
            "honest_alone": alone,
            "honest_under_spray": result.get("honest"),
            "rss_mb": {"start": round(rss_start, 1), "peak": round(peak[0], 1),
                       "after": round(rss_mb(server.proc.pid), 1)},
        }
    finally:
        server.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.adversary.overload", description=__doc__)
    p.add_argument("--seconds", type=int, default=10)
    p.add_argument("--rate", type=float, default=200.0, help="the held run's rate")
    p.add_argument("--out", type=Path, default=Path("overload-report.json"))
    args = p.parse_args(argv)
    cpus = os.sched_getaffinity(0)
    pinning = ({min(cpus)}, cpus - {min(cpus)}) if len(cpus) > 1 else (None, None)
    runs = []
    for rate in (0.0, args.rate):  # without holding, then with: the same machine, one run
        with tempfile.TemporaryDirectory(prefix="overload-") as tmp:
            runs.append(measure(Path(tmp), args.seconds, rate, pinning))
    capacity = runs[0]["spray_alone_64"]["served_rps"]
    report = {"seconds_per_run": args.seconds, "capacity_rps": capacity,
              "offered_note": "wrk's closed loop at 256 connections keeps every connection "
                              "busy: offered load is whatever the server will take, and more",
              "runs": runs}
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
