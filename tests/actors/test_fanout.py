"""The owner's fanout to worker processes (docs/architecture.md §8), driven through its
handlers: who is answered when."""

from __future__ import annotations

from typing import Any

from actors.fanout import Fanout
from anon_ticket.domain.ids import PaymentId, ServiceToken
from anon_ticket.domain.messages import (
    Acked,
    AddPids,
    Attach,
    CacheClaim,
    Committed,
    Detach,
    Invalidate,
    Recorded,
    Settle,
)
from anon_ticket.metrics import Metrics
from mailboxes import Envelope, Mailbox, Outbox
from tests.actors.core import ReplySlot


def handle(handler: Any, msg: object) -> ReplySlot:
    slot = ReplySlot()
    handler(Envelope(msg, slot, float("inf")))
    return slot


def attached(fanout: Fanout, *indexes: int) -> dict[int, Outbox[list[Any]]]:
    queues: dict[int, Outbox[list[Any]]] = {i: Outbox() for i in indexes}
    for i, q in queues.items():
        assert handle(fanout._attach, Attach(i, q)).value is True
    return queues


async def test_new_ids_are_acknowledged_to_the_poller_only_once_every_worker_has_them() -> None:
    fanout = Fanout(Mailbox("fanout"), Metrics())
    queues = attached(fanout, 1, 2)
    pid = PaymentId.generate()
    ack = Recorded(1, (pid,), (), 10)
    slot = handle(fanout._replicate, AddPids((pid,), ack))
    pushed = [q.take_all() for q in queues.values()]
    assert pushed[0] == pushed[1] and pushed[0][0][:3] == ["push", 1, "replicate"]
    assert not slot.done.is_set()
    handle(fanout._acked, Acked(1, 1))
    assert not slot.done.is_set()  # worker 2 has not got it yet
    handle(fanout._acked, Acked(2, 1))
    assert slot.value == ack


async def test_a_revoke_is_answered_once_its_invalidation_reached_every_worker() -> None:
    fanout = Fanout(Mailbox("fanout"), Metrics())
    queues = attached(fanout, 1, 2)
    pid = PaymentId.generate()
    handle(fanout._push, Committed((Invalidate((pid,)),)))
    slot = handle(fanout._barrier, Settle("the revoke's answer"))
    for q in queues.values():  # the invalidation first, then the barrier
        assert [m[2] for m in q.take_all()] == ["committed", "barrier"]
    handle(fanout._acked, Acked(2, 1))
    assert not slot.done.is_set()
    handle(fanout._acked, Acked(1, 1))
    assert slot.value == "the revoke's answer"


async def test_a_worker_that_leaves_or_is_given_up_holds_nobody_up() -> None:
    fanout = Fanout(Mailbox("fanout"), Metrics())
    queues = attached(fanout, 1, 2)
    slot = handle(fanout._barrier, Settle(7))
    handle(fanout._acked, Acked(1, 1))
    handle(fanout._detach, Detach(2, queues[2]))  # its process ended
    assert slot.value == 7
    slow = handle(fanout._barrier, Settle(8))
    fanout._give_up(1, "no acknowledgement in time")  # as its deadline does
    assert slow.value == 8 and queues[1].slow  # its link ends: the process is restarted
    # with no worker attached, nothing waits
    assert handle(fanout._barrier, Settle(9)).value == 9
    assert handle(fanout._push, Committed((CacheClaim(PaymentId.generate(),
                                                      ServiceToken(b"t" * 32), 1),))
                  ).value is None


async def test_a_full_worker_queue_gives_the_worker_up() -> None:
    fanout = Fanout(Mailbox("fanout"), Metrics())
    full: Outbox[list[Any]] = Outbox(capacity=1)
    handle(fanout._attach, Attach(1, full))
    handle(fanout._push, Committed(()))
    assert not full.slow
    handle(fanout._push, Committed(()))
    assert full.slow and 1 not in fanout._workers
