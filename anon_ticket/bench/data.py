"""Prepared databases for the benchmark.

- `write_legacy` writes a database of the original anon-ticket (DESIGN §8 DDL) with recorded,
  unclaimed payments and claimed ones (status 1 with no token row: the import gives them their
  legacy token, which is how the benchmark knows their tokens without asking the server).
- `import_legacy_cli` loads it the way an operator does: `anon-ticket --data-dir D db
  import-legacy L`, in a subprocess, timed.
- `bulk_load` writes N recorded, unclaimed tickets (one transfer each) straight into our
  schema with two set-based SQL statements: for the 1M-PID start-up scenario in `--quick`,
  where the operator's import path (1M rows in 74 s here) would not fit the time budget.

Payment ids are derived from (seed, index), so every run sees the same ids (`bulk_load`'s
rise with their index instead).
"""

from __future__ import annotations

import hashlib
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import apsw

from anon_ticket import schema
from anon_ticket.domain.ids import PaymentId
from anon_ticket.domain.tokens import derive_legacy

# Exactly the original's DDL (DESIGN §8, as SeaORM emits it).
LEGACY_DDL = """
CREATE TABLE payments (pid BLOB(8) PRIMARY KEY NOT NULL, txid VARCHAR(64) NOT NULL,
  amount BIGINT NOT NULL, block_height BIGINT NOT NULL, status TINYINT NOT NULL,
  created_at DATETIME NOT NULL DEFAULT CURRENT_TIMESTAMP, claimed_at DATETIME NULL);
CREATE TABLE service_tokens (token BLOB(32) PRIMARY KEY NOT NULL, pid BLOB(8) NOT NULL,
  amount BIGINT NOT NULL, issued_at DATETIME NOT NULL DEFAULT CURRENT_TIMESTAMP,
  revoked_at DATETIME NULL, revoke_reason VARCHAR NULL, abuse_score SMALLINT NOT NULL DEFAULT 0);
CREATE TABLE monitor_state (key VARCHAR(64) PRIMARY KEY NOT NULL, value_int BIGINT NOT NULL);
"""

AMOUNT = 1_000_000_000_000  # 1 XMR in piconero
CREATED = "2025-11-20T12:34:56.123456789+00:00"
FIRST_HEIGHT = 1000
PER_BLOCK = 10


def pid_for(seed: str, index: int) -> bytes:
    """A deterministic, non-zero 8-byte payment id."""
    n = 0
    while True:
        raw = hashlib.blake2b(f"{seed}:{index}:{n}".encode(), digest_size=8).digest()
        if raw != bytes(8):
            return raw
        n += 1


def txid_for(pid: bytes) -> str:
    return hashlib.sha256(b"bench-tx" + pid).hexdigest()


def pids(seed: str, count: int, start: int = 0) -> list[bytes]:
    return [pid_for(seed, i) for i in range(start, start + count)]


def legacy_token(pid: bytes) -> bytes:
    """The token `db import-legacy` gives a claimed payment that has no token row."""
    return derive_legacy(PaymentId(pid), txid_for(pid)).raw


@dataclass(frozen=True)
class LegacySet:
    path: Path
    unclaimed: list[bytes]
    claimed: list[bytes]


def write_legacy(path: Path, unclaimed: list[bytes], claimed: list[bytes]) -> LegacySet:
    for suffix in ("", "-wal", "-shm", "-journal"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    conn = sqlite3.connect(path)
    try:
        conn.execute("PRAGMA journal_mode = OFF")
        conn.execute("PRAGMA synchronous = OFF")
        conn.executescript(LEGACY_DDL)
        rows = ((pid, txid_for(pid), AMOUNT, FIRST_HEIGHT + i // PER_BLOCK, status, CREATED)
                for status, group in ((0, unclaimed), (1, claimed))
                for i, pid in enumerate(group))
        conn.executemany(
            "INSERT INTO payments (pid, txid, amount, block_height, status, created_at) "
            "VALUES (?, ?, ?, ?, ?, ?)", rows)
        conn.execute("INSERT INTO monitor_state (key, value_int) "
                     "VALUES ('last_processed_height', ?)",
                     (FIRST_HEIGHT + (len(unclaimed) + len(claimed)) // PER_BLOCK + 1,))
        conn.commit()
    finally:
        conn.close()
    return LegacySet(path, unclaimed, claimed)


@dataclass(frozen=True)
class Imported:
    seconds: float
    rows: int
    output: str

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else 0.0


def import_legacy_cli(data_dir: Path, legacy: Path, rows: int, *,
                      cpus: set[int] | None = None, timeout: float = 1800) -> Imported:
    """`anon-ticket --data-dir D db import-legacy L`, as an operator runs it."""
    import os

    def pin() -> None:
        if cpus:
            os.sched_setaffinity(0, cpus)

    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "anon_ticket", "--data-dir", str(data_dir),
         "db", "import-legacy", str(legacy)],
        capture_output=True, text=True, timeout=timeout, preexec_fn=pin)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"db import-legacy exited {done.returncode}:\n"
                           f"{done.stdout}\n{done.stderr}")
    return Imported(seconds, rows, done.stdout)


def bulk_load(db_path: Path, count: int) -> float:
    """N recorded, unclaimed tickets with one transfer each, written by set-based SQL into our
    (migrated) schema. Returns the seconds it took.

    The payment ids rise with their index (index x stride + a scrambled offset below the
    stride), and so do the heights: every B-tree, the height index included, is appended to
    in order, and nothing is sorted. The Bloom filter hashes the ids, so their order does not
    change what the start-up measures."""
    started = time.perf_counter()
    for suffix in ("", "-wal", "-shm"):
        Path(f"{db_path}{suffix}").unlink(missing_ok=True)
    schema.migrate(db_path)
    conn = apsw.Connection(str(db_path))
    stride = (2**63 - 1) // (count + 1)
    numbers = ("WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?), "
               f"ids(i, pid) AS (SELECT i, unhex(printf('%016x', i * {stride} + "
               f"(i * 2654435761) % {stride})) FROM n) ")
    try:
        conn.execute("PRAGMA journal_mode = OFF")
        conn.execute("PRAGMA synchronous = OFF")
        conn.execute("PRAGMA cache_size = -200000")
        created = "2025-11-20T12:34:56.123456Z"
        with conn:
            conn.execute(f"{numbers} INSERT INTO tickets (pid, amount, created_at) "
                         f"SELECT pid, {AMOUNT}, '{created}' FROM ids", (count,))
            conn.execute(f"{numbers} INSERT INTO transfers "
                         "(txid, pid, amount, height, recorded_at, source) "
                         f"SELECT randomblob(32), pid, {AMOUNT}, "
                         f"{FIRST_HEIGHT} + i / {PER_BLOCK}, '{created}', 'bench' FROM ids",
                         (count,))
        conn.execute("PRAGMA journal_mode = WAL")
    finally:
        conn.close()
    return time.perf_counter() - started


def count_tickets(db_path: Path) -> int:
    conn = apsw.Connection(str(db_path), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        row = conn.execute("SELECT count(*) FROM tickets").fetchone()
        return int(row[0]) if row else 0
    finally:
        conn.close()


def copy_database(src: Path, dst: Path) -> None:
    """A consistent copy through SQLite's backup API (the source may be in WAL mode)."""
    for suffix in ("", "-wal", "-shm"):
        Path(f"{dst}{suffix}").unlink(missing_ok=True)
    dst.parent.mkdir(parents=True, exist_ok=True)
    source = apsw.Connection(str(src), flags=apsw.SQLITE_OPEN_READONLY)
    target = apsw.Connection(str(dst))
    try:
        with target.backup("main", source, "main") as b:
            while not b.done:
                b.step(-1)
        target.execute("PRAGMA journal_mode = WAL")
    finally:
        target.close()
        source.close()
