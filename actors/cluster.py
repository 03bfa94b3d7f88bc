"""A node's cluster actor: what other nodes committed, brought to this node's filter and hub;
and what this node committed, announced only once every live node has it
(docs/architecture.md §9; only with PostgreSQL).

- Follow: it reads `cluster_events` past the last entry applied (the filter's prewarm
  snapshot is where it starts) when another node's COMMIT wakes it (LISTEN on
  `FEED_CHANNEL`, on a connection of its own), and at least every `idle_interval` (every
  `poll_interval` while it is not listening), and hands each other node's entry to the
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
from anon_ticket.schema import APPLIED_CHANNEL, FEED_CHANNEL, pg_reason
from anon_ticket.wire import WireError, decode_feed
from mailboxes import Dispatch, Envelope, Mailbox

log = get_logger("cluster")

BATCH = 500  # feed entries read at a time
RECONNECT_MAX_SECS = 5.0


@dataclass(frozen=True, slots=True)
class ClusterConfig:
    url: str
    node: str
    poll_interval: float = 0.02  # between reads while not listening; the barrier's checks
    idle_interval: float = 0.25  # between reads while listening (notifications wake it)
    listen: bool = True
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
        self._poked = trio.Event()  # another node committed an entry (a notification)
        self._progress = trio.Event()  # another node applied entries (a notification)
        self._recorded: int | None = None  # `applied` as cluster_nodes last had it
        self.listening = False  # the listener's LISTEN is in place
        self._stopping = False  # tells the listener's thread to end
        self.rounds = 0  # reads of the feed (the tests count them)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        # Where the filter's prewarm snapshot ended: the feed is followed from there.
        figures = await self.filter.ask(FilterStats(), self.config.request_timeout)
        self.applied = int(figures.get("feed_from") or 0)
        await self._db_call(self._register)
        log.info("cluster feed followed", node=self.config.node, start=self.applied)
        while await self._round() >= BATCH:  # caught up (and trusted) before serving
            pass
        try:
            async with trio.open_nursery() as nursery:
                if self.config.listen:
                    nursery.start_soon(self._listen)
                nursery.start_soon(self._follow)
                nursery.start_soon(self._barrier)
                task_status.started()
                await self.mailbox.serve(Dispatch(self.name, {AfterFeed: self._after_feed}))
        finally:
            self._stopping = True

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
            self._poked = trio.Event()  # a notification from now on wakes the wait below
            try:
                read = await self._round()
            except psycopg.Error as exc:
                log.warning("cluster feed unreadable", error=pg_reason(exc))
                delay = min(max(delay * 2, 0.1), RECONNECT_MAX_SECS)
                await trio.sleep(delay)
                continue
            delay = self.config.poll_interval
            if read == 0:
                with trio.move_on_after(self._idle_wait()):
                    await self._poked.wait()
            # (after entries, the next round at once: it records how far this node got,
            # which answers waiting on other nodes wait for)

    def _idle_wait(self) -> float:
        """Listening, a read now and then keeps this node seen and its filter trusted (well
        within `trust_secs`); without notifications, the feed is polled."""
        if not self.listening:
            return self.config.poll_interval
        return min(self.config.idle_interval, self.config.trust_secs / 4)

    # --- notifications ------------------------------------------------------------------

    async def _listen(self) -> None:
        """LISTEN on a connection of its own, in a thread of its own; a lost connection is
        tried again with backoff (meanwhile the feed is polled)."""
        token = trio.lowlevel.current_trio_token()
        limiter = trio.CapacityLimiter(1)
        delay = 0.1
        while True:
            try:
                await trio.to_thread.run_sync(self._listen_blocking, token,
                                              abandon_on_cancel=True, limiter=limiter)
            except psycopg.Error as exc:
                log.warning("cluster feed notifications lost; polling meanwhile",
                            error=pg_reason(exc))
            finally:
                self.listening = False
            await trio.sleep(delay)
            delay = min(delay * 2, RECONNECT_MAX_SECS)

    def _poke(self, channel: str) -> None:
        (self._poked if channel == FEED_CHANNEL else self._progress).set()

    def _listen_blocking(self, token: trio.lowlevel.TrioToken) -> None:
        with self._connect(self.config.url) as conn:
            conn.execute(f"LISTEN {FEED_CHANNEL}")
            conn.execute(f"LISTEN {APPLIED_CHANNEL}")
            self.listening = True
            while not self._stopping:
                for note in conn.notifies(timeout=1.0, stop_after=1):
                    if note.payload != self.config.node:  # (our own: nothing new)
                        try:
                            token.run_sync_soon(self._poke, note.channel)
                        except trio.RunFinishedError:
                            return

    async def _round(self) -> int:
        """Read and apply the next entries; how many were read. Raises psycopg.Error."""
        began = trio.current_time()
        self.rounds += 1
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
        applied, node = self.applied, self.config.node
        if applied == self._recorded:
            db.execute("UPDATE cluster_nodes SET seen_at = now() WHERE node = %s", (node,))
        else:  # progress: the barriers of the nodes that wait for it are woken
            db.execute("WITH u AS (UPDATE cluster_nodes SET applied = %s, seen_at = now() "
                       "WHERE node = %s RETURNING node) SELECT pg_notify(%s, node) FROM u",
                       (applied, node, APPLIED_CHANNEL))
            self._recorded = applied
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
            self._progress = trio.Event()  # progress from now on wakes the wait below
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
            if still:  # until a node waited for applies more (or, not listening, a while)
                with trio.move_on_after(0.1 if self.listening
                                        else self.config.poll_interval / 2):
                    await self._progress.wait()

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
