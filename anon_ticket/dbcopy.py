"""`db copy --to postgres://...`: move an SQLite deployment into PostgreSQL, verified.

Offline for the target, online for the source: the SQLite database is read on a read-only
connection inside one read transaction, so WAL gives a consistent snapshot while a server still
writes to it, and nothing is ever written there. That connection is APSW's, like the server's
and `db backup`'s: stdlib `sqlite3` would be a second SQLite library in the process, and two do
not see each other's file locks: the second takes itself for the WAL's only user and resets its
shared-memory index under the first (SIGBUS). So the copy may run beside a server in one process
(a test's actors). The target is written in one PostgreSQL transaction: all or nothing.

- The target must be empty (no ticket, transfer or skipped row, no cursor), and no node may be
  running on it (none seen in `cluster_nodes` for `LIVE_SECS`): a copy never merges into live
  data, and a node started on the empty database would go on with its epoch and an empty
  filter. Its tables are locked for the whole copy (ACCESS EXCLUSIVE: a node starting meanwhile
  waits and then reads the copy), so nothing slips in between that check and the COMMIT.
- Rows stream through COPY in primary-key order, a chunk at a time: a million tickets never sit
  in memory at once.
- `tickets.seq` and the state's `epoch` carry over unchanged (the migration's random epoch is
  replaced): a watcher's resume point (epoch, seq) names the same event on the new store. The
  `cursor` carries over too: the poller goes on from the height SQLite had scanned.
- Before the COMMIT, inside the same transaction, the copy is read back and compared per table:
  the row count and a SHA-256 over the rows in primary-key order, both sides hashed by the same
  code from what each driver returns. Any difference rolls everything back.

`cluster_events` and `cluster_nodes` are PostgreSQL's own and stay as they are; of `state` only
`cursor`, `epoch` and a stored `poller_paused` travel (`write_probe` is the SQLite writer's
scratch row).
"""

from __future__ import annotations

import hashlib
import itertools
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import apsw

from anon_ticket.config import redact_url
from anon_ticket.errors import StorageError
from anon_ticket.schema import KNOWN, MIGRATION_SET, migrate_postgres, pg_reason

__all__ = ["CopyMismatch", "CopyReport", "TableCopy", "check_target", "copy_to_postgres"]

CHUNK_ROWS = 5000  # rows read from SQLite (and back from PostgreSQL) at a time
LOCK_TIMEOUT = "10s"  # waiting longer for the target's tables means something is using them
LIVE_SECS = 30  # a node that read the cluster feed this recently is taken to be running
STATE_KEYS = ("cursor", "epoch", "poller_paused")


class CopyMismatch(StorageError):
    """The copy read back from PostgreSQL differs from the source: rolled back."""


@dataclass(frozen=True, slots=True)
class _Table:
    name: str
    columns: tuple[str, ...]
    key: tuple[str, ...]  # the primary key: the order rows are hashed in
    text_key: frozenset[str] = frozenset()  # key columns of type text (see _order)
    where: str = ""

    def select(self, *, postgres: bool) -> str:
        return (f"SELECT {', '.join(self.columns)} FROM {self.name}{self.where} "
                f"ORDER BY {self._order(postgres)}")

    def _order(self, postgres: bool) -> str:
        """SQLite orders blobs and text bytewise; PostgreSQL orders bytea bytewise too, but
        text by the database's collation unless told `COLLATE "C"` (bytewise in UTF-8)."""
        return ", ".join(f'{c} COLLATE "C"' if postgres and c in self.text_key else c
                         for c in self.key)


_IN_STATE_KEYS = f" WHERE key IN ({', '.join(repr(k) for k in STATE_KEYS)})"
# The tables of the SQLite layout after m004, in the order they are filled (a transfer refers
# to its ticket).
TABLES = (
    _Table("tickets", ("pid", "amount", "created_at", "token", "claimed_at", "revoked_at",
                       "revoke_reason", "abuse_score", "seq"), ("pid",)),
    _Table("transfers", ("pid", "txid", "amount", "height", "recorded_at", "vanished_at",
                         "source"), ("pid", "txid")),
    _Table("skipped", ("txid", "reason", "amount", "height", "payment_id", "recorded_at"),
           ("txid", "reason"), frozenset({"reason"})),
    _Table("state", ("key", "value"), ("key",), frozenset({"key"}), _IN_STATE_KEYS),
)


@dataclass(frozen=True, slots=True)
class TableCopy:
    name: str
    rows: int
    checksum: str  # SHA-256, hex, over the rows in primary-key order (`_Digest`)


@dataclass(frozen=True, slots=True)
class CopyReport:
    source: Path
    target: str  # the URL without its password
    tables: tuple[TableCopy, ...]
    epoch: int
    cursor: int | None
    seconds: float

    def summary(self, *, short: bool = False) -> dict[str, Any]:
        """For `_print`: `short` cuts the checksums to 16 hex digits (people compare those)."""
        return {
            "source": str(self.source),
            "target": self.target,
            "tables": [{"table": t.name, "rows": t.rows,
                        "checksum": t.checksum[:16] if short else t.checksum}
                       for t in self.tables],
            "epoch": self.epoch,
            "cursor": self.cursor,
            "verified": True,
            "seconds": round(self.seconds, 3),
        }


class _Digest:
    """A table's row count and SHA-256, fed rows in primary-key order.

    A row is hashed as the `repr` of its tuple: unambiguous (the type of every value shows,
    b'..' bytes, '..' text, ints, None) and the same for the same values from either driver,
    APSW and psycopg both giving bytes, int, str and None for these columns. A value that
    changed type on the way (text where bytes were, a float) changes the hash."""

    __slots__ = ("_sha", "rows")

    def __init__(self) -> None:
        self.rows = 0
        self._sha = hashlib.sha256()

    def feed(self, rows: Iterable[tuple[Any, ...]]) -> None:
        lines = [repr(row) for row in map(tuple, rows)]
        if lines:
            self._sha.update(("\n".join(lines) + "\n").encode())
        self.rows += len(lines)

    def hexdigest(self) -> str:
        return self._sha.hexdigest()


# --------------------------------------------------------------------------- the source


def _open_source(db_path: Path) -> apsw.Connection:
    """A read-only connection inside a read transaction whose snapshot is taken here."""
    if not db_path.is_file():
        raise StorageError(f"{db_path}: no such database file (db copy copies the configured "
                           "SQLite database: check --data-dir or DATABASE_URL)")
    try:
        conn = apsw.Connection(str(db_path), flags=apsw.SQLITE_OPEN_READONLY)
    except apsw.Error as exc:
        raise StorageError(f"{db_path}: cannot open it read-only ({exc})") from None
    try:
        conn.execute("BEGIN")
        # The first read takes the snapshot; every later read of this transaction sees it.
        tables = {r[0] for r in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table'")}
        _check_layout(conn, db_path, tables)
    except apsw.Error as exc:
        conn.close()
        raise StorageError(f"{db_path}: cannot read it as an SQLite database ({exc})") from None
    except BaseException:
        conn.close()
        raise
    return conn


def _check_layout(conn: apsw.Connection, db_path: Path, tables: set[str]) -> None:
    """Copy only a database at exactly this version's layout: the columns are named here."""
    if "payments" in tables and "_sqlite_migrations" not in tables:
        raise StorageError(f"{db_path} is the original anon-ticket's database; import it with: "
                           f"anon-ticket db import-legacy {db_path}")
    if "_sqlite_migrations" not in tables:
        raise StorageError(f"{db_path} is not an anon-ticket database (it has no migrations)")
    applied = {r[0] for r in conn.execute(
        "SELECT name FROM _sqlite_migrations WHERE migration_set = ?", (MIGRATION_SET,))}
    unknown = sorted(applied - set(KNOWN))
    if unknown:
        raise StorageError(f"{db_path} was written by a newer anon-ticket (unknown migrations: "
                           f"{', '.join(unknown)}); copy it with that version")
    pending = [name for name in KNOWN if name not in applied]
    if pending:
        raise StorageError(f"{db_path} is at an older layout (pending: {', '.join(pending)}); "
                           "start this version's server on it once (it migrates at start-up), "
                           "then copy")


def _chunks(rows: Iterable[tuple[Any, ...]]) -> Iterator[list[tuple[Any, ...]]]:
    it = iter(rows)
    while chunk := list(itertools.islice(it, CHUNK_ROWS)):
        yield chunk


# --------------------------------------------------------------------------- the target


def _refuse_unless_empty(cur: Any, target: str) -> None:
    live = cur.execute(
        "SELECT node, extract(epoch FROM now() - seen_at)::float8 FROM cluster_nodes "
        "WHERE seen_at > now() - make_interval(secs => %s) ORDER BY seen_at DESC LIMIT 1",
        (LIVE_SECS,)).fetchone()
    if live is not None:
        raise StorageError(f"{target}: node {live[0]!r} is running on it (seen "
                           f"{max(live[1], 0):.0f} s ago): stop every node before copying "
                           "into it")
    held = [name for name in ("tickets", "transfers", "skipped")
            if cur.execute(f"SELECT EXISTS (SELECT 1 FROM {name})").fetchone()[0]]
    if cur.execute("SELECT EXISTS (SELECT 1 FROM state WHERE key = 'cursor')").fetchone()[0]:
        held.append("a cursor")
    if held:
        raise StorageError(f"{target} is not empty (it holds {', '.join(held)}): db copy only "
                           "fills an empty database; point --to at a new one")


def check_target(url: str) -> None:
    """Refuse early a target `copy_to_postgres` would refuse as not empty (it checks again,
    under its lock): before an import-legacy spends minutes on a copy that cannot land.
    Creates nothing: a database without our tables is empty."""
    import psycopg

    target = redact_url(url)
    try:
        with psycopg.connect(url, autocommit=True, connect_timeout=10) as conn:
            cur = conn.cursor()
            present = cur.execute("SELECT to_regclass('cluster_nodes') IS NOT NULL").fetchone()
            if present is not None and present[0]:
                _refuse_unless_empty(cur, target)
    except psycopg.Error as exc:
        raise StorageError(f"cannot check {target}: {pg_reason(exc)}") from None


def _copy_table(src: apsw.Connection, cur: Any, table: _Table) -> _Digest:
    """Stream one table from SQLite into COPY, hashing each chunk as it passes."""
    digest = _Digest()
    rows = src.execute(table.select(postgres=False))
    with cur.copy(f"COPY {table.name} ({', '.join(table.columns)}) FROM STDIN") as copy:
        for chunk in _chunks(rows):
            digest.feed(chunk)
            for row in chunk:
                copy.write_row(row)
    return digest


def _read_back(conn: Any, table: _Table) -> tuple[int, _Digest]:
    """The table as PostgreSQL now holds it (this transaction's writes): its `count(*)`, and
    its rows hashed as they come through a server-side cursor, a chunk at a time."""
    (count,) = conn.execute(f"SELECT count(*) FROM {table.name}{table.where}").fetchone()
    digest = _Digest()
    with conn.cursor(name=f"dbcopy_{table.name}") as cur:
        cur.itersize = CHUNK_ROWS
        cur.execute(table.select(postgres=True))
        for chunk in _chunks(cur):
            digest.feed(chunk)
    return int(count), digest


def _state(src: apsw.Connection, key: str) -> int | None:
    row = src.execute("SELECT value FROM state WHERE key = ?", (key,)).fetchone()
    return None if row is None else int(row[0])


def copy_to_postgres(db_path: Path, url: str) -> CopyReport:
    """Copy the SQLite database at `db_path` into the empty PostgreSQL database at `url`,
    migrating it first, and verify the copy before committing it.

    Raises StorageError with a one-line message (CopyMismatch when the verification fails);
    on any error nothing is left in the target but its migrations.
    """
    import psycopg  # (only an operator who chose PostgreSQL needs the driver loaded)

    started = time.monotonic()
    target = redact_url(url)
    src = _open_source(db_path)  # refuse a wrong source before touching the target
    try:
        epoch = _state(src, "epoch")
        if epoch is None:
            raise StorageError(f"{db_path} has no event epoch (state 'epoch'): not a complete "
                               "anon-ticket database")
        cursor = _state(src, "cursor")
        migrate_postgres(url)
        try:
            conn = psycopg.connect(url, autocommit=True, connect_timeout=10)
        except psycopg.Error as exc:
            raise StorageError(f"cannot reach the database: {pg_reason(exc)}") from None
        try:
            with conn.transaction(), conn.cursor() as cur:
                cur.execute(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'")
                cur.execute("LOCK TABLE tickets, transfers, skipped, state "
                            "IN ACCESS EXCLUSIVE MODE")
                _refuse_unless_empty(cur, target)
                # the migration's epoch; a pause stored there is replaced by the source's
                cur.execute("DELETE FROM state WHERE key IN ('epoch', 'poller_paused')")
                copied = []
                for table in TABLES:
                    digest = _copy_table(src, cur, table)
                    copied.append(TableCopy(table.name, digest.rows, digest.hexdigest()))
                for table, mine in zip(TABLES, copied, strict=True):
                    count, theirs = _read_back(conn, table)
                    if (count, theirs.rows, theirs.hexdigest()) != (
                            mine.rows, mine.rows, mine.checksum):
                        raise CopyMismatch(
                            f"verification failed, nothing was written: the copy of "
                            f"{table.name} differs from {db_path} (source {mine.rows} rows, "
                            f"sha256 {mine.checksum[:16]}; copy {count} rows, sha256 "
                            f"{theirs.hexdigest()[:16]})")
        except psycopg.errors.LockNotAvailable:
            raise StorageError(f"{target}: its tables are in use (a node running on it, or "
                               "another copy); stop it and copy again") from None
        except psycopg.Error as exc:
            raise StorageError(f"copy into {target} failed, nothing was written: "
                               f"{pg_reason(exc)}") from None
        finally:
            conn.close()
    except apsw.Error as exc:
        raise StorageError(f"{db_path}: reading it failed, nothing was written: {exc}") from None
    finally:
        src.close()
    return CopyReport(db_path, target, tuple(copied), epoch, cursor,
                      time.monotonic() - started)
