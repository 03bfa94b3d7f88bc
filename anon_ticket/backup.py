"""Backups: one tar file with a consistent copy of the database and the token secret.

The database copy uses SQLite's online backup API on its own read-only connection, so it runs
while the server writes (in a worker thread when the server does it). The secret travels with
the database: without it, stored tokens stay valid but new claims would derive different ones.
Everything written here (the tar, the copy inside it, a restored database) is mode 0600: it
holds service tokens.
"""

from __future__ import annotations

import os
import secrets
import stat
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import apsw

from anon_ticket.datadir import create_private
from anon_ticket.errors import BackupFailed, StorageError

DB_MEMBER = "anon-ticket.db"
SECRET_MEMBER = "token.secret"


@dataclass(frozen=True, slots=True)
class BackupResult:
    path: Path
    bytes: int
    seconds: float


# Never a place for a backup: kernel and device file systems (/proc/self/mem is a "regular
# file" there).
SPECIAL_ROOTS = (Path("/proc"), Path("/sys"), Path("/dev"))


def check_destination(dest: Path) -> Path:
    """`dest` made real (symlinks resolved) if a backup may be written there, else
    BackupFailed saying why: an absolute path, in an existing directory that is not on a
    special file system, naming no directory and no special file (socket, FIFO, device)."""
    text = str(dest)
    if not dest.is_absolute():
        raise BackupFailed(f"backup path must be absolute, not {text!r}")
    try:
        os.fsencode(text)
    except UnicodeError:
        raise BackupFailed("backup path is not a valid file name") from None
    if "\x00" in text:
        raise BackupFailed("backup path must not contain a NUL character")
    real = Path(os.path.realpath(dest))
    parent = real.parent
    if any(parent == root or root in parent.parents for root in SPECIAL_ROOTS):
        raise BackupFailed(f"cannot write a backup to {real}: {parent} is on a special file "
                           "system; choose a directory on a disk")
    try:
        parent_st = os.stat(parent)
    except FileNotFoundError:
        raise BackupFailed(f"cannot write a backup to {real}: the directory {parent} does "
                           "not exist") from None
    except OSError as exc:
        raise BackupFailed(f"cannot write a backup to {real}: {parent}: "
                           f"{exc.strerror or exc}") from None
    if not stat.S_ISDIR(parent_st.st_mode):
        raise BackupFailed(f"cannot write a backup to {real}: {parent} is not a directory")
    try:
        st = os.stat(real)
    except FileNotFoundError:
        return real
    except OSError as exc:
        raise BackupFailed(f"cannot write a backup to {real}: {exc.strerror or exc}") from None
    if stat.S_ISDIR(st.st_mode):
        raise BackupFailed(f"cannot write a backup to {real}: it is a directory; name a file "
                           "in it")
    if not stat.S_ISREG(st.st_mode):
        raise BackupFailed(f"cannot write a backup to {real}: it is a special file (a socket, "
                           "FIFO or device)")
    return real


def _copy_database(db_path: Path, dest: Path) -> None:
    """Errors reading the database are StorageError; apsw.Error is the copy's side."""
    try:
        src = apsw.Connection(str(db_path), flags=apsw.SQLITE_OPEN_READONLY)
    except apsw.Error as exc:
        raise StorageError(f"backup of {db_path} failed: {type(exc).__name__}") from exc
    try:
        create_private(dest)
        dst = apsw.Connection(str(dest))
    except BaseException:
        src.close()
        raise
    try:
        with dst.backup("main", src, "main") as step:
            while not step.done:
                step.step(4096)
        dst.execute("PRAGMA journal_mode = DELETE")
    finally:
        dst.close()
        src.close()


def write_backup(db_path: Path, secret_path: Path, dest: Path) -> BackupResult:
    """Write `dest` (a tar file, mode 0600) atomically; safe while a server is running.

    BackupFailed (the operator's to fix: another place, or free space) for a destination
    `check_destination` refuses, one of the service's own files, or a write that fails there.
    """
    started = time.monotonic()
    dest = check_destination(dest)
    own = [db_path, *(Path(f"{db_path}{s}") for s in ("-wal", "-shm", "-journal")),
           secret_path]
    if any(Path(os.path.realpath(p)) == dest for p in own):
        raise BackupFailed(f"cannot write a backup to {dest}: it is one of the service's own "
                           "files; choose another path")
    try:
        with tempfile.TemporaryDirectory(prefix=".backup-", dir=dest.parent) as tmp:
            db_copy = Path(tmp) / DB_MEMBER
            try:
                _copy_database(db_path, db_copy)
            except apsw.Error as exc:
                raise BackupFailed(f"backup failed: cannot copy the database to "
                                   f"{dest.parent}: {exc}") from exc
            partial = Path(tmp) / "backup.tar"
            fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as raw, tarfile.open(fileobj=raw, mode="w") as tar:
                tar.add(db_copy, arcname=DB_MEMBER)
                if secret_path.exists():
                    tar.add(secret_path, arcname=SECRET_MEMBER)
                raw.flush()
                os.fsync(raw.fileno())
            os.replace(partial, dest)
        size = dest.stat().st_size
    except OSError as exc:  # permission, no space, a read-only file system, a quota
        raise BackupFailed(f"backup failed: cannot write {dest}: "
                           f"{exc.strerror or exc}") from exc
    return BackupResult(dest, size, time.monotonic() - started)


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
        os.chmod(copy, 0o600)  # (a tar member keeps the mode it had: 0644 in older backups)
        for suffix in ("-wal", "-shm"):
            Path(f"{db_path}{suffix}").unlink(missing_ok=True)
        os.replace(copy, db_path)
        secret = Path(tmp) / SECRET_MEMBER
        if secret.exists():
            os.chmod(secret, 0o600)
            os.replace(secret, secret_path)
