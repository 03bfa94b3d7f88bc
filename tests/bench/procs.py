"""Child processes of the benchmark and what it reads of them.

The server is the test suite's (`tests.process.proc.start_server`): `python -m anon_ticket
... serve` started as an operator starts it, settings as flags, the wallet's URL through
`MONERO_RPC_URL`. Beside it: the ceiling apps (`tests.bench.apps`), the fake wallet
(`tests.bench.wallet`) and the websocket load (`tests.bench.watchload`). The benchmark reads
the server only from outside: its CPU time and memory in /proc, its /metrics and
/admin/status over the internal socket, and its log.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import httpx

from tests.harness import free_port
from tests.process.proc import ServerProcess, child_setup, start_server

CLK_TCK = os.sysconf("SC_CLK_TCK")
# The server's settings the benchmark depends on (the fake wallet places transfers by them).
MIN_CONFIRMATIONS = 10


@dataclass(frozen=True)
class Pinning:
    """Which cores the servers and the load generator run on (None: not pinned)."""

    server: set[int] | None
    generator: set[int] | None
    note: str

    @classmethod
    def detect(cls) -> Pinning:
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) >= 2:
            return cls({cpus[0]}, {cpus[1]},
                       f"server on cpu {cpus[0]}, load generator on cpu {cpus[1]}")
        return cls(None, None, f"only {len(cpus)} cpu available: server and load generator "
                               "share it (figures are lower bounds)")

    def as_dict(self) -> dict[str, object]:
        return {"server_cpus": sorted(self.server) if self.server else None,
                "generator_cpus": sorted(self.generator) if self.generator else None,
                "note": self.note}


# --- what /proc says of a process --------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User + system CPU time the process has used so far (all its threads)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS (now) and VmHWM (peak) of the process, in KiB."""
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0])
    return out


def pin_threads(pid: int, cpus: set[int] | None) -> None:
    """Move every thread of the process to `cpus` (a child started unpinned, to start beside
    others on every core, is pinned before it is measured)."""
    if not cpus:
        return
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            os.sched_setaffinity(int(tid), cpus)
        except ProcessLookupError:
            pass  # the thread ended meanwhile


# --- the server --------------------------------------------------------------------------------


def spawn_server(data_dir: Path, *, cpus: set[int] | None, log_dir: Path,
                 wallet_url: str | None = None, bloom_entries: int = 1_000_000,
                 fp_rate: float = 1e-6, extra: Sequence[str] = ()) -> ServerProcess:
    """The real `anon-ticket serve`, started (not yet ready). Without `wallet_url` nothing
    listens at the wallet's URL (the poller reports `degraded`; recorded payments redeem).

    Answers about unknown ids are never held back (`--unknown-rate-per-sec 0`): the
    benchmark measures what the Bloom-negative path and a subscribe cost, not the hold that
    slows a spray of them (tests/adversary/overload.py measures that).

    One process (`--workers 1`, the single process with no worker processes): the benchmark
    pins the server to one core, beside the ceilings, and reads its CPU time and /metrics;
    worker processes (the default is one per core) would spread over the load generator's
    core, their CPU would not be the process's, and the ratios would no longer compare code
    on one core."""
    return start_server(
        data_dir, env={"MONERO_RPC_URL": wallet_url} if wallet_url else None, wait=False,
        log_dir=log_dir, cpus=cpus,
        args=("--pid-bloom-entries", str(bloom_entries), "--pid-bloom-fp-rate", repr(fp_rate),
              "--min-confirmations", str(MIN_CONFIRMATIONS), "--unknown-rate-per-sec", "0",
              "--workers", "1", *extra))


def internal(server: ServerProcess, method: str, path: str) -> httpx.Response:
    """One request over the server's internal socket (raises on an error status)."""
    with server.internal() as client:
        resp = client.request(method, path)
    resp.raise_for_status()
    return resp


def read_metrics(server: ServerProcess) -> str:
    return internal(server, "GET", "/metrics").text


def status(server: ServerProcess) -> dict[str, Any]:
    data: dict[str, Any] = internal(server, "GET", "/admin/status").json()
    return data


def poller(server: ServerProcess, action: str) -> None:
    """`ctl poller pause|resume` over the internal socket."""
    internal(server, "POST", f"/admin/poller/{action}")


# --- the ceiling apps --------------------------------------------------------------------------


@dataclass
class Ceiling:
    """A ceiling app (`python -m tests.bench.apps KIND HOST:PORT`); ready once it answers."""

    kind: str
    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path
    spawned_at: float
    ready_s: float | None = None
    _log_file: IO[bytes] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]

    def wait_ready(self, timeout: float = 30, interval: float = 0.01) -> None:
        deadline = time.monotonic() + timeout
        with httpx.Client(timeout=1.0) as client:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"ceiling {self.kind} exited {self.proc.returncode}:\n"
                                       f"{self.log()}")
                try:
                    client.get(self.url)
                except httpx.TransportError:
                    time.sleep(interval)
                    continue
                self.ready_s = time.monotonic() - self.spawned_at
                return
        raise RuntimeError(f"ceiling {self.kind} not ready after {timeout:.0f} s:\n{self.log()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._log_file is not None:
            self._log_file.close()


def spawn_ceiling(kind: str, *, cpus: set[int] | None, log_path: Path) -> Ceiling:
    """A ceiling app on a free loopback port, started (not yet ready)."""
    port = free_port()
    log = open(log_path, "wb")
    spawned = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.bench.apps", kind, f"127.0.0.1:{port}"],
        stdout=log, stderr=subprocess.STDOUT, preexec_fn=child_setup(cpus))
    return Ceiling(kind, proc, port, log_path, spawned, _log_file=log)


def ready(children: Sequence[ServerProcess | Ceiling], *, cpus: set[int] | None,
          timeout: float = 120.0) -> None:
    """Wait until every child is ready (/healthz 200 for the server, any answer for a ceiling),
    then pin all their threads to `cpus`; on failure stop them all."""
    try:
        for child in children:
            if isinstance(child, ServerProcess):
                child.wait_ready(timeout, interval=0.01)
            else:
                child.wait_ready(timeout)
            pin_threads(child.proc.pid, cpus)
    except BaseException:
        for child in children:
            child.stop()
        raise


# --- line-driven helper processes (the fake wallet, the websocket load) -------------------------


class LineProcess:
    """A child that answers commands on stdin with JSON lines on stdout."""

    def __init__(self, what: str, cmd: Sequence[str], *, cpus: set[int] | None,
                 ready_timeout: float = 120.0) -> None:
        self.what = what
        self.proc = subprocess.Popen(list(cmd), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     preexec_fn=child_setup(cpus))
        try:
            self.ready = self._line("ready", ready_timeout)
        except BaseException:
            self.proc.kill()
            self.proc.wait()
            raise

    def _line(self, key: str, timeout: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.proc.stdout], [], [], left)[0]:
                raise TimeoutError(f"{self.what}: no {key!r} within {timeout} s")
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"{self.what} exited (status {self.proc.wait()}) "
                                   f"before {key!r}")
            obj: dict[str, Any] = json.loads(line)
            if key in obj:
                return obj

    def command(self, command: str, key: str, timeout: float = 30.0) -> Any:
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"{command}\n".encode())
        self.proc.stdin.flush()
        return self._line(key, timeout)[key]

    def quit(self, key: str, timeout: float = 30.0) -> dict[str, Any]:
        try:
            assert self.proc.stdin is not None
            self.proc.stdin.write(b"quit\n")
            self.proc.stdin.close()
            return self._line(key, timeout)
        finally:
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class WatchLoad(LineProcess):
    """The websocket load process (`tests.bench.watchload`)."""

    def quit_load(self, timeout: float = 30.0) -> dict[str, Any]:
        return self.quit("idle_closed_by_server", timeout)


def start_watchload(url: str, idle: int, fanout: Path, *, cpus: set[int] | None,
                    ready_timeout: float = 120.0) -> WatchLoad:
    return WatchLoad("websocket load", [
        sys.executable, "-m", "tests.bench.watchload", url, "--idle", str(idle),
        "--fanout", str(fanout)], cpus=cpus, ready_timeout=ready_timeout)


class Wallet(LineProcess):
    """The fake wallet-rpc (`tests.bench.wallet`)."""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.ready['ready']}/json_rpc"

    def stop(self) -> None:
        self.quit("bye", 10)


def start_wallet(*, height: int, cpus: set[int] | None) -> Wallet:
    return Wallet("fake wallet", [sys.executable, "-m", "tests.bench.wallet", "--height",
                                  str(height), "--confirmations", str(MIN_CONFIRMATIONS)],
                  cpus=cpus)


# --- the server's metrics (Prometheus text from /metrics) --------------------------------------


def histogram(text: str, name: str) -> dict[str, float]:
    """Cumulative buckets of a Prometheus histogram (`le` → count), plus `_count`/`_sum`: the
    process's own series only (a server with worker processes adds each worker's, labelled
    `worker`, after its own)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(f'{name}_bucket{{le="') and line.count("=") == 1:
            le = line.split('le="', 1)[1].split('"', 1)[0]
            out[le] = float(line.rsplit(" ", 1)[1])
        elif line.startswith(f"{name}_count "):
            out["_count"] = float(line.rsplit(" ", 1)[1])
        elif line.startswith(f"{name}_sum "):
            out["_sum"] = float(line.rsplit(" ", 1)[1])
    return out


def counter_total(text: str, name: str) -> float:
    """The sum of a Prometheus counter (or gauge) over all its label values (0 when absent)."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(f"{name}{{") or line.startswith(f"{name} "):
            total += float(line.rsplit(" ", 1)[1])
    return total


def counter_by_label(text: str, name: str) -> dict[str, float]:
    """A one-label Prometheus counter's values by label value (`name{k="v"} 3.0` → v: 3)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(f"{name}{{"):
            label = line.split('"', 2)[1]
            out[label] = out.get(label, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


def histogram_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: after[k] - before.get(k, 0.0) for k in after}


def bucket_distribution(cumulative: dict[str, float]) -> dict[str, object]:
    """Per-bucket counts (`<=1`, `2`, `3-4`, ...) and the mean from cumulative buckets."""
    bounds = sorted((float(k), v) for k, v in cumulative.items()
                    if not k.startswith("_") and k != "+Inf")
    dist: dict[str, int] = {}
    prev_bound, prev_count = 0.0, 0.0
    for bound, count in bounds:
        n = round(count - prev_count)
        low = int(prev_bound) + 1
        label = f"{int(bound)}" if low >= int(bound) else f"{low}-{int(bound)}"
        dist[label] = n
        prev_bound, prev_count = bound, count
    total = cumulative.get("_count", 0.0)
    over = round(cumulative.get("+Inf", total) - prev_count)
    if over:
        dist[f">{int(prev_bound)}"] = over
    mean = cumulative.get("_sum", 0.0) / total if total else None
    return {"batches": int(total), "requests": int(cumulative.get("_sum", 0.0)),
            "mean_batch": round(mean, 2) if mean is not None else None, "buckets": dist}
