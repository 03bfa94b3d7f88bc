"""Start-up against PostgreSQL, as an operator meets it: an unreachable database is one clear
line and exit 2 (a configuration error systemd does not restart), never a traceback or a
crash loop (docs/architecture.md §9)."""

from __future__ import annotations

from pathlib import Path

from tests.harness import free_port
from tests.process.proc import cli


def test_an_unreachable_database_at_start_is_a_clear_error_and_exit_2(tmp_path: Path) -> None:
    nowhere = tmp_path / "no-server-here"
    nowhere.mkdir()
    url = f"postgresql://anon:hunter2@/anon?host={nowhere}&connect_timeout=2"
    done = cli(tmp_path / "data", "--database-url", url, "--bind-address",
               f"127.0.0.1:{free_port()}", "--monero-rpc-url",
               f"http://127.0.0.1:{free_port()}/json_rpc", "serve", timeout=60)
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.splitlines() if "cannot start" in line]
    assert len(lines) == 1, done.stderr
    assert "cannot reach the database" in lines[0]
    assert "Traceback" not in done.stderr
    assert "hunter2" not in done.stderr  # the password is never logged


def test_a_database_written_by_a_newer_version_is_refused(tmp_path: Path, pg_dsn: str) -> None:
    import psycopg

    from anon_ticket.schema import migrate_postgres

    migrate_postgres(pg_dsn)
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("INSERT INTO schema_migrations (name) VALUES ('p999_from_the_future')")
    done = cli(tmp_path / "data", "--database-url", pg_dsn, "--bind-address",
               f"127.0.0.1:{free_port()}", "--monero-rpc-url",
               f"http://127.0.0.1:{free_port()}/json_rpc", "serve", timeout=60)
    assert done.returncode == 2, done.stderr
    assert "newer anon-ticket" in done.stderr and "p999_from_the_future" in done.stderr
    assert "Traceback" not in done.stderr
