"""The restart machinery: a supervisor keeps its children running.

- Children start in order with `nursery.start`; a child is ready when its `run` calls
  `task_status.started()`, and only then does the next one start.
- A child that raises is restarted after an exponential backoff with jitter. `trio.Cancelled`
  is a stop, never a crash.
- More than `intensity` restarts within `period` seconds escalate: the supervisor itself fails
  with `Escalation`, which its own supervisor treats as a crash (at the root: exit 1).
- one-for-one restarts only the crashed child; rest-for-one also restarts the children started
  after it (they depend on it), stopping them first in reverse order.
- A stop runs in reverse order: each child is asked to stop gracefully (its `stop` hook) and
  given `grace` seconds before it is cancelled.
- An error whose class says restarting cannot fix it (`restartable = False`, as a
  configuration error's does) is not restarted: it goes up through every supervisor.

It knows no application message or error (docs/architecture.md §2): it reports its own
`ChildState`, and a supervisor's command mailbox is served by whoever builds it (the tree
answers the operator's commands with `status`, `restart_child` and `request_stop`).
"""

from __future__ import annotations

import enum
import random
import traceback
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

import trio

from anon_ticket.logs import get_logger
from mailboxes import AnyMailbox

log = get_logger("supervisor")


class Strategy(enum.Enum):
    ONE_FOR_ONE = "one_for_one"
    REST_FOR_ONE = "rest_for_one"


class Escalation(Exception):
    """A child restarted too often: the supervisor gives up and fails itself."""

    def __init__(self, supervisor: str, child: str, last_error: str) -> None:
        super().__init__(
            f"supervisor {supervisor!r}: child {child!r} exceeded its restart intensity "
            f"(last error: {last_error})"
        )
        self.child = child


class NoSuchChild(LookupError):
    """No child (nor grandchild) of that name."""


class Runnable(Protocol):
    async def run(self, *, task_status: trio.TaskStatus[None] = ...) -> None: ...


@dataclass(frozen=True, slots=True)
class ChildState:
    name: str
    state: str
    uptime_secs: float | None
    restarts: int
    last_error: str | None
    mailbox_depth: int | None
    children: tuple[ChildState, ...] = field(default=())


@dataclass(frozen=True)
class Commands:
    """A supervisor's command mailbox: it serves (`serve`, run in the supervisor's nursery)
    once every child runs, and stops taking commands the moment a stop begins."""

    mailbox: AnyMailbox
    serve: Callable[[Supervisor], Awaitable[None]]


def _fatal(exc: BaseException) -> bool:
    return getattr(type(exc), "restartable", True) is False


@dataclass
class Backoff:
    initial: float = 0.1
    maximum: float = 5.0

    def delay(self, attempt: int, rng: random.Random) -> float:
        base = min(self.maximum, self.initial * (2 ** max(0, attempt - 1)))
        return float(base * rng.uniform(0.5, 1.5))


@dataclass
class ChildSpec:
    """How to (re)create one child. `factory` builds a fresh actor for every run."""

    name: str
    factory: Callable[[], Runnable]
    mailbox: AnyMailbox | None = None  # serves while the child runs
    stop: Callable[[Runnable], Awaitable[None] | None] | None = None
    status: Callable[[Runnable], tuple[ChildState, ...]] | None = None


@dataclass
class _Child:
    spec: ChildSpec
    scope: trio.CancelScope | None = None
    actor: Runnable | None = None
    state: str = "starting"
    started_at: float | None = None
    restarts: int = 0
    attempt: int = 0
    last_error: str | None = None
    held: bool = False
    release: trio.Event = field(default_factory=trio.Event)
    running: trio.Event = field(default_factory=trio.Event)
    exited: trio.Event = field(default_factory=trio.Event)
    restart_requested: bool = False


def _describe(exc: BaseException) -> str:
    if isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        return _describe(exc.exceptions[0])
    return f"{type(exc).__name__}: {exc}"


class Supervisor:
    def __init__(
        self,
        name: str,
        children: list[ChildSpec],
        *,
        strategy: Strategy = Strategy.ONE_FOR_ONE,
        intensity: int = 5,
        period: float = 30.0,
        backoff: Backoff | None = None,
        grace: float = 10.0,
        commands: Commands | None = None,
        rng: random.Random | None = None,
        on_restart: Callable[[str], None] | None = None,
    ) -> None:
        self.name = name
        self.strategy = strategy
        self.intensity = intensity
        self.period = period
        self.backoff = backoff or Backoff()
        self.grace = grace
        self.commands = commands
        self._rng = rng or random.Random()
        self._on_restart = on_restart
        self._children = [_Child(spec) for spec in children]
        self._restart_times: deque[float] = deque()
        self._stop = trio.Event()
        self.stop_reason: str | None = None
        self._nursery: trio.Nursery | None = None

    # --- public face ------------------------------------------------------------------------

    def request_stop(self, reason: str = "requested") -> None:
        if not self._stop.is_set():
            self.stop_reason = reason
            self._stop.set()

    def status(self) -> tuple[ChildState, ...]:
        now = trio.current_time()
        out = []
        for c in self._children:
            nested = c.spec.status(c.actor) if (c.spec.status and c.actor) else ()
            out.append(
                ChildState(
                    name=c.spec.name,
                    state=c.state,
                    uptime_secs=(now - c.started_at) if c.started_at is not None else None,
                    restarts=c.restarts,
                    last_error=c.last_error,
                    mailbox_depth=c.spec.mailbox.depth if c.spec.mailbox else None,
                    children=nested,
                )
            )
        return tuple(out)

    def restart_child(self, name: str) -> None:
        """Restart a running child on an operator's command (not counted as a crash). A child
        with a `stop` hook (a listener) is stopped gracefully first, as in a stop: the
        request that asked for its restart (over the internal socket, perhaps this very
        listener) still gets its answer."""
        for c in self._children:
            if c.spec.name == name and c.scope is not None:
                if c.restart_requested:
                    return  # already on its way
                c.restart_requested = True
                if c.spec.stop is not None and self._nursery is not None:
                    self._nursery.start_soon(self._stop_gracefully, c, c.scope)
                else:
                    c.scope.cancel()
                return
            nested = c.actor
            if isinstance(nested, Supervisor) and nested.has_child(name):
                nested.restart_child(name)
                return
        raise NoSuchChild(f"no actor named {name!r}")

    def has_child(self, name: str) -> bool:
        return any(
            c.spec.name == name or (isinstance(c.actor, Supervisor) and c.actor.has_child(name))
            for c in self._children
        )

    async def _stop_gracefully(self, child: _Child, scope: trio.CancelScope) -> None:
        """Ask the child to stop (its `stop` hook), give it the grace period, then cancel
        that run's scope (a no-op once the run has ended)."""
        if child.spec.stop is not None and child.actor is not None:
            maybe = child.spec.stop(child.actor)
            if maybe is not None:
                await maybe
            with trio.move_on_after(self.grace):
                await child.exited.wait()
        scope.cancel()

    # --- running ----------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            for index, child in enumerate(self._children):
                if self._stop.is_set():
                    break  # a stop during start-up: start nothing more
                await nursery.start(self._keep, index, child)
            if self.commands is not None:
                self.commands.mailbox.serving = True
                nursery.start_soon(self.commands.serve, self)
            log.info("supervisor started", supervisor=self.name,
                     children=",".join(c.spec.name for c in self._children))
            task_status.started()
            await self._stop.wait()
            if self.commands is not None:
                self.commands.mailbox.serving = False
            await self._stop_children(range(len(self._children)))
            nursery.cancel_scope.cancel()

    async def _stop_children(self, indexes: range) -> None:
        """Stop children in reverse order: ask each to stop, give it grace, then cancel."""
        for i in reversed(indexes):
            child = self._children[i]
            if child.scope is None or child.exited.is_set():
                continue
            child.state = "stopping"
            await self._stop_gracefully(child, child.scope)
            await child.exited.wait()

    def _count_restart(self, child: _Child) -> None:
        if self._on_restart is not None:
            self._on_restart(child.spec.name)

    def _record_restart(self, child: _Child) -> None:
        now = trio.current_time()
        self._restart_times.append(now)
        while self._restart_times and self._restart_times[0] < now - self.period:
            self._restart_times.popleft()
        if len(self._restart_times) > self.intensity:
            log.error("restart intensity exceeded", supervisor=self.name,
                      child=child.spec.name, error=child.last_error)
            raise Escalation(self.name, child.spec.name, child.last_error or "?")

    async def _keep(self, index: int, child: _Child, *,
                    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run one child for as long as the supervisor runs, restarting it when it crashes."""
        reported = False
        held_dependents: list[_Child] = []
        while True:
            child.exited = trio.Event()
            child.running = trio.Event()
            child.scope = trio.CancelScope()
            child.actor = child.spec.factory()
            child.state = "starting"
            crashed: Exception | None = None
            ran_for = 0.0
            try:
                with child.scope:
                    async with trio.open_nursery() as inner:
                        await inner.start(child.actor.run)
                        child.state = "running"
                        child.started_at = trio.current_time()
                        if child.spec.mailbox is not None:
                            child.spec.mailbox.serving = True
                        child.running.set()
                        if not reported:
                            reported = True
                            task_status.started()
                        # rest-for-one: dependents come back only once this child serves again
                        for dep in held_dependents:
                            dep.release.set()
                            await dep.running.wait()
                        held_dependents = []
            except Exception as exc:
                # An error restarting cannot fix (a configuration error: exit 2) goes up.
                if _fatal(exc):
                    raise
                if isinstance(exc, BaseExceptionGroup):
                    fatal: BaseException | None = exc.subgroup(_fatal)
                    if fatal is not None:
                        while isinstance(fatal, BaseExceptionGroup):
                            fatal = fatal.exceptions[0]
                        raise fatal from None
                # An Escalation from a nested supervisor is that child's crash; our own
                # Escalation is raised below, outside this block.
                crashed = exc
            finally:
                if child.spec.mailbox is not None:
                    child.spec.mailbox.serving = False
                if child.started_at is not None:
                    ran_for = trio.current_time() - child.started_at
                child.started_at = None
                child.exited.set()

            if self._stop.is_set():  # stopping: whatever ended it, it is not restarted
                if crashed is not None:
                    log.warning("actor failed while stopping", child=child.spec.name,
                                error=_describe(crashed))
                child.state = "stopped"
                return
            if crashed is None:
                if child.held:
                    child.state = "waiting"
                    await child.release.wait()
                    child.held = False
                    child.release = trio.Event()
                    child.restarts += 1  # restarted with the child it depends on
                    self._count_restart(child)
                    continue
                if child.restart_requested:
                    child.restart_requested = False
                    child.restarts += 1
                    self._count_restart(child)
                    log.info("actor restarted on request", child=child.spec.name)
                    continue
                # A child that returns on its own when nobody asked it to is a crash too.
                crashed = RuntimeError("exited unexpectedly")

            child.last_error = _describe(crashed)
            child.state = "restarting"
            child.attempt = 1 if ran_for > self.period else child.attempt + 1
            child.restarts += 1
            self._count_restart(child)
            log.error("actor crashed", child=child.spec.name, error=child.last_error,
                      restarts=child.restarts)
            log.debug("crash traceback", child=child.spec.name,
                      traceback="".join(traceback.format_exception(crashed)))
            self._record_restart(child)
            if self.strategy is Strategy.REST_FOR_ONE:
                dependents = range(index + 1, len(self._children))
                held_dependents = [self._children[j] for j in dependents]
                for dep in held_dependents:
                    dep.held = True
                await self._stop_children(dependents)
            await trio.sleep(self.backoff.delay(child.attempt, self._rng))
