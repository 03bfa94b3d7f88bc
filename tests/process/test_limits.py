"""The real process and its descriptor limit (I14, finding 3 of the hostile-clients review)."""

from __future__ import annotations

import socket
from pathlib import Path

import httpx

from tests.process.proc import start_server


def soft_limit(pid: int) -> int:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            return int(line.split()[3])
    raise AssertionError("no descriptor limit listed")


def test_the_soft_descriptor_limit_is_raised_to_the_hard_one(tmp_path: Path) -> None:
    server = start_server(tmp_path / "data", nofile=(256, 2048))
    try:
        assert soft_limit(server.proc.pid) == 2048
    finally:
        server.stop()


def test_more_idle_connections_than_descriptors_starve_nothing(tmp_path: Path) -> None:
    # 512 descriptors in all: 600 idle clients used to exhaust them, and accept() then
    # failed with EMFILE (logged hundreds of times) while real requests waited.
    server = start_server(tmp_path / "data", nofile=(512, 512))
    idle: list[socket.socket] = []
    try:
        for _ in range(600):
            idle.append(socket.create_connection(("127.0.0.1", server.port)))
        with httpx.Client(base_url=server.url, timeout=10) as client:
            for _ in range(20):
                assert client.get("/healthz").status_code == 200
        with server.internal() as internal:
            assert internal.get("/admin/status").status_code == 200
        assert "EMFILE" not in server.log()
        assert "lowered to fit the descriptor limit" in server.log()
    finally:
        for sock in idle:
            sock.close()
        server.stop()
