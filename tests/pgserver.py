"""A real PostgreSQL server for the tests, run from Debian's `postgresql` binaries.

The fixtures are registered once for the whole suite, in tests/conftest.py (as `regtest_chain`
is, and for the same reason test modules must NOT import them):

- `pg_server` (session): one started `PgServer`, shared by the session (`shared_server()`,
  which the harness's in-process servers use too when the run asks for PostgreSQL);
- `pg_dsn` (function): the DSN of a fresh database on it, dropped after the test.

Tests isolate by database, not by server: a server takes under a second to start, a database
some tens of milliseconds. A test may `restart()` the session server (it keeps the data); a
test that stops, kills or reconfigures a server starts a `PgServer` of its own.

The server is a throwaway cluster in a temporary directory: `initdb --no-sync`, trust
authentication, no TCP (a unix socket in that directory only), `fsync=off` unless asked for,
so nothing of it outlives the test and nothing else on the machine can reach it over the
network. The binaries are Debian's (`scripts/setup.sh --test` installs `postgresql`), under
/usr/lib/postgresql/<version>/bin and not on PATH; the package's own `main` cluster is never
used. initdb and pg_ctl refuse to run as root, and CI runs as root: there they run as the
`postgres` system user the package creates, in a directory it owns.

The DSN form is `postgresql://anon@/<dbname>?host=<directory>` (`anon` is the cluster's
superuser, the host a socket directory).

pg_ctl detaches the server (its own session), so it cannot die with the test process the way
the dev chain's children do (PR_SET_PDEATHSIG). Instead `close()` runs at the end of the
session and from atexit, and a session that was killed before either (SIGKILL) leaves an owner
stamp behind: the next `start()` stops such orphaned servers and removes their directories.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import os
import pwd
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import psycopg
import pytest
from psycopg import sql

PG_ROOT = Path("/usr/lib/postgresql")
SUPERUSER = "anon"
SERVER_USER = "postgres"  # the system user the server runs as when the tests run as root
REQUIRE_ENV = "ANON_TICKET_REQUIRE_POSTGRES"  # "1": no binaries fails the tests (scripts/test.sh)
DIR_PREFIX = "anon-ticket-pg-"
OWNER_FILE = "owner"  # "<pid> <start time>" of the process that started the server
# A unix socket path is limited to 107 bytes; the server's is DIR/.s.PGSQL.5432.
_MAX_DIR_LEN = 90
_WAIT = 60  # seconds pg_ctl waits for a start or a stop

_live: set[PgServer] = set()
_reaped = False


class PgServerError(RuntimeError):
    """initdb or pg_ctl failed; the message carries their output and the server log's tail."""


def find_bindir(root: Path = PG_ROOT) -> Path | None:
    """The bin directory of the newest installed major version, or None. Debian installs
    versions side by side (during an upgrade there are two)."""
    found: list[tuple[tuple[int, ...], Path]] = []
    for initdb in root.glob("*/bin/initdb"):
        try:
            version = tuple(int(part) for part in initdb.parent.parent.name.split("."))
        except ValueError:
            continue
        found.append((version, initdb.parent))
    return max(found)[1] if found else None


def _running_as_root() -> bool:
    return os.geteuid() == 0


def _start_time(pid: int) -> str | None:
    """The process's start time (in clock ticks since boot), or None if it is gone: a PID
    together with its start time names one process, even after the PID is reused."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2:].split()  # the name in parentheses may hold spaces
    if fields[0] == "Z":  # a zombie nobody reaped yet is gone all the same
        return None
    return fields[19]


def _owner_stamp(pid: int) -> str:
    return f"{pid} {_start_time(pid)}\n"


def _owner_alive(stamp: str) -> bool:
    parts = stamp.split()
    if len(parts) != 2 or not parts[0].isdigit():
        return False
    return _start_time(int(parts[0])) == parts[1]


def _group_alive(pgid: int) -> bool:
    """Whether any live (non-zombie) process is left in process group `pgid`."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()
        if fields[0] != "Z" and int(fields[2]) == pgid:
            return True
    return False


def _kill_group(pgid: int, timeout: float = 10.0) -> None:
    """SIGKILL a whole process group and wait until none of it is left."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)
    deadline = time.monotonic() + timeout
    while _group_alive(pgid):
        if time.monotonic() > deadline:
            raise PgServerError(f"process group {pgid} survived SIGKILL for {timeout} s")
        time.sleep(0.02)


def _postmaster_pid(data_dir: Path) -> int | None:
    """The PID in postmaster.pid if that process is a live server of `data_dir`. The server
    runs with its working directory in the data directory, which tells it from a process that
    reused the PID."""
    try:
        pid = int((data_dir / "postmaster.pid").read_text().split("\n", 1)[0])
        cwd = os.readlink(f"/proc/{pid}/cwd")
    except (OSError, ValueError):
        return None
    if Path(cwd) != data_dir or _start_time(pid) is None:
        return None
    return pid


def _others_can_enter(path: Path) -> bool:
    """Whether every directory down to `path` lets other users through (the server's user
    must reach its own directory when the tests run as root)."""
    for p in (path, *path.parents):
        try:
            if not p.stat().st_mode & 0o001:
                return False
        except OSError:
            return False
    return True


def _temp_base() -> Path:
    base = Path(tempfile.gettempdir()).resolve()
    if len(str(base)) + len(DIR_PREFIX) + 10 > _MAX_DIR_LEN or (
            _running_as_root() and not _others_can_enter(base)):
        return Path("/tmp")
    return base


def reap_leftovers(base: Path | None = None) -> None:
    """Stop the servers of sessions that were killed before they could close them, and remove
    their directories. A directory whose owner process still runs is another live session's."""
    for d in sorted((base or _temp_base()).glob(f"{DIR_PREFIX}*")):
        try:
            if (d / OWNER_FILE).stat().st_uid != os.geteuid():
                continue  # another user's tests: not ours to judge
            stamp = (d / OWNER_FILE).read_text()
        except OSError:
            continue  # not ours, or a server being set up right now
        if _owner_alive(stamp):
            continue
        pid = _postmaster_pid(d / "data")
        if pid is not None:
            _kill_group(pid)  # the server leads its own process group (pg_ctl's setsid)
        shutil.rmtree(d, ignore_errors=True)


def _clean_env() -> dict[str, str]:
    """The environment without libpq's PG* variables, which would redirect the tools (PGDATA,
    PGHOST, PGPORT...) away from the throwaway cluster."""
    return {k: v for k, v in os.environ.items() if not k.startswith("PG")}


class PgServer:
    """One throwaway PostgreSQL cluster and its server. `start()` creates it, `close()` stops
    the server and deletes everything."""

    def __init__(self, *, fsync: bool = False, max_connections: int = 200,
                 bindir: Path | None = None) -> None:
        # fsync=off: the data lives as long as the test session, and commits that skip the
        # disk keep the suite fast; a benchmark that measures commits turns it on.
        self.fsync = fsync
        self.max_connections = max_connections
        self._bindir = bindir
        self._dir: Path | None = None
        self._creator = os.getpid()
        self._names = itertools.count(1)
        self.start_seconds: float | None = None  # how long the last start() took

    # --- where things are ------------------------------------------------------------------

    @property
    def bindir(self) -> Path:
        if self._bindir is None:
            self._bindir = find_bindir()
            if self._bindir is None:
                raise PgServerError(f"no {PG_ROOT}/*/bin/initdb: scripts/setup.sh --test "
                                    "installs Debian's postgresql")
        return self._bindir

    @property
    def dir(self) -> Path:
        """The server's directory: the socket, `data/` and `log`."""
        if self._dir is None:
            raise PgServerError("the server was not started")
        return self._dir

    @property
    def data_dir(self) -> Path:
        return self.dir / "data"

    @property
    def log_path(self) -> Path:
        return self.dir / "log"

    def dsn(self, dbname: str = "postgres") -> str:
        """A libpq URL for `dbname` over the unix socket, as the cluster's superuser."""
        return (f"postgresql://{SUPERUSER}@/{quote(dbname, safe='')}"
                f"?host={quote(str(self.dir), safe='/')}")

    def pid(self) -> int | None:
        """The postmaster's PID while it runs."""
        return _postmaster_pid(self.data_dir) if self._dir is not None else None

    def is_running(self) -> bool:
        return self.pid() is not None

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    # --- running the tools -----------------------------------------------------------------

    def _run(self, tool: str, *args: str) -> subprocess.CompletedProcess[str]:
        argv = [str(self.bindir / tool), *args]
        if _running_as_root():
            argv = ["runuser", "-u", SERVER_USER, "--", *argv]
        done = subprocess.run(argv, cwd=self.dir, env=_clean_env(), stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=_WAIT + 30)
        if done.returncode != 0:
            raise PgServerError(
                f"{tool} {shlex.join(args)} failed with status {done.returncode}:\n"
                f"{done.stdout}{done.stderr}\n--- server log:\n{self.log_tail()}")
        return done

    def _server_options(self) -> str:
        """postgres's command line (pg_ctl -o): the socket in our directory, no TCP."""
        return shlex.join([
            "-k", str(self.dir), "-c", "listen_addresses=",
            "-c", f"fsync={'on' if self.fsync else 'off'}",
            "-c", f"max_connections={self.max_connections}",
        ])

    def _pg_ctl(self, action: str, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.data_dir), "-o", self._server_options(),
                  "-m", mode, "-w", "-t", str(_WAIT), "-l", str(self.log_path), action)

    # --- lifecycle -------------------------------------------------------------------------

    def start(self) -> PgServer:
        """Create the cluster in a new temporary directory and start its server; return self."""
        global _reaped
        if self._dir is not None:
            raise PgServerError(f"already started in {self._dir}")
        if not (self.bindir / "initdb").is_file():  # before any directory is made
            raise PgServerError(f"no initdb in {self.bindir}")
        if not _reaped:
            _reaped = True
            reap_leftovers()
        began = time.monotonic()
        self._dir = Path(tempfile.mkdtemp(prefix=DIR_PREFIX, dir=_temp_base()))
        _live.add(self)
        try:
            (self.dir / OWNER_FILE).write_text(_owner_stamp(os.getpid()))
            if _running_as_root():
                try:
                    user = pwd.getpwnam(SERVER_USER)
                except KeyError:
                    raise PgServerError(
                        f"initdb refuses root and there is no {SERVER_USER!r} user to run it "
                        "as (Debian's postgresql package creates it)") from None
                os.chown(self.dir, user.pw_uid, user.pw_gid)
                self.dir.chmod(0o755)  # the socket must be reachable from the tests (root)
            # --no-sync: the cluster is thrown away, and syncing it is most of initdb's time.
            # C locale and UTF-8 whatever the machine's locale, so the tests see one collation.
            self._run("initdb", "-D", str(self.data_dir), "-A", "trust",
                      "-U", SUPERUSER, "--no-sync", "-E", "UTF8", "--locale=C")
            self._pg_ctl("start")
        except BaseException:
            self.close()
            raise
        self.start_seconds = time.monotonic() - began
        return self

    def stop(self, mode: str = "fast") -> None:
        """Stop the server, keeping the data (`mode`: smart, fast or immediate). A server that
        is not running is left as it is."""
        if self.is_running():
            self._run("pg_ctl", "-D", str(self.data_dir), "-m", mode, "-w", "-t", str(_WAIT),
                      "stop")

    def restart(self, mode: str = "fast") -> None:
        """Stop the server (if it runs: this also brings a killed one back) and start it again
        on the same data and socket. Connections opened before are ended by the server."""
        self._pg_ctl("restart", mode)

    def kill(self) -> None:
        """SIGKILL the server and all its backends, as a crash would; `restart()` recovers."""
        pid = self.pid()
        if pid is None:
            return
        _kill_group(pid)
        # The dead postmaster is reparented to PID 1, which may take a while to reap it (a
        # second here) or never do so; until then kill(pid, 0) finds it, and postgres and
        # pg_ctl take its lock files for a running server's. Every process of the server is
        # dead, so the locks are stale: removing them is what a restart after a crash amounts
        # to once the PID is gone. Crash recovery is pg_control's business, not theirs.
        for lock in (self.data_dir / "postmaster.pid", *self.dir.glob(".s.PGSQL.*.lock")):
            with contextlib.suppress(FileNotFoundError):
                lock.unlink()

    def close(self) -> None:
        """Stop the server at once and delete its directory. Safe to call more than once."""
        _live.discard(self)
        if self._dir is None:
            return
        try:
            try:
                self.stop("immediate")
            except (PgServerError, subprocess.TimeoutExpired):
                self.kill()
        finally:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def __enter__(self) -> PgServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- databases -------------------------------------------------------------------------

    def fresh_name(self) -> str:
        """A database name not used before on this server."""
        return f"test_{next(self._names)}"

    def _admin(self) -> psycopg.Connection[tuple[object, ...]]:
        return psycopg.connect(self.dsn("postgres"), autocommit=True, connect_timeout=10)

    def create_database(self, name: str | None = None) -> str:
        """Create an empty database (a fresh name unless `name` is given); return its DSN."""
        name = name or self.fresh_name()
        with self._admin() as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.dsn(name)

    def drop_database(self, name: str) -> None:
        """Drop a database, ending any connection still open to it."""
        with self._admin() as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)")
                         .format(sql.Identifier(name)))


@atexit.register
def _close_all() -> None:
    """A session that ends without its fixture's teardown (an exit from inside a test, a
    KeyboardInterrupt at the wrong moment) still stops its servers."""
    for server in list(_live):
        if server._creator != os.getpid():
            continue  # a forked child exiting: the server is its parent's
        with contextlib.suppress(Exception):
            server.close()


# --- fixtures (registered in tests/conftest.py) -------------------------------------------


def require_bindir() -> Path:
    """The server binaries, or a skip where they are not installed; where the run demands
    them (`ANON_TICKET_REQUIRE_POSTGRES=1`, set by scripts/test.sh) a failure, so a machine
    that lost them cannot pass by skipping every PostgreSQL test."""
    bindir = find_bindir()
    if bindir is None:
        why = (f"PostgreSQL's server binaries are missing (no {PG_ROOT}/*/bin/initdb); "
               "scripts/setup.sh --test installs Debian's postgresql")
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(f"{why}, and {REQUIRE_ENV}=1 demands them")
        pytest.skip(why)
    return bindir


_shared: PgServer | None = None


def shared_server() -> PgServer:
    """The process's one PostgreSQL server, started on first use: the `pg_server` fixture's,
    and the in-process servers' of the harness (tests/harness.py) when the run puts them on
    PostgreSQL. It is closed with the session (the fixture's teardown), or else at exit
    (atexit, as every `PgServer`); a session killed before either leaves it to the next
    `start()` to reap. Without the binaries this raises `PgServerError`."""
    global _shared
    if _shared is None or _shared._dir is None:
        _shared = PgServer().start()
    return _shared


def close_shared() -> None:
    """Stop the shared server and delete it (if it was started); a later `shared_server()`
    starts a new one."""
    global _shared
    server, _shared = _shared, None
    if server is not None:
        server.close()


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    require_bindir()
    try:
        yield shared_server()
    finally:
        close_shared()


@pytest.fixture
def pg_dsn(pg_server: PgServer) -> Iterator[str]:
    name = pg_server.fresh_name()
    dsn = pg_server.create_database(name)
    yield dsn
    pg_server.drop_database(name)
