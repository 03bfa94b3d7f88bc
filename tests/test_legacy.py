"""`db import-legacy`: the original's database comes over exactly once
(docs/architecture.md §7, I1, I5)."""

from __future__ import annotations

import hashlib
import sqlite3
from pathlib import Path

import pytest

from anon_ticket.domain.ids import PaymentId
from anon_ticket.domain.timefmt import rfc3339
from anon_ticket.domain.tokens import derive_legacy
from anon_ticket.errors import StorageError
from anon_ticket.legacy import import_legacy
from anon_ticket.schema import migrate

# Exactly the DDL of docs/architecture.md §7 (as SeaORM emits it).
LEGACY_DDL = """
CREATE TABLE payments (pid BLOB(8) PRIMARY KEY NOT NULL, txid VARCHAR(64) NOT NULL,
  amount BIGINT NOT NULL, block_height BIGINT NOT NULL, status TINYINT NOT NULL,
  created_at DATETIME NOT NULL DEFAULT CURRENT_TIMESTAMP, claimed_at DATETIME NULL);
CREATE TABLE service_tokens (token BLOB(32) PRIMARY KEY NOT NULL, pid BLOB(8) NOT NULL,
  amount BIGINT NOT NULL, issued_at DATETIME NOT NULL DEFAULT CURRENT_TIMESTAMP,
  revoked_at DATETIME NULL, revoke_reason VARCHAR NULL, abuse_score SMALLINT NOT NULL DEFAULT 0);
CREATE TABLE monitor_state (key VARCHAR(64) PRIMARY KEY NOT NULL, value_int BIGINT NOT NULL);
"""

NOW = 1_800_000_000.0
NOW_TEXT = rfc3339(NOW)


def txid(n: int) -> str:
    return hashlib.sha256(f"tx{n}".encode()).hexdigest()


# The payments (pid, txid, amount, height, status, created_at or None for the default, claimed_at)
PID_UNCLAIMED = bytes.fromhex("1111111111111111")
PID_DEFAULT_TS = bytes.fromhex("2222222222222222")  # created_at took CURRENT_TIMESTAMP
PID_CLAIMED = bytes.fromhex("3333333333333333")  # token row = derive_legacy(pid, txid)
PID_REVOKED = bytes.fromhex("4444444444444444")  # token row with a random token, revoked
PID_NO_TOKEN = bytes.fromhex("5555555555555555")  # claimed, token row lost (crash bug)
PID_TEXT = "6666666666666666"  # pid stored as TEXT hex
PID_UNCLAIMED_WITH_TOKEN = bytes.fromhex("7777777777777777")  # status 0 but has a token row
PID_BAD_DATE = bytes.fromhex("8888888888888888")  # unparseable created_at
PID_BAD_TXID = bytes.fromhex("9999999999999999")
ZERO = bytes(8)

REVOKED_TOKEN = hashlib.sha256(b"random token").digest()
UNCLAIMED_TOKEN = hashlib.sha256(b"another token").digest()
RFC_CREATED = "2025-11-20T12:34:56.123456789+00:00"
NAIVE = "2025-11-20 12:34:56"

VALID_HEIGHTS = {
    PID_UNCLAIMED: 1000, PID_DEFAULT_TS: 1003, PID_CLAIMED: 1010, PID_REVOKED: 1020,
    PID_NO_TOKEN: 1030, bytes.fromhex(PID_TEXT): 1040, PID_UNCLAIMED_WITH_TOKEN: 1050,
    PID_BAD_DATE: 1060,
}
AMOUNTS = {pid: 10_000_000_000 * (i + 1) for i, pid in enumerate(VALID_HEIGHTS)}


def legacy_token(pid: bytes, tx: str) -> bytes:
    """The legacy derivation (docs/architecture.md §6), written out:
    SHA3-256(lowercase_hex(pid) + "|" + txid)."""
    return hashlib.sha3_256(f"{pid.hex()}|{tx}".encode()).digest()


def build_legacy(path: Path) -> Path:
    conn = sqlite3.connect(path)
    conn.executescript(LEGACY_DDL)
    ins = ("INSERT INTO payments (pid, txid, amount, block_height, status, created_at, claimed_at)"
           " VALUES (?, ?, ?, ?, ?, ?, ?)")
    for i, (pid, height) in enumerate(VALID_HEIGHTS.items()):
        tx = txid(i)
        amount = AMOUNTS[pid]
        if pid == PID_DEFAULT_TS:
            conn.execute(
                "INSERT INTO payments (pid, txid, amount, block_height, status)"
                " VALUES (?, ?, ?, ?, 0)", (pid, tx, amount, height))
            continue
        status = 1 if pid in (PID_CLAIMED, PID_REVOKED, PID_NO_TOKEN) else 0
        claimed = "2025-11-21T08:00:00.987654321+00:00" if status else None
        created = "yesterday-ish" if pid == PID_BAD_DATE else RFC_CREATED
        stored_pid: bytes | str = PID_TEXT if pid == bytes.fromhex(PID_TEXT) else pid
        conn.execute(ins, (stored_pid, tx, amount, height, status, created, claimed))
    # quarantined rows, at lower heights than every valid one
    conn.execute(ins, (ZERO, txid(100), 50_000_000_000, 900, 1, RFC_CREATED, RFC_CREATED))
    conn.execute(ins, (PID_BAD_TXID, "not-a-txid", 50_000_000_000, 950, 0, NAIVE, None))
    # tokens
    tok = ("INSERT INTO service_tokens (token, pid, amount, issued_at, revoked_at, revoke_reason,"
           " abuse_score) VALUES (?, ?, ?, ?, ?, ?, ?)")
    i_claimed = list(VALID_HEIGHTS).index(PID_CLAIMED)
    conn.execute(tok, (legacy_token(PID_CLAIMED, txid(i_claimed)), PID_CLAIMED,
                       AMOUNTS[PID_CLAIMED], "2025-11-21T09:00:00.000000001+00:00", None, None, 0))
    conn.execute(tok, (REVOKED_TOKEN, PID_REVOKED, AMOUNTS[PID_REVOKED], NAIVE,
                       "2025-11-22T10:11:12.5+00:00", "chargeback fraud", 7))
    conn.execute(tok, (UNCLAIMED_TOKEN, PID_UNCLAIMED_WITH_TOKEN,
                       AMOUNTS[PID_UNCLAIMED_WITH_TOKEN], RFC_CREATED, None, None, 0))
    conn.execute("INSERT INTO monitor_state VALUES ('last_processed_height', 1100)")
    conn.commit()
    conn.close()
    return path


def dump(db: Path) -> dict[str, list[tuple[object, ...]]]:
    conn = sqlite3.connect(db)
    try:
        return {
            t: sorted(conn.execute(f"SELECT * FROM {t}").fetchall(), key=repr)
            for t in ("tickets", "transfers", "skipped", "state")
        }
    finally:
        conn.close()


def tickets(db: Path) -> dict[bytes, dict[str, object]]:
    conn = sqlite3.connect(db)
    conn.row_factory = sqlite3.Row
    try:
        return {r["pid"]: dict(r) for r in conn.execute("SELECT * FROM tickets")}
    finally:
        conn.close()


@pytest.fixture
def legacy(tmp_path: Path) -> Path:
    return build_legacy(tmp_path / "legacy.db")


@pytest.fixture
def ours(tmp_path: Path) -> Path:
    return tmp_path / "data" / "anon_ticket.db"


def test_design_vector() -> None:
    vector = "369e0f7c09124783e45fa6a6b7588733e362e2917f36fb7036f49284c1952fa9"
    pid = bytes.fromhex("0123456789abcdef")
    assert legacy_token(pid, "tx1").hex() == vector
    assert derive_legacy(PaymentId(pid), "tx1").hex() == vector


def test_import_balances_claims_tokens(legacy: Path, ours: Path) -> None:
    report = import_legacy(legacy, ours, now=NOW)
    got = tickets(ours)
    assert set(got) == set(VALID_HEIGHTS)
    for pid, amount in AMOUNTS.items():
        assert got[pid]["amount"] == amount

    # unclaimed
    for pid in (PID_UNCLAIMED, PID_DEFAULT_TS, bytes.fromhex(PID_TEXT), PID_BAD_DATE):
        assert got[pid]["token"] is None and got[pid]["claimed_at"] is None
    # both datetime forms normalised; the unparseable one took `now`
    assert got[PID_UNCLAIMED]["created_at"] == "2025-11-20T12:34:56.123456Z"
    assert str(got[PID_DEFAULT_TS]["created_at"]).endswith("Z")
    assert got[PID_BAD_DATE]["created_at"] == NOW_TEXT
    assert report.bad_datetimes >= 1

    # stored token kept, with issued_at → claimed_at
    i_claimed = list(VALID_HEIGHTS).index(PID_CLAIMED)
    assert got[PID_CLAIMED]["token"] == legacy_token(PID_CLAIMED, txid(i_claimed))
    assert got[PID_CLAIMED]["claimed_at"] == "2025-11-21T09:00:00.000000Z"
    assert got[PID_CLAIMED]["revoked_at"] is None
    # a random stored token is kept as stored, not re-derived; revocation comes over
    assert got[PID_REVOKED]["token"] == REVOKED_TOKEN
    assert got[PID_REVOKED]["claimed_at"] == "2025-11-20T12:34:56.000000Z"
    assert got[PID_REVOKED]["revoked_at"] == "2025-11-22T10:11:12.500000Z"
    assert got[PID_REVOKED]["revoke_reason"] == "chargeback fraud"
    assert got[PID_REVOKED]["abuse_score"] == 7
    # claimed without a token row: the legacy token is derived, claimed_at from the payment
    i_missing = list(VALID_HEIGHTS).index(PID_NO_TOKEN)
    assert got[PID_NO_TOKEN]["token"] == legacy_token(PID_NO_TOKEN, txid(i_missing))
    assert got[PID_NO_TOKEN]["claimed_at"] == "2025-11-21T08:00:00.987654Z"
    # status 0 with a token row: claimed with that token
    assert got[PID_UNCLAIMED_WITH_TOKEN]["token"] == UNCLAIMED_TOKEN

    assert report.payments_seen == len(VALID_HEIGHTS) + 2
    assert report.tickets_created == len(VALID_HEIGHTS)
    assert report.transfers_added == len(VALID_HEIGHTS)
    assert report.claimed == 4
    assert report.tokens_kept == 3
    assert report.tokens_derived == 1
    assert report.revoked == 1
    assert report.already_present == 0
    assert report.legacy_next_height == 1100

    conn = sqlite3.connect(ours)
    rows = conn.execute("SELECT txid, pid, amount, height, source FROM transfers").fetchall()
    conn.close()
    assert len(rows) == len(VALID_HEIGHTS)
    assert all(r[4] == "legacy" and len(r[0]) == 32 for r in rows)
    assert {(r[1], r[2], r[3]) for r in rows} == {
        (pid, AMOUNTS[pid], VALID_HEIGHTS[pid]) for pid in VALID_HEIGHTS
    }


def test_quarantine(legacy: Path, ours: Path) -> None:
    report = import_legacy(legacy, ours, now=NOW)
    got = tickets(ours)
    assert ZERO not in got and PID_BAD_TXID not in got
    conn = sqlite3.connect(ours)
    skipped = conn.execute("SELECT txid, reason, amount, height FROM skipped").fetchall()
    assert conn.execute("SELECT COUNT(*) FROM transfers WHERE pid = ?", (ZERO,)).fetchone() == (0,)
    conn.close()
    assert (bytes.fromhex(txid(100)), "legacy_zero_pid", 50_000_000_000, 900) in skipped
    assert (b"not-a-txid", "legacy_bad_row", 50_000_000_000, 950) in skipped
    assert len(report.quarantined) == 2
    assert any(q.startswith("legacy_zero_pid") for q in report.quarantined)
    assert any(q.startswith("legacy_bad_row") for q in report.quarantined)
    # never a full pid in the report
    text = "\n".join(report.lines())
    for pid in [*VALID_HEIGHTS, PID_BAD_TXID, ZERO]:
        assert pid.hex() not in text
    assert "9999…" in text


def test_cursor_lowest_height(legacy: Path, ours: Path) -> None:
    report = import_legacy(legacy, ours, now=NOW)
    # the quarantined rows (900, 950) do not count: lowest imported height is 1000
    assert report.cursor == 999
    assert [r for r in dump(ours)["state"] if r[0] == "cursor"] == [("cursor", 999)]


def test_cursor_rescan_from(legacy: Path, ours: Path) -> None:
    report = import_legacy(legacy, ours, rescan_from=500, now=NOW)
    assert report.cursor == 499
    assert [r for r in dump(ours)["state"] if r[0] == "cursor"] == [("cursor", 499)]


def _set_cursor(ours: Path, value: int) -> None:
    migrate(ours)
    conn = sqlite3.connect(ours)
    with conn:
        conn.execute("INSERT INTO state (key, value) VALUES ('cursor', ?)", (value,))
    conn.close()


def test_cursor_keeps_lower_existing(legacy: Path, ours: Path) -> None:
    _set_cursor(ours, 100)
    assert import_legacy(legacy, ours, now=NOW).cursor == 100
    assert [r for r in dump(ours)["state"] if r[0] == "cursor"] == [("cursor", 100)]


def test_cursor_lowers_higher_existing(legacy: Path, ours: Path) -> None:
    _set_cursor(ours, 5000)
    assert import_legacy(legacy, ours, now=NOW).cursor == 999
    assert [r for r in dump(ours)["state"] if r[0] == "cursor"] == [("cursor", 999)]


def test_second_run_changes_nothing(legacy: Path, ours: Path) -> None:
    first = import_legacy(legacy, ours, now=NOW)
    before = dump(ours)
    second = import_legacy(legacy, ours, now=NOW + 3600)
    assert dump(ours) == before
    assert second.already_present == len(VALID_HEIGHTS)
    assert second.tickets_created == second.transfers_added == 0
    assert second.claimed == second.tokens_kept == second.tokens_derived == second.revoked == 0
    assert second.cursor == first.cursor == 999
    assert "already present" in "\n".join(second.lines())
    # with the same rescan height twice, still nothing changes
    import_legacy(legacy, ours, rescan_from=10, now=NOW)
    before = dump(ours)
    import_legacy(legacy, ours, rescan_from=10, now=NOW + 1)
    assert dump(ours) == before


def test_preexisting_transfer_not_credited_twice(legacy: Path, ours: Path) -> None:
    migrate(ours)
    tx = bytes.fromhex(txid(0))  # PID_UNCLAIMED's legacy transfer, already seen by the poller
    amount = AMOUNTS[PID_UNCLAIMED]
    conn = sqlite3.connect(ours)
    with conn:
        conn.execute("INSERT INTO tickets (pid, amount, created_at) VALUES (?, ?, ?)",
                     (PID_UNCLAIMED, amount, NOW_TEXT))
        conn.execute("INSERT INTO transfers (txid, pid, amount, height, recorded_at, source)"
                     " VALUES (?, ?, ?, 1000, ?, 'chain')", (tx, PID_UNCLAIMED, amount, NOW_TEXT))
    conn.close()
    report = import_legacy(legacy, ours, now=NOW)
    assert report.already_present == 1
    assert report.transfers_added == len(VALID_HEIGHTS) - 1
    assert tickets(ours)[PID_UNCLAIMED]["amount"] == amount
    conn = sqlite3.connect(ours)
    rows = conn.execute("SELECT source FROM transfers WHERE pid = ?", (PID_UNCLAIMED,)).fetchall()
    conn.close()
    assert rows == [("chain",)]


def test_existing_token_is_kept(legacy: Path, ours: Path) -> None:
    """A ticket already claimed here keeps our token; the legacy one does not overwrite it."""
    migrate(ours)
    mine = hashlib.sha256(b"ours").digest()
    conn = sqlite3.connect(ours)
    with conn:
        conn.execute("INSERT INTO tickets (pid, amount, created_at, token, claimed_at)"
                     " VALUES (?, 0, ?, ?, ?)", (PID_REVOKED, NOW_TEXT, mine, NOW_TEXT))
    conn.close()
    report = import_legacy(legacy, ours, now=NOW)
    t = tickets(ours)[PID_REVOKED]
    assert t["token"] == mine and t["revoked_at"] is None and t["amount"] == AMOUNTS[PID_REVOKED]
    assert report.revoked == 0


def test_top_up_from_poller_adds(legacy: Path, ours: Path) -> None:
    """A different transfer the poller recorded to the same pid stays; the legacy one adds."""
    migrate(ours)
    other = bytes.fromhex(txid(500))
    conn = sqlite3.connect(ours)
    with conn:
        conn.execute("INSERT INTO tickets (pid, amount, created_at) VALUES (?, 7, ?)",
                     (PID_UNCLAIMED, NOW_TEXT))
        conn.execute("INSERT INTO transfers (txid, pid, amount, height, recorded_at)"
                     " VALUES (?, ?, 7, 2000, ?)", (other, PID_UNCLAIMED, NOW_TEXT))
    conn.close()
    import_legacy(legacy, ours, now=NOW)
    assert tickets(ours)[PID_UNCLAIMED]["amount"] == AMOUNTS[PID_UNCLAIMED] + 7


def test_no_payments_table_refused(tmp_path: Path, legacy: Path, ours: Path) -> None:
    bogus = tmp_path / "bogus.db"
    conn = sqlite3.connect(bogus)
    conn.execute("CREATE TABLE something (x)")
    conn.commit()
    conn.close()
    # our database does not exist: it must not be created
    with pytest.raises(StorageError, match="no `payments` table") as exc:
        import_legacy(bogus, ours, now=NOW)
    assert "\n" not in str(exc.value)
    assert not ours.exists()
    # our database exists with data: it must not change
    import_legacy(legacy, ours, now=NOW)
    before = dump(ours)
    with pytest.raises(StorageError, match="payments"):
        import_legacy(bogus, ours, rescan_from=1, now=NOW)
    assert dump(ours) == before


def test_missing_legacy_file_refused(tmp_path: Path, ours: Path) -> None:
    with pytest.raises(StorageError, match="no such file"):
        import_legacy(tmp_path / "nope.db", ours)
    assert not ours.exists()


def test_failure_rolls_back(legacy: Path, ours: Path) -> None:
    """An error half-way (a token clash) leaves our database exactly as it was."""
    migrate(ours)
    i_claimed = list(VALID_HEIGHTS).index(PID_CLAIMED)
    clash = legacy_token(PID_CLAIMED, txid(i_claimed))
    other = bytes.fromhex("abababababababab")
    conn = sqlite3.connect(ours)
    with conn:
        conn.execute("INSERT INTO tickets (pid, amount, created_at, token, claimed_at)"
                     " VALUES (?, 0, ?, ?, ?)", (other, NOW_TEXT, clash, NOW_TEXT))
        conn.execute("INSERT INTO state (key, value) VALUES ('cursor', 5000)")
    conn.close()
    before = dump(ours)
    with pytest.raises(StorageError, match="nothing was changed"):
        import_legacy(legacy, ours, now=NOW)
    assert dump(ours) == before


def test_legacy_file_is_untouched(legacy: Path, ours: Path) -> None:
    data = legacy.read_bytes()
    import_legacy(legacy, ours, now=NOW)
    assert legacy.read_bytes() == data


def test_our_database_as_legacy_refused(legacy: Path, ours: Path) -> None:
    import_legacy(legacy, ours, now=NOW)
    with pytest.raises(StorageError, match="not the original"):
        import_legacy(ours, ours.with_name("other.db"), now=NOW)


def test_negative_rescan_refused(legacy: Path, ours: Path) -> None:
    with pytest.raises(StorageError, match="rescan"):
        import_legacy(legacy, ours, rescan_from=-1)
    assert not ours.exists()
