"""Worker scaling: the real server with `--workers 2` against `--workers 1`, side by side.

`python -m tests.bench.workers [--quick] [--out FILE.json] [--pairs N] [--seconds S] [--keep]
[--profile DIR]`

Two servers (`anon-ticket serve`, started by `tests.bench.procs.spawn_server` as the main
benchmark starts its own: `--unknown-rate-per-sec 0`, so Bloom negatives are not held back)
run at once, each on its own copy of one data directory loaded by `db import-legacy`
(`tests.bench.data`), one with `--workers 1` (a single process), one with `--workers 2` (an
owner process and two worker processes on the inherited public socket). No wallet listens
(the poller is paused once the server is ready; recorded payments redeem as in an outage).
wrk (`tests.bench.wrk`: its Lua replay script, one thread, 64 connections) drives one
server at a time, in pairs: each scenario runs on one server then on the other, the order
swapped from one repetition to the next (1, 2 | 2, 1 | ...), so the machine's drift and
noise fall on both alike and a pair's ratio compares runs a few seconds apart.

Scenarios (each repetition, in this order, both servers): `bloom_negative` (redeem of payment
ids nobody paid: a worker answers alone), `new_claims` (fresh ids, each sent once: the owner's
storage claims them; a run takes ids for 1.5x the fastest rate this server has shown, the
unsent ones go back), `already_claimed` (the ids this server claimed in its run just before:
the filter's positive cache answers, in every worker, as storage replicates its effects),
`token` (GET /api/v1/token/{token} of imported claimed tickets: with workers, each worker
reads it from the database itself, `anon_ticket/reads.py`; in one process, storage does).

Per run: requests per second (wall, wrk's), the server's CPU seconds over the run summed over
the owner and every child it has (`pgrep -P OWNER`, utime + stime of /proc/PID/stat read
before and after: `tree_cpu`, `cpu_delta`), requests per server CPU second, wrk's CPU (share
of a core over its run: the load generator shares the two cores), the CPU the other, idle
server used meanwhile, what else the machine ran (busy time in /proc/stat less ours), and
how long the server's threads waited for a core (`tree_sched`: /proc/PID/task/*/schedstat).
Ratios N=2 / N=1 are taken within each pair, and the median over pairs is judged against
the targets (`TARGETS`), with the pairs' spread beside it.

Pinning: none, for both servers and for wrk. N=2 needs both cores (two workers, plus the
owner for what it answers), so it cannot be pinned to one; pinning N=1 to one core and wrk to
the other would give the two servers different machines. Unpinned, the same scheduler
places both servers and the load generator: N=1 uses at most one core and leaves wrk the
other, N=2 shares both with wrk (whose CPU is in the report). Requests per server CPU second
depends much less on how much of the machine the server got; the throughput ratio depends on
it entirely, and so includes wrk's share and whatever else runs on the machine (`other_cpu_s`
per run says how much that was).

The machine is shared: before each pair the run waits, briefly (`Plan.quiet_wait`, within
`Plan.quiet_budget` over the run), for half a second with at most `QUIET` cores of other load,
then measures anyway. Every run records that load (`other_cpu_s`, and `steal_s`: the host's
own), and the report gives the ratios over the quiet pairs apart (`quiet_ratios`). Under about
a core of other load, N=1 still gets most of a core and N=2 gets what is left of the second:
the throughput ratio falls (1.0 to 1.5 here, against 1.65 to 2.26 in quiet pairs), requests
per CPU second much less, though more widely spread (N=2's threads then wait 3 to 6 s for a
core in a 5 s run, N=1's under 1 s).

`--quick` (one pair of 2 s runs a scenario, 30 to 45 s) is a smoke test; judge the targets
on the full run (five pairs of 5 s runs a scenario: 3.7 minutes on a quiet machine, at most
a minute more waiting for quiet). `--profile DIR` then runs each scenario once more on each
server with py-spy on every process (`layer_samples`, `us_per_request`): where the CPU of a
request goes, owner and workers together.
"""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from tests.bench import cli, data, procs, profiling, wrk
from tests.bench.wrk import WrkResult
from tests.process.proc import ServerProcess

Log = Callable[[str], None]

REDEEM = "/api/v1/redeem"
CONNECTIONS = 64
WORKERS = (1, 2)  # the baseline first: ratios are WORKERS[1] / WORKERS[0]
SCENARIOS = ("bloom_negative", "new_claims", "already_claimed", "token")
EXPECTED = {"bloom_negative": ("404",), "new_claims": ("200:success",),
            "already_claimed": ("200:already_claimed",), "token": ("200",)}
# (scenario, metric, minimum of the median N=2 / N=1 ratio over pairs). `req_per_cpu_s`:
# requests per server CPU second (owner + workers); `rps`: requests per wall second.
TARGETS: tuple[tuple[str, str, float], ...] = (
    ("bloom_negative", "req_per_cpu_s", 0.85),
    ("already_claimed", "req_per_cpu_s", 0.85),
    ("token", "req_per_cpu_s", 0.85),
    ("new_claims", "req_per_cpu_s", 0.8),
    ("bloom_negative", "rps", 1.4),
)
# A new-claims run's lines: this much more than the fastest rate the server has shown (as
# `tests.bench.sizing.per_run`); the unsent ones go back to the server's pool.
PER_RUN_MARGIN = 1.5
BATCHES = "anon_ticket_storage_batch_size"
# A pair ran on a quiet machine when neither of its runs saw more than this many cores' worth
# of other load (the machine's busy time less both servers' and wrk's, over the run).
QUIET = 0.25
CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Plan:
    mode: str
    pairs: int  # repetitions: each scenario runs once on each server per repetition
    seconds: int  # one wrk run
    unclaimed: int  # fresh payment ids in the database (each server claims from its copy)
    claimed: int  # claimed tickets (their legacy tokens serve the token runs)
    negatives: int  # unknown payment ids the Bloom-negative runs cycle through
    warmup_s: int
    # Before each pair, wait up to this long for a quiet machine (`wait_quiet`), and up to
    # `quiet_budget` s over the whole run (a machine busy for minutes is measured as it is).
    quiet_wait: float = 5.0
    quiet_budget: float = 60.0
    connections: int = CONNECTIONS


QUICK = Plan("quick", pairs=1, seconds=2, unclaimed=20_000, claimed=2_000, negatives=2_000,
             warmup_s=1, quiet_wait=3.0, quiet_budget=10.0)
FULL = Plan("full", pairs=5, seconds=5, unclaimed=100_000, claimed=5_000, negatives=5_000,
            warmup_s=2)


# --- pure helpers (tests/test_bench_workers.py) -------------------------------------------------


def stat_cpu_seconds(stat: str) -> float:
    """utime + stime (all threads) from the text of /proc/PID/stat, in seconds. The command
    name (field 2) is in parentheses and may hold spaces or parentheses itself: the fields
    are counted from the last `)`."""
    fields = stat.rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def machine_cpu_seconds(proc_stat: str) -> tuple[float, float]:
    """CPU seconds all cores have spent busy since boot (user, nice, system, irq, softirq;
    guest time is inside user) and stolen (a virtual machine's cores kept waiting while the
    host ran something else), from the aggregate `cpu` line of /proc/stat."""
    for line in proc_stat.splitlines():
        parts = line.split()
        if parts and parts[0] == "cpu":
            values = [int(v) for v in parts[1:]]
            values += [0] * (8 - len(values))
            user, nice, system, _idle, _iowait, irq, softirq, steal = values[:8]
            return (user + nice + system + irq + softirq) / CLK_TCK, steal / CLK_TCK
    raise ValueError("no aggregate cpu line in /proc/stat")


@dataclass(frozen=True)
class CpuDelta:
    """CPU seconds a process tree used between two readings (`tree_cpu`)."""

    seconds: float
    by_pid: dict[int, float]
    started: tuple[int, ...] = ()  # not in the first reading: counted from zero
    lost: tuple[int, ...] = ()  # gone by the second reading: their last interval is missing

    def as_dict(self, owner: int) -> dict[str, Any]:
        return {"seconds": round(self.seconds, 3),
                "owner_s": round(self.by_pid.get(owner, 0.0), 3),
                "children_s": [round(v, 3) for pid, v in sorted(self.by_pid.items())
                               if pid != owner],
                **({"started": list(self.started)} if self.started else {}),
                **({"lost": list(self.lost)} if self.lost else {})}


def cpu_delta(before: Mapping[int, float], after: Mapping[int, float]) -> CpuDelta:
    """What each process of a tree used between two readings (pid -> cumulative CPU seconds),
    summed. A pid only in `after` started meanwhile (a restarted worker): all it used counts.
    A pid only in `before` ended: what it used after the first reading is not known (its
    parent's cutime has it once reaped), so it counts nothing and is reported as `lost`."""
    by_pid = {pid: max(0.0, cpu - before.get(pid, 0.0)) for pid, cpu in after.items()}
    return CpuDelta(sum(by_pid.values()), by_pid,
                    started=tuple(sorted(set(after) - set(before))),
                    lost=tuple(sorted(set(before) - set(after))))


def parse_schedstat(text: str) -> tuple[float, float, int]:
    """/proc/PID/task/TID/schedstat: seconds run on a core, seconds waited in a run queue
    (ready, but the cores were busy), and how many times it was put on a core."""
    run_ns, wait_ns, slices = text.split()[:3]
    return int(run_ns) / 1e9, int(wait_ns) / 1e9, int(slices)


def sched_delta(before: Mapping[int, tuple[float, int]], after: Mapping[int, tuple[float, int]]
                ) -> tuple[float, int]:
    """Run-queue wait (s) and times put on a core, summed over a process tree between two
    readings (pid -> (wait, slices)); a pid that started meanwhile counts from zero, one that
    ended counts nothing (as `cpu_delta`)."""
    wait, slices = 0.0, 0
    for pid, (w, n) in after.items():
        w0, n0 = before.get(pid, (0.0, 0))
        wait += max(0.0, w - w0)
        slices += max(0, n - n0)
    return wait, slices


def paired_ratios(values: Sequence[float | None], against: Sequence[float | None]
                  ) -> list[float]:
    """values[i] / against[i] for every pair measured side by side (a pair with a missing
    value or a missing or zero divisor is left out)."""
    if len(values) != len(against):
        raise ValueError(f"{len(values)} values against {len(against)}")
    return [v / a for v, a in zip(values, against, strict=True) if v is not None and a]


def spread(values: Sequence[float], digits: int = 3) -> dict[str, Any]:
    """Median, lowest, highest and every value (rounded); None figures when there are none."""
    if not values:
        return {"median": None, "min": None, "max": None, "runs": []}
    return {"median": round(statistics.median(values), digits),
            "min": round(min(values), digits), "max": round(max(values), digits),
            "runs": [round(v, digits) for v in values]}


def judge(ratios: Mapping[str, Mapping[str, Mapping[str, Any]]],
          targets: Sequence[tuple[str, str, float]] = TARGETS) -> list[dict[str, Any]]:
    """Each target against the median ratio of its scenario and metric (`ratios[scenario]
    [metric]` as `spread` makes it); `passed` is None when it was not measured."""
    out: list[dict[str, Any]] = []
    for scenario, metric, minimum in targets:
        figure = ratios.get(scenario, {}).get(metric, {})
        median = figure.get("median")
        out.append({"scenario": scenario, "metric": metric, "minimum": minimum,
                    "median": median, "min": figure.get("min"), "max": figure.get("max"),
                    "passed": None if median is None else median >= minimum})
    return out


def noise(other_cpu_s: float, duration_s: float) -> float:
    """Cores' worth of other load on the machine over a run (0.5: half a core was busy with
    something that is neither server nor wrk)."""
    return other_cpu_s / duration_s if duration_s > 0 else 0.0


def quiet_pairs(noise_by_pair: Sequence[tuple[float, float]], limit: float = 0.25
                ) -> list[bool]:
    """Which pairs ran on a quiet machine: both runs with at most `limit` cores of others'
    load."""
    return [max(pair) <= limit for pair in noise_by_pair]


# Layers a profile of the worker path has beyond `profiling.LAYERS` (checked first).
WORKER_LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("link to the owner (link.py, wire.py, msgspec)",
     ("actors/link.py", "anon_ticket/wire.py", "msgspec")),
    ("worker's own reads (reads.py + APSW)", ("anon_ticket/reads.py",)),
    ("owner: fanout + worker actors", ("actors/fanout.py", "actors/worker.py")),
)


def _frame_file(frame: str) -> tuple[str, str]:
    name, _, rest = frame.partition(" (")
    return name, rest.rsplit(":", 1)[0].rstrip(")")


def layer_samples(collapsed: str) -> tuple[Counter[str], int]:
    """Busy samples by layer of their innermost frame (py-spy's collapsed stacks; idle
    threads left out as `profiling.summarise` does), and their total. A stack that passes
    through the worker's own reads counts there, APSW included."""
    out: Counter[str] = Counter()
    total = 0
    for line in collapsed.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = [f for f in stack.split(";") if "(" in f]
        if not frames:
            continue
        name, where = _frame_file(frames[-1])
        if any(name == n and where.endswith(f) for n, f in profiling.IDLE):
            continue
        n = int(count)
        total += n
        files = [_frame_file(f)[1] for f in frames]
        layer = next((label for label, needles in WORKER_LAYERS
                      if any(x in where for x in needles)), None)
        if layer is None and any("anon_ticket/reads.py" in f for f in files):
            layer = WORKER_LAYERS[1][0]
        if layer is None:
            layer = next((label for label, needles in profiling.LAYERS
                          if any(x in where for x in needles)), None)
        if layer is None:
            layer = ("Python stdlib (contextlib, enum, ...)"
                     if "/" not in where or "python3" in where else "other")
        out[layer] += n
    return out, total


def us_per_request(shares: Sequence[tuple[Counter[str], int, float]], requests: int
                   ) -> dict[str, float]:
    """CPU microseconds per request by layer over a process tree: each process's busy samples
    by layer (`layer_samples`) weighted by the CPU seconds it used in the run."""
    out: dict[str, float] = {}
    if requests <= 0:
        return {}
    for samples, total, cpu_s in shares:
        if total <= 0:
            continue
        for layer, n in samples.items():
            out[layer] = out.get(layer, 0.0) + n / total * cpu_s / requests * 1e6
    return {k: round(v, 1) for k, v in sorted(out.items(), key=lambda kv: -kv[1])}


def pair_order(rep: int, scenario_index: int) -> tuple[int, int]:
    """Which server runs first in a pair: swapped from one repetition to the next, and from
    one scenario to the next, so neither always follows the other (or a claims run)."""
    return WORKERS if (rep + scenario_index) % 2 == 0 else (WORKERS[1], WORKERS[0])


def lines_for(rate: float, seconds: float, connections: int,
              margin: float = PER_RUN_MARGIN) -> int:
    """Fresh ids for one run that may go `margin` times faster than `rate` (req/s); at most
    `connections` more are in flight when a timed run ends."""
    return math.ceil(max(0.0, rate) * seconds * margin) + connections + 1


# --- what /proc says ----------------------------------------------------------------------------


def children(pid: int) -> list[int]:
    """`pgrep -P PID`: the process's children (the workers, for an owner)."""
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True,
                         timeout=10)
    return [int(x) for x in out.stdout.split()]


def tree_cpu(owner: int) -> dict[int, float]:
    """Cumulative CPU seconds of the owner and each of its children (pid -> seconds); a
    child that ended between `pgrep` and its reading is left out."""
    out: dict[int, float] = {}
    for pid in (owner, *children(owner)):
        try:
            with open(f"/proc/{pid}/stat") as f:
                out[pid] = stat_cpu_seconds(f.read())
        except (FileNotFoundError, ProcessLookupError):
            continue
    return out


def tree_sched(owner: int) -> dict[int, tuple[float, int]]:
    """Run-queue wait (s) and times put on a core so far, of the owner and each child (all
    their threads)."""
    out: dict[int, tuple[float, int]] = {}
    for pid in (owner, *children(owner)):
        wait, slices = 0.0, 0
        try:
            for tid in os.listdir(f"/proc/{pid}/task"):
                try:
                    with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                        _, w, n = parse_schedstat(f.read())
                except (FileNotFoundError, ProcessLookupError):
                    continue  # the thread ended meanwhile
                wait += w
                slices += n
        except (FileNotFoundError, ProcessLookupError):
            continue
        out[pid] = wait, slices
    return out


def machine_cpu() -> tuple[float, float]:
    """(busy, stolen) CPU seconds of the whole machine so far."""
    with open("/proc/stat") as f:
        return machine_cpu_seconds(f.read())


def wait_quiet(owners: Sequence[int], *, limit: float, max_wait: float,
               window: float = 0.5) -> tuple[float, float]:
    """Wait until the machine runs less than `limit` cores' worth of other load (busy and
    stolen time less the servers' own, over `window` s), at most `max_wait` s; (seconds
    waited, the last window's load)."""
    started = time.monotonic()
    load = 0.0
    while True:
        ours = sum(sum(tree_cpu(pid).values()) for pid in owners)
        busy, steal = machine_cpu()
        time.sleep(window)
        busy2, steal2 = machine_cpu()
        ours = sum(sum(tree_cpu(pid).values()) for pid in owners) - ours
        load = max(0.0, busy2 - busy + steal2 - steal - ours) / window
        waited = time.monotonic() - started
        if load <= limit or waited >= max_wait:
            return waited, load


# --- the servers ----------------------------------------------------------------------------


def _body(pid: bytes) -> str:
    return json.dumps({"pid": pid.hex()}, separators=(",", ":"))


def workers_serving(server: ServerProcess, n: int, timeout: float = 60.0) -> None:
    """Until /healthz has been answered by each of the n workers (each request on a new
    connection: the kernel hands it to whichever worker accepts first)."""
    if n <= 1:
        return
    seen: set[int] = set()
    deadline = time.monotonic() + timeout
    with httpx.Client(base_url=server.url, timeout=5,
                      limits=httpx.Limits(max_keepalive_connections=0)) as client:
        while len(seen) < n:
            if time.monotonic() > deadline:
                raise RuntimeError(f"only workers {sorted(seen)} of {n} answered in {timeout} s")
            try:
                seen.add(int(client.get("/healthz").json().get("worker", 1)))
            except (httpx.TransportError, ValueError):
                pass
            time.sleep(0.01)


@dataclass
class Server:
    workers: int
    proc: ServerProcess
    pool: list[bytes]  # fresh ids not yet sent to this server
    recent: list[bytes] = field(default_factory=list)  # claimed in its last new-claims run
    rate: float = 0.0  # the fastest run it has shown (req/s): new-claims runs are sized by it

    @property
    def pid(self) -> int:
        return self.proc.proc.pid


@dataclass
class Run:
    rep: int
    scenario: str
    workers: int
    first: bool  # the first of its pair
    result: WrkResult
    cpu: CpuDelta
    wall_s: float
    other_server_cpu_s: float
    other_cpu_s: float  # the machine's busy time over the run less both servers' and wrk's
    steal_s: float = 0.0  # time the host kept the machine's cores waiting
    runqueue_wait_s: float = 0.0  # the server's threads ready to run but not running
    timeslices: int = 0  # times the server's threads were put on a core
    batch: dict[str, Any] | None = None
    profile: dict[str, Any] | None = None

    @property
    def noise(self) -> float:
        return noise(self.other_cpu_s + self.steal_s, self.result.duration_s)

    @property
    def req_per_cpu_s(self) -> float | None:
        return self.result.requests / self.cpu.seconds if self.cpu.seconds > 0 else None

    @property
    def wrk_cpu_s(self) -> float:
        return (self.result.generator_cpu or 0.0) * self.wall_s

    def as_dict(self, owner: int) -> dict[str, Any]:
        r = self.result
        completed = sum(r.counts.values())
        good = r.count_of(EXPECTED[self.scenario])
        per_cpu = self.req_per_cpu_s
        return {
            "rep": self.rep, "scenario": self.scenario, "workers": self.workers,
            "first_of_pair": self.first,
            "rps": round(r.rps, 1), "requests": r.requests, "duration_s": round(r.duration_s, 3),
            "server_cpu": self.cpu.as_dict(owner),
            "server_cpu_util": round(self.cpu.seconds / r.duration_s, 3) if r.duration_s else None,
            "req_per_cpu_s": round(per_cpu, 1) if per_cpu else None,
            "cpu_us_per_req": round(1e6 / per_cpu, 1) if per_cpu else None,
            "wrk_cpu": r.generator_cpu, "wrk_cpu_s": round(self.wrk_cpu_s, 3),
            "other_server_cpu_s": round(self.other_server_cpu_s, 3),
            "other_cpu_s": round(self.other_cpu_s, 3), "steal_s": round(self.steal_s, 3),
            "runqueue_wait_s": round(self.runqueue_wait_s, 3), "timeslices": self.timeslices,
            "requests_per_timeslice": round(r.requests / self.timeslices, 2)
            if self.timeslices else None,
            "p50_ms": round(r.p50_ms, 3), "p99_ms": round(r.p99_ms, 3),
            "counts": r.counts, "expected_pct": round(100 * good / completed, 2)
            if completed else None,
            "socket_errors": r.socket_errors, "exhausted": r.exhausted,
            **({"storage_batches": self.batch} if self.batch is not None else {}),
            **({"profile": self.profile} if self.profile is not None else {}),
        }


class Bench:
    def __init__(self, plan: Plan, work: Path, log: Log) -> None:
        self.plan = plan
        self.work = work
        self.log = log
        self.script = wrk.write_script(work)
        self.servers: dict[int, Server] = {}
        self.runs: list[Run] = []
        self.profiled: list[Run] = []  # runs under py-spy (`profile`): in no ratio
        self.gates: list[dict[str, Any]] = []  # each pair's wait for a quiet machine
        self._files = 0
        self._requests: tuple[Path, Path] | None = None  # Bloom negatives, tokens
        self.meta: dict[str, Any] = {}

    def _file(self, lines: list[str]) -> Path:
        self._files += 1
        return wrk.write_lines(self.work / f"lines-{self._files}.txt", lines)

    def prepare(self) -> tuple[data.LegacySet, Path]:
        p = self.plan
        self.log(f"preparing: legacy database with {p.unclaimed} unclaimed + {p.claimed} "
                 "claimed payments")
        legacy = data.write_legacy(self.work / "legacy.db", p.unclaimed, p.claimed)
        base = self.work / "base"
        imported = data.import_legacy(base, legacy)
        self.log(f"  db import-legacy: {imported.rows} rows in {imported.seconds:.1f} s")
        self.meta["prepared"] = {"unclaimed": p.unclaimed, "claimed": p.claimed,
                                 "loaded_by": "anon-ticket db import-legacy",
                                 "import_seconds": round(imported.seconds, 2)}
        return legacy, base

    def start(self, legacy: data.LegacySet, base: Path) -> None:
        """Both servers, one after the other (each on its own copy of `base`), each ready
        with all its workers answering, its poller paused, warmed up."""
        fresh = [row[0] for row in legacy.unclaimed]
        started: dict[str, Any] = {}
        for n in WORKERS:
            proc = procs.spawn_server(data.copy_data_dir(base, self.work / f"workers-{n}"),
                                      cpus=None, log_dir=self.work,
                                      extra=("--workers", str(n)))
            server = Server(n, proc, list(fresh))
            self.servers[n] = server
            proc.wait_ready(120, interval=0.01)
            workers_serving(proc, n)
            procs.poller(proc, "pause")
            kids = children(server.pid)
            if len(kids) != (0 if n == 1 else n):
                raise RuntimeError(f"--workers {n}: the owner has children {kids}")
            started[str(n)] = {"ready_s": round(proc.ready_s or 0.0, 2),
                               "processes": 1 + len(kids), "log": str(proc.log_path)}
            self.log(f"server --workers {n} ready in {proc.ready_s:.2f} s "
                     f"({1 + len(kids)} processes)")
        self.meta["servers"] = started
        warm = self._file([_body(b) for b in data.unknown_pids(2000)])
        for server in self.servers.values():
            wrk.run_wrk(server.proc.url, script=self.script, method="POST", path=REDEEM,
                        lines_file=warm, connections=16, duration_s=self.plan.warmup_s)

    def stop(self) -> None:
        for server in self.servers.values():
            server.proc.stop()

    def _lines(self, server: Server, scenario: str, negatives: Path, tokens: Path
               ) -> tuple[str, str, Path, list[bytes]]:
        """Method, path, request lines of one run, and the fresh ids it took (new claims)."""
        if scenario == "bloom_negative":
            return "POST", REDEEM, negatives, []
        if scenario == "token":
            return "GET", "", tokens, []
        if scenario == "already_claimed":
            if not server.recent:
                raise RuntimeError(f"--workers {server.workers}: nothing claimed to ask again")
            return "POST", REDEEM, self._file([_body(b) for b in server.recent]), []
        want = lines_for(server.rate, self.plan.seconds, self.plan.connections)
        take = server.pool[:want]
        del server.pool[:len(take)]
        if len(take) < want:
            self.log(f"  warning: --workers {server.workers}: {len(take)} fresh ids left for "
                     f"{want} wanted (the run stops when they run out)")
        return "POST", REDEEM, self._file([_body(b) for b in take]), take

    def _drive(self, rep: int, scenario: str, server: Server, first: bool,
               negatives: Path, tokens: Path, spy: Path | None = None) -> Run:
        """One wrk run on `server`, its CPU over the run; `spy`: py-spy samples every
        process of its tree meanwhile (collapsed stacks into that directory)."""
        other = next(s for s in self.servers.values() if s is not server)
        method, path, lines, take = self._lines(server, scenario, negatives, tokens)
        once = scenario == "new_claims"
        metrics_before = procs.read_metrics(server.proc) if once else ""
        spies: dict[int, tuple[Path, subprocess.Popen[bytes]]] = {}
        if spy is not None:
            for pid in (server.pid, *children(server.pid)):
                out = spy / f"{scenario}-workers{server.workers}-{pid}.collapsed.txt"
                spies[pid] = out, profiling.record(pid, out,
                                                   seconds=max(1, self.plan.seconds - 1))
        other_before = tree_cpu(other.pid)
        busy_before, steal_before = machine_cpu()
        sched_before = tree_sched(server.pid)
        before = tree_cpu(server.pid)
        started = time.perf_counter()
        result = wrk.run_wrk(server.proc.url, script=self.script, method=method, path=path,
                             lines_file=lines, connections=self.plan.connections,
                             duration_s=self.plan.seconds, once=once)
        wall = time.perf_counter() - started
        cpu = cpu_delta(before, tree_cpu(server.pid))
        wait, slices = sched_delta(sched_before, tree_sched(server.pid))
        busy_after, steal_after = machine_cpu()
        busy, steal = busy_after - busy_before, steal_after - steal_before
        other_cpu = cpu_delta(other_before, tree_cpu(other.pid)).seconds
        run = Run(rep, scenario, server.workers, first, result, cpu, wall, other_cpu, 0.0)
        run.other_cpu_s = max(0.0, busy - cpu.seconds - other_cpu - run.wrk_cpu_s)
        run.steal_s = steal
        run.runqueue_wait_s, run.timeslices = wait, slices
        if spies:
            run.profile = self._profiled(server, run, spies)
        if scenario in ("bloom_negative", "new_claims"):
            server.rate = max(server.rate, result.rps)
        if once:
            sent, unsent = wrk.split_sent(take, result)
            server.pool[:0] = unsent
            # certainly claimed by now: the last `connections` sent may have been cut off
            done = max(0, result.count_of(EXPECTED["new_claims"]) - self.plan.connections)
            server.recent = sent[:max(done, 1)]
            after = procs.read_metrics(server.proc)
            run.batch = procs.bucket_distribution(procs.histogram_delta(
                procs.histogram(metrics_before, BATCHES), procs.histogram(after, BATCHES)))
            if result.exhausted:
                self.log(f"  warning: {scenario} --workers {server.workers} ran out of ids "
                         f"after {result.duration_s:.2f} s")
        completed = sum(result.counts.values())
        good = result.count_of(EXPECTED[scenario])
        if completed and good < 0.99 * completed:
            self.log(f"  warning: {scenario} --workers {server.workers}: {result.counts}")
        per_cpu = run.req_per_cpu_s
        what = f"rep {rep + 1}" if rep >= 0 else "profile"
        self.log(f"  {what} {scenario:<16} --workers {server.workers}: "
                 f"{result.rps:7.0f} req/s  {per_cpu or 0:7.0f} req/CPU-s  server cpu "
                 f"{cpu.seconds / result.duration_s if result.duration_s else 0:4.2f}  "
                 f"wrk {result.generator_cpu or 0:4.2f}  others {run.noise:4.2f} cores  "
                 f"p99 {result.p99_ms:6.1f} ms")
        return run

    def _profiled(self, server: Server, run: Run,
                  spies: dict[int, tuple[Path, subprocess.Popen[bytes]]]) -> dict[str, Any]:
        shares: list[tuple[Counter[str], int, float]] = []
        by_process: dict[str, Any] = {}
        for pid, (out, proc) in spies.items():
            _, err = proc.communicate(timeout=60)
            role = "owner" if pid == server.pid else f"child {pid}"
            if proc.returncode != 0 or not out.exists():
                by_process[role] = {"error": err.decode(errors="replace")[-300:]}
                continue
            samples, total = layer_samples(out.read_text())
            cpu_s = run.cpu.by_pid.get(pid, 0.0)
            shares.append((samples, total, cpu_s))
            by_process[role] = {
                "file": str(out), "cpu_s": round(cpu_s, 3), "busy_samples": total,
                "us_per_request": us_per_request([(samples, total, cpu_s)],
                                                 run.result.requests),
                "top_self_frames": profiling.summarise(out.read_text(), top=8)[
                    "top_self_frames"]}
        return {"us_per_request": us_per_request(shares, run.result.requests),
                "by_process": by_process}

    def profile(self, directory: Path, legacy: data.LegacySet) -> None:
        """One more run of each scenario on each server with py-spy on every process of its
        tree; CPU per request split by layer (each process's samples weighted by its CPU
        over the run). Sampling slows the server: these runs count in no ratio."""
        directory.mkdir(parents=True, exist_ok=True)
        negatives, tokens = self._request_files(legacy)
        for i, scenario in enumerate(SCENARIOS):
            for k, n in enumerate(pair_order(0, i)):
                run = self._drive(-1, scenario, self.servers[n], k == 0, negatives, tokens,
                                  spy=directory)
                self.profiled.append(run)
                layers = (run.profile or {}).get("us_per_request", {})
                self.log("    " + ", ".join(f"{k} {v:.0f}" for k, v in list(
                    layers.items())[:6]) + " (us a request)")

    def _request_files(self, legacy: data.LegacySet) -> tuple[Path, Path]:
        if self._requests is None:
            negatives = self._file([_body(b) for b in data.unknown_pids(self.plan.negatives)])
            tokens = self._file([f"/api/v1/token/{data.legacy_token(row).hex()}"
                                 for row in legacy.claimed])
            self._requests = negatives, tokens
        return self._requests

    def measure(self, legacy: data.LegacySet) -> None:
        p = self.plan
        negatives, tokens = self._request_files(legacy)
        for rep in range(p.pairs):
            self.log(f"repetition {rep + 1}/{p.pairs} (load average "
                     f"{', '.join(f'{x:.2f}' for x in os.getloadavg())})")
            for i, scenario in enumerate(SCENARIOS):
                budget = max(0.0, p.quiet_budget - sum(g["waited_s"] for g in self.gates))
                waited, load = wait_quiet([s.pid for s in self.servers.values()], limit=QUIET,
                                          max_wait=min(p.quiet_wait, budget))
                self.gates.append({"rep": rep, "scenario": scenario,
                                   "waited_s": round(waited, 2), "load": round(load, 2)})
                if load > QUIET:
                    self.log(f"  (the machine runs {load:.2f} cores of other load: waited "
                             f"{waited:.1f} s, measuring anyway)")
                for k, n in enumerate(pair_order(rep, i)):
                    self.runs.append(self._drive(rep, scenario, self.servers[n], k == 0,
                                                 negatives, tokens))

    def summary(self) -> dict[str, Any]:
        base, scaled = WORKERS
        scenarios: dict[str, Any] = {}
        ratios: dict[str, dict[str, dict[str, Any]]] = {}
        for scenario in SCENARIOS:
            by_n = {n: sorted((r for r in self.runs if r.scenario == scenario
                               and r.workers == n), key=lambda r: r.rep) for n in WORKERS}
            cell: dict[str, Any] = {}
            for n, runs in by_n.items():
                cell[f"workers_{n}"] = {
                    "rps": spread([r.result.rps for r in runs], 1),
                    "req_per_cpu_s": spread([x for r in runs if (x := r.req_per_cpu_s)], 1),
                    "server_cpu_util": spread([r.cpu.seconds / r.result.duration_s
                                               for r in runs if r.result.duration_s]),
                    "wrk_cpu": spread([r.result.generator_cpu or 0.0 for r in runs]),
                    "other_cpu_s": spread([r.other_cpu_s for r in runs]),
                    "steal_s": spread([r.steal_s for r in runs]),
                    "runqueue_wait_s": spread([r.runqueue_wait_s for r in runs]),
                    "requests_per_timeslice": spread([r.result.requests / r.timeslices
                                                      for r in runs if r.timeslices], 2),
                    "p99_ms": spread([r.result.p99_ms for r in runs]),
                    **({"mean_batch": spread([b["mean_batch"] for r in runs if r.batch
                                              and (b := r.batch)["mean_batch"] is not None],
                                             2)} if scenario == "new_claims" else {}),
                }
            ratios[scenario] = {
                "rps": spread(paired_ratios([r.result.rps for r in by_n[scaled]],
                                            [r.result.rps for r in by_n[base]])),
                "req_per_cpu_s": spread(paired_ratios(
                    [r.req_per_cpu_s for r in by_n[scaled]],
                    [r.req_per_cpu_s for r in by_n[base]])),
            }
            cell["ratios"] = ratios[scenario]
            # the same over the pairs that ran on a quiet machine (informational)
            quiet = quiet_pairs([(a.noise, b.noise) for a, b in zip(
                by_n[scaled], by_n[base], strict=True)], QUIET)
            pairs = [(a, b) for (a, b), q in zip(zip(by_n[scaled], by_n[base], strict=True),
                                                 quiet, strict=True) if q]
            cell["noise_by_pair"] = [round(max(a.noise, b.noise), 2)
                                     for a, b in zip(by_n[scaled], by_n[base], strict=True)]
            cell["quiet_ratios"] = {
                "pairs": len(pairs),
                "rps": spread(paired_ratios([a.result.rps for a, _ in pairs],
                                            [b.result.rps for _, b in pairs])),
                "req_per_cpu_s": spread(paired_ratios([a.req_per_cpu_s for a, _ in pairs],
                                                      [b.req_per_cpu_s for _, b in pairs]))}
            scenarios[scenario] = cell
        return {"scenarios": scenarios, "targets": judge(ratios),
                "quiet_gates": self.gates,
                "waited_for_quiet_s": round(sum(g["waited_s"] for g in self.gates), 1)}


def render(report: dict[str, Any]) -> str:
    """A short table: medians, the N=2 / N=1 ratios (median, pairs' range), targets."""
    def rng(s: dict[str, Any]) -> str:
        return "-" if s["median"] is None else f"{s['median']:.2f} ({s['min']:.2f}-{s['max']:.2f})"

    meta = report["meta"]
    lines = [f"worker scaling ({meta['mode']}: {meta['pairs']} pair(s) of {meta['seconds']} s "
             f"runs a scenario, {meta['connections']} connections, nothing pinned; "
             f"{meta['elapsed_s']:.0f} s)",
             f"{'scenario':<16} {'N=1 req/s':>9} {'N=2 req/s':>9} {'x req/s':>17} "
             f"{'N=1 req/CPU-s':>13} {'N=2 req/CPU-s':>13} {'x req/CPU-s':>17} "
             f"{'wrk cpu N1/N2':>13}"]
    for name, cell in report["scenarios"].items():
        one, two = cell["workers_1"], cell["workers_2"]
        lines.append(
            f"{name:<16} {one['rps']['median'] or 0:>9.0f} {two['rps']['median'] or 0:>9.0f} "
            f"{rng(cell['ratios']['rps']):>17} {one['req_per_cpu_s']['median'] or 0:>13.0f} "
            f"{two['req_per_cpu_s']['median'] or 0:>13.0f} "
            f"{rng(cell['ratios']['req_per_cpu_s']):>17} "
            f"{one['wrk_cpu']['median'] or 0:>6.2f}/{two['wrk_cpu']['median'] or 0:<6.2f}")
    lines.append(f"other load on the machine (cores, the larger of a pair's two runs; quiet: "
                 f"<= {QUIET}), and the ratios over the quiet pairs alone:")
    for name, cell in report["scenarios"].items():
        q = cell["quiet_ratios"]
        lines.append(f"  {name:<16} {' '.join(f'{x:.2f}' for x in cell['noise_by_pair'])}: "
                     f"{q['pairs']} quiet, x req/s {rng(q['rps'])}, "
                     f"x req/CPU-s {rng(q['req_per_cpu_s'])}")
    lines.append("targets (median of the pairs' N=2 / N=1 ratios):")
    for t in report["targets"]:
        verdict = {True: "met", False: "NOT MET", None: "not measured"}[t["passed"]]
        lines.append(f"  {t['scenario']:<16} {t['metric']:<14} >= {t['minimum']:.2f}: "
                     f"{t['median'] if t['median'] is not None else '-'}: {verdict}")
    return "\n".join(lines)


def run(plan: Plan, out: Path | None, *, keep: bool = False, profile: Path | None = None,
        log: Log | None = None) -> dict[str, Any]:
    say: Log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    work = Path(tempfile.mkdtemp(prefix="anon-ticket-workers-"))
    started = time.perf_counter()
    bench = Bench(plan, work, say)
    meta: dict[str, Any] = {
        "mode": plan.mode, "pairs": plan.pairs, "seconds": plan.seconds,
        "connections": plan.connections, "workers": list(WORKERS),
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "cpus": len(os.sched_getaffinity(0)), "loadavg_start": list(os.getloadavg()),
        "python": platform.python_version(), "wrk": wrk.wrk_version(),
        "pinning": "none: both servers (owner and workers) and wrk run on every core",
        "order": "per repetition: " + ", ".join(SCENARIOS) + "; each scenario on both "
                 "servers back to back, which runs first swapped every repetition and scenario",
        "notes": [
            "req_per_cpu_s: completed requests / the server's CPU seconds (utime + stime of "
            "the owner and every child of it, /proc/PID/stat before and after the wrk run)",
            "ratios: N=2 / N=1 within each pair; median, min and max over the pairs",
            "wrk_cpu: wrk's CPU time / its wall time (1.0 = a core); other_server_cpu_s: "
            "the idle server's CPU during the run; other_cpu_s: the machine's busy time over "
            "the run less both servers' and wrk's (other load on a shared machine); steal_s: "
            "time the host kept the machine's cores waiting (/proc/stat steal)",
            "runqueue_wait_s: time the server's threads (owner and workers) were ready to run "
            "but waited for a core; timeslices: how many times they were put on one "
            "(/proc/PID/task/*/schedstat); requests_per_timeslice: requests served a "
            "scheduling, how much each wake-up of the event loops does",
            "new_claims: fresh ids, each sent once, as many as 1.5x the fastest rate the "
            "server has shown (unsent ones go back); already_claimed: the ids the same server "
            "claimed in its run just before (every filter's positive cache answers them)",
            f"quiet_ratios: the same ratios over the pairs neither of whose runs saw more than "
            f"{QUIET} cores of other load or steal (noise_by_pair: the larger of the two, per "
            f"pair); quiet_gates: before each pair the run waited (up to {plan.quiet_wait} s "
            f"a pair, {plan.quiet_budget} s in all) for a half second with at most {QUIET} "
            "cores of other load",
        ],
    }
    bench.meta = meta
    try:
        legacy, base = bench.prepare()
        bench.start(legacy, base)
        bench.measure(legacy)
        results = bench.summary()
        if profile is not None:
            if profiling.py_spy() is None:
                results["profile"] = {"status": "not run: py-spy is not installed"}
            else:
                say(f"profiling (py-spy on every process of each server) into {profile}")
                bench.profile(profile, legacy)
                results["profile"] = {
                    "tool": "py-spy record --function, 250 Hz, each process of the tree; "
                            "us_per_request: each process's busy samples by layer x its CPU "
                            "over the run / the run's requests, summed over the tree",
                    "runs": [r.as_dict(bench.servers[r.workers].pid) for r in bench.profiled]}
    finally:
        bench.stop()
        if keep:
            say(f"work directory kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    meta["loadavg_end"] = list(os.getloadavg())
    meta["elapsed_s"] = round(time.perf_counter() - started, 1)
    owners = {n: s.pid for n, s in bench.servers.items()}
    report = {"meta": meta, **results,
              "runs": [r.as_dict(owners[r.workers]) for r in bench.runs]}
    if out is not None:
        out.write_text(json.dumps(report, indent=2) + "\n")
    return report


def main(argv: Sequence[str] | None = None) -> int:
    p = cli.parser("python -m tests.bench.workers",
                   "--workers 2 against --workers 1, side by side", QUICK, "pair")
    p.add_argument("--profile", metavar="DIR",
                   help="then one more run of each scenario on each server under py-spy "
                        "(if installed), every process sampled; stacks go to DIR")
    return cli.main(argv, p, lambda args, out: run(
        cli.plan_from(args, QUICK, FULL, "unclaimed"), out, keep=args.keep,
        profile=Path(args.profile) if args.profile else None), render)


if __name__ == "__main__":
    sys.exit(main())
