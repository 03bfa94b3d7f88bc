"""The tests' own PostgreSQL server (tests/pgserver.py): a real server that takes writes, gives
every test a database of its own, survives a restart and a crash with its data, and leaves
no process and no directory behind, even after its session was killed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

from tests import pgserver
from tests.pgserver import PgServer

ROOT = Path(__file__).resolve().parent.parent


def alive(pid: int) -> bool:
    """Whether `pid` is a live process (an unreaped zombie is not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2] != "Z"


def test_a_fresh_database_keeps_what_is_written(pg_dsn: str) -> None:
    with psycopg.connect(pg_dsn) as conn:
        conn.execute("CREATE TABLE ticket (id integer PRIMARY KEY, state text NOT NULL)")
        conn.execute("INSERT INTO ticket VALUES (1, 'waiting'), (2, 'claimed')")
    with psycopg.connect(pg_dsn) as conn:
        rows = conn.execute("SELECT id, state FROM ticket ORDER BY id").fetchall()
        settings = conn.execute("SELECT current_user, current_setting('fsync'), "
                                "current_setting('listen_addresses')").fetchone()
    assert rows == [(1, "waiting"), (2, "claimed")]
    assert settings == ("anon", "off", "")  # fsync off by default, no TCP at all


def test_fresh_databases_are_isolated(pg_server: PgServer) -> None:
    first, second = pg_server.create_database(), pg_server.create_database()
    assert first != second and first.startswith("postgresql://anon@/test_")
    with psycopg.connect(first) as conn:
        conn.execute("CREATE TABLE ticket (id integer)")
        conn.execute("INSERT INTO ticket VALUES (1)")
    with psycopg.connect(second) as conn:
        with pytest.raises(psycopg.errors.UndefinedTable):
            conn.execute("SELECT * FROM ticket")
        conn.rollback()
        conn.execute("CREATE TABLE ticket (id integer)")  # the same name, another table
        assert conn.execute("SELECT count(*) FROM ticket").fetchone() == (0,)
    with psycopg.connect(first) as conn:
        assert conn.execute("SELECT count(*) FROM ticket").fetchone() == (1,)


def test_restart_keeps_the_data_and_ends_older_connections(pg_server: PgServer,
                                                           pg_dsn: str) -> None:
    with psycopg.connect(pg_dsn) as conn:
        conn.execute("CREATE TABLE ticket (id integer)")
        conn.execute("INSERT INTO ticket VALUES (7)")
    before = psycopg.connect(pg_dsn, autocommit=True)
    try:
        pid = pg_server.pid()
        pg_server.restart()
        assert pg_server.pid() not in (None, pid)
        with pytest.raises(psycopg.OperationalError):
            before.execute("SELECT 1")
    finally:
        before.close()
    with psycopg.connect(pg_dsn) as conn:
        assert conn.execute("SELECT id FROM ticket").fetchall() == [(7,)]


def test_a_killed_server_recovers_and_close_leaves_nothing(pg_server: PgServer) -> None:
    # A server of its own: killing the session's would fail the tests running after this one.
    server = PgServer(fsync=True).start()
    directory = server.dir
    try:
        assert server.start_seconds is not None and server.start_seconds < 30
        dsn = server.create_database()
        with psycopg.connect(dsn) as conn:
            assert conn.execute("SHOW fsync").fetchone() == ("on",)
            conn.execute("CREATE TABLE ticket (id integer)")
            conn.execute("INSERT INTO ticket VALUES (1)")
        killed = server.pid()
        assert killed is not None
        server.kill()
        assert not alive(killed) and not server.is_running()
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(dsn, connect_timeout=5).close()
        server.restart()  # crash recovery replays the committed insert
        with psycopg.connect(dsn) as conn:
            assert conn.execute("SELECT id FROM ticket").fetchall() == [(1,)]
        last = server.pid()
        assert last is not None
    finally:
        server.close()
    assert not directory.exists()
    assert not alive(last)
    server.close()  # a second close is harmless
    assert pg_server.is_running()  # the session's server was not touched


def test_the_next_start_stops_what_a_killed_session_left() -> None:
    # A session killed with SIGKILL runs neither its fixture's teardown nor atexit.
    script = ("import os, signal\n"
              "from tests.pgserver import PgServer\n"
              "s = PgServer().start()\n"
              "print(s.dir, s.pid(), flush=True)\n"
              "os.kill(os.getpid(), signal.SIGKILL)\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == -signal.SIGKILL, done.stderr
    directory, pid = done.stdout.split()
    assert Path(directory).is_dir() and alive(int(pid))  # orphaned, still serving
    pgserver.reap_leftovers()
    assert not Path(directory).exists() and not alive(int(pid))


def test_the_newest_installed_version_is_used(tmp_path: Path) -> None:
    for version in ("9.6", "15", "16", "devel"):
        (tmp_path / version / "bin").mkdir(parents=True)
        (tmp_path / version / "bin" / "initdb").touch()
    (tmp_path / "17" / "bin").mkdir(parents=True)  # a version's leftover, without a server
    assert pgserver.find_bindir(tmp_path) == tmp_path / "16" / "bin"
    assert pgserver.find_bindir(tmp_path / "none") is None


def test_missing_binaries_skip_unless_the_run_demands_them(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pgserver, "find_bindir", lambda: None)
    monkeypatch.delenv(pgserver.REQUIRE_ENV, raising=False)
    with pytest.raises(pytest.skip.Exception, match=r"scripts/setup\.sh --test"):
        pgserver.require_bindir()
    monkeypatch.setenv(pgserver.REQUIRE_ENV, "1")
    with pytest.raises(pytest.fail.Exception, match="ANON_TICKET_REQUIRE_POSTGRES=1"):
        pgserver.require_bindir()
