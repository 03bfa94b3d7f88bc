"""The hub: fans committed events and chain announcements out to websocket watchers.

Storage numbers each committed fact per ticket (`seq`, in commit order) and publishes it after
COMMIT through the filter, so the hub sees a ticket's events in order. The hub keeps a small
replay buffer per ticket for watchers that reconnect with `since` (kept as tuples of plain
values, which CPython's cyclic GC stops tracking: 50,000 tickets of event objects made every
full collection walk them), and puts into each watcher's bounded queue without waiting: a
watcher that does not keep up is marked slow and dropped (its connection's scope is
cancelled), and never holds up the hub, the poller or the claim path.

A commit's fan-out is bounded and cheap: at most MAX_WATCHERS_PER_KEY watchers of a payment id
(or token), and each message is encoded once per key, not once per watcher (2,500 watchers of
one payment id made a claim's fan-out take half a second of the loop, JSON for each).

It also remembers, per payment id, the transfers the poller announced and has not yet seen
deep enough (`PendingPayment`), so a watcher that subscribes after the pool sighting is told
it in its `state` (docs/architecture.md §3): announced, updated as confirmations arrive,
forgotten at N (credited right after) or when the transfer leaves the wallet's pool and
recent blocks. Like the replay buffer it is bounded and lives only as long as the hub.

Its protocol (subscriptions, and what it puts into a watcher's queue) is
anon_ticket/domain/watch.py's; the queue itself, made by the public actor, mailboxes/outbox.py's.
"""

from __future__ import annotations

from collections import OrderedDict

import trio

from anon_ticket.domain.commands import HubStats
from anon_ticket.domain.ids import PaymentId, ServiceToken
from anon_ticket.domain.inboxes import FanoutMsg, HubMsg
from anon_ticket.domain.messages import (
    Confirmations,
    EventKind,
    PaymentSeen,
    Publish,
    SightingGone,
    TicketEvent,
)
from anon_ticket.domain.watch import (
    MAX_WATCHERS_PER_KEY,
    Drop,
    Key,
    PendingPayment,
    Replay,
    Subscribe,
    Subscriber,
    Unsubscribe,
    WatchEvent,
    encode,
    event_message,
    note_message,
)
from anon_ticket.errors import AnonTicketError, InvalidInput
from anon_ticket.logs import get_logger
from anon_ticket.metrics import Metrics
from mailboxes import Dispatch, Envelope, Mailbox

log = get_logger("hub")

REPLAY_PER_TICKET = 64
REPLAY_TICKETS = 50_000
PENDING_PER_TICKET = 16
PENDING_TICKETS = 50_000

# A replayable event: (kind, token or None, seq, epoch, fields); the ticket's pid is its key.
Record = tuple[str, bytes | None, int, int, tuple[tuple[str, object], ...]]


def _record(event: TicketEvent) -> Record:
    token = event.token.raw if event.token is not None else None
    return (event.kind.value, token, event.seq, event.epoch, event.fields)


def _event(pid: bytes, r: Record) -> TicketEvent:
    return TicketEvent(EventKind(r[0]), PaymentId(pid), ServiceToken(r[1]) if r[1] else None,
                       r[2], r[3], r[4])


class Hub:
    name = "hub"

    def __init__(self, mailbox: Mailbox[HubMsg], metrics: Metrics,
                 per_key: int = MAX_WATCHERS_PER_KEY,
                 replicas: Mailbox[FanoutMsg] | None = None) -> None:
        self.mailbox = mailbox
        self.metrics = metrics
        self.replicas = replicas  # the owner's fanout: announcements reach workers' hubs too
        self.per_key = per_key
        self._subs: dict[bytes, set[Subscriber]] = {}
        self._replay: OrderedDict[bytes, tuple[Record, ...]] = OrderedDict()
        # payment id -> txid -> what was announced of it, until it is deep enough
        self._pending: OrderedDict[bytes, dict[str, PendingPayment]] = OrderedDict()
        self._slow = 0
        self._refused = 0

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        await self.mailbox.serve(Dispatch(self.name, {
            Publish: self._publish,
            PaymentSeen: self._announce,
            Confirmations: self._announce,
            SightingGone: self._gone,
            Subscribe: self._subscribe,
            Unsubscribe: self._unsubscribe,
            Drop: self._drop,
            Replay: self._replay_events,
            HubStats: self._stats,
        }))

    # --- subscriptions ----------------------------------------------------------------------

    def _subscribe(self, env: Envelope[Subscribe]) -> None:
        """Refused (InvalidInput, for the watcher to read) when the key has `per_key`
        watchers already."""
        msg = env.msg
        watchers = self._subs.get(msg.key)
        if watchers is None:
            watchers = self._subs[msg.key] = set()
        elif len(watchers) >= self.per_key and msg.watcher not in watchers:
            self._refused += 1
            env.fail(InvalidInput(f"too many watchers of this {Key.of_raw(msg.key).noun}: "
                                  f"at most {self.per_key} at once"))
            return
        watchers.add(msg.watcher)
        msg.watcher.keys.add(msg.key)
        pending = self._pending.get(msg.key)
        env.reply(tuple(pending.values()) if pending else ())

    def _remove(self, watcher: Subscriber, key: bytes) -> None:
        watchers = self._subs.get(key)
        if watchers is not None:
            watchers.discard(watcher)
            if not watchers:
                del self._subs[key]
        watcher.keys.discard(key)

    def _unsubscribe(self, env: Envelope[Unsubscribe]) -> None:
        self._remove(env.msg.watcher, env.msg.key)
        env.reply(True)

    def _drop(self, env: Envelope[Drop]) -> None:
        watcher = env.msg.watcher
        if watcher.slow:  # counted here, whoever found it slow (the hub or its connection)
            self._slow += 1
            self.metrics.alerts.labels("slow_watcher").inc()
        for key in list(watcher.keys):
            self._remove(watcher, key)

    # --- delivery ---------------------------------------------------------------------------

    def _deliver(self, key: bytes, fact: TicketEvent | PaymentSeen | Confirmations) -> None:
        """Put a `WatchEvent` to every watcher of `key`: one encoding for all of them (the
        message names the key, so it is the same for each)."""
        watchers = self._subs.get(key)
        if not watchers:
            return
        if isinstance(fact, TicketEvent):
            item = WatchEvent(key, fact.seq, encode(event_message(Key.of_raw(key), fact)))
        else:  # an announcement: no seq
            item = WatchEvent(key, None, encode(note_message(Key.of_raw(key), fact)))
        for watcher in list(watchers):
            if not watcher.put(item):
                # Too slow: dropped here, closed by its connection (which counts it when it
                # leaves); nobody waits for it.
                watcher.mark_slow()
                for k in list(watcher.keys):
                    self._remove(watcher, k)

    def _publish(self, env: Envelope[Publish]) -> None:
        for event in env.msg.events:
            pid = event.pid.raw
            buffer = self._replay.get(pid)
            if buffer is None:
                self._replay[pid] = (_record(event),)
                while len(self._replay) > REPLAY_TICKETS:
                    self._replay.popitem(last=False)
            else:
                self._replay[pid] = (*buffer, _record(event))[-REPLAY_PER_TICKET:]
                self._replay.move_to_end(pid)
            self._deliver(pid, event)
            if event.token is not None:
                self._deliver(event.token.raw, event)

    def _announce(self, env: Envelope[PaymentSeen | Confirmations]) -> None:
        note = env.msg
        pid = note.pid.raw
        pending = self._pending.get(pid)
        if note.confirmations >= note.required:  # credited next: no longer pending
            if pending is not None:
                self._forget(pid, note.txid)
        elif isinstance(note, PaymentSeen):
            if pending is None:
                pending = self._pending[pid] = {}
                while len(self._pending) > PENDING_TICKETS:
                    self._pending.popitem(last=False)
            if note.txid in pending or len(pending) < PENDING_PER_TICKET:
                pending[note.txid] = PendingPayment(note.amount, note.height is None,
                                                    note.confirmations, note.required)
            self._pending.move_to_end(pid)
        elif pending is not None and (known := pending.get(note.txid)) is not None:
            pending[note.txid] = known._replace(in_pool=False,
                                                confirmations=note.confirmations)
        self._deliver(pid, note)
        self._replicate(note)

    def _gone(self, env: Envelope[SightingGone]) -> None:
        self._forget(env.msg.pid.raw, env.msg.txid)
        self._replicate(env.msg)

    def _replicate(self, note: PaymentSeen | Confirmations | SightingGone) -> None:
        if self.replicas is not None:
            try:
                self.replicas.tell(note)
            except AnonTicketError:
                pass  # announcements are best effort

    def _forget(self, pid: bytes, txid: str) -> None:
        pending = self._pending.get(pid)
        if pending is not None:
            pending.pop(txid, None)
            if not pending:
                del self._pending[pid]

    def _replay_events(self, env: Envelope[Replay]) -> None:
        msg = env.msg
        if msg.since >= msg.upto:
            env.reply(())
            return
        buffer = self._replay.get(msg.pid)
        wanted = [r for r in buffer or () if msg.since < r[2] <= msg.upto]
        if len(wanted) != msg.upto - msg.since:
            env.reply(None)  # not all of them are still here: a gap
            return
        env.reply(tuple(_event(msg.pid, r) for r in wanted))

    def _stats(self, env: Envelope[HubStats]) -> None:
        env.reply({
            "subscriptions": sum(len(w) for w in self._subs.values()),
            "keys": len(self._subs),
            "replay_tickets": len(self._replay),
            "pending_tickets": len(self._pending),
            "slow_watchers_dropped": self._slow,
            "refused_per_key": self._refused,
        })
