"""The filter actor: a Bloom filter of every recorded payment id, and a positive cache.

- Bloom (I8): sized max(configured entries, 2 x recorded ids), seeded at random per run, and
  prewarmed by streaming the recorded ids from its own read-only connection in a worker thread
  (no full list in memory, nothing slow on the loop). Its mailbox serves only once prewarm is
  done, so a restarting filter answers 503 (through the mailbox), never a 404 from a half-built
  filter. Additions come from storage after COMMIT and are acknowledged to the requester.
- Cache: the `already_claimed` answer (token, balance) of recently claimed ids, filled and
  invalidated by storage in commit order; bounded in size and age.
- Redeem: a Bloom negative or a cached claim is answered here; anything else is forwarded to
  storage as a `Claim`, and storage answers the requester, who waits once.
- With worker processes (docs/architecture.md §8) the owner's filter hands additions and
  effects on to the fanout (`replicas`), which answers the poller once every worker has the
  new ids queued; a worker's filter is a replica: the same actor, its `storage` a link to the
  owner's, fed `Replicated` and `Committed` by its link.
- With several nodes on PostgreSQL (docs/architecture.md §9) the filter is prewarmed from the
  database in one snapshot together with the cluster feed's last entry (`feed_from`: its
  cluster actor follows the feed from there), and answers alone (Bloom negative, cached claim)
  only while the cluster actor reports the feed read recently (`FeedSynced`); otherwise every
  redeem asks storage: a node cut off from the feed is slower, never wrong.
"""

from __future__ import annotations

import math
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import apsw
import trio

from anon_ticket.domain.bloom import BloomFilter
from anon_ticket.domain.commands import Figures, FilterStats
from anon_ticket.domain.ids import PaymentId, ServiceToken
from anon_ticket.domain.inboxes import FanoutMsg, FilterMsg, HubMsg, StorageMsg
from anon_ticket.domain.messages import (
    AddPids,
    Announce,
    CacheClaim,
    Claim,
    Claimed,
    ClaimStatus,
    Committed,
    FeedSynced,
    Invalidate,
    Lookup,
    Note,
    Presence,
    Publish,
    Redeem,
    Replicated,
    Settle,
    TicketEvent,
)
from anon_ticket.errors import AnonTicketError, Unavailable
from anon_ticket.logs import get_logger
from anon_ticket.metrics import Metrics
from mailboxes import Dispatch, Envelope, Mailbox

log = get_logger("filter")

# From this many new ids in one message, one numpy pass beats an `add` per id.
BULK_ADD = 32


@dataclass(frozen=True, slots=True)
class FilterConfig:
    db_path: Path
    bloom_entries: int  # 0: no Bloom filter (every lookup is "maybe")
    bloom_fp_rate: float
    cache_ttl: float
    cache_capacity: int
    postgres_url: str | None = None  # several nodes share this database (§9)


def build_bloom(config: FilterConfig, seed: int) -> tuple[BloomFilter, int | None]:
    """Size and fill the filter from the database, streaming (runs in a worker thread); with
    PostgreSQL, also the cluster feed's last entry in the same snapshot."""
    if config.postgres_url is not None:
        return _build_bloom_pg(config, seed)
    conn = apsw.Connection(str(config.db_path), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        with conn:  # one read snapshot: additions committed later arrive by message
            row = conn.execute("SELECT count(*) FROM tickets").fetchone()
            count = int(row[0]) if row else 0
            bloom = BloomFilter.for_capacity(max(config.bloom_entries, 2 * count, 1),
                                             config.bloom_fp_rate, seed)
            bloom.add_many(pid for (pid,) in conn.execute("SELECT pid FROM tickets"))
    finally:
        conn.close()
    return bloom, None


def feed_end(url: str) -> int:
    """The cluster feed's last entry now."""
    import psycopg

    with psycopg.connect(url, connect_timeout=10) as conn:
        row: Any = conn.execute("SELECT coalesce(max(id), 0) FROM cluster_events").fetchone()
        return int(row[0])


def _build_bloom_pg(config: FilterConfig, seed: int) -> tuple[BloomFilter, int]:
    """One REPEATABLE READ snapshot: every id committed after it has a feed entry numbered
    above the last one it sees (entries are numbered in commit order), so following the feed
    from there misses none."""
    import psycopg

    assert config.postgres_url is not None
    with psycopg.connect(config.postgres_url, connect_timeout=10) as conn:
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
        row: Any = conn.execute("SELECT coalesce(max(id), 0) FROM cluster_events").fetchone()
        feed_from = int(row[0])
        row = conn.execute("SELECT count(*) FROM tickets").fetchone()
        count = int(row[0]) if row else 0
        bloom = BloomFilter.for_capacity(max(config.bloom_entries, 2 * count, 1),
                                         config.bloom_fp_rate, seed)
        with conn.cursor(name="prewarm") as cur:  # streamed from the server
            cur.itersize = 10_000
            cur.execute("SELECT pid FROM tickets")
            bloom.add_many(bytes(pid) for (pid,) in cur)
    return bloom, feed_from


class Filter:
    name = "filter"

    def __init__(self, config: FilterConfig, mailbox: Mailbox[FilterMsg], metrics: Metrics,
                 storage: Mailbox[StorageMsg], hub: Mailbox[HubMsg] | None = None,
                 replicas: Mailbox[FanoutMsg] | None = None) -> None:
        self.config = config
        self.mailbox = mailbox
        self.hub = hub
        self.replicas = replicas
        self.storage = storage
        self.metrics = metrics
        self.bloom: BloomFilter | None = None
        # Values are tuples of atoms (expiry, token bytes, balance): CPython untracks them, so
        # a full cache adds nothing to garbage-collection pauses on the redeem path.
        self._cache: OrderedDict[bytes, tuple[float, bytes, int]] = OrderedDict()
        hints = metrics.redeem_cache_hints
        self._hint_negative = hints.labels("bloom_negative")
        self._hint_cache_hit = hints.labels("cache_hit")
        self._hint_maybe = hints.labels("maybe")
        # Several nodes: the last feed entry the prewarm saw, and until when (trio clock) the
        # Bloom filter and the cache may answer alone; None: one node, always.
        self.feed_from: int | None = None
        self._trusted_until: float | None = -math.inf if config.postgres_url else None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        if self.config.bloom_entries > 0:
            started = time.perf_counter()
            bloom, self.feed_from = await trio.to_thread.run_sync(
                build_bloom, self.config, secrets.randbits(64))
            self.bloom = bloom
            self.metrics.bloom_entries.set(len(bloom))
            log.info("bloom filter ready", entries=len(bloom), bits=bloom.bits,
                     hashes=bloom.hashes, memory_bytes=bloom.nbytes,
                     fp_rate=self.config.bloom_fp_rate,
                     seconds=round(time.perf_counter() - started, 3))
        else:
            log.warning("no bloom filter: every redeem of an unknown id reaches storage")
            if self.config.postgres_url is not None:  # (the cache still follows the feed)
                self.feed_from = await trio.to_thread.run_sync(feed_end, self.config.postgres_url)
        task_status.started()
        await self.mailbox.serve(Dispatch(self.name, {
            Redeem: self._redeem,
            Lookup: self._lookup,
            AddPids: self._add,
            Committed: self._committed,
            Replicated: self._replicated,
            Settle: self._settle,
            FeedSynced: self._feed_synced,
            FilterStats: self._stats,
        }))

    def _answer(self, pid: PaymentId) -> Presence | Claimed:
        key = pid.raw
        bloom = self.bloom
        trusted = self._trusted_until
        if trusted is not None and trio.current_time() >= trusted:
            self._hint_maybe.inc()  # cut off from the other nodes: storage answers
            return Presence.MAYBE
        if bloom is not None and key not in bloom:
            self._hint_negative.inc()
            return Presence.ABSENT
        hit = self._cache.get(key)
        if hit is not None:
            if hit[0] > trio.current_time():
                self._hint_cache_hit.inc()
                return Claimed(ClaimStatus.ALREADY_CLAIMED, ServiceToken(hit[1]), hit[2])
            del self._cache[key]
        self._hint_maybe.inc()
        return Presence.MAYBE

    def _lookup(self, env: Envelope[Lookup]) -> None:
        env.reply(self._answer(env.msg.pid))

    def _redeem(self, env: Envelope[Redeem]) -> None:
        pid = env.msg.pid
        answer = self._answer(pid)
        if answer is not Presence.MAYBE:
            env.reply(answer)
        elif not self.storage.serving:
            # A request fails at once on a restarting actor, as `ask` would; `forward` itself
            # queues (storage's AddPids must reach a restarting filter, events and all).
            env.fail(Unavailable("storage is not available", retry_after=1))
        else:
            self.storage.forward(Claim(pid), env)  # storage answers the requester

    def _add_to_bloom(self, pids: tuple[PaymentId, ...]) -> None:
        if self.bloom is not None:
            if len(pids) >= BULK_ADD:  # a catch-up's chunk: vectorized
                self.bloom.add_many([pid.raw for pid in pids])
            else:
                for pid in pids:
                    self.bloom.add(pid.raw)
            self.metrics.bloom_entries.set(len(self.bloom))

    def _add(self, env: Envelope[AddPids]) -> None:
        """New ids into the Bloom filter, then the poller's answer, then the events (I8). With
        workers, the fanout answers the poller once each worker has them queued."""
        msg = env.msg
        self._add_to_bloom(msg.pids)
        if self.replicas is not None:
            self.replicas.forward(msg, env)
        else:
            env.reply(msg.ack)
        if msg.events:
            self._to_hub(msg.events)

    def _settle(self, env: Envelope[Settle]) -> None:
        """The transaction's invalidations are applied here (they came first): answer, or
        let the fanout answer once every worker has them queued too."""
        if self.replicas is not None:
            self.replicas.forward(env.msg, env)
        else:
            env.reply(env.msg.answer)

    def _feed_synced(self, env: Envelope[FeedSynced]) -> None:
        self._trusted_until = trio.current_time() + env.msg.valid_for
        if self.replicas is not None:
            try:
                self.replicas.tell(env.msg)
            except AnonTicketError:
                pass  # (the workers distrust themselves a little sooner)

    def _replicated(self, env: Envelope[Replicated]) -> None:
        """A worker's replica: the owner's new ids, then their events to this process's hub."""
        self._add_to_bloom(env.msg.pids)
        if env.msg.events:
            self._to_hub(env.msg.events)

    def _committed(self, env: Envelope[Committed]) -> None:
        """One storage transaction's effects, in order: cache fills and invalidations here,
        the events on to the hub in one message."""
        events: list[TicketEvent] = []
        announced = False
        for effect in env.msg.effects:
            if isinstance(effect, CacheClaim):
                self._cache_claim(effect)
            elif isinstance(effect, Invalidate):
                for pid in effect.pids:
                    self._cache.pop(pid.raw, None)
            elif isinstance(effect, Announce):
                announced = True
                for note in effect.notes:
                    self._note_to_hub(note)
            else:
                events.extend(effect.events)
        if events:
            self._to_hub(tuple(events))
        if self.replicas is not None:
            committed = env.msg
            if announced:  # (the hub pushes its announcements to the workers itself)
                committed = Committed(tuple(e for e in committed.effects
                                            if not isinstance(e, Announce)))
            try:
                self.replicas.tell(committed)
            except AnonTicketError:
                self.metrics.alerts.labels("fanout_mailbox_full").inc()

    def _to_hub(self, events: tuple[TicketEvent, ...]) -> None:
        """Committed events, in commit order; the hub never holds up this actor."""
        if self.hub is None:
            return
        try:
            self.hub.tell(Publish(events))
        except AnonTicketError:
            self.metrics.alerts.labels("hub_mailbox_full").inc()

    def _note_to_hub(self, note: Note) -> None:
        if self.hub is None:
            return
        try:
            self.hub.tell(note)
        except AnonTicketError:
            pass  # announcements are best effort; committed facts come from storage

    def _cache_claim(self, msg: CacheClaim) -> None:
        if self.config.cache_ttl <= 0 or self.config.cache_capacity <= 0:
            return
        cache = self._cache
        cache[msg.pid.raw] = (trio.current_time() + self.config.cache_ttl, msg.token.raw,
                              msg.balance)
        cache.move_to_end(msg.pid.raw)
        while len(cache) > self.config.cache_capacity:
            cache.popitem(last=False)

    def _stats(self, env: Envelope[FilterStats]) -> None:
        bloom = self.bloom
        figures: Figures = {
            "enabled": bloom is not None,
            "configured_fp_rate": self.config.bloom_fp_rate,
            "cache_entries": len(self._cache),
            "cache_capacity": self.config.cache_capacity,
        }
        if self.feed_from is not None:
            figures["feed_from"] = self.feed_from
        if bloom is not None:
            figures.update(entries=len(bloom), bits=bloom.bits, hashes=bloom.hashes,
                           memory_bytes=bloom.nbytes,
                           expected_fp_rate=bloom.expected_fp_rate(len(bloom)))
        env.reply(figures)
