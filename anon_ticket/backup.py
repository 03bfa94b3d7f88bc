"""Backups: one tar file with a consistent copy of the database and the token secret.

The database copy uses SQLite's online backup API on its own read-only connection, so it runs
while the server writes (in a worker thread when the server does it). The secret travels with
the database: without it, stored tokens stay valid but new claims would derive different ones.
"""

from __future__ import annotations

import os
import secrets
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import apsw

from anon_ticket.errors import StorageError

DB_MEMBER = "anon-ticket.db"
SECRET_MEMBER = "token.secret"


@dataclass(frozen=True, slots=True)
class BackupResult:
    path: Path
    bytes: int
    seconds: float


def _copy_database(db_path: Path, dest: Path) -> None:
    src = apsw.Connection(str(db_path), flags=apsw.SQLITE_OPEN_READONLY)
    dst = apsw.Connection(str(dest))
    try:
        with dst.backup("main", src, "main") as step:
            while not step.done:
                step.step(4096)
        dst.execute("PRAGMA journal_mode = DELETE")
    finally:
        dst.close()
        src.close()


def write_backup(db_path: Path, secret_path: Path, dest: Path) -> BackupResult:
    """Write `dest` (a tar file, mode 0600) atomically; safe while a server is running."""
    started = time.monotonic()
    dest = dest.resolve()
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".backup-", dir=dest.parent) as tmp:
        db_copy = Path(tmp) / DB_MEMBER
        try:
            _copy_database(db_path, db_copy)
        except apsw.Error as exc:
            raise StorageError(f"backup of {db_path} failed: {type(exc).__name__}") from exc
        partial = Path(tmp) / "backup.tar"
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as raw, tarfile.open(fileobj=raw, mode="w") as tar:
            tar.add(db_copy, arcname=DB_MEMBER)
            if secret_path.exists():
                tar.add(secret_path, arcname=SECRET_MEMBER)
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(partial, dest)
    return BackupResult(dest, dest.stat().st_size, time.monotonic() - started)


def _new_epoch(db: Path) -> None:
    """Event numbers may go back with a restore: watchers must not resume across it."""
    conn = apsw.Connection(str(db))
    try:
        with conn:
            conn.execute("UPDATE state SET value = ? WHERE key = 'epoch'",
                         (secrets.randbelow(2**53 - 1) + 1,))
    except apsw.SQLError:
        pass  # written before event numbering existed: its migration creates the epoch
    finally:
        conn.close()


def restore_backup(archive: Path, db_path: Path, secret_path: Path) -> None:
    """Replace the database (and the secret, when the backup has one) from `archive`.

    The caller must hold the data-directory lock: no server may run meanwhile.
    """
    try:
        tar = tarfile.open(archive, mode="r")
    except (OSError, tarfile.TarError) as exc:
        raise StorageError(f"{archive} is not a readable anon-ticket backup") from exc
    with tar, tempfile.TemporaryDirectory(prefix=".restore-", dir=db_path.parent) as tmp:
        names = set(tar.getnames())
        if DB_MEMBER not in names:
            raise StorageError(f"{archive} holds no {DB_MEMBER}")
        tar.extractall(tmp, members=[m for m in tar.getmembers()
                                     if m.name in (DB_MEMBER, SECRET_MEMBER)], filter="data")
        copy = Path(tmp) / DB_MEMBER
        check = apsw.Connection(str(copy), flags=apsw.SQLITE_OPEN_READONLY)
        try:
            result = check.execute("PRAGMA integrity_check").fetchall()
        finally:
            check.close()
        if result != [("ok",)]:
            raise StorageError(f"{archive}: the database in it fails its integrity check")
        _new_epoch(copy)
        for suffix in ("-wal", "-shm"):
            Path(f"{db_path}{suffix}").unlink(missing_ok=True)
        os.replace(copy, db_path)
        secret = Path(tmp) / SECRET_MEMBER
        if secret.exists():
            os.chmod(secret, 0o600)
            os.replace(secret, secret_path)
