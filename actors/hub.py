"""The hub: fans committed events and chain announcements out to websocket watchers.

Storage numbers each committed fact per ticket (`seq`, in commit order) and publishes it after
COMMIT through the filter, so the hub sees a ticket's events in order. The hub keeps a small
replay buffer per ticket for watchers that reconnect with `since` (kept as tuples of plain
values, which CPython's cyclic GC stops tracking: 50,000 tickets of event objects made every
full collection walk them), and pushes into each watcher's bounded queue with `send_nowait`
only: a watcher that does not keep up is marked slow and dropped (its connection closes it),
and never holds up the hub, the poller or the claim path.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import trio

from anon_ticket.domain.ids import PaymentId, ServiceToken
from anon_ticket.domain.messages import (
    Confirmations,
    EventKind,
    PaymentSeen,
    Publish,
    TicketEvent,
)
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


@dataclass(eq=False)
class Watcher:
    """One websocket connection's outbound queue; the hub only ever `send_nowait`s into it."""

    send: trio.MemorySendChannel[tuple[Any, ...]]
    receive: trio.MemoryReceiveChannel[tuple[Any, ...]]
    slow: trio.Event = field(default_factory=trio.Event)
    keys: set[bytes] = field(default_factory=set)

    @classmethod
    def create(cls, capacity: int = QUEUE) -> Watcher:
        send, receive = trio.open_memory_channel[tuple[Any, ...]](capacity)
        return cls(send, receive)


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

    def __init__(self, mailbox: Mailbox[Any], metrics: Metrics) -> None:
        self.mailbox = mailbox
        self.metrics = metrics
        self._subs: dict[bytes, set[Watcher]] = {}
        self._replay: OrderedDict[bytes, tuple[Record, ...]] = OrderedDict()
        self._slow = 0

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
        msg: Subscribe = env.msg
        self._subs.setdefault(msg.key, set()).add(msg.watcher)
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
        for key in list(watcher.keys):
            self._remove(watcher, key)

    # --- delivery ---------------------------------------------------------------------------

    def _deliver(self, key: bytes, item: tuple[Any, ...]) -> None:
        watchers = self._subs.get(key)
        if not watchers:
            return
        for watcher in list(watchers):
            try:
                watcher.send.send_nowait(item)
            except trio.WouldBlock:
                # Too slow: dropped here, closed by its connection; nobody waits for it.
                self._slow += 1
                self.metrics.alerts.labels("slow_watcher").inc()
                watcher.slow.set()
                for k in list(watcher.keys):
                    self._remove(watcher, k)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
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
            self._deliver(pid, ("event", pid, event))
            if event.token is not None:
                self._deliver(event.token.raw, ("event", event.token.raw, event))

    def _announce(self, env: Envelope[Any]) -> None:
        note = env.msg
        self._deliver(note.pid.raw, ("note", note.pid.raw, note))

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
        })
