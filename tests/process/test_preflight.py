"""`serve` checks what needs the machine before it creates anything (anon_ticket/preflight.py)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from tests.process.proc import cli

pytestmark = pytest.mark.process


def test_every_problem_at_once_and_nothing_created(tmp_path: Path) -> None:
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    try:
        port = busy.getsockname()[1]
        data = tmp_path / "data"
        done = cli(data, "--bind-address", f"127.0.0.1:{port}", "--primary-address", "4xyz",
                   "serve", env={"MONERO_RPC_URL": "http://127.0.0.1:9/json_rpc"})
    finally:
        busy.close()
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert any(line.startswith("anon-ticket: primary_address:") for line in lines), lines
    assert f"anon-ticket: bind_address: 127.0.0.1:{port} is already in use" in lines
    assert not data.exists()  # no data directory, no database, no secret


def test_a_data_directory_that_cannot_be_written_is_said_so(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    done = cli(blocker / "data", "serve",
               env={"MONERO_RPC_URL": "http://127.0.0.1:9/json_rpc"})
    assert done.returncode == 2
    assert "data_dir:" in done.stderr and "not a directory" in done.stderr
