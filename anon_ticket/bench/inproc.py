"""In-process measurements: the real storage actor (with the real filter, and the hub when the
tree has one) under a supervisor, on copies of one prepared database; and raw APSW doing the
same claims, for reference.

- `storage_claims`: N claims asked by C concurrent requesters, straight to storage's mailbox
  (no HTTP, no filter lookup). Run once with group commit (batch limit 256) and once with
  `batch_limit=1` (one transaction per claim).
- `raw_claims`: the claim's statements on a bare APSW connection, `per_tx` claims a
  transaction: the floor of what SQLite costs for this work on this machine.
- `ingest`: transfers of new payment ids through the real record-transfers path: messages
  split at block boundaries by the poller's own `chunks_at_block_boundaries` (256 transfers
  each, with the cursor), each asked and awaited in turn like the poller does, so every chunk
  includes its COMMIT, the filter adding its ids and acknowledging, and the committed events.
"""

from __future__ import annotations

import gc
import os
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from actors.filter import Filter, FilterConfig
from actors.hub import Hub
from actors.poller import CHUNK_TRANSFERS, chunks_at_block_boundaries
from actors.storage import (
    CLAIM_READ,
    CLAIM_WRITE,
    CREDIT,
    CURSOR_WRITE,
    TRANSFER_INSERT,
    TRANSFER_READ,
    Storage,
    StorageConfig,
    open_connection,
)
from anon_ticket import gctune
from anon_ticket.domain.ids import PaymentId
from anon_ticket.domain.messages import (
    Claim,
    Claimed,
    ClaimStatus,
    Recorded,
    RecordTransfers,
    Transfer,
)
from anon_ticket.domain.timefmt import rfc3339
from anon_ticket.domain.tokens import Derivation, derive
from anon_ticket.metrics import Metrics
from supervisors.mailbox import Mailbox
from supervisors.supervisor import Backoff, ChildSpec, Strategy, Supervisor

SECRET = b"b" * 32
TIMEOUT = 60.0


@dataclass
class GcTime:
    """Time spent in CPython's cyclic garbage collector while a measurement ran."""

    collections: list[int] = field(default_factory=lambda: [0, 0, 0])
    seconds: float = 0.0
    max_pause_s: float = 0.0

    def as_dict(self, span_s: float) -> dict[str, object]:
        return {"collections_by_generation": list(self.collections),
                "seconds": round(self.seconds, 4),
                "share_of_run": round(self.seconds / span_s, 3) if span_s > 0 else None,
                "max_pause_ms": round(self.max_pause_s * 1000, 1)}


@contextmanager
def gc_time() -> Iterator[GcTime]:
    acc = GcTime()
    started = [0.0]

    def callback(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
            return
        pause = time.perf_counter() - started[0]
        acc.collections[info["generation"]] += 1
        acc.seconds += pause
        acc.max_pause_s = max(acc.max_pause_s, pause)

    gc.callbacks.append(callback)
    try:
        yield acc
    finally:
        gc.callbacks.remove(callback)


@dataclass
class Core:
    storage: Mailbox[Any]
    filter: Mailbox[Any]
    metrics: Metrics
    supervisor: Supervisor


@asynccontextmanager
async def run_core(db_path: Path, *, batch_limit: int = 256, bloom_entries: int = 1_000_000,
                   fp_rate: float = 1e-6) -> AsyncIterator[Core]:
    """Storage + filter (+ hub) under a supervisor that gives up at the first crash."""
    metrics = Metrics()
    smb: Mailbox[Any] = Mailbox("storage", 8192)
    fmb: Mailbox[Any] = Mailbox("filter", 65536)
    scfg = StorageConfig(db_path, SECRET, db_path.parent / "token.secret",
                         batch_limit=batch_limit)
    fcfg = FilterConfig(db_path, bloom_entries, fp_rate, 60.0, 100_000)
    hmb: Mailbox[Any] = Mailbox("hub", 65536)
    children = [
        ChildSpec("storage", lambda: Storage(scfg, smb, fmb, metrics), smb),
        ChildSpec("filter", lambda: Filter(fcfg, fmb, metrics, smb, hub=hmb), fmb),
        ChildSpec("hub", lambda: Hub(hmb, metrics), hmb),
    ]
    sup = Supervisor("bench-core", children, strategy=Strategy.REST_FOR_ONE, intensity=0,
                     period=60, backoff=Backoff(0.05, 0.2), grace=2)
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        # The server's collector settings once its tree is up (without the freeze each full
        # collection walked some 60,000 start-up objects, up to 90 ms here, a sixth of a
        # claims run).
        previous = gctune.settle()
        try:
            yield Core(smb, fmb, metrics, sup)
        finally:
            sup.request_stop("benchmark over")
            gctune.restore(previous)


def _batch_histogram(metrics: Metrics) -> dict[str, float]:
    """The storage batch-size histogram of an in-process Metrics, as cumulative buckets."""
    out: dict[str, float] = {}
    for family in metrics.batch_size.collect():
        for sample in family.samples:
            if sample.name.endswith("_bucket"):
                out[str(sample.labels["le"])] = float(sample.value)
            elif sample.name.endswith("_count"):
                out["_count"] = float(sample.value)
            elif sample.name.endswith("_sum"):
                out["_sum"] = float(sample.value)
    return out


@dataclass
class ClaimRun:
    claims: int
    seconds: float
    cpu_seconds: float  # this process's CPU time over the same span
    concurrency: int
    batch_limit: int
    outcomes: dict[str, int]
    batches: dict[str, float]
    gc: GcTime | None = None

    @property
    def per_s(self) -> float:
        return self.claims / self.seconds if self.seconds > 0 else 0.0

    @property
    def per_cpu_s(self) -> float:
        """Claims per CPU second: the rate on a core of its own, whatever else runs."""
        return self.claims / self.cpu_seconds if self.cpu_seconds > 0 else 0.0


async def _storage_claims(db_path: Path, pids: list[bytes], concurrency: int,
                          batch_limit: int) -> ClaimRun:
    outcomes: dict[str, int] = {}
    async with run_core(db_path, batch_limit=batch_limit) as core:
        ask = core.storage.ask
        queue = iter([PaymentId(p) for p in pids])

        async def requester() -> None:
            for pid in queue:  # shared iterator: each pid is claimed once
                try:
                    result = await ask(Claim(pid), TIMEOUT)
                except Exception as exc:
                    key = type(exc).__name__
                else:
                    key = result.status.value if isinstance(result, Claimed) else "other"
                outcomes[key] = outcomes.get(key, 0) + 1

        started, cpu = trio.current_time(), time.process_time()
        with gc_time() as gct:
            async with trio.open_nursery() as nursery:
                for _ in range(concurrency):
                    nursery.start_soon(requester)
        seconds, cpu = trio.current_time() - started, time.process_time() - cpu
        batches = _batch_histogram(core.metrics)
    return ClaimRun(len(pids), seconds, cpu, concurrency, batch_limit, outcomes, batches, gct)


def storage_claims(db_path: Path, pids: list[bytes], *, concurrency: int,
                   batch_limit: int) -> ClaimRun:
    return trio.run(_storage_claims, db_path, pids, concurrency, batch_limit)


def raw_claims(db_path: Path, pids: list[bytes], *, per_tx: int) -> ClaimRun:
    """The storage actor's claim statements on a bare connection, `per_tx` a transaction.

    Same connection settings (WAL, synchronous=NORMAL), same statements (read the ticket with
    its first surviving transfer, derive the HMAC token, write token, claimed_at and the event
    number), no actor, no mailbox, no messages.
    """
    conn = open_connection(db_path)
    outcomes: dict[str, int] = {}
    try:
        cur = conn.cursor()
        started, cpu = time.perf_counter(), time.process_time()
        for i in range(0, len(pids), per_tx):
            with conn:
                now = rfc3339(time.time())
                for raw in pids[i:i + per_tx]:
                    row = cur.execute(CLAIM_READ, (raw,)).fetchone()
                    if row is None or row[1] is not None or row[2] is None:
                        outcomes["not_claimable"] = outcomes.get("not_claimable", 0) + 1
                        continue
                    token = derive(Derivation.HMAC, SECRET, PaymentId(raw), row[2].hex())
                    cur.execute(CLAIM_WRITE, (token.raw, now, raw)).fetchall()
                    outcomes["success"] = outcomes.get("success", 0) + 1
        seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    finally:
        conn.close()
    return ClaimRun(len(pids), seconds, cpu, 1, per_tx, outcomes, {})


# --- ingestion ---------------------------------------------------------------------------------


@dataclass
class IngestRun:
    transfers: int
    messages: int
    seconds: float
    cpu_seconds: float
    credited: int
    new_pids: int
    cursor: int | None
    gc: GcTime | None = None

    @property
    def per_s(self) -> float:
        return self.transfers / self.seconds if self.seconds > 0 else 0.0

    @property
    def per_cpu_s(self) -> float:
        return self.transfers / self.cpu_seconds if self.cpu_seconds > 0 else 0.0


def make_transfers(count: int, *, first_height: int, per_block: int) -> list[Transfer]:
    return [Transfer(os.urandom(32), PaymentId.generate(), 10**12, first_height + i // per_block)
            for i in range(count)]


def _messages(transfers: list[Transfer], window_blocks: int) -> list[RecordTransfers]:
    """Windows of `window_blocks` heights, as the poller asks the wallet for them, each split
    into storage messages at block boundaries."""
    windows: dict[int, list[Transfer]] = {}
    base = transfers[0].height if transfers else 0
    for t in transfers:
        windows.setdefault((t.height - base) // window_blocks, []).append(t)
    messages = []
    for w in sorted(windows):
        top = base + (w + 1) * window_blocks - 1
        messages.extend(chunks_at_block_boundaries(windows[w], [], top))
    return messages


async def _ingest(db_path: Path, transfers: list[Transfer], window_blocks: int) -> IngestRun:
    messages = _messages(transfers, window_blocks)
    credited = new = 0
    cursor = None
    async with run_core(db_path) as core:
        ask = core.storage.ask
        started, cpu = trio.current_time(), time.process_time()
        with gc_time() as gct:
            for msg in messages:
                rec = await ask(msg, TIMEOUT)
                assert isinstance(rec, Recorded)
                credited += rec.credited
                new += len(rec.new_pids)
                cursor = rec.cursor
        seconds, cpu = trio.current_time() - started, time.process_time() - cpu
    return IngestRun(len(transfers), len(messages), seconds, cpu, credited, new, cursor,
                     gct)


def ingest(db_path: Path, transfers: list[Transfer], *, window_blocks: int = 1000) -> IngestRun:
    return trio.run(_ingest, db_path, transfers, window_blocks)


def raw_ingest(db_path: Path, transfers: list[Transfer], *,
               window_blocks: int = 1000) -> IngestRun:
    """The storage actor's crediting statements on a bare connection, one transaction per
    message of the same chunking: the SQL floor of ingestion, without actors, events or
    the Bloom filter."""
    messages = _messages(transfers, window_blocks)
    conn = open_connection(db_path)
    credited = 0
    try:
        cur = conn.cursor()
        started, cpu = time.perf_counter(), time.process_time()
        for msg in messages:
            with conn:
                now = rfc3339(time.time())
                for t in msg.transfers:
                    raw = t.pid.raw
                    if cur.execute(TRANSFER_READ, (t.txid, raw)).fetchall():
                        continue
                    cur.execute(CREDIT, (raw, t.amount, now)).fetchall()
                    cur.execute(TRANSFER_INSERT, (t.txid, raw, t.amount, t.height, now))
                    credited += 1
                cur.execute(CURSOR_WRITE, (msg.cursor,))
        seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    finally:
        conn.close()
    return IngestRun(len(transfers), len(messages), seconds, cpu, credited, credited,
                     messages[-1].cursor if messages else None)


def expected_outcome(run: ClaimRun) -> bool:
    return run.outcomes.get(ClaimStatus.SUCCESS.value, 0) == run.claims


__all__ = [
    "CHUNK_TRANSFERS",
    "ClaimRun",
    "IngestRun",
    "expected_outcome",
    "ingest",
    "make_transfers",
    "raw_claims",
    "raw_ingest",
    "storage_claims",
]
