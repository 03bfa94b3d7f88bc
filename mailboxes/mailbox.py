"""Mailboxes: the only way actors talk (trio memory channels).

A mailbox is owned by the supervisor, so it outlives any one run of its actor: requests sent
while the actor restarts wait for the next run (and their own deadline). A request carries its
own one-shot reply slot and a deadline (I11); a requester that gives up (deadline or
cancellation) abandons its slot, and the actor's reply to it is dropped quietly.

A mailbox is typed by what it takes (`Mailbox[M]`, M a union of message classes), and `ask`
by what the request answers: a request states its reply type, a notice that it gets none
(`Asks`, `Tells`: read structurally, so application messages need import nothing from here;
anon_ticket/domain/messages.py's `Request[R]` and `Notice` state them).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

import outcome
import trio
from trio.lowlevel import (
    Abort,
    RunVar,
    Task,
    current_task,
    reschedule,
    spawn_system_task,
    wait_task_rescheduled,
)

from mailboxes.errors import Unavailable, raised

M = TypeVar("M")
R = TypeVar("R")
M_co = TypeVar("M_co", covariant=True)
R_co = TypeVar("R_co", covariant=True)

# A reply slot's life: sent (the requester has not parked yet), parked, answered, or given up.
_SENT, _PARKED, _ANSWERED, _GONE = 0, 1, 2, 3


class Asks(Protocol[M_co, R_co]):
    """A request as a mailbox of M sees it: one of M, answered with an R. Typing only: the
    two methods are declared, never called (no state, no cost per request)."""

    def _message(self) -> M_co: ...

    def _reply(self) -> R_co: ...


class Tells(Protocol[M_co]):
    """A notice as a mailbox of M sees it: one of M, answered by nobody."""

    def _message(self) -> M_co: ...

    def _unanswered(self) -> None: ...


class AnyMailbox(Protocol):
    """A mailbox seen from outside, whatever it takes: what the supervisor (which opens and
    closes it with its actor) and the metrics need, and no way to send."""

    name: str
    serving: bool

    @property
    def depth(self) -> int: ...


def _timed_out(mailbox: str) -> Unavailable:
    return raised.unavailable(f"{mailbox} did not answer in time", retry_after=1)


@dataclass(slots=True)
class Failure:
    """An actor's answer that is an error for the requester to raise."""

    error: Exception


class Reply:
    """A one-shot reply slot: the parked requester is woken with the answer.

    The first answer wins; an answer to a requester that gave up (deadline passed, or
    cancelled) is dropped. An answer that comes before the requester has parked (it waited
    for room in a full mailbox, and the actor was quicker) is kept for it. Cheaper than a
    memory channel and a cancel scope per request: each request costs a park and a wake.
    """

    __slots__ = ("deadline", "mailbox", "state", "task", "value")

    def __init__(self, task: Task, deadline: float, mailbox: str) -> None:
        self.task = task
        self.deadline = deadline
        self.mailbox = mailbox
        self.state = _SENT
        self.value: object = None

    def put(self, value: object) -> None:
        if self.state == _PARKED:
            self.state = _ANSWERED
            reschedule(self.task, outcome.Value(value))
        elif self.state == _SENT:
            self.state = _ANSWERED
            self.value = value

    def expire(self) -> None:
        if self.state == _PARKED:
            self.state = _GONE
            reschedule(self.task, outcome.Error(_timed_out(self.mailbox)))

    def abort(self, _raise_cancel: object) -> Abort:
        self.state = _GONE  # cancelled from outside: a late answer is dropped
        return Abort.SUCCEEDED


class _Deadlines:
    """Enforces every waiting request's deadline (I11) from one task per trio run.

    It holds only requests still waiting (a handful to a few hundred), sleeps until the
    earliest deadline among them and wakes whoever is past theirs. In steady state it wakes
    once per timeout period, not once per request.
    """

    def __init__(self) -> None:
        self.waiting: set[Reply] = set()
        self._next = math.inf
        self._wake = trio.Event()

    def add(self, slot: Reply) -> None:
        self.waiting.add(slot)
        if slot.deadline < self._next:
            self._next = slot.deadline
            self._wake.set()

    def discard(self, slot: Reply) -> None:
        self.waiting.discard(slot)

    async def run(self) -> None:
        while True:
            now = trio.current_time()
            earliest = math.inf
            for slot in list(self.waiting):
                if slot.deadline <= now:
                    self.waiting.discard(slot)
                    slot.expire()
                elif slot.deadline < earliest:
                    earliest = slot.deadline
            self._next = earliest
            self._wake = trio.Event()
            with trio.move_on_at(earliest):
                await self._wake.wait()


_DEADLINES: RunVar[_Deadlines] = RunVar("mailbox_deadlines")


def _deadlines() -> _Deadlines:
    try:
        return _DEADLINES.get()
    except LookupError:
        keeper = _Deadlines()
        _DEADLINES.set(keeper)
        spawn_system_task(keeper.run, name="mailbox deadlines")
        return keeper


class ReplyTo(Protocol):
    """Where an answer goes: a parked requester's `Reply`, or a slot of a link that carries
    the answer to a requester in another process (actors/worker.py)."""

    def put(self, value: object) -> None: ...


@dataclass(slots=True)
class Envelope(Generic[M]):
    msg: M
    reply_to: ReplyTo | None
    deadline: float

    def expired(self, now: float) -> bool:
        return now >= self.deadline

    def reply(self, value: object) -> None:
        """Answer once; a requester that already gave up is not an error."""
        if self.reply_to is None:
            return
        self.reply_to.put(value)
        self.reply_to = None

    def fail(self, error: Exception) -> None:
        self.reply(Failure(error))


class Mailbox(Generic[M]):
    """A bounded queue of envelopes plus whether its actor is serving now."""

    def __init__(self, name: str, capacity: int = 4096) -> None:
        self.name = name
        self.capacity = capacity
        send, self.inbox = trio.open_memory_channel[Envelope[M]](capacity)
        # Requests and notices are M by their declared type, not by their class (`Asks`,
        # `Tells`): what goes in is checked at `ask`, `tell` and `forward`.
        self._send: trio.MemorySendChannel[Envelope[Any]] = send
        self.serving = False

    @property
    def depth(self) -> int:
        return self._send.statistics().current_buffer_used

    def _unavailable(self) -> Unavailable:
        return raised.unavailable(f"{self.name} is not available", retry_after=1)

    async def ask(self, req: Asks[M, R], timeout: float) -> R:
        """Send `req` and wait for its answer until `timeout` seconds pass (then Unavailable).

        Fails at once when the actor is not serving (restarting or stopped): a request never
        hangs on a dead actor, and it is never answered from a half-built state.
        """
        if not self.serving:
            raise self._unavailable()
        deadline = trio.current_time() + timeout
        slot = Reply(current_task(), deadline, self.name)
        envelope = Envelope(req, slot, deadline)
        try:
            self._send.send_nowait(envelope)
        except trio.WouldBlock:  # a full mailbox: wait for room, within the same deadline
            try:
                with trio.move_on_at(deadline):
                    await self._send.send(envelope)
            finally:
                if slot.state == _SENT and trio.current_time() >= deadline:
                    slot.state = _GONE  # not sent, or sent too late: any answer is dropped
            if slot.state == _GONE:
                raise _timed_out(self.name) from None
        answer: Any
        if slot.state == _ANSWERED:  # answered while this task waited for room
            answer = slot.value
        else:
            slot.state = _PARKED
            keeper = _deadlines()
            keeper.add(slot)
            try:
                answer = await wait_task_rescheduled(slot.abort)
            finally:
                keeper.discard(slot)
        if isinstance(answer, Failure):
            raise answer.error
        return answer  # type: ignore[no-any-return]  # R, as the request states

    def tell(self, msg: Tells[M]) -> None:
        """Send without waiting for an answer; raises Unavailable when the mailbox is full."""
        try:
            self._send.send_nowait(Envelope(msg, None, math.inf))
        except trio.WouldBlock:
            raise self._unavailable() from None

    async def tell_wait(self, msg: Tells[M]) -> None:
        """Send without an answer, waiting for room: for messages that must not be lost.

        Waits (and yields to the scheduler) only when the mailbox is full: an actor that
        hands on several messages a batch should not pay a scheduler round for each."""
        envelope = Envelope(msg, None, math.inf)
        try:
            self._send.send_nowait(envelope)
        except trio.WouldBlock:
            await self._send.send(envelope)

    async def serve(self, handle: Callable[[Envelope[M]], object], drain: int = 256) -> None:
        """Hand every envelope to `handle` (synchronous: what it returns is ignored), in
        order, until cancelled.

        What is already queued is handled in the same wake-up, up to `drain` envelopes, then
        the actor yields: a receive per message would cost a scheduler round each."""
        inbox = self.inbox
        while True:
            handle(await inbox.receive())
            for _ in range(drain):
                try:
                    envelope = inbox.receive_nowait()
                except trio.WouldBlock:
                    break
                handle(envelope)

    def post(self, req: Asks[M, Any], reply_to: ReplyTo, deadline: float) -> bool:
        """Hand on a request whose answer goes to `reply_to` (nobody waits here): a link
        relaying requests from another process. False, and nothing sent, when the actor is
        not serving or its mailbox is full."""
        if not self.serving:
            return False
        try:
            self._send.send_nowait(Envelope(req, reply_to, deadline))
        except trio.WouldBlock:
            return False
        return True

    def forward(self, msg: Asks[M, Any], envelope: Envelope[Any]) -> None:
        """Pass `msg` on with `envelope`'s reply channel and deadline: the next actor answers."""
        try:
            self._send.send_nowait(Envelope(msg, envelope.reply_to, envelope.deadline))
        except trio.WouldBlock:
            envelope.fail(self._unavailable())
            return
        envelope.reply_to = None
