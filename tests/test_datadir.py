"""The data directory: mode 0700, one process at a time, the token secret."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from anon_ticket.datadir import SECRET_SIZE, DataDir
from anon_ticket.errors import ConfigError, DataDirLocked

REPO = Path(__file__).resolve().parent.parent

# Takes the lock, says so, and holds it until its stdin closes.
HOLDER = """
import sys
from pathlib import Path
from anon_ticket.datadir import DataDir
lock = DataDir(Path(sys.argv[1])).lock()
print("locked", flush=True)
sys.stdin.read()
lock.release()
"""


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def umask_022() -> Iterator[None]:
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


@pytest.fixture
def holder(tmp_path: Path) -> Iterator[subprocess.Popen[str]]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(tmp_path / "data")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env=env,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if line.strip() != "locked":
        proc.kill()
        _, err = proc.communicate(timeout=10)
        pytest.fail(f"lock holder did not start: {err}")
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


# --- directory


def test_ensure_creates_0700(tmp_path: Path, umask_022: None) -> None:
    d = DataDir(tmp_path / "a" / "data")
    d.ensure()
    assert d.path.is_dir()
    assert mode_of(d.path) == 0o700
    d.ensure()  # idempotent
    assert mode_of(d.path) == 0o700


def test_ensure_tightens_existing(tmp_path: Path) -> None:
    path = tmp_path / "data"
    path.mkdir()
    path.chmod(0o755)
    DataDir(path).ensure()
    assert mode_of(path) == 0o700


def test_ensure_refuses_a_file(tmp_path: Path) -> None:
    path = tmp_path / "data"
    path.write_text("x")
    with pytest.raises(ConfigError, match="not a directory"):
        DataDir(path).ensure()


def test_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    d = DataDir(Path("data"))
    assert d.path == tmp_path / "data"
    assert d.lock_path == tmp_path / "data" / "anon-ticket.lock"
    assert d.secret_path == tmp_path / "data" / "token.secret"
    assert d.db_default_path == tmp_path / "data" / "anon-ticket.db"
    assert d.internal_socket_default == tmp_path / "data" / "internal.sock"


# --- lock


def test_lock_and_release(tmp_path: Path) -> None:
    d = DataDir(tmp_path / "data")
    assert d.holder_pid() is None  # no directory, no lock file
    lock = d.lock()
    assert mode_of(d.path) == 0o700
    assert lock.held
    assert d.lock_path.read_text().strip() == str(os.getpid())
    assert d.holder_pid() == os.getpid()
    # flock is per open file: a second lock() in the same process is refused too.
    with pytest.raises(DataDirLocked, match=f"pid {os.getpid()}"):
        d.lock()
    lock.release()
    lock.release()  # idempotent
    assert not lock.held
    assert d.holder_pid() is None
    with d.lock() as again:
        assert again.held
        assert d.holder_pid() == os.getpid()
    assert d.holder_pid() is None


def test_lock_held_by_another_process(tmp_path: Path, holder: subprocess.Popen[str]) -> None:
    d = DataDir(tmp_path / "data")
    assert d.holder_pid() == holder.pid
    with pytest.raises(DataDirLocked) as info:
        d.lock()
    assert str(info.value) == (
        f"data directory {d.path} is in use by another anon-ticket process (pid {holder.pid})"
    )
    # Probing did not disturb the holder.
    assert d.holder_pid() == holder.pid

    assert holder.stdin is not None
    holder.stdin.close()
    assert holder.wait(timeout=10) == 0
    assert d.holder_pid() is None
    with d.lock():
        assert d.holder_pid() == os.getpid()


def test_lock_freed_when_holder_is_killed(tmp_path: Path, holder: subprocess.Popen[str]) -> None:
    d = DataDir(tmp_path / "data")
    assert d.holder_pid() == holder.pid
    holder.kill()
    holder.wait(timeout=10)
    # The lock file still holds the dead process's pid, but nobody holds the lock.
    assert d.lock_path.read_text().strip() == str(holder.pid)
    assert d.holder_pid() is None
    with d.lock():
        assert d.lock_path.read_text().strip() == str(os.getpid())


# --- token secret


def test_token_secret_created_once(tmp_path: Path, umask_022: None) -> None:
    d = DataDir(tmp_path / "data")
    secret = d.token_secret()
    assert len(secret) == SECRET_SIZE
    assert mode_of(d.secret_path) == 0o600
    assert mode_of(d.path) == 0o700
    inode = d.secret_path.stat().st_ino
    assert d.token_secret() == secret
    assert DataDir(tmp_path / "data").token_secret() == secret
    assert d.secret_path.stat().st_ino == inode
    assert d.secret_path.read_bytes() == secret
    # No temporary file left behind.
    assert sorted(p.name for p in d.path.iterdir()) == ["token.secret"]
    assert DataDir(tmp_path / "other").token_secret() != secret


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_token_secret_refused_when_others_can_read(tmp_path: Path, mode: int) -> None:
    d = DataDir(tmp_path / "data")
    d.token_secret()
    d.secret_path.chmod(mode)
    with pytest.raises(ConfigError, match="chmod 600"):
        d.token_secret()


@pytest.mark.parametrize("size", [0, 16, 33])
def test_token_secret_refused_with_wrong_size(tmp_path: Path, size: int) -> None:
    d = DataDir(tmp_path / "data")
    d.ensure()
    d.secret_path.write_bytes(b"x" * size)
    d.secret_path.chmod(0o600)
    with pytest.raises(ConfigError, match=f"holds {size} bytes, expected 32"):
        d.token_secret()
    assert d.secret_path.read_bytes() == b"x" * size  # never replaced


def test_token_secret_refuses_a_symlink(tmp_path: Path) -> None:
    d = DataDir(tmp_path / "data")
    d.ensure()
    target = tmp_path / "elsewhere"
    target.write_bytes(os.urandom(SECRET_SIZE))
    target.chmod(0o600)
    d.secret_path.symlink_to(target)
    with pytest.raises(ConfigError, match="token secret"):
        d.token_secret()
