"""Mailboxes: the only way actors talk (trio memory channels).

A mailbox is owned by the supervisor, so it outlives any one run of its actor: requests sent
while the actor restarts wait for the next run (and their own deadline). A request carries its
own reply channel and a deadline (I11); a requester that gives up closes its reply channel, and
the actor's reply to it is dropped quietly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import trio

from anon_ticket.errors import AnonTicketError, Unavailable

M = TypeVar("M")


@dataclass(slots=True)
class Failure:
    """An actor's answer that is an error for the requester to raise."""

    error: AnonTicketError


class Reply:
    """A one-shot reply channel: cheaper than a memory channel per request (the redeem path
    makes one or two requests), with the same rule: the first answer wins, and an answer to
    a requester that gave up is dropped."""

    __slots__ = ("abandoned", "done", "value")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.value: object = None
        self.abandoned = False

    def put(self, value: object) -> None:
        if self.abandoned or self.done.is_set():
            return
        self.value = value
        self.done.set()


@dataclass(slots=True)
class Envelope(Generic[M]):
    msg: M
    reply_to: Reply | None
    deadline: float

    def expired(self, now: float) -> bool:
        return now >= self.deadline

    def reply(self, value: object) -> None:
        """Answer once; a requester that already gave up is not an error."""
        if self.reply_to is None:
            return
        self.reply_to.put(value)
        self.reply_to = None

    def fail(self, error: AnonTicketError) -> None:
        self.reply(Failure(error))


class Mailbox(Generic[M]):
    """A bounded queue of envelopes plus whether its actor is serving now."""

    def __init__(self, name: str, capacity: int = 4096) -> None:
        self.name = name
        self.capacity = capacity
        self._send, self.inbox = trio.open_memory_channel[Envelope[M]](capacity)
        self.serving = False

    @property
    def depth(self) -> int:
        return self._send.statistics().current_buffer_used

    def _unavailable(self) -> Unavailable:
        return Unavailable(f"{self.name} is not available", retry_after=1)

    async def ask(self, msg: M, timeout: float) -> Any:
        """Send `msg` and wait for the answer until `timeout` seconds pass (then Unavailable).

        Fails at once when the actor is not serving (restarting or stopped): a request never
        hangs on a dead actor, and it is never answered from a half-built state.
        """
        if not self.serving:
            raise self._unavailable()
        deadline = trio.current_time() + timeout
        slot = Reply()
        with trio.move_on_at(deadline):
            try:
                self._send.send_nowait(Envelope(msg, slot, deadline))
            except trio.WouldBlock:
                await self._send.send(Envelope(msg, slot, deadline))
            await slot.done.wait()
        if not slot.done.is_set():
            slot.abandoned = True  # a late answer is dropped
            raise Unavailable(f"{self.name} did not answer in time", retry_after=1)
        answer = slot.value
        if isinstance(answer, Failure):
            raise answer.error
        return answer

    def tell(self, msg: M) -> None:
        """Send without waiting for an answer; raises Unavailable when the mailbox is full."""
        try:
            self._send.send_nowait(Envelope(msg, None, math.inf))
        except trio.WouldBlock:
            raise self._unavailable() from None

    async def tell_wait(self, msg: M) -> None:
        """Send without an answer, waiting for room: for messages that must not be lost."""
        await self._send.send(Envelope(msg, None, math.inf))

    def forward(self, msg: M, envelope: Envelope[Any]) -> None:
        """Pass `msg` on with `envelope`'s reply channel and deadline: the next actor answers."""
        try:
            self._send.send_nowait(Envelope(msg, envelope.reply_to, envelope.deadline))
        except trio.WouldBlock:
            envelope.fail(self._unavailable())
            return
        envelope.reply_to = None
