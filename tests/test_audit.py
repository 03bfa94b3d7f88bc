"""`db check`: a healthy import audits clean; each kind of corruption is reported, redacted."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from anon_ticket.audit import check_database, summary
from anon_ticket.legacy import import_legacy
from anon_ticket.schema import migrate
from tests.test_legacy import (
    AMOUNTS,
    NOW,
    NOW_TEXT,
    PID_CLAIMED,
    PID_DEFAULT_TS,
    PID_UNCLAIMED,
    VALID_HEIGHTS,
    build_legacy,
    txid,
)

ALL_PIDS = [*VALID_HEIGHTS, bytes(8)]


@pytest.fixture
def imported(tmp_path: Path) -> Path:
    db = tmp_path / "data" / "anon_ticket.db"
    import_legacy(build_legacy(tmp_path / "legacy.db"), db, now=NOW)
    return db


def corrupt(db: Path, tmp_path: Path, *statements: str | tuple[str, tuple[object, ...]]) -> Path:
    """Copy `db` and run raw statements on the copy, bypassing CHECK and FK constraints."""
    copy = tmp_path / "copy.db"
    src, dst = sqlite3.connect(db), sqlite3.connect(copy)
    src.backup(dst)
    src.close()
    dst.execute("PRAGMA ignore_check_constraints = ON")
    dst.execute("PRAGMA foreign_keys = OFF")
    with dst:
        for st in statements:
            if isinstance(st, tuple):
                dst.execute(*st)
            else:
                dst.execute(st)
    dst.close()
    return copy


def assert_redacted(problems: list[str]) -> None:
    text = "\n".join(problems)
    for pid in ALL_PIDS:
        assert pid.hex() not in text
    for n in range(200):
        assert txid(n) not in text


def test_clean_after_import(imported: Path) -> None:
    assert check_database(imported) == []


def test_clean_after_second_import(tmp_path: Path, imported: Path) -> None:
    import_legacy(tmp_path / "legacy.db", imported, now=NOW + 1)
    assert check_database(imported) == []


def test_fresh_database_is_clean(tmp_path: Path) -> None:
    db = tmp_path / "fresh.db"
    migrate(db)
    assert check_database(db) == []


def test_summary(imported: Path) -> None:
    s = summary(imported)
    assert s["tickets"] == len(VALID_HEIGHTS)
    assert s["claimed"] == 4
    assert s["revoked"] == 1
    assert s["transfers"] == len(VALID_HEIGHTS)
    assert s["skipped"] == 2
    assert s["cursor"] == 999


def test_summary_without_cursor(tmp_path: Path) -> None:
    db = tmp_path / "fresh.db"
    migrate(db)
    assert summary(db) == {"tickets": 0, "claimed": 0, "revoked": 0, "transfers": 0,
                           "vanished": 0, "skipped": 0, "cursor": -1}


def test_check_is_read_only(imported: Path) -> None:
    before = imported.read_bytes()
    check_database(imported)
    summary(imported)
    assert imported.read_bytes() == before



CASES: dict[str, tuple[tuple[str | tuple[str, tuple[object, ...]], ...], str]] = {
    "amount_mismatch": (
        (("UPDATE tickets SET amount = amount + 1 WHERE pid = ?", (PID_UNCLAIMED,)),),
        f"ticket 1111… amount {AMOUNTS[PID_UNCLAIMED] + 1} != sum of its transfers",
    ),
    "claimed_without_token": (
        (("UPDATE tickets SET token = NULL WHERE pid = ?", (PID_CLAIMED,)),),
        "ticket 3333… is claimed (claimed_at set) but has no token",
    ),
    "token_without_claimed_at": (
        (("UPDATE tickets SET claimed_at = NULL WHERE pid = ?", (PID_CLAIMED,)),),
        "ticket 3333… has a token but no claimed_at",
    ),
    "short_token": (
        (("UPDATE tickets SET token = x'0102' WHERE pid = ?", (PID_CLAIMED,)),),
        "ticket 3333… has a token that is not 32 bytes",
    ),
    "txid_two_pids": (
        (
            ("INSERT INTO transfers (txid, pid, amount, height, recorded_at)"
             " VALUES (?, ?, 5, 1000, ?)", (bytes.fromhex(txid(0)), PID_DEFAULT_TS, NOW_TEXT)),
            ("UPDATE tickets SET amount = amount + 5 WHERE pid = ?", (PID_DEFAULT_TS,)),
        ),
        f"txid {txid(0)[:6]}… is credited to 2 payment ids",
    ),
    "orphan_transfer": (
        (
            ("INSERT INTO transfers (txid, pid, amount, height, recorded_at)"
             " VALUES (?, ?, 5, 1000, ?)",
             (bytes.fromhex(txid(150)), bytes.fromhex("abcdabcdabcdabcd"), NOW_TEXT)),
        ),
        "references a missing ticket abcd…",
    ),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_corruption_reported(name: str, imported: Path, tmp_path: Path) -> None:
    statements, expected = CASES[name]
    copy = corrupt(imported, tmp_path, *statements)
    problems = check_database(copy)
    assert any(expected in p for p in problems), problems
    assert_redacted(problems)
    # the original stays healthy
    assert check_database(imported) == []


def test_orphan_transfer_also_fails_foreign_key_check(imported: Path, tmp_path: Path) -> None:
    statements, _ = CASES["orphan_transfer"]
    problems = check_database(corrupt(imported, tmp_path, *statements))
    assert any(p.startswith("foreign_key_check: 1 row(s) of transfers") for p in problems)


def test_vanished_transfer_not_counted(imported: Path, tmp_path: Path) -> None:
    # vanished and the ticket's amount lowered: consistent
    ok = corrupt(
        imported, tmp_path,
        ("UPDATE transfers SET vanished_at = ? WHERE pid = ?", (NOW_TEXT, PID_UNCLAIMED)),
        ("UPDATE tickets SET amount = 0 WHERE pid = ?", (PID_UNCLAIMED,)),
    )
    assert check_database(ok) == []
    assert summary(ok)["vanished"] == 1


def test_vanished_transfer_still_credited_is_reported(imported: Path, tmp_path: Path) -> None:
    bad = corrupt(
        imported, tmp_path,
        ("UPDATE transfers SET vanished_at = ? WHERE pid = ?", (NOW_TEXT, PID_UNCLAIMED)),
    )
    assert any("1111…" in p and "!= sum of its transfers 0" in p for p in check_database(bad))


def test_unmigrated_database(tmp_path: Path) -> None:
    db = tmp_path / "plain.db"
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE tickets (pid BLOB)")
    conn.commit()
    conn.close()
    assert check_database(db) == ["schema is not migrated (no _sqlite_migrations table)"]


def test_legacy_database_is_named(tmp_path: Path) -> None:
    problems = check_database(build_legacy(tmp_path / "legacy.db"))
    assert len(problems) == 1 and "import-legacy" in problems[0]


def test_missing_file(tmp_path: Path) -> None:
    problems = check_database(tmp_path / "nope.db")
    assert len(problems) == 1 and "no such database file" in problems[0]
    assert not (tmp_path / "nope.db").exists()


def test_not_a_database(tmp_path: Path) -> None:
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not sqlite at all" * 100)
    problems = check_database(junk)
    assert len(problems) == 1 and "junk.db" in problems[0]
