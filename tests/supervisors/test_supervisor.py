"""The restart machinery with small actors and trio's mock clock (no sleeps)."""

from __future__ import annotations

import random
from typing import Any

import pytest
import trio
import trio.testing

from anon_ticket.errors import ConfigError, Unavailable
from supervisors.mailbox import Mailbox
from supervisors.supervisor import Backoff, ChildSpec, Escalation, Strategy, Supervisor


class Journal:
    def __init__(self) -> None:
        self.lines: list[str] = []
        self.crash_next: set[str] = set()


class Toy:
    """Starts, reports ready, and crashes when told to."""

    def __init__(self, name: str, journal: Journal, fail_start: int = 0) -> None:
        self.name = name
        self.journal = journal
        self.crash = trio.Event()
        self.fail_start = fail_start

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        self.journal.lines.append(f"start {self.name} @{trio.current_time():.2f}")
        if self.name in self.journal.crash_next:
            self.journal.crash_next.discard(self.name)
            raise RuntimeError(f"{self.name} failed to start")
        task_status.started()
        try:
            await self.crash.wait()
            raise RuntimeError(f"{self.name} crashed")
        finally:
            self.journal.lines.append(f"stop {self.name}")


def make(journal: Journal, names: list[str], strategy: Strategy = Strategy.ONE_FOR_ONE,
         intensity: int = 3, period: float = 10.0) -> tuple[Supervisor, dict[str, list[Toy]]]:
    made: dict[str, list[Toy]] = {n: [] for n in names}

    def factory(name: str) -> Any:
        def build() -> Toy:
            toy = Toy(name, journal)
            made[name].append(toy)
            return toy
        return build

    sup = Supervisor("test", [ChildSpec(n, factory(n)) for n in names], strategy=strategy,
                     intensity=intensity, period=period, backoff=Backoff(1.0, 8.0),
                     grace=1.0, rng=random.Random(7))
    return sup, made


async def wait_until(predicate: Any) -> None:
    while not predicate():
        await trio.sleep(0.01)


async def test_children_start_in_order_and_stop_in_reverse(
        mock_clock: trio.testing.MockClock) -> None:
    mock_clock.autojump_threshold = 0
    journal = Journal()
    sup, _ = make(journal, ["a", "b", "c"])
    async with trio.open_nursery() as n:
        await n.start(sup.run)
        assert [x.split(" @")[0] for x in journal.lines] == ["start a", "start b", "start c"]
        sup.request_stop()
    assert journal.lines[3:] == ["stop c", "stop b", "stop a"]


async def test_one_for_one_restarts_only_the_crashed_child_with_growing_backoff(
        mock_clock: trio.testing.MockClock) -> None:
    mock_clock.autojump_threshold = 0
    journal = Journal()
    sup, made = make(journal, ["a", "b"], intensity=10, period=1000)
    async with trio.open_nursery() as n:
        await n.start(sup.run)
        crash_times = []
        for i in range(3):
            crash_times.append(trio.current_time())
            made["a"][-1].crash.set()
            await wait_until(lambda i=i: len(made["a"]) == i + 2
                             and sup.status()[0].state == "running")
        restarts = [float(x.split("@")[1]) for x in journal.lines if x.startswith("start a")][1:]
        delays = [r - c for r, c in zip(restarts, crash_times, strict=True)]
        # exponential (1, 2, 4 s) with jitter in [0.5, 1.5)
        for delay, base in zip(delays, (1, 2, 4), strict=True):
            assert 0.5 * base <= delay < 1.5 * base + 0.05, delays
        assert len(made["b"]) == 1  # b was never touched
        st = {s.name: s for s in sup.status()}
        assert st["a"].restarts == 3 and "a crashed" in (st["a"].last_error or "")
        sup.request_stop()


async def test_rest_for_one_restarts_the_later_children_too(
        mock_clock: trio.testing.MockClock) -> None:
    mock_clock.autojump_threshold = 0
    journal = Journal()
    sup, made = make(journal, ["a", "b", "c"], strategy=Strategy.REST_FOR_ONE)
    async with trio.open_nursery() as n:
        await n.start(sup.run)
        journal.lines.clear()
        made["b"][-1].crash.set()
        await wait_until(lambda: len(made["c"]) == 2
                         and all(s.state == "running" for s in sup.status()))
        order = [x.split(" @")[0] for x in journal.lines]
        assert order == ["stop b", "stop c", "start b", "start c"]
        assert len(made["a"]) == 1
        sup.request_stop()


async def test_intensity_exceeded_escalates(mock_clock: trio.testing.MockClock) -> None:
    mock_clock.autojump_threshold = 0
    journal = Journal()
    sup, made = make(journal, ["a"], intensity=2, period=100)
    with pytest.RaisesGroup(Escalation, flatten_subgroups=True):
        async with trio.open_nursery() as n:
            await n.start(sup.run)
            while True:  # crash it again each time it is back; the escalation ends the loop
                count = len(made["a"])
                made["a"][-1].crash.set()
                await wait_until(lambda count=count: len(made["a"]) > count
                                 and sup.status()[0].state == "running")
    assert len(made["a"]) == 3  # two restarts allowed, the third crash escalated


async def test_a_crash_at_start_is_retried(mock_clock: trio.testing.MockClock) -> None:
    mock_clock.autojump_threshold = 0
    journal = Journal()
    journal.crash_next.add("a")
    sup, made = make(journal, ["a"])
    async with trio.open_nursery() as n:
        await n.start(sup.run)
        assert len(made["a"]) == 2
        assert sup.status()[0].restarts == 1
        sup.request_stop()


async def test_cancellation_is_a_stop_not_a_crash(mock_clock: trio.testing.MockClock) -> None:
    mock_clock.autojump_threshold = 0
    journal = Journal()
    sup, made = make(journal, ["a"])
    with trio.CancelScope() as scope:
        async with trio.open_nursery() as n:
            await n.start(sup.run)
            scope.cancel()
    assert sup.status()[0].restarts == 0
    assert len(made["a"]) == 1


async def test_config_errors_are_fatal_not_restarted() -> None:
    class Bad:
        async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                      ) -> None:
            raise ConfigError(["port in use"])

    sup = Supervisor("t", [ChildSpec("bad", Bad)], backoff=Backoff(0.01, 0.01))
    with pytest.RaisesGroup(ConfigError, flatten_subgroups=True):
        async with trio.open_nursery() as n:
            await n.start(sup.run)


async def test_a_mailbox_of_a_stopped_actor_answers_unavailable_at_once() -> None:
    mb: Mailbox[str] = Mailbox("x", 4)
    with trio.fail_after(1), pytest.raises(Unavailable):
        await mb.ask("hello", 30)  # not serving: no hang
    mb.serving = True
    with pytest.raises(Unavailable, match="did not answer in time"):
        await mb.ask("hello", 0.05)  # serving but nobody answers: the deadline holds
