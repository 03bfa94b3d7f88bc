"""A node's cluster actor: what other nodes committed, brought to this node's filter and hub;
and what this node committed, announced only once every live node has it
(docs/architecture.md §9; only with PostgreSQL).

- Follow: every `poll_interval` it reads `cluster_events` past the last entry applied (the
  filter's prewarm snapshot is where it starts), and hands each other node's entry to the
  filter in order: its effects (cache fills, invalidations, events) as one `Committed`, an
  invalidation settled (`Settle`: with worker processes, once every worker has it queued), its
  new ids as `AddPids` (into the Bloom filter, every worker's too, then their events to the
  hub). Then it records how far it got (`cluster_nodes.applied`) and tells the filter the feed
  was read (`FeedSynced`): the filter answers alone only for `trust_secs` after the read
  began, so a node cut off from the feed asks storage for every redeem instead of answering a
  stale 404.
- Barrier: storage forwards each of this node's new-id and settle answers here with its feed
  entry (`AfterFeed`); it is released once every live node (one that read the feed within
  `trust_secs`) has applied the entry, or after `trust_secs` plus a margin: by then a node
  that has not read it has stopped trusting its filter. New ids are in this node's filters
  already (storage put them there before its COMMIT): released, the poller gets its answer
  and the events go to the hub through the filter; a settle goes to the filter, which answers
  once the workers have it. So a payment acknowledged on one node is redeemable at once on
  every node, and a revocation answered on one is seen by all.
- Housekeeping: entries every live node applied are deleted after `keep_secs`; nodes gone for
  a day are forgotten.

The database is reached from a thread of the actor's own (psycopg's sync API), one
connection; losing it is survived: the filter stops trusting itself when no read succeeds,
waiting answers are released after their bound, and the actor reconnects with backoff.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import psycopg
import trio

from anon_ticket.domain.commands import FilterStats
from anon_ticket.domain.inboxes import ClusterMsg, FilterMsg
from anon_ticket.domain.messages import (
    NOTHING_RECORDED,
    AddPids,
    AfterFeed,
    Committed,
    FeedSynced,
    Invalidate,
    Publish,
    Settle,
)
from anon_ticket.errors import AnonTicketError
from anon_ticket.logs import get_logger
from anon_ticket.metrics import Metrics
from anon_ticket.schema import pg_reason
from anon_ticket.wire import WireError, decode_feed
from mailboxes import Dispatch, Envelope, Mailbox

log = get_logger("cluster")

BATCH = 500  # feed entries read at a time
RECONNECT_MAX_SECS = 5.0


@dataclass(frozen=True, slots=True)
class ClusterConfig:
    url: str
    node: str
    poll_interval: float = 0.02
    trust_secs: float = 2.0  # the filter answers alone this long after a feed read began
    barrier_margin: float = 0.5
    keep_secs: float = 600.0  # applied entries are kept this long (for a node catching up)
    request_timeout: float = 5.0


@dataclass(slots=True)
class _Waiting:
    entry: int
    msg: AddPids | Settle
    env: Envelope[Any]
    since: float


class Cluster:
    name = "cluster"

    def __init__(self, config: ClusterConfig, mailbox: Mailbox[ClusterMsg],
                 filter_mailbox: Mailbox[FilterMsg], metrics: Metrics,
                 connect: Callable[[str], psycopg.Connection[Any]] | None = None) -> None:
        self.config = config
        self.mailbox = mailbox
        self.filter = filter_mailbox
        self.metrics = metrics
        self._connect = connect or _connect
        self._db: psycopg.Connection[Any] | None = None
        self._thread = trio.CapacityLimiter(1)
        self.applied = 0
        self._waiting: list[_Waiting] = []
        self._wake = trio.Event()
        self._pruned_at = -math.inf

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        # Where the filter's prewarm snapshot ended: the feed is followed from there.
        figures = await self.filter.ask(FilterStats(), self.config.request_timeout)
        self.applied = int(figures.get("feed_from") or 0)
        await self._db_call(self._register)
        log.info("cluster feed followed", node=self.config.node, start=self.applied)
        while await self._round() >= BATCH:  # caught up (and trusted) before serving
            pass
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._follow)
            nursery.start_soon(self._barrier)
            task_status.started()
            await self.mailbox.serve(Dispatch(self.name, {AfterFeed: self._after_feed}))

    # --- the database, from the actor's thread ----------------------------------------------

    async def _db_call(self, fn: Callable[[psycopg.Connection[Any]], Any]) -> Any:
        """`fn(connection)` in the thread; connects first if needed. Raises psycopg.Error."""
        return await trio.to_thread.run_sync(self._with_db, fn, limiter=self._thread)

    def _with_db(self, fn: Callable[[psycopg.Connection[Any]], Any]) -> Any:
        db = self._db
        if db is None or db.closed or db.broken:
            if db is not None:
                db.close()
            self._db = None
            db = self._db = self._connect(self.config.url)
        try:
            return fn(db)
        except psycopg.Error:
            if db.closed or db.broken:
                db.close()
                self._db = None
            raise

    def _register(self, db: psycopg.Connection[Any]) -> None:
        db.execute("INSERT INTO cluster_nodes (node, applied, seen_at) VALUES (%s, %s, now()) "
                   "ON CONFLICT (node) DO UPDATE SET applied = excluded.applied, "
                   "seen_at = now()", (self.config.node, self.applied))

    # --- following the feed -----------------------------------------------------------------

    async def _follow(self) -> None:
        delay = self.config.poll_interval
        while True:
            try:
                read = await self._round()
            except psycopg.Error as exc:
                log.warning("cluster feed unreadable", error=pg_reason(exc))
                delay = min(max(delay * 2, 0.1), RECONNECT_MAX_SECS)
                await trio.sleep(delay)
                continue
            delay = self.config.poll_interval
            if read == 0:
                await trio.sleep(self.config.poll_interval)
            # (after entries, the next round at once: it records how far this node got,
            # which answers waiting on other nodes wait for)

    async def _round(self) -> int:
        """Read and apply the next entries; how many were read. Raises psycopg.Error."""
        began = trio.current_time()
        rows = await self._db_call(self._read)
        for entry, node, body in rows:
            if node != self.config.node:
                await self._apply(entry, bytes(body))
            self.applied = entry
        self.metrics.feed_applied.set(self.applied)
        if len(rows) < BATCH:  # read to the end: the filter may answer alone a while
            valid_for = self.config.trust_secs - (trio.current_time() - began)
            if valid_for > 0:
                try:
                    self.filter.tell(FeedSynced(valid_for))
                except AnonTicketError:
                    pass  # (a full mailbox: the filter distrusts itself a little sooner)
        return len(rows)

    def _read(self, db: psycopg.Connection[Any]) -> list[tuple[int, str, bytes]]:
        """The next entries, and (in the same round) how far this node got."""
        db.execute("UPDATE cluster_nodes SET applied = %s, seen_at = now() WHERE node = %s",
                   (self.applied, self.config.node))
        rows = db.execute("SELECT id, node, body FROM cluster_events WHERE id > %s "
                          "ORDER BY id LIMIT %s", (self.applied, BATCH)).fetchall()
        now = time.monotonic()
        if now - self._pruned_at >= 60:
            self._pruned_at = now
            self._prune(db)
        return rows

    def _prune(self, db: psycopg.Connection[Any]) -> None:
        db.execute("DELETE FROM cluster_events WHERE at < now() - make_interval(secs => %s) "
                   "AND id <= (SELECT coalesce(min(applied), 0) FROM cluster_nodes "
                   "WHERE seen_at > now() - interval '1 hour')", (self.config.keep_secs,))
        db.execute("DELETE FROM cluster_nodes WHERE seen_at < now() - interval '1 day'")

    async def _apply(self, entry: int, body: bytes) -> None:
        try:
            committed, pids, events = decode_feed(body)
        except WireError as exc:  # written by this code: a bug or a foreign writer
            log.error("cluster feed entry skipped", entry=entry, error=str(exc))
            self.metrics.alerts.labels("cluster_feed_unreadable").inc()
            return
        timeout = self.config.request_timeout
        try:
            if committed.effects:
                await self.filter.tell_wait(committed)
                if any(type(e) is Invalidate for e in committed.effects):
                    await self.filter.ask(Settle(None), timeout)
            if pids:
                await self.filter.ask(AddPids(pids, NOTHING_RECORDED, events), timeout)
        except AnonTicketError as exc:
            # The filter is restarting: it prewarms again and this actor restarts after it
            # (rest-for-one), so nothing is skipped for good.
            log.warning("cluster entry not applied", entry=entry, error=str(exc))
            raise

    # --- this node's answers, held until every live node has the entry ----------------------

    def _after_feed(self, env: Envelope[AfterFeed]) -> None:
        self._waiting.append(_Waiting(env.msg.entry, env.msg.msg, env, trio.current_time()))
        self._wake.set()

    async def _barrier(self) -> None:
        bound = self.config.trust_secs + self.config.barrier_margin
        while True:
            if not self._waiting:
                await self._wake.wait()
                self._wake = trio.Event()
                continue
            highest = max(w.entry for w in self._waiting)
            try:
                behind = await self._db_call(partial(self._behind, highest=highest))
            except psycopg.Error as exc:
                log.warning("cluster nodes unreadable", error=pg_reason(exc))
                behind = None  # unknown: only the bound releases
            now = trio.current_time()
            still: list[_Waiting] = []
            for w in self._waiting:
                done = behind is not None and all(applied >= w.entry for applied in behind)
                if done or now - w.since >= bound:
                    if not done:
                        self.metrics.alerts.labels("cluster_node_behind").inc()
                        log.warning("a node did not apply a feed entry in time; it answers "
                                    "through storage until it reads the feed", entry=w.entry)
                    self._release(w)
                else:
                    still.append(w)
            self._waiting = still
            if still:
                await trio.sleep(self.config.poll_interval / 2)

    def _release(self, w: _Waiting) -> None:
        """New ids: they are in this node's filters since before their COMMIT (storage put
        them there): the poller's answer, then their events, through the filter to the hub
        and the workers. A settle: to the filter, which answers once the workers have it."""
        msg = w.msg
        if isinstance(msg, AddPids):
            w.env.reply(msg.ack)
            if msg.events:
                try:
                    self.filter.tell(Committed((Publish(msg.events),)))
                except AnonTicketError:
                    self.metrics.alerts.labels("filter_mailbox_full").inc()
        else:
            self.filter.forward(msg, w.env)

    def _behind(self, db: psycopg.Connection[Any], *, highest: int) -> list[int]:
        """What the other live nodes applied, for those not yet at `highest`."""
        rows = db.execute(
            "SELECT applied FROM cluster_nodes WHERE node <> %s AND applied < %s "
            "AND seen_at > now() - make_interval(secs => %s)",
            (self.config.node, highest, self.config.trust_secs)).fetchall()
        return [int(r[0]) for r in rows]


def _connect(url: str) -> psycopg.Connection[Any]:
    return psycopg.connect(url, autocommit=True, connect_timeout=5,
                           options="-c statement_timeout=5000")
