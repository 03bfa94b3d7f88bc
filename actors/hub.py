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
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Any

import trio
from trio.lowlevel import Abort, Task, current_task, reschedule, wait_task_rescheduled

from anon_ticket.domain.ids import PaymentId, ServiceToken
from anon_ticket.domain.messages import (
    Confirmations,
    EventKind,
    PaymentSeen,
    Publish,
    TicketEvent,
)
from anon_ticket.domain.watch import (
    MAX_WATCHERS_PER_KEY,
    Key,
    encode,
    event_message,
    note_message,
)
from anon_ticket.errors import InvalidInput
from anon_ticket.logs import get_logger
from anon_ticket.metrics import Metrics
from supervisors.mailbox import Envelope, Mailbox

log = get_logger("hub")

REPLAY_PER_TICKET = 64
REPLAY_TICKETS = 50_000
QUEUE = 2048  # a memory bound; a stopped reader is caught by the send timeout first

# A replayable event: (kind, token or None, seq, epoch, fields); the ticket's pid is its key.
Record = tuple[str, bytes | None, int, int, tuple[tuple[str, object], ...]]


def _record(event: TicketEvent) -> Record:
    token = event.token.raw if event.token is not None else None
    return (event.kind.value, token, event.seq, event.epoch, event.fields)


def _event(pid: bytes, r: Record) -> TicketEvent:
    return TicketEvent(EventKind(r[0]), PaymentId(pid), ServiceToken(r[1]) if r[1] else None,
                       r[2], r[3], r[4])


class Watcher:
    """One websocket connection's outbound queue: the hub only ever `put`s into it (never
    waits); the connection's writer `get`s.

    Cheaper than a memory channel (three objects, two ordered dicts and a deque each, for
    every idle connection): an idle watcher holds no queue at all, and the one writer parks
    on it directly. `scope` is the connection's: cancelling it (slow, or draining) ends the
    connection without a task per connection waiting for that.
    """

    __slots__ = ("_items", "_waiter", "capacity", "keys", "scope", "slow")

    def __init__(self, capacity: int = QUEUE) -> None:
        self._items: deque[tuple[Any, ...]] | None = None
        self._waiter: Task | None = None
        self.capacity = capacity
        self.keys: set[bytes] = set()
        self.scope = trio.CancelScope()
        self.slow = False

    def put(self, item: tuple[Any, ...]) -> bool:
        """Queue `item` for the writer; False (nothing queued) when the queue is full."""
        items = self._items
        if items is None:
            items = self._items = deque()
        elif len(items) >= self.capacity:
            return False
        items.append(item)
        if self._waiter is not None:
            task, self._waiter = self._waiter, None
            reschedule(task)
        return True

    async def get(self) -> tuple[Any, ...]:
        """The next item, waiting for one (one reader only)."""
        if not self._items:
            self._waiter = current_task()

            def abort(_: object) -> Abort:
                self._waiter = None
                return Abort.SUCCEEDED

            await wait_task_rescheduled(abort)
        items = self._items
        assert items
        item = items.popleft()
        if not items:
            self._items = None  # idle again: no queue held
        return item

    def mark_slow(self) -> None:
        """Too slow to keep: its connection closes it (SLOW_CONSUMER), nobody waits for it."""
        self.slow = True
        self.scope.cancel()


@dataclass(frozen=True, slots=True)
class Subscribe:
    watcher: Watcher
    key: bytes  # 8-byte payment id or 32-byte token


@dataclass(frozen=True, slots=True)
class Unsubscribe:
    watcher: Watcher
    key: bytes


@dataclass(frozen=True, slots=True)
class Drop:
    watcher: Watcher


@dataclass(frozen=True, slots=True)
class Replay:
    """Events of a ticket with since < seq <= upto, or None when the buffer no longer has
    them all (the watcher then gets `gap` + `state`)."""

    pid: bytes
    since: int
    upto: int


@dataclass(frozen=True, slots=True)
class HubStats:
    pass


class Hub:
    name = "hub"

    def __init__(self, mailbox: Mailbox[Any], metrics: Metrics,
                 per_key: int = MAX_WATCHERS_PER_KEY) -> None:
        self.mailbox = mailbox
        self.metrics = metrics
        self.per_key = per_key
        self._subs: dict[bytes, set[Watcher]] = {}
        self._replay: OrderedDict[bytes, tuple[Record, ...]] = OrderedDict()
        self._slow = 0
        self._refused = 0

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        handlers = {
            Publish: self._publish,
            PaymentSeen: self._announce,
            Confirmations: self._announce,
            Subscribe: self._subscribe,
            Unsubscribe: self._unsubscribe,
            Drop: self._drop,
            Replay: self._replay_events,
            HubStats: self._stats,
        }
        def handle(env: Envelope[Any]) -> None:
            handler = handlers.get(type(env.msg))
            if handler is not None:  # other poller notes are not for watchers
                handler(env)

        await self.mailbox.serve(handle)

    # --- subscriptions ----------------------------------------------------------------------

    def _subscribe(self, env: Envelope[Any]) -> None:
        """Refused (InvalidInput, for the watcher to read) when the key has `per_key`
        watchers already."""
        msg: Subscribe = env.msg
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
        env.reply(True)

    def _remove(self, watcher: Watcher, key: bytes) -> None:
        watchers = self._subs.get(key)
        if watchers is not None:
            watchers.discard(watcher)
            if not watchers:
                del self._subs[key]
        watcher.keys.discard(key)

    def _unsubscribe(self, env: Envelope[Any]) -> None:
        self._remove(env.msg.watcher, env.msg.key)
        env.reply(True)

    def _drop(self, env: Envelope[Any]) -> None:
        watcher: Watcher = env.msg.watcher
        if watcher.slow:  # counted here, whoever found it slow (the hub or its connection)
            self._slow += 1
            self.metrics.alerts.labels("slow_watcher").inc()
        for key in list(watcher.keys):
            self._remove(watcher, key)

    # --- delivery ---------------------------------------------------------------------------

    def _deliver(self, key: bytes, fact: TicketEvent | PaymentSeen | Confirmations) -> None:
        """Put ("event", key, seq or None, text) to every watcher of `key`: one encoding for
        all of them (the message names the key, so it is the same for each)."""
        watchers = self._subs.get(key)
        if not watchers:
            return
        item: tuple[str, bytes, int | None, str]
        if isinstance(fact, TicketEvent):
            item = ("event", key, fact.seq, encode(event_message(Key.of_raw(key), fact)))
        else:  # an announcement: no seq
            item = ("event", key, None, encode(note_message(Key.of_raw(key), fact)))
        for watcher in list(watchers):
            if not watcher.put(item):
                # Too slow: dropped here, closed by its connection (which counts it when it
                # leaves); nobody waits for it.
                watcher.mark_slow()
                for k in list(watcher.keys):
                    self._remove(watcher, k)

    def _publish(self, env: Envelope[Any]) -> None:
        event: TicketEvent
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

    def _announce(self, env: Envelope[Any]) -> None:
        note = env.msg
        self._deliver(note.pid.raw, note)

    def _replay_events(self, env: Envelope[Any]) -> None:
        msg: Replay = env.msg
        if msg.since >= msg.upto:
            env.reply(())
            return
        buffer = self._replay.get(msg.pid)
        wanted = [r for r in buffer or () if msg.since < r[2] <= msg.upto]
        if len(wanted) != msg.upto - msg.since:
            env.reply(None)  # not all of them are still here: a gap
            return
        env.reply(tuple(_event(msg.pid, r) for r in wanted))

    def _stats(self, env: Envelope[Any]) -> None:
        env.reply({
            "subscriptions": sum(len(w) for w in self._subs.values()),
            "keys": len(self._subs),
            "replay_tickets": len(self._replay),
            "slow_watchers_dropped": self._slow,
            "refused_per_key": self._refused,
        })
