"""Prepared databases for the benchmark, made the way the tests make theirs.

- `write_legacy` writes a database of the original anon-ticket (`tests.process.proc.
  write_legacy_db`, the DDL of `tests.test_legacy`) with recorded, unclaimed payments and
  claimed ones (status 1 with no token row: the import gives them their legacy token, which
  is how the benchmark knows their tokens without asking the server).
- `import_legacy` loads it the way an operator does (`tests.process.proc.import_legacy`:
  `anon-ticket --data-dir D db import-legacy L` in a subprocess), timed.
- `bulk_load` writes N recorded, unclaimed tickets straight into our schema with two
  set-based SQL statements: only for the 1M-PID start-up scenario of `--quick`, where the
  operator's import (1M rows in 66 s here) would not fit the time budget. It is the one place
  the benchmark writes the server's tables itself.
- `copy_data_dir` copies a data directory no server runs on (a fresh one for every server
  the benchmark starts on the same prepared data).
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import apsw

from anon_ticket import schema
from tests.process.proc import LegacyRow, write_legacy_db
from tests.process.proc import import_legacy as import_cli
from tests.process.test_process import legacy_rows
from tests.test_legacy import legacy_token as legacy_token_of

AMOUNT = 1_000_000_000_000  # 1 XMR in piconero
FIRST_HEIGHT = 1000  # bulk_load's first height
PER_BLOCK = 10
# Above every height the prepared data has (legacy_rows: 100 to 106; bulk_load: 1000 +
# count / 10): where the fake wallet's transfers begin.
WALLET_FIRST_HEIGHT = 500_000


def random_pid() -> bytes:
    """A payment id nobody paid (8 bytes, never all zeros)."""
    while (raw := os.urandom(8)) == bytes(8):
        pass
    return raw


def unknown_pids(count: int) -> list[bytes]:
    return [random_pid() for _ in range(count)]


def legacy_token(row: LegacyRow) -> bytes:
    """The token `db import-legacy` gives a claimed payment that has no token row."""
    return legacy_token_of(row[0], row[1])


@dataclass(frozen=True)
class LegacySet:
    path: Path
    unclaimed: list[LegacyRow]
    claimed: list[LegacyRow]

    @property
    def rows(self) -> int:
        return len(self.unclaimed) + len(self.claimed)


def write_legacy(path: Path, unclaimed: int, claimed: int) -> LegacySet:
    rows = legacy_rows(unclaimed + claimed)
    fresh, done = rows[:unclaimed], rows[unclaimed:]
    write_legacy_db(path, fresh, claimed=done)
    return LegacySet(path, fresh, done)


@dataclass(frozen=True)
class Imported:
    seconds: float
    rows: int
    output: str

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else 0.0


def import_legacy(data_dir: Path, legacy: LegacySet, *, cpus: set[int] | None = None,
                  timeout: float = 1800) -> Imported:
    """`anon-ticket --data-dir D db import-legacy L`, as an operator runs it, timed."""
    started = time.perf_counter()
    output = import_cli(data_dir, legacy.path, timeout=timeout, cpus=cpus)
    return Imported(time.perf_counter() - started, legacy.rows, output)


def copy_data_dir(src: Path, dst: Path) -> Path:
    """A copy of a data directory that no server runs on (its database, log, secret)."""
    shutil.rmtree(dst, ignore_errors=True)
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.sock", "*.lock"))
    return dst


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
