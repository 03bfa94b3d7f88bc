"""Start the real `anon-ticket` process and talk to it like an operator would."""

from __future__ import annotations

import os
import resource
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tests.harness import UNUSED_WALLET, free_port
from tests.test_legacy import LEGACY_DDL

BIN = [sys.executable, "-m", "anon_ticket"]


def child_setup(cpus: set[int] | None = None,
                nofile: tuple[int, int] | None = None) -> Callable[[], None] | None:
    """A child's `preexec_fn`: move to `cpus`, set its descriptor limit (None: nothing to do)."""
    if not cpus and nofile is None:
        return None

    def setup() -> None:
        if cpus:
            os.sched_setaffinity(0, cpus)
        if nofile is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, nofile)

    return setup


def cli(data_dir: Path, *args: str, env: dict[str, str] | None = None,
        timeout: float = 60, cpus: set[int] | None = None
        ) -> subprocess.CompletedProcess[str]:
    """`anon-ticket --data-dir DATA ARGS...`, run to its end (on `cpus`, when given)."""
    return subprocess.run([*BIN, "--data-dir", str(data_dir), *args], capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})},
                          preexec_fn=child_setup(cpus))


def import_legacy(data_dir: Path, legacy: Path, *, timeout: float = 60,
                  cpus: set[int] | None = None, env: dict[str, str] | None = None) -> str:
    """`anon-ticket db import-legacy LEGACY` as an operator runs it; its report (stdout)."""
    done = cli(data_dir, "db", "import-legacy", str(legacy), timeout=timeout, cpus=cpus,
               env=env)
    assert done.returncode == 0, f"db import-legacy exited {done.returncode}:\n" \
        f"{done.stdout}\n{done.stderr}"
    return done.stdout


@dataclass
class ServerProcess:
    data_dir: Path
    port: int
    proc: subprocess.Popen[str]
    log_path: Path
    extra_env: dict[str, str] = field(default_factory=dict)
    spawned_at: float = field(default_factory=time.monotonic)
    ready_s: float | None = None  # from the spawn to the first 200 from /healthz

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def internal_socket(self) -> Path:
        return self.data_dir / "internal.sock"

    def log(self) -> str:
        return self.log_path.read_text()

    def wait_ready(self, timeout: float = 30, interval: float = 0.05) -> None:
        """Poll /healthz every `interval` s until it answers 200; `ready_s` says when."""
        deadline = time.monotonic() + timeout
        with httpx.Client(timeout=1) as client:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise AssertionError(f"server exited {self.proc.returncode}:\n"
                                         f"{self.log()}")
                try:
                    if client.get(f"{self.url}/healthz").status_code == 200:
                        self.ready_s = time.monotonic() - self.spawned_at
                        return
                except httpx.TransportError:
                    pass
                time.sleep(interval)
        raise AssertionError(f"server not ready after {timeout}s:\n{self.log()}")

    def wait_exit(self, timeout: float = 30) -> int:
        return self.proc.wait(timeout)

    def signal(self, sig: signal.Signals) -> None:
        self.proc.send_signal(sig)

    def internal(self) -> httpx.Client:
        return httpx.Client(transport=httpx.HTTPTransport(uds=str(self.internal_socket)),
                            base_url="http://internal", timeout=30)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_server(data_dir: Path, *, port: int | None = None, env: dict[str, str] | None = None,
                 args: Sequence[str] = (), wait: bool = True,
                 nofile: tuple[int, int] | None = None, log_dir: Path | None = None,
                 cpus: set[int] | None = None, ready_timeout: float = 30) -> ServerProcess:
    """`anon-ticket serve` on a free loopback port, the way an operator starts it: settings
    as flags (`args` come after the defaults here, so they win), the wallet's URL through
    `MONERO_RPC_URL` (nothing listens at the default one: the poller reports `degraded` and
    recorded payments redeem as during a wallet outage). `nofile`: the (soft, hard)
    descriptor limit the server starts with; `cpus`: the cores it runs on; the log is written
    to `log_dir` (default: beside the data directory)."""
    port = port or free_port()
    data_dir.mkdir(parents=True, exist_ok=True)
    log_path = (log_dir or data_dir.parent) / f"server-{port}.log"
    full_env = {**os.environ, "MONERO_RPC_URL": UNUSED_WALLET, **(env or {})}
    spawned = time.monotonic()
    # A new file, not the old one truncated: a process of an earlier start on this port that
    # is still exiting writes on into its own (now unlinked) file, not into this one's middle.
    log_path.unlink(missing_ok=True)
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [*BIN, "--data-dir", str(data_dir), "--bind-address", f"127.0.0.1:{port}",
             "--pid-bloom-entries", "10000", *args, "serve"],
            stdout=log, stderr=subprocess.STDOUT, text=True, env=full_env,
            preexec_fn=child_setup(cpus, nofile))
    server = ServerProcess(data_dir, port, proc, log_path, env or {}, spawned_at=spawned)
    if wait:
        server.wait_ready(ready_timeout)
    return server


LegacyRow = tuple[bytes, str, int, int]  # pid, txid, amount, height


def write_legacy_db(path: Path, rows: Sequence[LegacyRow], *,
                    claimed: Sequence[LegacyRow] = (), last_height: int | None = None) -> Path:
    """A database of the original anon-ticket: unclaimed payments `rows`, and `claimed` ones
    (status 1 with no token row: the import gives them their legacy token,
    `tests.test_legacy.legacy_token`); `last_height`: the original's scan cursor."""
    for suffix in ("", "-wal", "-shm", "-journal"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    conn = sqlite3.connect(path)
    try:
        conn.execute("PRAGMA journal_mode = OFF")  # a million rows for the benchmark
        conn.execute("PRAGMA synchronous = OFF")
        conn.executescript(LEGACY_DDL)
        for status, group in ((0, rows), (1, claimed)):
            conn.executemany(
                "INSERT INTO payments (pid, txid, amount, block_height, status, created_at) "
                f"VALUES (?, ?, ?, ?, {status}, '2025-11-20T12:34:56.123456789+00:00')", group)
        if last_height is not None:
            conn.execute("INSERT INTO monitor_state (key, value_int) "
                         "VALUES ('last_processed_height', ?)", (last_height,))
        conn.commit()
    finally:
        conn.close()
    return path


def kill(server: ServerProcess) -> None:
    os.kill(server.proc.pid, signal.SIGKILL)
    server.proc.wait()
