"""An outbound queue for one connection: producers never wait, its one writer parks on it.

The public actor makes one per websocket watcher, the hub puts into it (seeing it as the
domain's `Subscriber`, anon_ticket/domain/watch.py): here, beside the mailbox, both can use
it without importing each other (docs/architecture.md §2).
"""

from __future__ import annotations

from collections import deque
from typing import Generic, TypeVar

import trio
from trio.lowlevel import Abort, Task, current_task, reschedule, wait_task_rescheduled

T = TypeVar("T")

CAPACITY = 2048  # a memory bound; a stopped reader is caught by its send timeout first


class Outbox(Generic[T]):
    """Producers only ever `put` (never wait); the connection's writer `get`s.

    Cheaper than a memory channel (three objects, two ordered dicts and a deque each, for
    every idle connection): an idle outbox holds no queue at all, and the one writer parks
    on it directly. `scope` is the connection's: cancelling it (slow, or draining) ends the
    connection without a task per connection waiting for that. `keys` are what it is
    subscribed to, kept by whoever fans out to it (dropping it then needs no search).
    """

    __slots__ = ("_items", "_waiter", "capacity", "keys", "scope", "slow")

    def __init__(self, capacity: int = CAPACITY) -> None:
        self._items: deque[T] | None = None
        self._waiter: Task | None = None
        self.capacity = capacity
        self.keys: set[bytes] = set()
        self.scope = trio.CancelScope()
        self.slow = False

    def put(self, item: T) -> bool:
        """Queue `item` for the writer; False (nothing queued) when the queue is full."""
        items = self._items
        if items is None:
            items = self._items = deque()
        elif len(items) >= self.capacity:
            return False
        items.append(item)
        if self._waiter is not None:
            task, self._waiter = self._waiter, None
            reschedule(task)
        return True

    def take_all(self) -> list[T]:
        """Everything queued now, without waiting (a writer batching what piled up)."""
        items = self._items
        if not items:
            return []
        self._items = None
        return list(items)

    async def get(self) -> T:
        """The next item, waiting for one (one reader only)."""
        if not self._items:
            self._waiter = current_task()

            def abort(_: object) -> Abort:
                self._waiter = None
                return Abort.SUCCEEDED

            await wait_task_rescheduled(abort)
        items = self._items
        assert items
        item = items.popleft()
        if not items:
            self._items = None  # idle again: no queue held
        return item

    def mark_slow(self) -> None:
        """Too slow to keep: its connection closes it (SLOW_CONSUMER), nobody waits for it."""
        self.slow = True
        self.scope.cancel()
