"""The bare-SQL floors: what SQLite itself costs for a claim and for a credited transfer on this
machine, on a connection of our own with no server, actor or message around it.

The server's side of each comparison is its own timing of its storage transactions
(`anon_ticket_storage_commit_seconds` on /metrics: from the first statement of a transaction
to its COMMIT), so both sides time the same span. The server checkpoints its write-ahead log
in a thread of its own, never inside a COMMIT; so does the floor, between two transactions and
outside their spans, once the log has 2,000 pages (the server's first threshold).

The statements and connection settings are copies of the storage actor's (`actors/storage.py`:
CLAIM_READ, CLAIM_WRITE, TRANSFER_READ, CREDIT, TRANSFER_INSERT, CURSOR_WRITE,
`open_connection`). They stay copies until storage offers them publicly;
tests/test_bench.py holds them equal to storage's, so a change there fails a test instead of
leaving the floor measuring other SQL.
"""

from __future__ import annotations

import hmac
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import apsw

CLAIM_READ = (
    "SELECT amount, token, (SELECT txid FROM transfers WHERE transfers.pid = tickets.pid "
    "AND vanished_at IS NULL ORDER BY height, txid LIMIT 1) FROM tickets WHERE pid = ?")
CLAIM_WRITE = ("UPDATE tickets SET token = ?, claimed_at = ?, seq = seq + 1 "
               "WHERE pid = ? AND token IS NULL RETURNING seq")
TRANSFER_READ = "SELECT height, vanished_at FROM transfers WHERE txid = ? AND pid = ?"
CREDIT = ("INSERT INTO tickets (pid, amount, created_at, seq) VALUES (?, ?, ?, 1) "
          "ON CONFLICT (pid) DO UPDATE SET amount = tickets.amount + excluded.amount, "
          "seq = tickets.seq + 1 RETURNING amount, token, revoked_at, seq")
TRANSFER_INSERT = ("INSERT INTO transfers (txid, pid, amount, height, recorded_at) "
                   "VALUES (?, ?, ?, ?, ?)")
CURSOR_WRITE = ("INSERT INTO state (key, value) VALUES ('cursor', ?) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value")
STATEMENTS = {"CLAIM_READ": CLAIM_READ, "CLAIM_WRITE": CLAIM_WRITE,
              "TRANSFER_READ": TRANSFER_READ, "CREDIT": CREDIT,
              "TRANSFER_INSERT": TRANSFER_INSERT, "CURSOR_WRITE": CURSOR_WRITE}
PRAGMAS = ("PRAGMA journal_mode = WAL", "PRAGMA synchronous = NORMAL",
           f"PRAGMA journal_size_limit = {64 * 1024 * 1024}", "PRAGMA foreign_keys = ON",
           f"PRAGMA cache_size = -{32 * 1024}")
SECRET = b"b" * 32
CHECKPOINT_PAGES = 2000

Transfer = tuple[bytes, bytes, int, int]  # txid, pid, amount, height


def open_connection(path: Path) -> apsw.Connection:
    """A connection set up as the storage actor sets up its own (on a migrated database)."""
    conn = apsw.Connection(str(path))
    conn.setbusytimeout(5000)
    for pragma in PRAGMAS:
        conn.execute(pragma)
    return conn


class Spans:
    """The wall and CPU time of each transaction; the log checkpointed between them."""

    def __init__(self, conn: apsw.Connection) -> None:
        self.conn = conn
        self.wall = self.cpu = 0.0
        self.count = 0
        self.pages = 0
        conn.set_wal_hook(self._hook)  # replaces SQLite's checkpoint inside COMMIT

    def _hook(self, conn: apsw.Connection, dbname: str, pages: int) -> int:
        self.pages = pages
        return apsw.SQLITE_OK

    def __enter__(self) -> Spans:
        self._wall, self._cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall += time.perf_counter() - self._wall
        self.cpu += time.process_time() - self._cpu
        self.count += 1
        if self.pages >= CHECKPOINT_PAGES:
            self.conn.wal_checkpoint(mode=apsw.SQLITE_CHECKPOINT_PASSIVE)
            self.pages = 0


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000000Z", time.gmtime())


def token_for(pid: bytes, txid: bytes) -> bytes:
    """The service token (the public contract: HMAC-SHA3-256 of `pid_hex|txid_hex`)."""
    return hmac.digest(SECRET, f"{pid.hex()}|{txid.hex()}".encode(), "sha3_256")


@dataclass
class FloorRun:
    items: int
    transactions: int
    tx_seconds: float  # the transactions' spans, first statement to COMMIT
    cpu_seconds: float  # this process's CPU time within them
    outcomes: dict[str, int]

    @property
    def per_tx_s(self) -> float:
        """Items per second of transaction time."""
        return self.items / self.tx_seconds if self.tx_seconds > 0 else 0.0

    @property
    def per_cpu_s(self) -> float:
        return self.items / self.cpu_seconds if self.cpu_seconds > 0 else 0.0


def claims(db_path: Path, pids: Sequence[bytes], *, per_tx: int) -> FloorRun:
    """The storage actor's claim statements, `per_tx` claims a transaction: read the ticket
    with its first surviving transfer, derive the HMAC token, write token, claimed_at and the
    event number."""
    conn = open_connection(db_path)
    outcomes: dict[str, int] = {}
    spans = Spans(conn)
    try:
        cur = conn.cursor()
        for i in range(0, len(pids), per_tx):
            with spans, conn:
                now = _now()
                for raw in pids[i:i + per_tx]:
                    row = cur.execute(CLAIM_READ, (raw,)).fetchone()
                    if row is None or row[1] is not None or row[2] is None:
                        outcomes["not_claimable"] = outcomes.get("not_claimable", 0) + 1
                        continue
                    cur.execute(CLAIM_WRITE, (token_for(raw, row[2]), now, raw)).fetchall()
                    outcomes["success"] = outcomes.get("success", 0) + 1
    finally:
        conn.close()
    return FloorRun(len(pids), spans.count, spans.wall, spans.cpu, outcomes)


def blocks(transfers: Sequence[Transfer], per_tx: int) -> list[list[Transfer]]:
    """Consecutive transfers (in height order) in groups of about `per_tx`, each ending on a
    whole block, as the poller splits a window into storage messages."""
    out: list[list[Transfer]] = []
    batch: list[Transfer] = []
    for i, t in enumerate(transfers):
        batch.append(t)
        last_of_block = i + 1 == len(transfers) or transfers[i + 1][3] != t[3]
        if len(batch) >= per_tx and last_of_block:
            out.append(batch)
            batch = []
    if batch:
        out.append(batch)
    return out


def ingest(db_path: Path, transfers: Sequence[Transfer], *, per_tx: int) -> FloorRun:
    """The storage actor's crediting statements, one transaction per group of `blocks`
    (each with its cursor): without actors, events or the Bloom filter."""
    groups = blocks(transfers, per_tx)
    conn = open_connection(db_path)
    credited = 0
    spans = Spans(conn)
    try:
        cur = conn.cursor()
        for group in groups:
            with spans, conn:
                now = _now()
                for txid, pid, amount, height in group:
                    if cur.execute(TRANSFER_READ, (txid, pid)).fetchall():
                        continue
                    cur.execute(CREDIT, (pid, amount, now)).fetchall()
                    cur.execute(TRANSFER_INSERT, (txid, pid, amount, height, now))
                    credited += 1
                cur.execute(CURSOR_WRITE, (group[-1][3],))
    finally:
        conn.close()
    return FloorRun(len(transfers), spans.count, spans.wall, spans.cpu, {"credited": credited})
