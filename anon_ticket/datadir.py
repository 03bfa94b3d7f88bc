"""The data directory: one process at a time (docs/architecture.md §2), the token secret,
default paths.

The lock is an `flock` on `<dir>/anon-ticket.lock`: the kernel drops it when the holder dies,
even on kill -9, so a stale lock file never blocks a restart. The file itself is never removed
(removing it would let two processes lock two different inodes of the same name).
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import os
import secrets
import stat
import tempfile
import time
from pathlib import Path
from types import TracebackType

from anon_ticket.errors import ConfigError, DataDirLocked, StorageError

LOCK_FILE_NAME = "anon-ticket.lock"
SECRET_FILE_NAME = "token.secret"
DB_FILE_NAME = "anon-ticket.db"
INTERNAL_SOCKET_NAME = "internal.sock"
SECRET_SIZE = 32

# A probe (`holder_pid`) by another process holds the lock for a moment; retrying for this long
# keeps such a probe from being mistaken for a server.
_LOCK_RETRY_SECS = 0.2
_LOCK_RETRY_STEP_SECS = 0.01


def _read_pid(fd: int) -> int | None:
    try:
        raw = os.pread(fd, 64, 0)
    except OSError:
        return None
    text = raw.decode("ascii", "replace").strip()
    return int(text) if text.isdigit() and int(text) > 0 else None


def create_private(path: Path) -> bool:
    """Create `path` empty with mode 0600 unless it exists (True when it was created).

    Done before SQLite opens a new database or a copy of one: they hold service tokens, and
    SQLite would create the file through the umask (0644 as a rule), then give its -wal,
    -shm and journal files the main file's mode."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        return False
    try:
        os.fchmod(fd, 0o600)  # exactly 0600, whatever the umask took away
    finally:
        os.close(fd)
    return True


def database_files(db_path: Path) -> list[Path]:
    """The database and every file that holds a copy of its rows: -wal, -shm, a rollback
    journal, the migrations' `<db>.pre-*.bak` backups."""
    files = [db_path, *(Path(f"{db_path}{s}") for s in ("-wal", "-shm", "-journal"))]
    with contextlib.suppress(OSError):
        files.extend(sorted(db_path.parent.glob(f"{glob.escape(db_path.name)}.pre-*.bak")))
    return files


def tighten_database_files(db_path: Path) -> list[str]:
    """Take group and other access away from the database's files (an older version, or
    another tool, created them 0644); returns `name (mode)` for each file changed."""
    changed: list[str] = []
    for path in database_files(db_path):
        try:
            st = os.stat(path)
        except FileNotFoundError:
            continue
        mode = stat.S_IMODE(st.st_mode)
        if not stat.S_ISREG(st.st_mode) or not mode & 0o077:
            continue
        try:
            os.chmod(path, mode & 0o700)
        except OSError as exc:
            raise StorageError(
                f"{path} is readable by group or others (mode {mode:04o}) and cannot be "
                f"tightened: {exc.strerror}; run: chmod 600 {path}") from exc
        changed.append(f"{path.name} ({mode:04o})")
    return changed


class DataDirLock:
    """Holds the data directory's lock until `release()` (or the end of a `with` block)."""

    def __init__(self, fd: int, path: Path) -> None:
        self._fd: int | None = fd
        self.path = path
        self.pid = os.getpid()

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Give the lock up; calling it again does nothing."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def __enter__(self) -> DataDirLock:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


class DataDir:
    """The directory holding the database, the token secret, the default sockets and the lock."""

    def __init__(self, path: Path) -> None:
        self.path = Path(os.path.abspath(path))

    def __repr__(self) -> str:
        return f"DataDir({str(self.path)!r})"

    @property
    def lock_path(self) -> Path:
        return self.path / LOCK_FILE_NAME

    @property
    def secret_path(self) -> Path:
        return self.path / SECRET_FILE_NAME

    @property
    def db_default_path(self) -> Path:
        return self.path / DB_FILE_NAME

    @property
    def internal_socket_default(self) -> Path:
        return self.path / INTERNAL_SOCKET_NAME

    def ensure(self) -> None:
        """Create the directory with mode 0700, or tighten an existing one to 0700."""
        try:
            self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
            st = os.stat(self.path)
        except FileExistsError as exc:
            raise ConfigError(
                [f"data directory {self.path} exists and is not a directory"]
            ) from exc
        except OSError as exc:
            raise ConfigError(
                [f"data directory {self.path}: cannot create it: {exc.strerror}"]
            ) from exc
        if not stat.S_ISDIR(st.st_mode):
            raise ConfigError([f"data directory {self.path} exists and is not a directory"])
        if stat.S_IMODE(st.st_mode) != 0o700:
            try:
                os.chmod(self.path, 0o700)
            except OSError as exc:
                raise ConfigError(
                    [f"data directory {self.path}: cannot set mode 0700: {exc.strerror}"]
                ) from exc

    def lock(self) -> DataDirLock:
        """Take the exclusive lock (creating the directory if needed) or raise DataDirLocked."""
        self.ensure()
        try:
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise StorageError(f"cannot open lock file {self.lock_path}: {exc.strerror}") from exc
        try:
            deadline = time.monotonic() + _LOCK_RETRY_SECS
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        pid = _read_pid(fd)
                        raise DataDirLocked(
                            f"data directory {self.path} is in use by another anon-ticket "
                            f"process (pid {pid if pid is not None else 'unknown'})"
                        ) from None
                    time.sleep(_LOCK_RETRY_STEP_SECS)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        except BaseException:
            os.close(fd)
            raise
        return DataDirLock(fd, self.lock_path)

    def holder_pid(self) -> int | None:
        """The pid of the live process holding the lock, None when nobody holds it.

        -1 when the lock is held but the holder has not written its pid (yet).
        """
        try:
            fd = os.open(self.lock_path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StorageError(f"cannot open lock file {self.lock_path}: {exc.strerror}") from exc
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                # The holder writes its pid right after locking: give it a moment.
                deadline = time.monotonic() + _LOCK_RETRY_SECS
                while (pid := _read_pid(fd)) is None and time.monotonic() < deadline:
                    time.sleep(_LOCK_RETRY_STEP_SECS)
                return pid if pid is not None else -1
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        finally:
            os.close(fd)

    def token_secret(self) -> bytes:
        """The server's token secret (32 bytes, mode 0600), created on first use."""
        self.ensure()
        try:
            return self._read_secret()
        except FileNotFoundError:
            pass
        self._create_secret()
        return self._read_secret()

    def _read_secret(self) -> bytes:
        path = self.secret_path
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            raise
        except OSError as exc:
            raise ConfigError(
                [f"token secret {path}: cannot open it: {exc.strerror} (it must be a regular file)"]
            ) from exc
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise ConfigError([f"token secret {path} is not a regular file"])
            mode = stat.S_IMODE(st.st_mode)
            if mode & 0o077:
                raise ConfigError(
                    [
                        f"token secret {path} is accessible by group or others (mode {mode:04o}); "
                        f"run: chmod 600 {path}"
                    ]
                )
            data = os.read(fd, SECRET_SIZE + 1)
        except OSError as exc:
            raise StorageError(f"cannot read token secret {path}: {exc.strerror}") from exc
        finally:
            os.close(fd)
        if len(data) != SECRET_SIZE:
            raise ConfigError(
                [
                    f"token secret {path} holds {st.st_size} bytes, expected {SECRET_SIZE}; "
                    "restore it from a backup (a new one changes every token derived from now on)"
                ]
            )
        return data

    def _create_secret(self) -> None:
        path = self.secret_path
        try:
            fd, tmp_name = tempfile.mkstemp(prefix=f".{SECRET_FILE_NAME}.", dir=self.path)
        except OSError as exc:
            raise StorageError(
                f"cannot create token secret in {self.path}: {exc.strerror}"
            ) from exc
        tmp = Path(tmp_name)
        try:
            try:
                os.fchmod(fd, 0o600)
                os.write(fd, secrets.token_bytes(SECRET_SIZE))
                os.fsync(fd)
            finally:
                os.close(fd)
            # link, not rename: a secret another process created meanwhile must win, never be
            # overwritten (tokens may already be derived from it).
            try:
                os.link(tmp, path)
            except FileExistsError:
                return
            except OSError:
                # A filesystem without hard links: the open(O_EXCL)-free fallback.
                if path.exists():
                    return
                os.replace(tmp, path)
            self._fsync_dir()
        except OSError as exc:
            raise StorageError(f"cannot create token secret {path}: {exc.strerror}") from exc
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()

    def _fsync_dir(self) -> None:
        fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
