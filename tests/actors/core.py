"""Run the real storage and filter actors (and the hub) in-process on a real SQLite file, or
on a real PostgreSQL database (`pg=` a fresh database's URL: the same contract)."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import apsw
import trio

from actors.cluster import Cluster, ClusterConfig
from actors.filter import Filter, FilterConfig
from actors.hub import Hub
from actors.storage import Storage, StorageConfig
from actors.storage_pg import PgConfig, PgStorage
from anon_ticket import schema
from anon_ticket.domain.ids import PaymentId
from anon_ticket.domain.messages import RecordTransfers, Transfer
from anon_ticket.metrics import Metrics
from supervisors.mailbox import Mailbox
from supervisors.supervisor import Backoff, ChildSpec, Strategy, Supervisor


class ReplySlot:
    """A reply slot for envelopes handed straight to an actor's handler or mailbox: keeps the
    answer and sets `done`."""

    def __init__(self) -> None:
        self.value: Any = None
        self.done = trio.Event()

    def put(self, value: object) -> None:
        self.value = value
        self.done.set()


class _FaultyFile(apsw.VFSFile):
    def __init__(self, disk: FaultyDisk, name: Any, flags: list[int]) -> None:
        super().__init__("unix", name, flags)
        self._disk = disk

    def xWrite(self, data: bytes, offset: int) -> None:
        if self._disk.full:
            raise apsw.FullError("injected: no space left on device")
        super().xWrite(data, offset)


class FaultyDisk(apsw.VFS):
    """SQLite's files through a VFS whose writes fail with SQLITE_FULL while `full` is set:
    the database, its log and its journals, as on a disk that filled up."""

    def __init__(self) -> None:
        self.full = False
        super().__init__("faulty-disk", base="unix", makedefault=True)

    def xOpen(self, name: Any, flags: list[int]) -> apsw.VFSFile:
        return _FaultyFile(self, name, flags)


@contextmanager
def faulty_disk() -> Iterator[FaultyDisk]:
    """The default VFS of every APSW connection opened meanwhile (storage's among them)."""
    disk = FaultyDisk()
    try:
        yield disk
    finally:
        disk.unregister()


@dataclass
class Core:
    """`db_path` is the SQLite file (unused on PostgreSQL, where `pg` is the URL)."""

    storage: Mailbox[Any]
    filter: Mailbox[Any]
    metrics: Metrics
    supervisor: Supervisor
    db_path: Path
    hub: Mailbox[Any]
    pg: str | None = None
    made: dict[str, Any] = field(default_factory=dict)  # the latest instance of an actor

    async def pay(self, pid: PaymentId, amount: int = 10**12, height: int = 100,
                  txid: bytes | None = None) -> Any:
        t = Transfer(txid or os.urandom(32), pid, amount, height)
        return await self.storage.ask(RecordTransfers((t,)), 5)


@asynccontextmanager
async def run_core(tmp_path: Path, *, on_open: Callable[[apsw.Connection], None] | None = None,
                   storage_factory: Callable[..., Storage] = Storage, batch_limit: int = 256,
                   bloom_entries: int = 10_000, intensity: int = 5, pg: str | None = None,
                   node: str = "node-a", cluster: bool = False, secret: bytes = b"s" * 32,
                   trust_secs: float = 2.0, **cluster_options: Any) -> AsyncIterator[Core]:
    """With `pg`, PostgreSQL's storage actor (and, with `cluster`, the node's cluster actor
    after the filter, as in the tree)."""
    db = tmp_path / "anon-ticket.db"
    if pg is None:
        schema.migrate(db)
    else:
        schema.migrate_postgres(pg)
    metrics = Metrics()
    smb: Mailbox[Any] = Mailbox("storage", 8192)
    fmb: Mailbox[Any] = Mailbox("filter", 65536)
    cmb: Mailbox[Any] = Mailbox("cluster", 65536)
    scfg = StorageConfig(db, secret, tmp_path / "token.secret", batch_limit=batch_limit)
    fcfg = FilterConfig(db, bloom_entries, 1e-6, 60.0, 1000, postgres_url=pg)
    hmb: Mailbox[Any] = Mailbox("hub", 65536)
    if pg is not None:
        pg_cfg = PgConfig(pg, node)
        storage_factory = partial(PgStorage, pg=pg_cfg,
                                  cluster=cmb if cluster else None)
    made: dict[str, Any] = {}
    children = [
        ChildSpec("storage", lambda: storage_factory(scfg, smb, fmb, metrics, on_open=on_open),
                  smb),
        ChildSpec("filter", lambda: Filter(fcfg, fmb, metrics, smb, hub=hmb), fmb),
    ]
    if pg is not None and cluster:
        ccfg = ClusterConfig(pg, node, trust_secs=trust_secs, **cluster_options)
        def make_cluster() -> Cluster:
            made["cluster"] = actor = Cluster(ccfg, cmb, fmb, metrics)
            return actor

        children.append(ChildSpec("cluster", make_cluster, cmb))
    children.append(ChildSpec("hub", lambda: Hub(hmb, metrics), hmb))
    sup = Supervisor("core", children, strategy=Strategy.REST_FOR_ONE, intensity=intensity,
                     period=30, backoff=Backoff(0.05, 0.2), grace=1)
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        yield Core(smb, fmb, metrics, sup, db, hmb, pg, made)
        sup.request_stop("test over")
