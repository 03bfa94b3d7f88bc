"""Mailbox requests: answers, deadlines (I11) and requesters that give up."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from anon_ticket.errors import NotFound, Unavailable
from supervisors.mailbox import Envelope, Failure, Mailbox, _deadlines


def serving(name: str, capacity: int = 16) -> Mailbox[str]:
    mb: Mailbox[str] = Mailbox(name, capacity)
    mb.serving = True
    return mb


async def test_answers_and_failures_reach_the_requester() -> None:
    mb = serving("echo")

    async def actor() -> None:
        async for env in mb.inbox:
            if env.msg == "missing":
                env.fail(NotFound("no such thing"))
            else:
                env.reply(env.msg.upper())

    async with trio.open_nursery() as n:
        n.start_soon(actor)
        assert await mb.ask("hi", 5) == "HI"
        with pytest.raises(NotFound, match="no such thing"):
            await mb.ask("missing", 5)
        n.cancel_scope.cancel()
    assert not _deadlines().waiting  # answered requests are not tracked any more


async def test_an_earlier_deadline_is_kept_while_a_later_one_waits(
        autojump_clock: trio.testing.MockClock) -> None:
    """On a clock that jumps to the next sleeper's deadline: a keeper still asleep until the
    60 s request's deadline would let the 0.1 s request wait 60 s."""
    mb = serving("silent")
    results: dict[str, tuple[Exception, float]] = {}

    async def ask(name: str, timeout: float) -> None:
        try:
            await mb.ask(name, timeout)
        except Unavailable as exc:
            results[name] = (exc, trio.current_time())

    async with trio.open_nursery() as n:
        n.start_soon(ask, "slow", 60)
        await trio.testing.wait_all_tasks_blocked()  # the keeper sleeps until 60 s from now
        started = trio.current_time()
        await ask("fast", 0.1)
        n.cancel_scope.cancel()
    error, at = results["fast"]
    assert "did not answer in time" in str(error)
    assert at - started == pytest.approx(0.1)
    assert "slow" not in results  # cancelled, never answered


async def test_a_late_answer_and_an_answer_to_a_cancelled_requester_are_dropped() -> None:
    mb = serving("late")
    with pytest.raises(Unavailable, match="did not answer in time"):
        await mb.ask("expired", 0.02)
    late: Envelope[str] = mb.inbox.receive_nowait()
    late.reply("too late")  # nobody waits: no error, nobody woken

    with trio.move_on_after(0.02):
        await mb.ask("cancelled", 60)
    gone: Envelope[str] = mb.inbox.receive_nowait()
    gone.reply("nobody listens")
    gone.fail(NotFound("either"))
    assert not _deadlines().waiting


async def test_the_first_answer_wins() -> None:
    mb = serving("twice")

    async def actor() -> None:
        env = await mb.inbox.receive()
        slot = env.reply_to
        env.reply("first")
        assert slot is not None
        slot.put("second")  # a second answer through the same slot changes nothing
        slot.put(Failure(NotFound("third")))

    async with trio.open_nursery() as n:
        n.start_soon(actor)
        assert await mb.ask("q", 5) == "first"


async def test_a_full_mailbox_waits_for_room_within_the_deadline() -> None:
    mb = serving("full", capacity=1)
    mb.tell("occupies the only place")
    with trio.fail_after(2), pytest.raises(Unavailable, match="did not answer in time"):
        await mb.ask("no room", 0.05)
    assert mb.depth == 1


async def test_an_answer_that_comes_before_the_requester_parks_is_kept() -> None:
    """A full mailbox: the requester waits for room, and the actor may take its request and
    answer before the requester runs again. Trio shuffles who runs first, so try often."""
    for _ in range(50):
        mb = serving("eager", capacity=1)
        mb.tell("occupies the only place")

        async def actor(mb: Mailbox[str] = mb) -> None:
            await trio.testing.wait_all_tasks_blocked()  # the requester waits for room
            inbox = mb.inbox
            inbox.receive_nowait()  # makes room: the waiting request moves in...
            while True:
                try:
                    env = inbox.receive_nowait()  # ...and is answered at once
                    env.reply(env.msg.upper())
                    return
                except trio.WouldBlock:
                    await trio.lowlevel.checkpoint()

        with trio.fail_after(5):
            async with trio.open_nursery() as n:
                n.start_soon(actor)
                assert await mb.ask("quick", 5) == "QUICK"


async def test_serve_handles_what_is_queued_in_order_and_then_yields() -> None:
    box: Mailbox[int] = Mailbox("t", 1000)
    box.serving = True
    for i in range(300):
        box.tell(i)
    seen: list[int] = []
    per_step: list[int] = []  # messages handled in each step (wake-up) of the serving task

    class Steps(trio.abc.Instrument):
        def before_task_step(self, task: trio.lowlevel.Task) -> None:
            if task.name == "serving":
                self.before = len(seen)

        def after_task_step(self, task: trio.lowlevel.Task) -> None:
            if task.name == "serving":
                per_step.append(len(seen) - self.before)

    steps = Steps()
    trio.lowlevel.add_instrument(steps)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(box.serve, lambda env: seen.append(env.msg), 100,
                               name="serving")
            await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()
    finally:
        trio.lowlevel.remove_instrument(steps)
    assert seen == list(range(300))
    # many a wake-up (no scheduler round per message), at most 1 + 100 (then it yields)
    assert max(per_step) == 101
    assert sum(1 for n in per_step if n) == 3  # 101 + 101 + 98
