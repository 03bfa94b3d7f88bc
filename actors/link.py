"""A worker process's link to its owner (docs/architecture.md §8).

In a worker, the public listener, the filter replica and the hub talk to mailboxes as they do
in one process. Two of those mailboxes, `storage` and `poller`, are served here: each request
is sent to the owner over the link's unix socket, and its answer, when it comes back, goes
to the requester's reply slot (the requester waits within its own deadline, as always). The
other way, the owner pushes what its filter and hub hear: new payment ids (`replicate`,
acknowledged once they are in this filter's queue, ahead of any later redeem), committed
effects, and the poller's announcements.

Everything queued for the owner goes out in one frame per wake-up. Silence both ways is
noticed: a heartbeat every second, and a link that hears nothing for `silence` seconds ends,
which ends this process (the owner starts a new one).
"""

from __future__ import annotations

import itertools
import os
import socket
from typing import Any

import apsw
import trio
from prometheus_client import generate_latest

from anon_ticket.domain.commands import Drain
from anon_ticket.domain.ids import PaymentId
from anon_ticket.domain.inboxes import FilterMsg, HubMsg, PollerMsg, PublicMsg, StorageMsg
from anon_ticket.domain.messages import Claim, FeedSynced, LookupToken, Replicated
from anon_ticket.errors import AnonTicketError, NotFound
from anon_ticket.logs import get_logger
from anon_ticket.metrics import Metrics
from anon_ticket.reads import NOT_FOUND, Reader
from anon_ticket.wire import (
    FrameReader,
    WireError,
    decode_committed,
    decode_events,
    decode_failure,
    decode_note,
    decode_reply,
    encode_ask,
    encode_failure,
    frame,
)
from mailboxes import Envelope, Mailbox

log = get_logger("link")

ATTACH_TIMEOUT = 30.0


class LinkLost(AnonTicketError):
    """The owner closed the link, or fell silent: this worker ends."""


class Link:
    name = "link"

    def __init__(self, index: int, sock: socket.socket, *, storage: Mailbox[StorageMsg],
                 poller: Mailbox[PollerMsg], filter_: Mailbox[FilterMsg],
                 hub: Mailbox[HubMsg], public: Mailbox[PublicMsg], metrics: Metrics,
                 reader: Reader | None = None, heartbeat: float = 1.0,
                 silence: float = 5.0) -> None:
        self.public = public
        self.reader = reader  # reads of its own (anon_ticket/reads.py), or all asked
        self.index = index
        self.metrics = metrics
        self.sock = sock
        self.storage = storage
        self.poller = poller
        self.filter = filter_
        self.hub = hub
        self.heartbeat = heartbeat
        self.silence = silence
        self._out: list[list[Any]] = []
        self._wake = trio.Event()
        self._pending: dict[int, Envelope[Any]] = {}
        self._ids = itertools.count(1)
        self._heard = 0.0
        self._attached = trio.Event()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        stream = trio.SocketStream(trio.socket.from_stdlib_socket(self.sock))
        async with stream, trio.open_nursery() as nursery:
            self._nursery = nursery
            self._heard = trio.current_time()
            self._send(["hello", self.index, os.getpid()])
            nursery.start_soon(self._writer, stream)
            nursery.start_soon(self._reader, stream)
            with trio.fail_after(ATTACH_TIMEOUT):
                await self._attached.wait()
            # From here on every new payment id reaches this process: the filter may prewarm.
            for mailbox in (self.storage, self.poller):
                nursery.start_soon(mailbox.serve, self._relay)
                mailbox.serving = True
            nursery.start_soon(self._beat)
            log.info("link attached", worker=self.index)
            task_status.started()

    def _send(self, item: list[Any]) -> None:
        self._out.append(item)
        self._wake.set()

    def _relay(self, env: Envelope[Any]) -> None:
        """A local request for the owner's storage or poller: sent, answered when the owner
        answers (or never, if the requester's deadline passes first). With a reader, a
        claimed ticket's `already_claimed` and a token's introspection are read here."""
        if env.reply_to is None:
            return  # nobody waits for it
        msg = env.msg
        reader = self.reader
        if reader is not None:
            kind = type(msg)
            try:
                if kind is Claim:
                    answer = reader.claimed(msg.pid)
                    if answer is not None:
                        env.reply(answer)
                        return
                elif kind is LookupToken:
                    info = reader.token_info(msg.token)
                    if info is None:
                        env.fail(NotFound(NOT_FOUND))
                    else:
                        env.reply(info)
                    return
            except apsw.Error:
                pass  # busy past its timeout, or an I/O error: the owner answers instead
        what, arg = encode_ask(msg)
        rid = next(self._ids)
        self._pending[rid] = env
        self._send(["ask", rid, what, arg])

    async def _writer(self, stream: trio.SocketStream) -> None:
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            items, self._out = self._out, []
            if items:
                with trio.move_on_after(self.silence) as timer:
                    await stream.send_all(frame(items))
                if timer.cancelled_caught:
                    raise LinkLost("the owner stopped reading")

    async def _reader(self, stream: trio.SocketStream) -> None:
        reader = FrameReader()
        while True:
            data = await stream.receive_some(1 << 16)
            if not data:
                raise LinkLost("the owner closed the link")
            self._heard = trio.current_time()
            for msg in reader.feed(data):
                await self._handle(msg)

    async def _handle(self, msg: list[Any]) -> None:
        kind = msg[0]
        if kind == "reply":
            env = self._pending.pop(msg[1], None)
            if env is not None:
                env.reply(decode_reply(msg[2], msg[3]))
        elif kind == "fail":
            env = self._pending.pop(msg[1], None)
            if env is not None:
                env.fail(decode_failure(msg[2], msg[3], msg[4]))
        elif kind == "ask":  # the owner asks this worker: its metrics, or a drain
            if msg[2] == "metrics":
                self._send(["reply", msg[1], "text",
                            generate_latest(self.metrics.registry).decode()])
            elif msg[2] == "drain":
                self._nursery.start_soon(self._drain, msg[1], str(msg[3]))
            else:
                raise WireError(f"unknown request {msg[2]!r}")
        elif kind == "push":
            await self._push(msg[1], msg[2], msg[3])
        elif kind == "attached":
            self._attached.set()
        elif kind != "beat":
            raise WireError(f"unknown message {kind!r}")

    async def _drain(self, rid: int, reason: str) -> None:
        try:
            figures = await self.public.ask(Drain(reason), 5.0)
        except AnonTicketError as exc:
            self._send(["fail", rid, *encode_failure(exc)])
            return
        self._send(["reply", rid, "figures", figures])

    async def _push(self, push_id: int | None, what: str, value: Any) -> None:
        if what == "replicate":
            pids, events = value
            # Queued ahead of any redeem that comes after the owner hears this ack (I8).
            await self.filter.tell_wait(Replicated(tuple(PaymentId(p) for p in pids),
                                                   decode_events(events)))
            self._send(["ack", push_id])
        elif what == "barrier":  # what came before it is queued: say so
            self._send(["ack", push_id])
        elif what == "committed":
            await self.filter.tell_wait(decode_committed(value))
        elif what == "synced":  # the owner read the cluster feed (§9)
            try:
                self.filter.tell(FeedSynced(float(value)))
            except AnonTicketError:
                pass  # (the replica distrusts itself a little sooner)
        elif what in ("seen", "confirmations", "gone"):
            try:
                self.hub.tell(decode_note(what, value))
            except AnonTicketError:
                pass  # announcements are best effort
        else:
            raise WireError(f"unknown push {what!r}")

    async def _beat(self) -> None:
        while True:
            await trio.sleep(self.heartbeat)
            now = trio.current_time()
            if now - self._heard > self.silence:
                raise LinkLost(f"nothing from the owner for {self.silence:g} s")
            self._send(["beat"])
            # Requests whose requester gave up: their answers, if any come, are dropped.
            for rid, env in list(self._pending.items()):
                if env.deadline < now:
                    del self._pending[rid]
