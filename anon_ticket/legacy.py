"""`db import-legacy`: bring the original anon-ticket's SQLite database over
(docs/architecture.md §7).

Offline operator command: synchronous stdlib `sqlite3`, one transaction on our database.
The caller (CLI) holds the data-directory lock; this module does not look at it.

What happens to each legacy `payments` row:
- it becomes a transfer (txid, pid, amount, height, source='legacy') of its ticket, inserted
  only when (txid, pid) is not there yet, so a re-import or a transfer the poller already
  recorded is never credited twice (I1). A new transfer adds its amount to the ticket.
- claimed rows (status 1, or any row whose pid has a `service_tokens` row) keep their stored
  token with its issue time, revocation, reason and abuse score; a claimed row with no token
  row (the original's crash bug) gets its legacy token `derive_legacy(pid, txid)`. A ticket
  that already has a token in our database keeps ours unchanged.
- rows that must not become claimable (the all-zero pid, a pid that is not 8 bytes, a txid
  that is not 64 hex characters, a non-positive amount, an unknown status) are quarantined:
  recorded in `skipped` and reported with a redacted pid prefix, never a full pid.
The cursor is lowered so the poller rescans from the lowest newly imported height (or
`rescan_from`), never raised: heights are never skipped (I5).
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path

from anon_ticket.domain.ids import PID_BYTES, TOKEN_BYTES, ZERO_PID, PaymentId
from anon_ticket.domain.timefmt import parse_legacy, rfc3339
from anon_ticket.domain.tokens import derive_legacy
from anon_ticket.errors import StorageError
from anon_ticket.schema import migrate

__all__ = ["ImportReport", "import_legacy"]

REASON_ZERO_PID = "legacy_zero_pid"
REASON_BAD_ROW = "legacy_bad_row"
CURSOR_KEY = "cursor"
_HEX = frozenset("0123456789abcdefABCDEF")
_REQUIRED_COLUMNS = ("pid", "txid", "amount", "block_height", "status")


@dataclass(frozen=True, slots=True)
class ImportReport:
    """What one `import_legacy` run did. Counts refer to changes made by this run."""

    payments_seen: int = 0
    tickets_created: int = 0
    transfers_added: int = 0
    claimed: int = 0
    tokens_kept: int = 0
    tokens_derived: int = 0
    revoked: int = 0
    quarantined: tuple[str, ...] = ()
    already_present: int = 0
    cursor: int | None = None
    bad_datetimes: int = 0
    tokens_ignored: int = 0
    legacy_next_height: int | None = None
    warnings: tuple[str, ...] = ()

    def lines(self) -> list[str]:
        """A human summary, one fact per line (no full pid, txid or token)."""
        out = [
            f"legacy payments seen:      {self.payments_seen}",
            f"tickets created:           {self.tickets_created}",
            f"transfers added:           {self.transfers_added}",
            f"already present:           {self.already_present}",
            f"tickets claimed:           {self.claimed} "
            f"(tokens kept {self.tokens_kept}, derived {self.tokens_derived})",
            f"tokens revoked:            {self.revoked}",
            f"quarantined rows:          {len(self.quarantined)}",
        ]
        out.extend(f"  - {q}" for q in self.quarantined)
        if self.bad_datetimes:
            out.append(f"unparseable datetimes:     {self.bad_datetimes} (import time used)")
        if self.tokens_ignored:
            out.append(f"token rows ignored:        {self.tokens_ignored}")
        out.extend(f"warning: {w}" for w in self.warnings)
        if self.legacy_next_height is not None:
            out.append(f"original's next height:    {self.legacy_next_height}")
        if self.cursor is None:
            out.append("cursor:                    unset")
        else:
            out.append(
                f"cursor:                    {self.cursor} "
                f"(the poller scans heights above it)"
            )
        return out


@dataclass(slots=True)
class _TokenRow:
    token: bytes
    issued_at: object
    revoked_at: object
    revoke_reason: str | None
    abuse_score: int


@dataclass(slots=True)
class _Counts:
    payments_seen: int = 0
    tickets_created: int = 0
    transfers_added: int = 0
    claimed: int = 0
    tokens_kept: int = 0
    tokens_derived: int = 0
    revoked: int = 0
    already_present: int = 0
    bad_datetimes: int = 0
    tokens_ignored: int = 0
    quarantined: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    heights: list[int] = field(default_factory=list)


# --------------------------------------------------------------------------- value parsing


def _pid_bytes(value: object) -> bytes | None:
    """A legacy pid as 8 bytes: BLOB(8), or 16 hex characters stored as TEXT."""
    if isinstance(value, bytes):
        return value if len(value) == PID_BYTES else None
    if isinstance(value, str):
        text = value.strip()
        if len(text) == PID_BYTES * 2 and _HEX.issuperset(text):
            return bytes.fromhex(text)
    return None


def _pid_prefix(value: object) -> str:
    """A short, redacted prefix of whatever the pid column held."""
    if isinstance(value, bytes):
        return value[:2].hex() + "…" if value else "(empty)"
    if isinstance(value, str):
        return value.strip()[:4].lower() + "…" if value.strip() else "(empty)"
    return f"({type(value).__name__})"


def _txid_hex(value: object) -> str | None:
    if isinstance(value, bytes):
        try:
            value = value.decode("ascii")
        except UnicodeDecodeError:
            return None
    if isinstance(value, str):
        text = value.strip()
        if len(text) == 64 and _HEX.issuperset(text):
            return text.lower()
    return None


def _token_bytes(value: object) -> bytes | None:
    if isinstance(value, bytes):
        return value if len(value) == TOKEN_BYTES else None
    if isinstance(value, str):
        text = value.strip()
        if len(text) == TOKEN_BYTES * 2 and _HEX.issuperset(text):
            return bytes.fromhex(text)
    return None


def _int(value: object) -> int | None:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    return None


# --------------------------------------------------------------------------- the legacy side


def _open_legacy(path: Path) -> sqlite3.Connection:
    if not path.is_file():
        raise StorageError(f"{path}: no such file (expected the original anon-ticket database)")
    try:
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
        tables = {
            r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        }
    except sqlite3.Error as exc:
        raise StorageError(f"{path}: cannot read it as an SQLite database ({exc})") from exc
    if "payments" not in tables:
        conn.close()
        if "_sqlite_migrations" in tables:
            raise StorageError(
                f"{path} is an anon-ticket (new) database, not the original's: nothing to import"
            )
        raise StorageError(
            f"{path} has no `payments` table: not an original anon-ticket database"
        )
    return conn


def _columns(conn: sqlite3.Connection, table: str) -> set[str]:
    return {r[1] for r in conn.execute(f"PRAGMA table_info({table})")}


def _legacy_tables(conn: sqlite3.Connection) -> set[str]:
    return {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}


def _payments(conn: sqlite3.Connection, path: Path) -> sqlite3.Cursor:
    """Check the `payments` layout and return a cursor over its rows, lowest height first."""
    cols = _columns(conn, "payments")
    missing = [c for c in _REQUIRED_COLUMNS if c not in cols]
    if missing:
        raise StorageError(
            f"{path}: table `payments` lacks column(s) {', '.join(missing)}; "
            "not an original anon-ticket database"
        )
    created = "created_at" if "created_at" in cols else "NULL"
    claimed = "claimed_at" if "claimed_at" in cols else "NULL"
    return conn.execute(
        f"SELECT pid, txid, amount, block_height, status, {created}, {claimed} "
        "FROM payments ORDER BY block_height, rowid"
    )


def _token_rows(
    conn: sqlite3.Connection, counts: _Counts
) -> dict[bytes, list[_TokenRow]]:
    if "service_tokens" not in _legacy_tables(conn):
        counts.warnings.append(
            "no `service_tokens` table: claimed payments get derived legacy tokens"
        )
        return {}
    cols = _columns(conn, "service_tokens")
    want = ("token", "pid", "issued_at", "revoked_at", "revoke_reason", "abuse_score")
    sel = ", ".join(c if c in cols else "NULL" for c in want)
    by_pid: dict[bytes, list[_TokenRow]] = {}
    for token_v, pid_v, issued, revoked, reason, score in conn.execute(
        f"SELECT {sel} FROM service_tokens ORDER BY issued_at, token"
    ):
        pid = _pid_bytes(pid_v)
        token = _token_bytes(token_v)
        if pid is None or token is None:
            counts.tokens_ignored += 1
            counts.warnings.append(
                f"token row for pid {_pid_prefix(pid_v)} has an unusable "
                f"{'pid' if pid is None else 'token'}; ignored"
            )
            continue
        by_pid.setdefault(pid, []).append(
            _TokenRow(
                token=token,
                issued_at=issued,
                revoked_at=revoked,
                revoke_reason=None if reason is None else str(reason),
                abuse_score=_int(score) or 0,
            )
        )
    return by_pid


def _legacy_next_height(conn: sqlite3.Connection) -> int | None:
    if "monitor_state" not in _legacy_tables(conn):
        return None
    row = conn.execute(
        "SELECT value_int FROM monitor_state WHERE key = 'last_processed_height'"
    ).fetchone()
    return None if row is None else _int(row[0])


# --------------------------------------------------------------------------- the import


_INSERT_TRANSFER = (
    "INSERT INTO transfers (txid, pid, amount, height, recorded_at, source)"
    " VALUES (?, ?, ?, ?, ?, 'legacy')"
)


class _Importer:
    def __init__(self, conn: sqlite3.Connection, now: float) -> None:
        self.conn = conn
        self.now = now
        self.now_text = rfc3339(now)
        self.c = _Counts()

    def when(self, value: object) -> str:
        """A legacy datetime in our form; unparseable or missing → the import time (counted)."""
        if isinstance(value, bytes):
            value = value.decode("utf-8", "replace")
        if isinstance(value, str):
            try:
                return parse_legacy(value)
            except ValueError:
                pass
        self.c.bad_datetimes += 1
        return self.now_text

    def quarantine(
        self, reason: str, detail: str, pid_v: object, txid_v: object, amount_v: object,
        height_v: object,
    ) -> None:
        txid_hex = _txid_hex(txid_v)
        if txid_hex is not None:
            txid_key = bytes.fromhex(txid_hex)
        elif isinstance(txid_v, bytes):
            txid_key = txid_v
        else:
            txid_key = str(txid_v).encode()
        if isinstance(pid_v, bytes):
            payment_id: str | None = pid_v.hex()
        else:
            payment_id = None if pid_v is None else str(pid_v)
        self.conn.execute(
            "INSERT OR IGNORE INTO skipped (txid, reason, amount, height, payment_id, recorded_at)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (txid_key, reason, _int(amount_v) or 0, _int(height_v) or 0, payment_id,
             self.now_text),
        )
        self.c.quarantined.append(f"{reason}: pid {_pid_prefix(pid_v)} ({detail})")

    def payment(
        self, row: tuple[object, ...], tokens: dict[bytes, list[_TokenRow]],
        used_tokens: set[bytes],
    ) -> None:
        pid_v, txid_v, amount_v, height_v, status_v, created_v, claimed_v = row
        self.c.payments_seen += 1
        pid = _pid_bytes(pid_v)
        txid = _txid_hex(txid_v)
        amount = _int(amount_v)
        height = _int(height_v)
        status = _int(status_v)
        if pid == ZERO_PID:
            self.quarantine(REASON_ZERO_PID, "all-zero payment id", pid_v, txid_v, amount_v,
                            height_v)
            return
        problem = (
            "payment id is not 8 bytes" if pid is None
            else "txid is not 64 hex characters" if txid is None
            else "amount is not a positive integer" if amount is None or amount <= 0
            else "block height is not a non-negative integer" if height is None or height < 0
            else "status is neither 0 nor 1" if status not in (0, 1)
            else None
        )
        if problem is not None:
            self.quarantine(REASON_BAD_ROW, problem, pid_v, txid_v, amount_v, height_v)
            return
        assert pid is not None and txid is not None and amount is not None
        assert height is not None

        conn = self.conn
        ticket = conn.execute("SELECT token FROM tickets WHERE pid = ?", (pid,)).fetchone()
        created_at = self.when(created_v)
        txid_raw = bytes.fromhex(txid)
        transfer = (txid_raw, pid, amount, height, created_at)
        # Three statements for a new ticket (its first transfer cannot be present yet), four
        # for another transfer to a known one: the import's time is its statements.
        if ticket is None:
            conn.execute(
                "INSERT INTO tickets (pid, amount, created_at) VALUES (?, ?, ?)",
                (pid, amount, created_at),
            )
            conn.execute(_INSERT_TRANSFER, transfer)
            self.c.tickets_created += 1
            added = True
        else:
            added = conn.execute(
                _INSERT_TRANSFER + " ON CONFLICT DO NOTHING", transfer
            ).rowcount == 1
            if added:
                conn.execute(
                    "UPDATE tickets SET amount = amount + ? WHERE pid = ?", (amount, pid)
                )
        if added:
            self.c.transfers_added += 1
            self.c.heights.append(height)
        else:
            self.c.already_present += 1

        candidates = tokens.get(pid, [])
        used_tokens.update(t.token for t in candidates)
        if status != 1 and not candidates:
            return  # unclaimed in the original: stays unclaimable until redeemed here
        if ticket is not None and ticket[0] is not None:
            return  # already claimed here (a previous import or a redeem): ours wins
        derived = derive_legacy(PaymentId(pid), txid).raw
        chosen = next((t for t in candidates if t.token == derived), None)
        if chosen is None and candidates:
            chosen = candidates[0]  # earliest issued
        if len(candidates) > 1:
            self.c.warnings.append(
                f"pid {_pid_prefix(pid)} has {len(candidates)} token rows; kept one"
            )
            self.c.tokens_ignored += len(candidates) - 1
        if chosen is not None:
            token = chosen.token
            claimed_at = self.when(chosen.issued_at)
            revoked_at = None if chosen.revoked_at is None else self.when(chosen.revoked_at)
            reason, score = chosen.revoke_reason, chosen.abuse_score
            self.c.tokens_kept += 1
        else:
            token = derived
            claimed_at = self.when(claimed_v)
            revoked_at, reason, score = None, None, 0
            self.c.tokens_derived += 1
        conn.execute(
            "UPDATE tickets SET token = ?, claimed_at = ?, revoked_at = ?, revoke_reason = ?,"
            " abuse_score = ? WHERE pid = ?",
            (token, claimed_at, revoked_at, reason, score, pid),
        )
        self.c.claimed += 1
        if revoked_at is not None:
            self.c.revoked += 1

    def cursor(self, rescan_from: int | None) -> int | None:
        row = self.conn.execute(
            "SELECT value FROM state WHERE key = ?", (CURSOR_KEY,)
        ).fetchone()
        existing = None if row is None else int(row[0])
        if rescan_from is not None:
            new: int | None = rescan_from - 1
        elif self.c.heights:
            new = min(self.c.heights) - 1
        else:
            new = None
        if new is None:
            return existing
        new = max(new, 0)
        if existing is not None and existing <= new:
            return existing
        self.conn.execute(
            "INSERT INTO state (key, value) VALUES (?, ?)"
            " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (CURSOR_KEY, new),
        )
        return new


def import_legacy(
    legacy_path: Path,
    db_path: Path,
    *,
    rescan_from: int | None = None,
    now: float | None = None,
) -> ImportReport:
    """Import the original's database at `legacy_path` into ours at `db_path`.

    One transaction: on any error nothing changes in our database (and a database that did
    not exist is not created when the legacy file is refused). Running it twice changes
    nothing the second time. Raises `StorageError` with a one-line message.

    `rescan_from` (a height) sets the cursor to `rescan_from - 1`; it is applied even when no
    new transfer was imported (the operator asked for it). The cursor is only ever lowered
    (the minimum of the existing and the new value) and never set below 0.
    """
    if rescan_from is not None and rescan_from < 0:
        raise StorageError(f"rescan height must be >= 0, not {rescan_from}")
    if legacy_path.exists() and db_path.exists() and legacy_path.resolve() == db_path.resolve():
        raise StorageError(f"{legacy_path}: the legacy database and ours are the same file")
    when = time.time() if now is None else now

    legacy = _open_legacy(legacy_path)  # refuse a wrong file before touching ours
    try:
        payments = _payments(legacy, legacy_path)  # checks the layout before ours is touched
        migrate(db_path)
        conn = sqlite3.connect(db_path, isolation_level=None, timeout=10.0)
        try:
            conn.execute("PRAGMA foreign_keys = ON")
            conn.execute("PRAGMA cache_size = -65536")
            conn.execute("BEGIN IMMEDIATE")
            try:
                imp = _Importer(conn, when)
                tokens = _token_rows(legacy, imp.c)
                next_height = _legacy_next_height(legacy)
                used: set[bytes] = set()
                for row in payments:
                    imp.payment(row, tokens, used)
                orphans = sum(
                    1 for rows in tokens.values() for t in rows if t.token not in used
                )
                if orphans:
                    imp.c.tokens_ignored += orphans
                    imp.c.warnings.append(
                        f"{orphans} token row(s) match no importable payment; ignored"
                    )
                cursor = imp.cursor(rescan_from)
                conn.execute("COMMIT")
            except BaseException:
                if not conn.in_transaction:
                    raise
                conn.execute("ROLLBACK")
                raise
        finally:
            conn.close()
    except sqlite3.Error as exc:
        raise StorageError(f"legacy import failed, nothing was changed: {exc}") from exc
    finally:
        legacy.close()

    c = imp.c
    return ImportReport(
        payments_seen=c.payments_seen,
        tickets_created=c.tickets_created,
        transfers_added=c.transfers_added,
        claimed=c.claimed,
        tokens_kept=c.tokens_kept,
        tokens_derived=c.tokens_derived,
        revoked=c.revoked,
        quarantined=tuple(c.quarantined),
        already_present=c.already_present,
        cursor=cursor,
        bad_datetimes=c.bad_datetimes,
        tokens_ignored=c.tokens_ignored,
        legacy_next_height=next_height,
        warnings=tuple(c.warnings),
    )
