"""The hub's replay buffer, driven through its handlers (no loop needed: they are synchronous)."""

from __future__ import annotations

import gc
from typing import Any

from actors.hub import PENDING_PER_TICKET, REPLAY_PER_TICKET, Hub
from anon_ticket.domain.ids import PaymentId, ServiceToken
from anon_ticket.domain.messages import (
    Confirmations,
    EventKind,
    PaymentSeen,
    Publish,
    SightingGone,
    TicketEvent,
)
from anon_ticket.domain.watch import Drop, PendingPayment, Replay, Subscribe, WatchEvent
from anon_ticket.metrics import Metrics
from mailboxes import Outbox
from supervisors.mailbox import Envelope, Failure, Mailbox
from tests.actors.core import ReplySlot


def ask(handler: Any, msg: object) -> Any:
    slot = ReplySlot()
    handler(Envelope(msg, slot, float("inf")))  # type: ignore[arg-type]
    return slot.value


def events(pid: PaymentId, token: ServiceToken, seqs: range) -> tuple[TicketEvent, ...]:
    return tuple(TicketEvent(EventKind.TOPPED_UP if s > 1 else EventKind.CLAIMED, pid,
                             token, s, 77, (("amount", s * 10), ("balance", s * 100)))
                 for s in seqs)


def test_replay_returns_the_events_published_and_says_gap_past_its_window() -> None:
    hub = Hub(Mailbox("hub"), Metrics())
    pid, token = PaymentId.generate(), ServiceToken(b"t" * 32)
    published = events(pid, token, range(1, 101))
    hub._publish(Envelope(Publish(published), None, float("inf")))
    kept = published[-REPLAY_PER_TICKET:]
    since = kept[0].seq - 1
    assert ask(hub._replay_events, Replay(pid.raw, since, 100)) == kept
    assert ask(hub._replay_events, Replay(pid.raw, 90, 95)) == published[90:95]
    assert ask(hub._replay_events, Replay(pid.raw, since - 1, 100)) is None  # a gap
    other = PaymentId.generate()
    hub._publish(Envelope(Publish((TicketEvent(EventKind.PAYMENT_CONFIRMED, other, None, 1, 77,
                                               (("amount", 5),)),)), None, float("inf")))
    assert ask(hub._replay_events, Replay(other.raw, 0, 1))[0].token is None


def test_the_replay_buffer_holds_nothing_the_cyclic_gc_must_walk() -> None:
    # 50,000 tickets of event objects in the buffer made every full collection walk them.
    hub = Hub(Mailbox("hub"), Metrics())
    for _ in range(200):
        pid = PaymentId.generate()
        hub._publish(Envelope(Publish(events(pid, ServiceToken(pid.raw * 4), range(1, 4))),
                              None, float("inf")))
    for _ in range(4):  # a collection untracks one level of nested tuples
        gc.collect()
    assert not any(gc.is_tracked(buffer) for buffer in hub._replay.values())


def test_a_key_takes_at_most_per_key_watchers_and_a_leaver_makes_room() -> None:
    hub = Hub(Mailbox("hub"), Metrics(), per_key=2)
    token = ServiceToken(b"t" * 32)
    first, second, third = Outbox(), Outbox(), Outbox()
    assert ask(hub._subscribe, Subscribe(first, token.raw)) == ()
    assert ask(hub._subscribe, Subscribe(second, token.raw)) == ()
    refused = ask(hub._subscribe, Subscribe(third, token.raw))
    assert isinstance(refused, Failure)
    assert str(refused.error) == "too many watchers of this token: at most 2 at once"
    assert ask(hub._subscribe, Subscribe(first, token.raw)) == ()  # already one of them
    hub._drop(Envelope(Drop(second), None, float("inf")))
    assert ask(hub._subscribe, Subscribe(third, token.raw)) == ()
    assert third.keys == {token.raw} and not second.keys


def tell(handler: Any, msg: object) -> None:
    handler(Envelope(msg, None, float("inf")))  # type: ignore[arg-type]


def test_a_late_watcher_is_told_what_was_announced_and_not_yet_credited() -> None:
    hub = Hub(Mailbox("hub"), Metrics())
    pid, other = PaymentId.generate(), PaymentId.generate()
    tx, tx2 = "aa" * 32, "bb" * 32
    tell(hub._announce, PaymentSeen(pid, tx, 500, None, 0, 10))  # in the pool
    assert ask(hub._subscribe, Subscribe(Outbox(), pid.raw)) == (
        PendingPayment(500, True, 0, 10),)
    tell(hub._announce, Confirmations(pid, tx, 3, 10))  # mined, 3 of 10
    tell(hub._announce, PaymentSeen(pid, tx2, 7, 95, 6, 10))  # first seen already 6 deep
    assert ask(hub._subscribe, Subscribe(Outbox(), pid.raw)) == (
        PendingPayment(500, False, 3, 10), PendingPayment(7, False, 6, 10))
    assert ask(hub._subscribe, Subscribe(Outbox(), other.raw)) == ()
    assert ask(hub._subscribe, Subscribe(Outbox(), pid.raw * 4)) == ()  # a token: never
    tell(hub._announce, Confirmations(pid, tx, 10, 10))  # deep: credited next
    tell(hub._gone, SightingGone(pid, tx2))  # left the pool and the window
    assert ask(hub._subscribe, Subscribe(Outbox(), pid.raw)) == ()
    assert not hub._pending
    # first seen at N or deeper (a catch-up): never pending
    tell(hub._announce, PaymentSeen(other, tx, 5, 80, 20, 10))
    assert not hub._pending


def test_announcements_reach_watchers_and_pending_is_bounded() -> None:
    hub = Hub(Mailbox("hub"), Metrics())
    pid = PaymentId.generate()
    watcher: Outbox[Any] = Outbox()
    ask(hub._subscribe, Subscribe(watcher, pid.raw))
    for i in range(PENDING_PER_TICKET + 5):
        tell(hub._announce, PaymentSeen(pid, f"{i:064x}", i, None, 0, 10))
    assert len(ask(hub._subscribe, Subscribe(Outbox(), pid.raw))) == PENDING_PER_TICKET
    assert watcher._items is not None and len(watcher._items) == PENDING_PER_TICKET + 5
    first = watcher._items[0]
    assert isinstance(first, WatchEvent) and first.seq is None and '"in_pool":true' in first.text
