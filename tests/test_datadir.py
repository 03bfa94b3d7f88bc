"""The data directory: mode 0700, one process at a time, the token secret."""

from __future__ import annotations

import logging
import os
import sqlite3
import stat
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path

import apsw
import pytest

from actors.storage import open_connection
from anon_ticket import schema
from anon_ticket.backup import restore_backup, write_backup
from anon_ticket.datadir import SECRET_SIZE, DataDir
from anon_ticket.errors import ConfigError, DataDirLocked
from anon_ticket.legacy import import_legacy

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


# Writes to the database and dies before any checkpoint: its -wal and -shm stay behind.
CRASHED_WRITER = """
import os, sys
import apsw
conn = apsw.Connection(sys.argv[1])
conn.execute("PRAGMA journal_mode = WAL")
conn.execute("INSERT INTO state (key, value) VALUES ('crashed', 1)")
os._exit(0)
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


# --- the database's files: private like the secret (they hold service tokens) ------------


def _write_through_storage(db: Path) -> apsw.Connection:
    """A write on the storage actor's kind of connection, kept open: -wal and -shm exist."""
    conn = open_connection(db)
    with conn:
        conn.execute("INSERT INTO state (key, value) VALUES ('x', 1) "
                     "ON CONFLICT (key) DO UPDATE SET value = value + 1")
    return conn


def _modes(db: Path) -> dict[str, int]:
    return {p.name: mode_of(p) for p in sorted(db.parent.iterdir()) if p.is_file()}


def test_a_new_database_and_its_wal_and_shm_are_0600(tmp_path: Path, umask_022: None) -> None:
    db = tmp_path / "anon-ticket.db"
    schema.migrate(db)
    conn = _write_through_storage(db)
    try:
        assert _modes(db) == {"anon-ticket.db": 0o600, "anon-ticket.db-shm": 0o600,
                              "anon-ticket.db-wal": 0o600}
    finally:
        conn.close()


def test_an_existing_databases_readable_files_are_tightened_once(
        tmp_path: Path, umask_022: None, caplog: pytest.LogCaptureFixture) -> None:
    db = tmp_path / "anon-ticket.db"
    schema.migrate(db)
    os.chmod(db, 0o644)  # as an older version left it (created through the umask)
    # A server that died with its log not yet checkpointed: -wal and -shm are left behind,
    # with the main file's mode (a process of its own: two SQLite libraries in one process
    # would not see each other's locks).
    subprocess.run([sys.executable, "-c", CRASHED_WRITER, str(db)], check=True, cwd=REPO)
    old_backup = tmp_path / "anon-ticket.db.pre-m004_x-1.bak"
    old_backup.write_bytes(b"")  # (a copy of the rows, as far as its mode goes)
    other = tmp_path / "unrelated.txt"
    other.write_text("")
    assert _modes(db)["anon-ticket.db-wal"] == 0o644
    caplog.set_level(logging.WARNING)
    schema.migrate(db)  # (its connection, the last one, checkpoints and removes the log)
    assert _modes(db) == {"anon-ticket.db": 0o600, old_backup.name: 0o600,
                          "unrelated.txt": 0o644}
    warnings = [r for r in caplog.records if "now 0600" in r.getMessage()]
    assert len(warnings) == 1  # one line for every file
    assert getattr(warnings[0], "fields", {})["files"] == (
        "anon-ticket.db (0644), anon-ticket.db-wal (0644), anon-ticket.db-shm (0644), "
        "anon-ticket.db.pre-m004_x-1.bak (0644)")
    schema.migrate(db)  # nothing left to tighten: nothing logged
    assert len([r for r in caplog.records if "now 0600" in r.getMessage()]) == 1
    conn = _write_through_storage(db)
    try:
        assert _modes(db)["anon-ticket.db-wal"] == 0o600
        assert sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True).execute(
            "SELECT value FROM state WHERE key = 'crashed'").fetchone() == (1,)
    finally:
        conn.close()


def test_the_migration_backup_is_0600(tmp_path: Path, umask_022: None,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    db = tmp_path / "a.db"
    schema.migrate(db)

    @schema.migrations(name="m900_test_only")
    def _extra(database: object) -> None:
        database.conn.execute("CREATE TABLE extra (x)")  # type: ignore[attr-defined]

    monkeypatch.setattr(schema, "KNOWN", (*schema.KNOWN, "m900_test_only"))
    try:
        schema.migrate(db)
    finally:
        schema.migrations._migrations.pop()
    (bak,) = tmp_path.glob("a.db.pre-m900_test_only-*.bak")
    assert mode_of(bak) == 0o600


def test_backups_and_restored_databases_are_0600(tmp_path: Path, umask_022: None) -> None:
    db = tmp_path / "data" / "anon-ticket.db"
    schema.migrate(db)
    secret = DataDir(db.parent)
    secret.token_secret()
    conn = _write_through_storage(db)
    try:
        result = write_backup(db, secret.secret_path, tmp_path / "b.tar")
    finally:
        conn.close()
    assert mode_of(result.path) == 0o600
    with tarfile.open(result.path) as tar:
        assert {m.name: m.mode for m in tar.getmembers()} == {"anon-ticket.db": 0o600,
                                                              "token.secret": 0o600}
    # A backup written by an older version: its database member is 0644.
    old = tmp_path / "old.tar"
    with tarfile.open(result.path) as src, tarfile.open(old, "w") as dst:
        for member in src.getmembers():
            data = src.extractfile(member)
            member.mode = 0o644 if member.name == "anon-ticket.db" else member.mode
            dst.addfile(member, data)
    restore_backup(old, db, secret.secret_path)
    assert mode_of(db) == 0o600
    conn = _write_through_storage(db)
    try:
        assert _modes(db)["anon-ticket.db-wal"] == 0o600
    finally:
        conn.close()


def test_a_database_created_by_the_legacy_import_is_0600(tmp_path: Path,
                                                         umask_022: None) -> None:
    from tests.test_legacy import build_legacy

    db = tmp_path / "data" / "anon-ticket.db"
    import_legacy(build_legacy(tmp_path / "legacy.db"), db)
    conn = _write_through_storage(db)
    try:
        assert _modes(db) == {"anon-ticket.db": 0o600, "anon-ticket.db-shm": 0o600,
                              "anon-ticket.db-wal": 0o600}
    finally:
        conn.close()


async def test_the_running_servers_database_files_are_0600(tmp_path: Path,
                                                           umask_022: None) -> None:
    from anon_ticket.domain.ids import PaymentId
    from tests.harness import running_server

    async with running_server(tmp_path) as srv:
        pid = PaymentId.generate()
        await srv.pay(pid)
        assert (await srv.redeem(pid.hex())).json()["status"] == "success"
        db = srv.settings.database_path
        modes = _modes(db)
        assert {n: m for n, m in modes.items() if n.startswith(db.name)} == {
            "anon-ticket.db": 0o600, "anon-ticket.db-shm": 0o600, "anon-ticket.db-wal": 0o600}
