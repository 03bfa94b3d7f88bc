"""The database schema and its migrations (sqlite-utils `Migrations`, stdlib sqlite3).

Migrations run at start-up on a stdlib `sqlite3` connection, before the APSW writer opens
(sqlite-utils cannot drive APSW). A backup is taken first when an existing database has
anything to migrate; a database with migrations this version does not know is refused.

Layout (binary ids: pid 8 bytes, txid and token 32 bytes):
- `tickets`: one row per payment id ever credited. `amount` is the sum of its credited,
  surviving transfers (before and after the claim: top-ups keep adding). Claiming sets `token`
  and `claimed_at` in the same statement (I3), so a claimed ticket always has its token.
- `transfers`: each qualifying chain transfer, once per (txid, pid) (I1); keyed by (pid, txid)
  so a ticket's transfers sit together, with an index on height for the reorg window.
- `skipped`: transfers that did not qualify, with the reason (I7).
- `state`: small named integers; `cursor` is the highest height fully scanned (I4);
  `epoch` names the event numbering (`tickets.seq`), and changes when a backup is restored.
"""

from __future__ import annotations

import os
import sqlite3
import time
from pathlib import Path

from sqlite_utils import Database, Migrations

from anon_ticket.datadir import create_private, tighten_database_files
from anon_ticket.errors import StorageError
from anon_ticket.logs import get_logger

log = get_logger("schema")

MIGRATION_SET = "anon_ticket"
migrations = Migrations(MIGRATION_SET)


@migrations()
def m001_initial(db: Database) -> None:
    db.executescript(
        """
        CREATE TABLE tickets (
            pid BLOB PRIMARY KEY NOT NULL CHECK (length(pid) = 8),
            amount INTEGER NOT NULL DEFAULT 0,
            created_at TEXT NOT NULL,
            token BLOB UNIQUE CHECK (token IS NULL OR length(token) = 32),
            claimed_at TEXT,
            revoked_at TEXT,
            revoke_reason TEXT,
            abuse_score INTEGER NOT NULL DEFAULT 0,
            CHECK ((token IS NULL) = (claimed_at IS NULL)),
            CHECK (revoked_at IS NULL OR token IS NOT NULL)
        ) WITHOUT ROWID;
        CREATE TABLE transfers (
            txid BLOB NOT NULL CHECK (length(txid) = 32),
            pid BLOB NOT NULL REFERENCES tickets(pid),
            amount INTEGER NOT NULL CHECK (amount > 0),
            height INTEGER NOT NULL,
            recorded_at TEXT NOT NULL,
            vanished_at TEXT,
            source TEXT NOT NULL DEFAULT 'chain',
            PRIMARY KEY (txid, pid)
        ) WITHOUT ROWID;
        CREATE INDEX transfers_by_pid ON transfers (pid, height, txid);
        CREATE TABLE skipped (
            txid BLOB NOT NULL,
            reason TEXT NOT NULL,
            amount INTEGER NOT NULL,
            height INTEGER NOT NULL,
            payment_id TEXT,
            recorded_at TEXT NOT NULL,
            PRIMARY KEY (txid, reason)
        ) WITHOUT ROWID;
        CREATE TABLE state (
            key TEXT PRIMARY KEY NOT NULL,
            value INTEGER NOT NULL
        ) WITHOUT ROWID;
        """
    )


@migrations()
def m002_event_numbering(db: Database) -> None:
    """Per-ticket event numbers (`seq`, in commit order) and the numbering's epoch."""
    db.executescript(
        """
        ALTER TABLE tickets ADD COLUMN seq INTEGER NOT NULL DEFAULT 0;
        INSERT INTO state (key, value)
            VALUES ('epoch', abs(random()) % 9007199254740991 + 1)
            ON CONFLICT (key) DO NOTHING;
        """
    )


@migrations()
def m003_transfers_by_pid_and_height(db: Database) -> None:
    """Transfers keyed by (pid, txid), with an index on height.

    The recent-window query of every poller tick (`height > ?`) scanned the whole table; and
    keyed by a random txid plus a pid index, each new transfer dirtied pages in two random
    B-trees. Now the key serves the per-ticket queries (claims, credits) by itself and the
    height index grows at its right edge, as the chain does. Spelled out rather than
    sqlite-utils' `transform()`, which rebuilds the table without `WITHOUT ROWID`.
    """
    db.executescript(
        """
        CREATE TABLE transfers_new (
            txid BLOB NOT NULL CHECK (length(txid) = 32),
            pid BLOB NOT NULL REFERENCES tickets(pid),
            amount INTEGER NOT NULL CHECK (amount > 0),
            height INTEGER NOT NULL,
            recorded_at TEXT NOT NULL,
            vanished_at TEXT,
            source TEXT NOT NULL DEFAULT 'chain',
            PRIMARY KEY (pid, txid)
        ) WITHOUT ROWID;
        INSERT INTO transfers_new (txid, pid, amount, height, recorded_at, vanished_at, source)
            SELECT txid, pid, amount, height, recorded_at, vanished_at, source FROM transfers
            ORDER BY pid, txid;
        DROP TABLE transfers;
        ALTER TABLE transfers_new RENAME TO transfers;
        CREATE INDEX transfers_by_height ON transfers (height);
        """
    )


@migrations()
def m004_token_index_without_unclaimed(db: Database) -> None:
    """The token's unique index covers claimed tickets only.

    As a UNIQUE column, `token` put every unclaimed ticket in its index too, under NULL and
    ordered by pid: each new ticket dirtied one more page of a B-tree as random as the table
    (a sixth of ingestion's cost on a 200k-ticket database), and each claim moved an entry
    from there to its token's place. Tokens stay unique; lookups by token use the new index
    (`token = ?` implies `token IS NOT NULL`). The table is rebuilt to drop the column's
    constraint (SQLite cannot drop an automatic index); foreign keys are off on the migration
    connection, and `transfers` refers to the table by name.
    """
    db.executescript(
        """
        CREATE TABLE tickets_new (
            pid BLOB PRIMARY KEY NOT NULL CHECK (length(pid) = 8),
            amount INTEGER NOT NULL DEFAULT 0,
            created_at TEXT NOT NULL,
            token BLOB CHECK (token IS NULL OR length(token) = 32),
            claimed_at TEXT,
            revoked_at TEXT,
            revoke_reason TEXT,
            abuse_score INTEGER NOT NULL DEFAULT 0,
            seq INTEGER NOT NULL DEFAULT 0,
            CHECK ((token IS NULL) = (claimed_at IS NULL)),
            CHECK (revoked_at IS NULL OR token IS NOT NULL)
        ) WITHOUT ROWID;
        INSERT INTO tickets_new (pid, amount, created_at, token, claimed_at, revoked_at,
                                 revoke_reason, abuse_score, seq)
            SELECT pid, amount, created_at, token, claimed_at, revoked_at, revoke_reason,
                   abuse_score, seq FROM tickets ORDER BY pid;
        DROP TABLE tickets;
        ALTER TABLE tickets_new RENAME TO tickets;
        CREATE UNIQUE INDEX tickets_by_token ON tickets (token) WHERE token IS NOT NULL;
        """
    )


KNOWN = tuple(m.name for m in migrations._migrations)


class LegacyDatabase(StorageError):
    """The file is the original anon-ticket's database, not ours."""


def _tables(conn: sqlite3.Connection) -> set[str]:
    return {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}


def migrate(path: Path) -> list[str]:
    """Bring the database at `path` to this version's schema; return the migrations applied.

    Its files are made private first (0600: they hold service tokens): a new database is
    created so, an existing one's group- or other-readable files are tightened (logged)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    create_private(path)
    tightened = tighten_database_files(path)
    if tightened:
        log.warning("database files were readable by group or others; now 0600",
                    files=", ".join(tightened))
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        tables = _tables(conn)
        if "payments" in tables and "_sqlite_migrations" not in tables:
            raise LegacyDatabase(
                f"{path} is the original anon-ticket's database; "
                f"import it with: anon-ticket db import-legacy {path}"
            )
        db = Database(conn)
        applied = [m.name for m in migrations.applied(db)]
        unknown = [name for name in applied if name not in KNOWN]
        if unknown:
            raise StorageError(
                f"{path} was written by a newer anon-ticket (unknown migrations: "
                f"{', '.join(unknown)}); refusing to open it"
            )
        pending = [m.name for m in migrations.pending(db)]
        if pending and applied:
            backup = path.with_name(f"{path.name}.pre-{pending[0]}-{int(time.time())}.bak")
            if not create_private(backup):
                os.chmod(backup, 0o600)  # (a second migration within the same second)
            dest = sqlite3.connect(backup)
            with dest:
                conn.backup(dest)
            dest.close()
        conn.execute("PRAGMA journal_mode = WAL")
        migrations.apply(db)
        return pending
    finally:
        conn.close()


# --- PostgreSQL -------------------------------------------------------------------------------
#
# The same tables for several nodes sharing one database (docs/architecture.md §9). Columns,
# types and constraints mirror the SQLite layout after m004 (bytea for blobs, bigint for
# integers, timestamps as the same RFC 3339 text), so `db copy` moves rows unchanged and the
# storage actor runs the same statements on both. Two tables only PostgreSQL has:
# - `cluster_events`: what each committed write transaction changed (new payment ids,
#   invalidations, ticket events), numbered in commit order (the appending transaction holds a
#   transaction-level advisory lock until its COMMIT); every node follows it by number.
# - `cluster_nodes`: each running node, the last entry it applied and when it last read.
# Applied migrations are listed in `schema_migrations`; migrating holds an advisory lock, so
# nodes starting together migrate once.

POSTGRES_MIGRATIONS: tuple[tuple[str, str], ...] = (
    ("p001_layout", """
        CREATE TABLE tickets (
            pid BYTEA PRIMARY KEY CHECK (octet_length(pid) = 8),
            amount BIGINT NOT NULL DEFAULT 0,
            created_at TEXT NOT NULL,
            token BYTEA CHECK (token IS NULL OR octet_length(token) = 32),
            claimed_at TEXT,
            revoked_at TEXT,
            revoke_reason TEXT,
            abuse_score BIGINT NOT NULL DEFAULT 0,
            seq BIGINT NOT NULL DEFAULT 0,
            CHECK ((token IS NULL) = (claimed_at IS NULL)),
            CHECK (revoked_at IS NULL OR token IS NOT NULL)
        );
        CREATE UNIQUE INDEX tickets_by_token ON tickets (token) WHERE token IS NOT NULL;
        CREATE TABLE transfers (
            txid BYTEA NOT NULL CHECK (octet_length(txid) = 32),
            pid BYTEA NOT NULL REFERENCES tickets(pid),
            amount BIGINT NOT NULL CHECK (amount > 0),
            height BIGINT NOT NULL,
            recorded_at TEXT NOT NULL,
            vanished_at TEXT,
            source TEXT NOT NULL DEFAULT 'chain',
            PRIMARY KEY (pid, txid)
        );
        CREATE INDEX transfers_by_height ON transfers (height);
        CREATE TABLE skipped (
            txid BYTEA NOT NULL,
            reason TEXT NOT NULL,
            amount BIGINT NOT NULL,
            height BIGINT NOT NULL,
            payment_id TEXT,
            recorded_at TEXT NOT NULL,
            PRIMARY KEY (txid, reason)
        );
        CREATE TABLE state (
            key TEXT PRIMARY KEY,
            value BIGINT NOT NULL
        );
        INSERT INTO state (key, value)
            VALUES ('epoch', 1 + floor(random() * 9007199254740990)::bigint)
            ON CONFLICT (key) DO NOTHING;
    """),
    ("p002_cluster", """
        CREATE TABLE cluster_events (
            id BIGSERIAL PRIMARY KEY,
            node TEXT NOT NULL,
            at TIMESTAMPTZ NOT NULL DEFAULT now(),
            body BYTEA NOT NULL
        );
        CREATE TABLE cluster_nodes (
            node TEXT PRIMARY KEY,
            applied BIGINT NOT NULL,
            seen_at TIMESTAMPTZ NOT NULL DEFAULT now()
        );
    """),
)
KNOWN_POSTGRES = tuple(name for name, _ in POSTGRES_MIGRATIONS)
# pg_advisory_lock keys (one 64-bit namespace per database): migrating, the poller's
# leadership, and the order of `cluster_events`.
LOCK_MIGRATE = 0x616E6F6E_0001
LOCK_POLLER = 0x616E6F6E_0002
LOCK_EVENTS = 0x616E6F6E_0003
# NOTIFY channel: a transaction that appends to `cluster_events` wakes the other nodes'
# followers at its COMMIT (the payload is the writing node's name).
FEED_CHANNEL = "anon_ticket_feed"
# ...and a node that applied entries wakes the barriers waiting for it (payload: its name).
APPLIED_CHANNEL = "anon_ticket_applied"


def migrate_postgres(dsn: str) -> list[str]:
    """Bring the PostgreSQL database at `dsn` to this version's schema; return the migrations
    applied. Each migration is one transaction; a database with migrations this version does
    not know is refused, as with SQLite."""
    import psycopg  # (only an operator who chose PostgreSQL needs the driver loaded)

    try:
        conn = psycopg.connect(dsn, autocommit=True, connect_timeout=10)
    except psycopg.Error as exc:
        raise StorageError(f"cannot reach the database: {pg_reason(exc)}") from None
    try:
        conn.execute("SELECT pg_advisory_lock(%s)", (LOCK_MIGRATE,))
        conn.execute("CREATE TABLE IF NOT EXISTS schema_migrations ("
                     "name TEXT PRIMARY KEY, applied_at TIMESTAMPTZ NOT NULL DEFAULT now())")
        applied = [r[0] for r in conn.execute("SELECT name FROM schema_migrations")]
        unknown = [name for name in applied if name not in KNOWN_POSTGRES]
        if unknown:
            raise StorageError(
                "the database was written by a newer anon-ticket (unknown migrations: "
                f"{', '.join(sorted(unknown))}); refusing to open it")
        pending = [(n, sql) for n, sql in POSTGRES_MIGRATIONS if n not in applied]
        for name, sql in pending:
            with conn.transaction():
                conn.execute(sql.encode())
                conn.execute("INSERT INTO schema_migrations (name) VALUES (%s)", (name,))
        return [name for name, _ in pending]
    except psycopg.Error as exc:
        raise StorageError(f"migrating the database failed: {pg_reason(exc)}") from None
    finally:
        conn.close()


def pg_reason(exc: BaseException) -> str:
    """A driver error as one line an operator can act on, without the DSN's password (libpq
    messages name host and port, never the password)."""
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]
