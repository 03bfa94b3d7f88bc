"""The owner's fanout to its worker processes (docs/architecture.md §8).

Every attached worker's link gets, in order, what the owner's filter and hub hear: new payment
ids with their events (`replicate`), committed effects (cache fills, invalidations, events)
and the poller's announcements. Each message is encoded once for all workers.

No false Bloom negative across processes (I8): the poller's answer for a transaction that
recorded new ids waits here until every worker attached at the time has acknowledged the ids
(they are in its filter's queue, ahead of any later redeem). A worker that does not
acknowledge within `ack_timeout`, or whose queue is full, is given up: its link ends and its
process is restarted (it prewarms from the database, so it misses nothing).
"""

from __future__ import annotations

import itertools
from typing import Any

import trio

from anon_ticket.domain.inboxes import FanoutMsg
from anon_ticket.domain.messages import (
    Acked,
    AddPids,
    Attach,
    Committed,
    Confirmations,
    Detach,
    FeedSynced,
    PaymentSeen,
    Settle,
    SightingGone,
    WorkerQueue,
)
from anon_ticket.logs import get_logger
from anon_ticket.metrics import Metrics
from anon_ticket.wire import encode_events, encode_push
from mailboxes import Dispatch, Envelope, Mailbox

log = get_logger("fanout")


class Fanout:
    name = "fanout"

    def __init__(self, mailbox: Mailbox[FanoutMsg], metrics: Metrics,
                 ack_timeout: float = 2.5) -> None:
        self.mailbox = mailbox
        self.metrics = metrics
        self.ack_timeout = ack_timeout
        self._workers: dict[int, WorkerQueue] = {}
        # push id -> (whom to answer, the answer, workers yet to acknowledge, deadline)
        self._waiting: dict[int, tuple[Envelope[Any], object, set[int], float]] = {}
        self._ids = itertools.count(1)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._expire)
            task_status.started()
            await self.mailbox.serve(Dispatch(self.name, {
                AddPids: self._replicate,
                Settle: self._barrier,
                Committed: self._push,
                PaymentSeen: self._push,
                Confirmations: self._push,
                SightingGone: self._push,
                FeedSynced: self._push,
                Attach: self._attach,
                Detach: self._detach,
                Acked: self._acked,
            }))

    # --- workers ----------------------------------------------------------------------------

    def _attach(self, env: Envelope[Attach]) -> None:
        old = self._workers.get(env.msg.index)
        if old is not None and old is not env.msg.queue:
            self._give_up(env.msg.index, "replaced")
        self._workers[env.msg.index] = env.msg.queue
        env.reply(True)

    def _detach(self, env: Envelope[Detach]) -> None:
        if self._workers.get(env.msg.index) is env.msg.queue:
            del self._workers[env.msg.index]
            self._settle(env.msg.index)

    def _give_up(self, index: int, reason: str) -> None:
        queue = self._workers.pop(index, None)
        if queue is not None:
            log.warning("worker given up", worker=index, reason=reason)
            self.metrics.alerts.labels("worker_given_up").inc()
            queue.mark_slow()
        self._settle(index)

    def _settle(self, index: int) -> None:
        """`index` is gone: nothing waits for its acknowledgements any more."""
        for push_id, (env, answer, left, _) in list(self._waiting.items()):
            left.discard(index)
            if not left:
                del self._waiting[push_id]
                env.reply(answer)

    def _send(self, item: list[Any]) -> set[int]:
        sent = set()
        for index, queue in list(self._workers.items()):
            if queue.put(item):
                sent.add(index)
            else:
                self._give_up(index, "its queue is full")
        return sent

    # --- what the owner hears ---------------------------------------------------------------

    def _acknowledged(self, env: Envelope[Any], answer: object, what: str,
                      value: object) -> None:
        """Push to every worker; answer `env` once each has acknowledged (or is gone)."""
        push_id = next(self._ids)
        sent = self._send(["push", push_id, what, value])
        if sent:
            self._waiting[push_id] = (env, answer, sent, trio.current_time() + self.ack_timeout)
        else:
            env.reply(answer)

    def _replicate(self, env: Envelope[AddPids]) -> None:
        msg = env.msg
        self._acknowledged(env, msg.ack, "replicate",
                           [[p.raw for p in msg.pids], encode_events(msg.events)])

    def _barrier(self, env: Envelope[Settle]) -> None:
        """The invalidations pushed before this are queued in every worker's filter once it
        acknowledges this: then the revoke's (or top-up's) requester hears back."""
        self._acknowledged(env, env.msg.answer, "barrier", None)

    def _acked(self, env: Envelope[Acked]) -> None:
        entry = self._waiting.get(env.msg.push_id)
        if entry is not None:
            entry[2].discard(env.msg.index)
            if not entry[2]:
                del self._waiting[env.msg.push_id]
                entry[0].reply(entry[1])

    def _push(self, env: Envelope[Committed | PaymentSeen | Confirmations | SightingGone
                                  | FeedSynced]) -> None:
        if self._workers:
            what, value = encode_push(env.msg)
            self._send(["push", None, what, value])

    async def _expire(self) -> None:
        while True:
            await trio.sleep(self.ack_timeout / 4)
            now = trio.current_time()
            late = {i for _, _, left, deadline in self._waiting.values() if deadline < now
                    for i in left}
            for index in late:
                self._give_up(index, "no acknowledgement in time")
