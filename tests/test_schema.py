"""Migrations: applied once, backed up first, unknown ones and the original's file refused."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from sqlite_utils import Database

from anon_ticket import schema
from anon_ticket.errors import StorageError
from tests.test_legacy import LEGACY_DDL


def test_migrate_is_idempotent(tmp_path: Path) -> None:
    db = tmp_path / "a.db"
    assert schema.migrate(db) == list(schema.KNOWN)
    assert schema.migrate(db) == []
    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)


def test_unknown_migrations_are_refused(tmp_path: Path) -> None:
    db = tmp_path / "a.db"
    schema.migrate(db)
    conn = sqlite3.connect(db)
    conn.execute("INSERT INTO _sqlite_migrations (migration_set, name, applied_at) "
                 "VALUES (?, 'm999_from_the_future', '2030-01-01')", (schema.MIGRATION_SET,))
    conn.commit()
    conn.close()
    with pytest.raises(StorageError, match="newer anon-ticket"):
        schema.migrate(db)


def test_the_originals_database_points_at_import_legacy(tmp_path: Path) -> None:
    db = tmp_path / "original.db"
    conn = sqlite3.connect(db)
    conn.executescript(LEGACY_DDL)
    conn.close()
    with pytest.raises(schema.LegacyDatabase, match="db import-legacy"):
        schema.migrate(db)


def test_a_backup_is_taken_before_migrating_an_existing_database(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    db = tmp_path / "a.db"
    schema.migrate(db)

    @schema.migrations(name="m900_test_only")
    def _extra(database: object) -> None:
        sqlite3_conn = database.conn  # type: ignore[attr-defined]
        sqlite3_conn.execute("CREATE TABLE extra (x)")

    monkeypatch.setattr(schema, "KNOWN", (*schema.KNOWN, "m900_test_only"))
    try:
        assert schema.migrate(db) == ["m900_test_only"]
        backups = list(tmp_path.glob("a.db.pre-m900_test_only-*.bak"))
        assert len(backups) == 1
        old = sqlite3.connect(backups[0])
        names = {r[0] for r in old.execute("SELECT name FROM sqlite_master")}
        assert "tickets" in names and "extra" not in names
    finally:
        schema.migrations._migrations.pop()


def test_m003_keeps_every_transfer_and_indexes_the_reorg_window(tmp_path: Path) -> None:
    db = tmp_path / "a.db"
    conn = sqlite3.connect(db, isolation_level=None)
    schema.migrations.apply(Database(conn), stop_before="m003_transfers_by_pid_and_height")
    rows: list[tuple[object, ...]] = [
        (bytes([i]) * 32, bytes([i % 3 + 1]) * 8, 10 + i, 100 + i, "t", None, "chain")
        for i in range(9)]
    rows[4] = (*rows[4][:5], "gone", "legacy")
    for pid in {r[1] for r in rows}:
        conn.execute("INSERT INTO tickets (pid, amount, created_at) VALUES (?, 1, 't')", (pid,))
    conn.executemany("INSERT INTO transfers VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
    conn.close()

    assert schema.migrate(db)[0] == "m003_transfers_by_pid_and_height"
    conn = sqlite3.connect(db)
    kept = conn.execute("SELECT txid, pid, amount, height, recorded_at, vanished_at, source "
                        "FROM transfers ORDER BY height").fetchall()
    assert kept == rows
    plan = conn.execute("EXPLAIN QUERY PLAN SELECT txid, pid, height FROM transfers "
                        "WHERE height > ? AND vanished_at IS NULL", (0,)).fetchall()
    assert "transfers_by_height" in plan[0][-1]  # not a scan of every transfer each tick
    with pytest.raises(sqlite3.IntegrityError):  # still one row per (txid, pid): I1
        conn.execute("INSERT INTO transfers (txid, pid, amount, height, recorded_at) "
                     "VALUES (?, ?, 1, 1, 't')", (rows[0][0], rows[0][1]))


def test_m004_keeps_every_ticket_and_tokens_unique_without_indexing_unclaimed(
        tmp_path: Path) -> None:
    db = tmp_path / "a.db"
    conn = sqlite3.connect(db, isolation_level=None)
    schema.migrations.apply(Database(conn), stop_before="m004_token_index_without_unclaimed")
    tickets: list[tuple[object, ...]] = [
        (bytes([i + 1]) * 8, 10 * i, f"c{i}", None, None, None, None, 0, i) for i in range(6)]
    tickets[1] = (tickets[1][0], 20, "c1", b"t" * 32, "at1", None, None, 0, 3)
    tickets[2] = (tickets[2][0], 30, "c2", b"u" * 32, "at2", "rv2", "abuse", 7, 5)
    conn.executemany("INSERT INTO tickets (pid, amount, created_at, token, claimed_at, "
                     "revoked_at, revoke_reason, abuse_score, seq) "
                     "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", tickets)
    conn.execute("INSERT INTO transfers (txid, pid, amount, height, recorded_at) "
                 "VALUES (?, ?, 5, 1, 't')", (b"x" * 32, tickets[1][0]))
    conn.close()

    assert schema.migrate(db) == ["m004_token_index_without_unclaimed"]
    conn = sqlite3.connect(db)
    kept = conn.execute("SELECT pid, amount, created_at, token, claimed_at, revoked_at, "
                        "revoke_reason, abuse_score, seq FROM tickets ORDER BY pid").fetchall()
    assert kept == tickets
    assert conn.execute("PRAGMA foreign_key_check").fetchall() == []
    assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    # One index on tickets besides the key: the token's, partial (claimed tickets only)...
    indexes = [(r[1], r[2], r[4]) for r in conn.execute("PRAGMA index_list(tickets)")
               if r[3] != "pk"]
    assert indexes == [("tickets_by_token", 1, 1)]  # (name, unique, partial)
    plan = conn.execute("EXPLAIN QUERY PLAN SELECT pid FROM tickets WHERE token = ?",
                        (b"t" * 32,)).fetchall()
    assert "tickets_by_token" in plan[0][-1]  # ...which still serves lookups by token
    with pytest.raises(sqlite3.IntegrityError):  # and a token is still one ticket's
        conn.execute("UPDATE tickets SET token = ?, claimed_at = 'x' WHERE pid = ?",
                     (b"t" * 32, tickets[3][0]))
