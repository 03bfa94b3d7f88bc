"""`serve` checks what needs the machine before it creates anything (anon_ticket/preflight.py)."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import pytest

from anon_ticket import preflight
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


def _held(release_after: float | None) -> tuple[socket.socket, int]:
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    if release_after is not None:
        threading.Timer(release_after, busy.close).start()
    return busy, busy.getsockname()[1]


def test_a_port_let_go_of_within_two_seconds_is_waited_for(
        capsys: pytest.CaptureFixture[str]) -> None:
    """After a crash, what the dead process left may hold the port a moment longer: the
    check tries again, half a second apart, as nginx does."""
    busy, port = _held(release_after=0.8)
    try:
        started = time.monotonic()
        assert preflight._tcp("127.0.0.1", port, "bind_address") == []
        assert 0.8 <= time.monotonic() - started < 5
    finally:
        busy.close()
    assert f"bind_address: 127.0.0.1:{port} is in use; trying again for 2 s" in (
        capsys.readouterr().err)


def test_a_port_held_for_good_is_a_problem_after_the_tries() -> None:
    busy, port = _held(release_after=None)
    try:
        started = time.monotonic()
        found = preflight._tcp("127.0.0.1", port, "bind_address")
        waited = time.monotonic() - started
    finally:
        busy.close()
    assert found == [f"bind_address: 127.0.0.1:{port} is already in use"]
    assert waited >= (preflight.BIND_TRIES - 1) * preflight.BIND_PAUSE
