"""Child processes of the benchmark: the real server and the ceiling apps, pinned to cores.

The server is started exactly as an operator starts it (`python -m anon_ticket ... serve`,
settings as global flags, the chain setting through `MONERO_RPC_URL`). Nothing listens at the
wallet URL used here, so the poller reports `degraded` and redemption of recorded payments
works, as it does during a wallet outage.
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import httpx

UNUSED_WALLET = "http://127.0.0.1:9/json_rpc"
CLK_TCK = os.sysconf("SC_CLK_TCK")


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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pin(cpus: set[int] | None) -> Callable[[], None] | None:
    if not cpus:
        return None

    def pin() -> None:
        os.sched_setaffinity(0, cpus)

    return pin


@dataclass
class Child:
    name: str
    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path
    spawned_at: float
    # Ready once `ready_path` answers: 200 only (the server's /healthz), or anything (a
    # ceiling app, which serves one route).
    ready_path: str = "/"
    ready_any_status: bool = True
    ready_s: float | None = None
    data_dir: Path | None = None
    _log_file: IO[bytes] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def memory_kib(self) -> dict[str, int]:
        """VmRSS (now) and VmHWM (peak) of the process, in KiB."""
        out: dict[str, int] = {}
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    out[key] = int(value.split()[0])
        return out

    def cpu_seconds(self) -> float:
        """User + system CPU time the process has used so far."""
        with open(f"/proc/{self.pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK

    def wait_ready(self, *, timeout: float) -> float:
        """Poll `ready_path` until it answers as it should; seconds since the process was
        spawned."""
        path, any_status = self.ready_path, self.ready_any_status
        deadline = time.perf_counter() + timeout
        with httpx.Client(timeout=1.0) as client:
            while time.perf_counter() < deadline:
                if not self.alive():
                    raise RuntimeError(f"{self.name} exited {self.proc.returncode} before it "
                                       f"was ready:\n{self.log_tail()}")
                try:
                    status = client.get(f"{self.url}{path}").status_code
                except httpx.TransportError:
                    status = None
                if status is not None and (any_status or status == 200):
                    self.ready_s = time.perf_counter() - self.spawned_at
                    return self.ready_s
                time.sleep(0.01)
        raise RuntimeError(f"{self.name} not ready after {timeout:.0f} s:\n{self.log_tail()}")

    def pin(self, cpus: set[int] | None) -> None:
        """Move every thread of the process to `cpus` (a child started unpinned, to start
        beside others on every core, is pinned before it is measured)."""
        if not cpus:
            return
        for tid in os.listdir(f"/proc/{self.pid}/task"):
            try:
                os.sched_setaffinity(int(tid), cpus)
            except ProcessLookupError:
                pass  # the thread ended meanwhile

    def stop(self, timeout: float = 20.0) -> int | None:
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._log_file is not None:
            self._log_file.close()
        return self.proc.returncode


def spawn(name: str, cmd: Sequence[str], *, port: int, log_path: Path,
          cpus: set[int] | None, env: dict[str, str] | None = None,
          data_dir: Path | None = None, ready_path: str = "/",
          ready_any_status: bool = True) -> Child:
    log = open(log_path, "wb")
    spawned = time.perf_counter()
    proc = subprocess.Popen(list(cmd), stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, **(env or {})}, preexec_fn=_pin(cpus))
    return Child(name, proc, port, log_path, spawned, ready_path=ready_path,
                 ready_any_status=ready_any_status, data_dir=data_dir, _log_file=log)


def spawn_server(data_dir: Path, *, cpus: set[int] | None, log_path: Path,
                 bloom_entries: int = 1_000_000, fp_rate: float = 1e-6,
                 extra: Sequence[str] = ()) -> Child:
    """The real `anon-ticket serve` on a free loopback port, started (not yet ready)."""
    port = free_port()
    cmd = [sys.executable, "-m", "anon_ticket", "--data-dir", str(data_dir),
           "--bind-address", f"127.0.0.1:{port}",
           "--pid-bloom-entries", str(bloom_entries), "--pid-bloom-fp-rate", repr(fp_rate),
           *extra, "serve"]
    return spawn("anon-ticket", cmd, port=port, log_path=log_path, cpus=cpus,
                 env={"MONERO_RPC_URL": UNUSED_WALLET}, data_dir=data_dir,
                 ready_path="/healthz", ready_any_status=False)


def spawn_ceiling(kind: str, *, cpus: set[int] | None, log_path: Path) -> Child:
    """A ceiling app (`anon_ticket.bench.apps`) on a free loopback port, started."""
    port = free_port()
    cmd = [sys.executable, "-m", "anon_ticket.bench.apps", kind, f"127.0.0.1:{port}"]
    return spawn(f"ceiling-{kind}", cmd, port=port, log_path=log_path, cpus=cpus)


def ready(children: Sequence[Child], *, cpus: set[int] | None,
          timeout: float = 120.0) -> None:
    """Wait until every child is ready, then pin them all to `cpus`; on failure stop them
    all."""
    try:
        for child in children:
            child.wait_ready(timeout=timeout)
            child.pin(cpus)
    except BaseException:
        for child in children:
            child.stop()
        raise


def start_server(data_dir: Path, *, cpus: set[int] | None, log_path: Path,
                 bloom_entries: int = 1_000_000, fp_rate: float = 1e-6,
                 extra: Sequence[str] = (), ready_timeout: float = 120.0) -> Child:
    """The real `anon-ticket serve`, started pinned to `cpus` and ready (`/healthz` 200):
    its time to ready is the operator's."""
    child = spawn_server(data_dir, cpus=cpus, log_path=log_path, bloom_entries=bloom_entries,
                         fp_rate=fp_rate, extra=extra)
    ready([child], cpus=None, timeout=ready_timeout)
    return child


class WatchLoad:
    """The websocket load process (`anon_ticket.bench.watchload`), driven by stdin lines."""

    def __init__(self, proc: subprocess.Popen[bytes], ready_timeout: float) -> None:
        self.proc = proc
        self.ready = self._line("ready", ready_timeout)

    def _line(self, key: str, timeout: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.proc.stdout], [], [], left)[0]:
                raise TimeoutError(f"websocket load: no {key!r} within {timeout} s")
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"websocket load exited (status {self.proc.wait()}) "
                                   f"before {key!r}")
            obj: dict[str, Any] = json.loads(line)
            if key in obj:
                return obj

    def command(self, command: str, key: str, timeout: float) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"{command}\n".encode())
        self.proc.stdin.flush()
        result: dict[str, Any] = self._line(key, timeout)[key]
        return result

    def quit(self, timeout: float = 30.0) -> dict[str, Any]:
        try:
            assert self.proc.stdin is not None
            self.proc.stdin.write(b"quit\n")
            self.proc.stdin.close()
            return self._line("idle_closed_by_server", timeout)
        finally:
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_watchload(url: str, idle: int, fanout: Path, *, cpus: set[int] | None,
                    ready_timeout: float = 120.0) -> WatchLoad:
    proc = subprocess.Popen(
        [sys.executable, "-m", "anon_ticket.bench.watchload", url, "--idle", str(idle),
         "--fanout", str(fanout)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, preexec_fn=_pin(cpus))
    try:
        return WatchLoad(proc, ready_timeout)
    except BaseException:
        proc.kill()
        proc.wait()
        raise


# --- the server's metrics (internal socket) ---------------------------------------------------


def read_metrics(socket_path: Path) -> str:
    with httpx.Client(transport=httpx.HTTPTransport(uds=str(socket_path)),
                      base_url="http://internal", timeout=10.0) as client:
        resp = client.get("/metrics")
        resp.raise_for_status()
        return resp.text


def histogram(text: str, name: str) -> dict[str, float]:
    """Cumulative buckets of a Prometheus histogram (`le` → count), plus `_count`/`_sum`."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(f"{name}_bucket{{"):
            le = line.split('le="', 1)[1].split('"', 1)[0]
            out[le] = float(line.rsplit(" ", 1)[1])
        elif line.startswith(f"{name}_count"):
            out["_count"] = float(line.rsplit(" ", 1)[1])
        elif line.startswith(f"{name}_sum"):
            out["_sum"] = float(line.rsplit(" ", 1)[1])
    return out


def counter_total(text: str, name: str) -> float:
    """The sum of a Prometheus counter over all its label values (0 when absent)."""
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
