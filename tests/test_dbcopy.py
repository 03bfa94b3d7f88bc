"""`db copy --to postgres://...`: an SQLite deployment moves into PostgreSQL row for row, its
event numbering (epoch, seq) and cursor with it, verified before the COMMIT or not at all; and
`db import-legacy` into PostgreSQL goes through it. Against a real PostgreSQL server."""

from __future__ import annotations

import json
import os
import random
import sqlite3
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
import trio
import trio.lowlevel

from anon_ticket import dbcopy, schema
from anon_ticket.dbcopy import CopyMismatch, copy_to_postgres
from anon_ticket.domain.ids import PaymentId, ServiceToken
from anon_ticket.domain.messages import (
    Claim,
    ClaimStatus,
    LookupToken,
    MarkVanished,
    PollerPauseFlag,
    ReadCursor,
    ReadTicketState,
    RecordTransfers,
    Revoke,
    SkippedTransfer,
    TicketState,
    Transfer,
)
from anon_ticket.domain.tokens import derive_hmac
from anon_ticket.errors import StorageError
from tests.actors.core import run_core
from tests.pgserver import PgServer
from tests.process.proc import write_legacy_db
from tests.test_legacy import legacy_token

XMR = 10**12
CURSOR = 110
# Two reasons of one transfer that PostgreSQL's usual collations order the other way round
# from SQLite (bytewise: 'Zeta' < 'alpha').
REASONS = ("Zeta", "alpha")
TABLES = ("tickets", "transfers", "skipped", "state")
CLI = [sys.executable, "-m", "anon_ticket"]


@dataclass
class Source:
    """An SQLite database written by the real storage actor (secret b"s" * 32)."""

    db: Path
    claimable: PaymentId  # two transfers (paid, then topped up), not claimed
    first_txid: bytes  # its transfer at the lowest height: the one its token derives from
    claimed: PaymentId
    claimed_token: ServiceToken
    revoked: PaymentId
    revoked_token: ServiceToken
    vanished: PaymentId  # its only transfer vanished in a reorg
    states: dict[PaymentId, TicketState]


async def fill(data_dir: Path) -> Source:
    async with run_core(data_dir) as core:
        a, b, c, d = (PaymentId.generate() for _ in range(4))
        first = os.urandom(32)
        await core.pay(a, 4 * XMR // 10, height=100, txid=first)
        await core.pay(a, XMR // 10, height=101)
        await core.pay(b, XMR, height=102)
        claimed = await core.storage.ask(Claim(b), 5)
        await core.pay(c, 2 * XMR, height=103)
        revoked = await core.storage.ask(Claim(c), 5)
        await core.storage.ask(Revoke(revoked.token, "resold", 7), 5)
        gone = os.urandom(32)
        await core.pay(d, XMR, height=104, txid=gone)
        await core.storage.ask(MarkVanished(gone, d), 5)
        shared = os.urandom(32)
        skipped = (*(SkippedTransfer(shared, r, 5, 105) for r in REASONS),
                   SkippedTransfer(os.urandom(32), "below_minimum", 7, 106, "00" * 8))
        await core.storage.ask(RecordTransfers((), skipped, cursor=CURSOR), 5)
        await core.storage.ask(PollerPauseFlag(True), 5)  # an operator paused it: it stays
        states = {p: await core.storage.ask(ReadTicketState(pid=p), 5) for p in (a, b, c, d)}
    return Source(core.db_path, a, first, b, claimed.token, c, revoked.token, d, states)


def sqlite_rows(db: Path, table: str) -> list[tuple[Any, ...]]:
    """Every row, columns as the table declares them (`SELECT *`: independent of the column
    lists db copy names), in a stable order. Through stdlib `sqlite3`, a second reader, so
    only while no actor has the file open (anon_ticket/dbcopy.py says why)."""
    conn = sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True)
    try:
        rows = conn.execute(f"SELECT * FROM {table}").fetchall()
    finally:
        conn.close()
    if table == "state":
        rows = [r for r in rows if r[0] != "write_probe"]
    return sorted(rows, key=repr)


def pg_rows(url: str, table: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(url) as conn:
        return sorted(conn.execute(f"SELECT * FROM {table}").fetchall(), key=repr)


def pg_count(url: str, table: str) -> int | None:
    """Rows in `table`, None when it does not exist."""
    with psycopg.connect(url) as conn:
        if conn.execute("SELECT to_regclass(%s)", (table,)).fetchone() == (None,):
            return None
        (n,) = conn.execute(f"SELECT count(*) FROM {table}").fetchone()  # type: ignore[misc]
        return int(n)


def pg_state(url: str) -> dict[str, int]:
    return dict(pg_rows(url, "state"))


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=120)


# --- the round trip ----------------------------------------------------------------------


async def test_a_copy_carries_every_row_and_serves_from_postgres(
        tmp_path: Path, pg_dsn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    src = await fill(tmp_path / "sqlite")
    monkeypatch.setattr(dbcopy, "CHUNK_ROWS", 2)  # several chunks each way, even here
    report = copy_to_postgres(src.db, pg_dsn)

    counts = {t.name: t.rows for t in report.tables}
    assert counts == {"tickets": 4, "transfers": 5, "skipped": 3, "state": 3}
    for table in TABLES:
        assert pg_rows(pg_dsn, table) == sqlite_rows(src.db, table), table
    epoch = src.states[src.claimable].epoch
    assert pg_state(pg_dsn) == {"epoch": epoch, "cursor": CURSOR, "poller_paused": 1}
    assert (report.epoch, report.cursor) == (epoch, CURSOR)
    assert all(len(t.checksum) == 64 for t in report.tables)
    vanished = [r for r in pg_rows(pg_dsn, "transfers") if r[1] == src.vanished.raw]
    assert len(vanished) == 1 and vanished[0][5] is not None  # vanished_at came along
    assert pg_count(pg_dsn, "cluster_events") == 0  # PostgreSQL's own: not touched

    # The service on the copy: same numbering, same tokens, same cursor.
    async with run_core(tmp_path / "pg", pg=pg_dsn) as core:
        for pid, before in src.states.items():
            assert await core.storage.ask(ReadTicketState(pid=pid), 5) == before
        assert await core.storage.ask(ReadCursor(), 5) == CURSOR
        again = await core.storage.ask(Claim(src.claimed), 5)
        assert (again.status, again.token, again.balance) == (
            ClaimStatus.ALREADY_CLAIMED, src.claimed_token, XMR)
        info = await core.storage.ask(LookupToken(src.revoked_token), 5)
        assert (info.revoked, info.revoke_reason, info.abuse_score) == (True, "resold", 7)
        new = await core.storage.ask(Claim(src.claimable), 5)
        assert new.status is ClaimStatus.SUCCESS and new.balance == XMR // 2
        after = await core.storage.ask(ReadTicketState(pid=src.claimable), 5)
        assert (after.epoch, after.seq) == (epoch, src.states[src.claimable].seq + 1)
    # ... the token SQLite would have given (the copy left the source as it was).
    assert new.token == derive_hmac(b"s" * 32, src.claimable, src.first_txid.hex())
    async with run_core(tmp_path / "sqlite") as core:
        on_sqlite = await core.storage.ask(Claim(src.claimable), 5)
    assert (on_sqlite.status, on_sqlite.token) == (ClaimStatus.SUCCESS, new.token)


async def test_text_keys_are_compared_in_sqlite_order(tmp_path: Path,
                                                      pg_server: PgServer) -> None:
    """A database whose collation orders 'alpha' before 'Zeta' (SQLite: after) still
    verifies: the read-back orders text keys bytewise."""
    src = await fill(tmp_path)
    name = pg_server.fresh_name()
    with psycopg.connect(pg_server.dsn(), autocommit=True) as admin:
        try:
            admin.execute(f'CREATE DATABASE "{name}" TEMPLATE template0 ENCODING \'UTF8\' '
                          "LOCALE_PROVIDER icu ICU_LOCALE 'en' LOCALE 'C'")
        except psycopg.Error as exc:
            pytest.skip(f"no ICU collation here: {exc}")
    url = pg_server.dsn(name)
    try:
        with psycopg.connect(url) as conn:
            order = conn.execute("SELECT x FROM (VALUES ('Zeta'), ('alpha')) v (x) "
                                 "ORDER BY x").fetchall()
        assert order == [("alpha",), ("Zeta",)]  # the case this test is about
        copy_to_postgres(src.db, url)
        assert pg_rows(url, "skipped") == sqlite_rows(src.db, "skipped")
    finally:
        pg_server.drop_database(name)


async def test_a_copy_reads_one_snapshot_while_the_server_writes(
        tmp_path: Path, pg_dsn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Between the tickets and the transfers the server commits new tickets and top-ups: the
    copy still holds the database as it was when it began (every balance the sum of its
    transfers, no transfer without its ticket)."""
    async with run_core(tmp_path) as core:
        pids = [PaymentId.generate() for _ in range(500)]
        await core.storage.ask(RecordTransfers(tuple(
            Transfer(os.urandom(32), p, 100, 10) for p in pids)), 30)
        writes = 0
        stop = threading.Event()

        async def writer() -> None:
            nonlocal writes
            while not stop.is_set():
                await core.storage.ask(RecordTransfers((
                    Transfer(os.urandom(32), random.choice(pids), 1, 11),
                    Transfer(os.urandom(32), PaymentId.generate(), 1, 11))), 5)
                writes += 1
                await trio.lowlevel.checkpoint()

        real = dbcopy._copy_table

        def copy_table(src: Any, cur: Any, table: Any) -> Any:
            digest = real(src, cur, table)
            if table.name == "tickets":  # (in the copy's thread) let the server write
                seen = writes
                deadline = time.monotonic() + 10
                while writes < seen + 5 and time.monotonic() < deadline:
                    time.sleep(0.01)
            return digest

        monkeypatch.setattr(dbcopy, "_copy_table", copy_table)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer)
            started_at = writes
            report = await trio.to_thread.run_sync(copy_to_postgres, core.db_path, pg_dsn)
            stop.set()
        assert writes >= started_at + 5  # the server did write during the copy
    counts = {t.name: t.rows for t in report.tables}
    assert 500 <= counts["tickets"] < 500 + writes
    assert pg_count(pg_dsn, "tickets") == counts["tickets"]
    assert pg_count(pg_dsn, "transfers") == counts["transfers"]
    with psycopg.connect(pg_dsn) as conn:
        off = conn.execute("SELECT count(*) FROM tickets t WHERE amount <> (SELECT "
                           "coalesce(sum(amount), 0) FROM transfers WHERE pid = t.pid)"
                           ).fetchone()
    assert off == (0,)
    assert len(sqlite_rows(core.db_path, "tickets")) > counts["tickets"]


# --- refusals ----------------------------------------------------------------------------


async def test_a_target_that_is_not_empty_is_refused(tmp_path: Path, pg_dsn: str) -> None:
    src = await fill(tmp_path)
    copy_to_postgres(src.db, pg_dsn)
    before = {t: pg_rows(pg_dsn, t) for t in TABLES}
    with pytest.raises(StorageError, match=r"is not empty .*tickets, transfers, skipped, "
                       r"a cursor.*point --to at a new one"):
        copy_to_postgres(src.db, pg_dsn)
    assert {t: pg_rows(pg_dsn, t) for t in TABLES} == before
    # A cursor alone is enough: a poller has run there.
    with psycopg.connect(pg_dsn) as conn:
        conn.execute("TRUNCATE transfers, tickets, skipped")
    with pytest.raises(StorageError, match=r"is not empty \(it holds a cursor\)"):
        copy_to_postgres(src.db, pg_dsn)
    # So is a node running there (it read the cluster feed just now), even on no data.
    with psycopg.connect(pg_dsn) as conn:
        conn.execute("DELETE FROM state WHERE key = 'cursor'")
        conn.execute("INSERT INTO cluster_nodes (node, applied) VALUES ('node-b', 0)")
    with pytest.raises(StorageError, match=r"node 'node-b' is running on it .*stop every node"):
        copy_to_postgres(src.db, pg_dsn)
    with psycopg.connect(pg_dsn) as conn:  # gone for a while: no longer in the way
        conn.execute("UPDATE cluster_nodes SET seen_at = now() - interval '1 minute'")
    copy_to_postgres(src.db, pg_dsn)
    assert {t: pg_rows(pg_dsn, t) for t in TABLES} == before


async def test_a_target_a_node_runs_on_is_refused(tmp_path: Path, pg_dsn: str) -> None:
    src = await fill(tmp_path / "sqlite")
    async with run_core(tmp_path / "node", pg=pg_dsn, cluster=True):
        with trio.fail_after(10):
            while not pg_count(pg_dsn, "cluster_nodes"):
                await trio.sleep(0.05)
        with pytest.raises(StorageError, match="node 'node-a' is running on it"):
            await trio.to_thread.run_sync(copy_to_postgres, src.db, pg_dsn)
    assert pg_count(pg_dsn, "tickets") == 0


def test_a_missing_source_is_refused_before_the_target_is_touched(tmp_path: Path,
                                                                  pg_dsn: str) -> None:
    with pytest.raises(StorageError, match="no such database file"):
        copy_to_postgres(tmp_path / "anon-ticket.db", pg_dsn)
    assert pg_count(pg_dsn, "tickets") is None  # not even migrated


def test_an_old_or_legacy_source_is_refused(tmp_path: Path, pg_dsn: str) -> None:
    legacy = write_legacy_db(tmp_path / "legacy.db", [])
    with pytest.raises(StorageError, match="original anon-ticket's database; import it"):
        copy_to_postgres(legacy, pg_dsn)
    old = tmp_path / "old.db"
    conn = sqlite3.connect(old)
    conn.execute("CREATE TABLE _sqlite_migrations (id INTEGER PRIMARY KEY, migration_set "
                 "TEXT, name TEXT, applied_at TEXT)")
    conn.execute("INSERT INTO _sqlite_migrations (migration_set, name, applied_at) "
                 f"VALUES ('{schema.MIGRATION_SET}', 'm001_initial', '')")
    conn.commit()
    conn.close()
    with pytest.raises(StorageError, match=r"older layout .*m002_event_numbering"):
        copy_to_postgres(old, pg_dsn)
    assert pg_count(pg_dsn, "tickets") is None


async def test_a_copy_that_reads_back_different_is_rolled_back(tmp_path: Path,
                                                               pg_dsn: str) -> None:
    src = await fill(tmp_path)
    schema.migrate_postgres(pg_dsn)
    epoch_before = pg_state(pg_dsn)["epoch"]
    with psycopg.connect(pg_dsn) as conn:  # a value that changes on its way in
        conn.execute("""
            CREATE FUNCTION tamper() RETURNS trigger LANGUAGE plpgsql AS $$
                BEGIN NEW.amount := NEW.amount + 1; RETURN NEW; END $$;
            CREATE TRIGGER tamper BEFORE INSERT ON transfers
                FOR EACH ROW EXECUTE FUNCTION tamper();
        """)
    with pytest.raises(CopyMismatch, match="verification failed, nothing was written: the "
                       r"copy of transfers differs .*\(source 5 rows, .*; copy 5 rows, "):
        copy_to_postgres(src.db, pg_dsn)
    assert {t: pg_count(pg_dsn, t) for t in TABLES} == {
        "tickets": 0, "transfers": 0, "skipped": 0, "state": 1}
    assert pg_state(pg_dsn) == {"epoch": epoch_before}


async def test_a_checksum_that_differs_is_a_mismatch(tmp_path: Path, pg_dsn: str,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The other side of the comparison: the read-back's own hash disagreeing."""
    src = await fill(tmp_path)
    real = dbcopy._read_back

    def skewed(conn: Any, table: Any) -> Any:
        count, digest = real(conn, table)
        if table.name == "tickets":
            digest.feed([("one more",)])
        return count, digest

    monkeypatch.setattr(dbcopy, "_read_back", skewed)
    with pytest.raises(CopyMismatch, match="the copy of tickets differs"):
        copy_to_postgres(src.db, pg_dsn)
    assert pg_count(pg_dsn, "tickets") == 0
    assert "cursor" not in pg_state(pg_dsn)


# --- the command line --------------------------------------------------------------------


async def test_cli_copy_prints_a_summary_and_refuses_a_second_time(
        tmp_path: Path, pg_dsn: str, pg_server: PgServer) -> None:
    data = tmp_path / "data"
    src = await fill(data)
    done = run_cli("--data-dir", str(data), "db", "copy", "--to", pg_dsn)
    assert done.returncode == 0, done.stderr
    assert "tickets" in done.stdout and "verified" in done.stdout
    assert done.stdout.rstrip().endswith("and give every node this data directory's "
                                         "token.secret")
    assert pg_rows(pg_dsn, "tickets") == sqlite_rows(src.db, "tickets")

    again = run_cli("--data-dir", str(data), "db", "copy", "--to", pg_dsn, "--json")
    assert again.returncode == 1
    assert "is not empty" in again.stderr and "Traceback" not in again.stderr

    name = pg_server.fresh_name()
    other = pg_server.create_database(name)
    try:
        as_json = run_cli("--data-dir", str(data), "db", "copy", "--to", other, "--json")
        assert as_json.returncode == 0, as_json.stderr
        summary = json.loads(as_json.stdout)
        assert summary["verified"] is True
        assert summary["epoch"] == src.states[src.claimed].epoch
        assert summary["cursor"] == CURSOR
        assert [(t["table"], t["rows"]) for t in summary["tables"]] == [
            ("tickets", 4), ("transfers", 5), ("skipped", 3), ("state", 3)]
        assert all(len(t["checksum"]) == 64 for t in summary["tables"])
    finally:
        pg_server.drop_database(name)


def test_cli_refusals_are_usage_errors(tmp_path: Path, pg_dsn: str) -> None:
    data = tmp_path / "data"
    missing = run_cli("--data-dir", str(data), "db", "copy", "--to", pg_dsn)
    assert missing.returncode == 2
    assert "no such database file" in missing.stderr
    schema.migrate(data / "anon-ticket.db")
    not_pg = run_cli("--data-dir", str(data), "db", "copy", "--to", "sqlite:///x.db")
    assert not_pg.returncode == 2 and "postgres://" in not_pg.stderr
    on_pg = ["--data-dir", str(data), "--database-url", pg_dsn, "db"]
    from_pg = run_cli(*on_pg, "copy", "--to", pg_dsn)
    assert from_pg.returncode == 2 and "already PostgreSQL" in from_pg.stderr
    backup = run_cli(*on_pg, "backup", str(tmp_path / "b.tar"))
    assert backup.returncode == 2 and "pg_dump" in backup.stderr
    assert not (tmp_path / "b.tar").exists()
    check = run_cli(*on_pg, "check")
    assert check.returncode == 2 and "PostgreSQL" in check.stderr
    restore = run_cli(*on_pg, "restore", str(tmp_path / "b.tar"))
    assert restore.returncode == 2 and "pg_restore" in restore.stderr
    for done in (missing, not_pg, from_pg, backup, check, restore):
        assert "Traceback" not in done.stderr and done.stdout == ""
    assert pg_count(pg_dsn, "tickets") is None


def _legacy(tmp_path: Path) -> tuple[Path, list[tuple[bytes, str, int, int]],
                                     list[tuple[bytes, str, int, int]]]:
    rows = [(os.urandom(8), os.urandom(32).hex(), (i + 1) * XMR // 10, 2000 + i)
            for i in range(5)]
    claimed = [(os.urandom(8), os.urandom(32).hex(), XMR, 1990 + i) for i in range(3)]
    return write_legacy_db(tmp_path / "legacy.db", rows, claimed=claimed,
                           last_height=2010), rows, claimed


def test_import_legacy_into_postgres(tmp_path: Path, pg_dsn: str) -> None:
    legacy, rows, claimed = _legacy(tmp_path)
    data = tmp_path / "data"
    done = run_cli("--data-dir", str(data), "--database-url", pg_dsn,
                   "db", "import-legacy", str(legacy))
    assert done.returncode == 0, done.stderr
    assert "tickets created:           8" in done.stdout
    assert "verified" in done.stdout
    tickets = {r[0]: r for r in pg_rows(pg_dsn, "tickets")}
    assert len(tickets) == 8
    for pid, _, amount, _ in rows:
        assert tickets[pid][1] == amount and tickets[pid][3] is None
    for pid, tx, _, _ in claimed:
        assert tickets[pid][3] == legacy_token(pid, tx)
    transfers = pg_rows(pg_dsn, "transfers")
    assert len(transfers) == 8 and {r[6] for r in transfers} == {"legacy"}
    assert pg_state(pg_dsn)["cursor"] == 1989  # rescans from the lowest imported height
    assert sorted(p.name for p in data.iterdir()) == ["anon-ticket.lock"]  # staging gone

    # Into a database that holds tickets: refused before anything is imported.
    again = run_cli("--data-dir", str(data), "--database-url", pg_dsn,
                    "db", "import-legacy", str(legacy))
    assert again.returncode == 1
    assert "is not empty" in again.stderr and "legacy payments seen" not in again.stdout
    assert len(pg_rows(pg_dsn, "tickets")) == 8


def test_import_legacy_into_sqlite_is_unchanged(tmp_path: Path) -> None:
    legacy, _, _ = _legacy(tmp_path)
    data = tmp_path / "data"
    done = run_cli("--data-dir", str(data), "db", "import-legacy", str(legacy))
    assert done.returncode == 0, done.stderr
    assert "verified" not in done.stdout
    assert len(sqlite_rows(data / "anon-ticket.db", "tickets")) == 8
