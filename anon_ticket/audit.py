"""`db check`: read-only consistency audit of our database (works while a server runs).

Every problem is one line; pids and txids are redacted to a short prefix, never shown whole.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from anon_ticket.domain.ids import TOKEN_BYTES, redact_txid
from anon_ticket.errors import StorageError

__all__ = ["check_database", "summary"]

_MAX_PER_CHECK = 20  # a badly broken database should not print a million lines
_TABLES = ("tickets", "transfers", "skipped", "state")


def _pid(value: object) -> str:
    """A redacted pid prefix (the same shape as PaymentId.redacted(), but total)."""
    if isinstance(value, bytes):
        return value[:2].hex() + "…"
    if isinstance(value, str):
        return value[:4] + "…"
    return f"({type(value).__name__})"


def _txid(value: object) -> str:
    if isinstance(value, bytes | str):
        return redact_txid(value)
    return f"({type(value).__name__})"


def _open_ro(db_path: Path) -> sqlite3.Connection:
    if not db_path.is_file():
        raise StorageError(f"{db_path}: no such database file")
    try:
        conn = sqlite3.connect(f"{db_path.resolve().as_uri()}?mode=ro", uri=True)
        conn.execute("PRAGMA query_only = ON")
        conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
    except sqlite3.Error as exc:
        raise StorageError(f"{db_path}: cannot open it read-only ({exc})") from exc
    return conn


def _tables(conn: sqlite3.Connection) -> set[str]:
    return {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}


def _capped(problems: list[str], found: list[str], what: str) -> None:
    problems.extend(found[:_MAX_PER_CHECK])
    if len(found) > _MAX_PER_CHECK:
        problems.append(f"... and {len(found) - _MAX_PER_CHECK} more {what}")


def check_database(db_path: Path) -> list[str]:
    """Return the problems found in the database at `db_path` (empty: healthy).

    A file that cannot be opened is reported as a problem, not raised.
    """
    try:
        conn = _open_ro(db_path)
    except StorageError as exc:
        return [str(exc)]
    try:
        return _check(conn, db_path)
    except sqlite3.Error as exc:
        return [f"{db_path}: the check itself failed: {exc}"]
    finally:
        conn.close()


def _check(conn: sqlite3.Connection, db_path: Path) -> list[str]:
    problems: list[str] = []

    integrity = [str(r[0]) for r in conn.execute("PRAGMA integrity_check")]
    if integrity != ["ok"]:
        _capped(problems, [f"integrity_check: {line}" for line in integrity],
                "integrity_check lines")

    tables = _tables(conn)
    if "_sqlite_migrations" not in tables:
        if "payments" in tables:
            problems.append(
                f"{db_path} is the original anon-ticket's database; "
                "import it with `anon-ticket db import-legacy`"
            )
        else:
            problems.append("schema is not migrated (no _sqlite_migrations table)")
        return problems
    missing = [t for t in _TABLES if t not in tables]
    if missing:
        problems.append(f"schema is incomplete: missing table(s) {', '.join(missing)}")
        return problems

    fk = conn.execute("PRAGMA foreign_key_check").fetchall()
    if fk:
        by_table: dict[str, int] = {}
        for row in fk:
            by_table[row[0]] = by_table.get(row[0], 0) + 1
        for table, n in sorted(by_table.items()):
            problems.append(f"foreign_key_check: {n} row(s) of {table} violate a foreign key")

    # Claim state: token and claimed_at together, token 32 bytes, revocation only when claimed.
    found = []
    for pid, token, claimed_at, revoked_at in conn.execute(
        "SELECT pid, token, claimed_at, revoked_at FROM tickets"
        " WHERE (token IS NULL) != (claimed_at IS NULL)"
        "    OR (token IS NOT NULL AND (typeof(token) != 'blob' OR length(token) != ?))"
        "    OR (revoked_at IS NOT NULL AND token IS NULL)"
        " ORDER BY pid",
        (TOKEN_BYTES,),
    ):
        if token is None and claimed_at is not None:
            found.append(f"ticket {_pid(pid)} is claimed (claimed_at set) but has no token")
        elif token is not None and claimed_at is None:
            found.append(f"ticket {_pid(pid)} has a token but no claimed_at")
        elif token is not None:
            found.append(f"ticket {_pid(pid)} has a token that is not {TOKEN_BYTES} bytes")
        if revoked_at is not None and token is None:
            found.append(f"ticket {_pid(pid)} is revoked but has no token")
    _capped(problems, found, "claim-state problems")

    # Balances: a ticket's amount is the sum of its surviving (non-vanished) transfers.
    found = [
        f"ticket {_pid(pid)} amount {amount} != sum of its transfers {total}"
        for pid, amount, total in conn.execute(
            "SELECT t.pid, t.amount, COALESCE(SUM(x.amount), 0) AS total"
            " FROM tickets t LEFT JOIN transfers x"
            "   ON x.pid = t.pid AND x.vanished_at IS NULL"
            " GROUP BY t.pid HAVING t.amount IS NOT total ORDER BY t.pid"
        )
    ]
    _capped(problems, found, "balance mismatches")

    # One txid, one payment id (a Monero transaction carries one payment id).
    found = [
        f"txid {_txid(txid)} is credited to {n} payment ids"
        for txid, n in conn.execute(
            "SELECT txid, COUNT(DISTINCT pid) FROM transfers"
            " GROUP BY txid HAVING COUNT(DISTINCT pid) > 1 ORDER BY txid"
        )
    ]
    _capped(problems, found, "txids credited to several payment ids")

    found = [
        f"transfer {_txid(txid)} references a missing ticket {_pid(pid)}"
        for txid, pid in conn.execute(
            "SELECT x.txid, x.pid FROM transfers x LEFT JOIN tickets t ON t.pid = x.pid"
            " WHERE t.pid IS NULL ORDER BY x.txid"
        )
    ]
    _capped(problems, found, "orphan transfers")

    cursor = conn.execute("SELECT value FROM state WHERE key = 'cursor'").fetchone()
    if cursor is not None and (not isinstance(cursor[0], int) or cursor[0] < 0):
        problems.append(f"cursor is not a non-negative integer: {cursor[0]!r}")

    return problems


def summary(db_path: Path) -> dict[str, int]:
    """Counts for `db check`: tickets, claimed, revoked, transfers, skipped, cursor (-1: unset).

    Raises StorageError when the database cannot be opened or is not migrated.
    """
    conn = _open_ro(db_path)
    try:
        tables = _tables(conn)
        missing = [t for t in _TABLES if t not in tables]
        if missing:
            raise StorageError(f"{db_path}: not an anon-ticket database (no {missing[0]} table)")

        def one(sql: str) -> int:
            row = conn.execute(sql).fetchone()
            return int(row[0]) if row is not None and row[0] is not None else 0

        cursor = conn.execute("SELECT value FROM state WHERE key = 'cursor'").fetchone()
        return {
            "tickets": one("SELECT COUNT(*) FROM tickets"),
            "claimed": one("SELECT COUNT(*) FROM tickets WHERE token IS NOT NULL"),
            "revoked": one("SELECT COUNT(*) FROM tickets WHERE revoked_at IS NOT NULL"),
            "transfers": one("SELECT COUNT(*) FROM transfers"),
            "vanished": one("SELECT COUNT(*) FROM transfers WHERE vanished_at IS NOT NULL"),
            "skipped": one("SELECT COUNT(*) FROM skipped"),
            "cursor": int(cursor[0]) if cursor is not None else -1,
        }
    except sqlite3.Error as exc:
        raise StorageError(f"{db_path}: cannot summarise it ({exc})") from exc
    finally:
        conn.close()
