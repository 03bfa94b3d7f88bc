"""Start the real `anon-ticket` process and talk to it like an operator would."""

from __future__ import annotations

import os
import resource
import signal
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tests.harness import UNUSED_WALLET, free_port
from tests.test_legacy import LEGACY_DDL

BIN = [sys.executable, "-m", "anon_ticket"]


def cli(data_dir: Path, *args: str, env: dict[str, str] | None = None,
        timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*BIN, "--data-dir", str(data_dir), *args], capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})


@dataclass
class ServerProcess:
    data_dir: Path
    port: int
    proc: subprocess.Popen[str]
    log_path: Path
    extra_env: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def internal_socket(self) -> Path:
        return self.data_dir / "internal.sock"

    def log(self) -> str:
        return self.log_path.read_text()

    def wait_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.05)
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
                 args: tuple[str, ...] = (), wait: bool = True,
                 nofile: tuple[int, int] | None = None,
                 log_dir: Path | None = None) -> ServerProcess:
    """`nofile`: the (soft, hard) descriptor limit the server starts with; the log is written
    to `log_dir` (default: beside the data directory)."""
    port = port or free_port()
    data_dir.mkdir(parents=True, exist_ok=True)
    log_path = (log_dir or data_dir.parent) / f"server-{port}.log"
    full_env = {**os.environ, "MONERO_RPC_URL": UNUSED_WALLET, **(env or {})}
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [*BIN, "--data-dir", str(data_dir), "--bind-address", f"127.0.0.1:{port}",
             "--pid-bloom-entries", "10000", *args, "serve"],
            stdout=log, stderr=subprocess.STDOUT, text=True, env=full_env,
            preexec_fn=None if nofile is None else (
                lambda: resource.setrlimit(resource.RLIMIT_NOFILE, nofile)))
    server = ServerProcess(data_dir, port, proc, log_path, env or {})
    if wait:
        server.wait_ready()
    return server


def write_legacy_db(path: Path, rows: list[tuple[bytes, str, int, int]]) -> Path:
    """A database of the original anon-ticket with unclaimed payments (pid, txid, amount, h)."""
    conn = sqlite3.connect(path)
    conn.executescript(LEGACY_DDL)
    conn.executemany(
        "INSERT INTO payments (pid, txid, amount, block_height, status, created_at) "
        "VALUES (?, ?, ?, ?, 0, '2025-11-20T12:34:56.123456789+00:00')", rows)
    conn.commit()
    conn.close()
    return path


def kill(server: ServerProcess) -> None:
    os.kill(server.proc.pid, signal.SIGKILL)
    server.proc.wait()
