"""Many watchers (security finding 9): what they cost, what they leave behind, and fan-out.

An outside run found 10,000 watchers took the server from 116 to 736 MB and kept it after
they left: each closed connection ended in reference cycles (quart caught the nursery's group
of `Cancelled`) that only a full collection frees, and a server seldom runs one. A claim with
2,500 watchers of its payment id took half a second of the loop.
"""

from __future__ import annotations

import gc
import json
import tracemalloc
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import wsproto
from wsproto.events import (
    AcceptConnection,
    CloseConnection,
    Message,
    Request,
    TextMessage,
)

from actors.public import Public, _WatchConnection
from anon_ticket.domain.commands import HubStats
from anon_ticket.domain.ids import PaymentId
from anon_ticket.domain.watch import MAX_WATCHERS_PER_KEY
from mailboxes import Outbox
from tests.actors.test_watch import recv, send, watcher
from tests.harness import Server, count_tasks, running_server

CONNECT_AT_ONCE = 50


class RawWatcher:
    """A cheap websocket client (a socket and wsproto): hundreds of them fit in one test."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.ws = wsproto.WSConnection(wsproto.ConnectionType.CLIENT)
        self.messages: list[dict[str, Any]] = []
        self._text = ""

    @classmethod
    async def open(cls, srv: Server) -> RawWatcher:
        sock = trio.socket.socket()
        await sock.connect((srv.settings.bind_host, srv.settings.bind_port))
        client = cls(trio.SocketStream(sock))
        await client.stream.send_all(client.ws.send(Request(host="localhost",
                                                            target="/api/v1/watch")))
        while not any(isinstance(e, AcceptConnection) for e in await client._events()):
            pass
        return client

    async def _events(self) -> list[Any]:
        data = await self.stream.receive_some(65536)
        if not data:
            raise EOFError("the server closed the connection")
        self.ws.receive_data(data)
        events = list(self.ws.events())
        for event in events:
            if isinstance(event, Message):
                self._text += str(event.data)
                if event.message_finished:
                    self.messages.append(json.loads(self._text))
                    self._text = ""
        return events

    async def send(self, **msg: Any) -> None:
        await self.stream.send_all(self.ws.send(TextMessage(json.dumps(msg))))

    async def recv(self, timeout: float = 10) -> dict[str, Any]:
        with trio.fail_after(timeout):
            while not self.messages:
                await self._events()
        return self.messages.pop(0)

    async def subscribe(self, pid: PaymentId) -> dict[str, Any]:
        await self.send(op="subscribe", pid=pid.hex())
        return await self.recv()

    async def close(self) -> None:
        """A client that leaves properly: a close frame, then the socket."""
        try:
            await self.stream.send_all(self.ws.send(CloseConnection(code=1000)))
        except (trio.BrokenResourceError, wsproto.utilities.LocalProtocolError):
            pass
        await self.stream.aclose()


async def open_subscribed(srv: Server, pids: list[PaymentId]) -> list[RawWatcher]:
    """One connection per entry of `pids`, each subscribed to it and past its `state`."""
    opened: list[RawWatcher] = []
    limit = trio.Semaphore(CONNECT_AT_ONCE)

    async def one(pid: PaymentId) -> None:
        async with limit:
            client = await RawWatcher.open(srv)
            opened.append(client)
            assert (await client.subscribe(pid))["type"] == "state"

    async with trio.open_nursery() as nursery:
        for pid in pids:
            nursery.start_soon(one, pid)
    return opened


async def close_all(clients: list[RawWatcher]) -> None:
    async with trio.open_nursery() as nursery:
        for client in clients:
            nursery.start_soon(client.close)
    clients.clear()


def public_of(srv: Server) -> Public:
    actor = next(c.actor for c in srv.tree.root._children if c.spec.name == "public")
    assert isinstance(actor, Public)
    return actor


def _is_watch_reader(task: trio.lowlevel.Task) -> bool:
    return task.name.endswith("_read_loop")


def _any(task: trio.lowlevel.Task) -> bool:
    return True


async def hub_stats(srv: Server) -> dict[str, int]:
    stats: dict[str, int] = await srv.tree.mailboxes.hub.ask(HubStats(), 5)
    return stats


async def wait_until(check: Callable[[], Any], timeout: float = 30) -> None:
    """Poll `check` (sync or async) until it is true, within `timeout` seconds."""
    with trio.fail_after(timeout):
        while True:
            result = check()
            if hasattr(result, "__await__"):
                result = await result
            if result:
                return
            await trio.sleep(0.02)


@contextmanager
def no_cyclic_collection() -> Iterator[None]:
    """What refcounting frees shows at once; what waits for the cyclic collector stays."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def ours_in_cycles() -> list[str]:
    """Collect now; what of ours (watch state, frames of our code) only the cyclic collector
    could free."""
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        gc.collect()
        return [type(o).__name__ for o in gc.garbage if _ours(o)]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.collect()  # saved, they were not freed: now they are


def _ours(obj: object) -> bool:
    if isinstance(obj, (_WatchConnection, Outbox)):
        return True
    code = getattr(obj, "f_code", None)
    return code is not None and code.co_filename.endswith(
        ("actors/public.py", "actors/hub.py", "mailboxes/outbox.py"))


async def test_watchers_that_leave_release_their_state_and_memory(tmp_path: Path) -> None:
    n = 500
    async with running_server(tmp_path) as srv:
        public = public_of(srv)
        await close_all(await open_subscribed(srv, [PaymentId.generate()]))  # imports, caches
        await wait_until(lambda: not public._connections)
        shared = PaymentId.generate()  # a fifth of them watch one payment id together
        pids = [shared if i % 5 == 0 else PaymentId.generate() for i in range(n)]
        started_tracing = not tracemalloc.is_tracing()
        if started_tracing:
            tracemalloc.start()
        try:
            with no_cyclic_collection():
                tasks = count_tasks(_any)
                before = tracemalloc.get_traced_memory()[0]
                clients = await open_subscribed(srv, pids)
                stats = await hub_stats(srv)
                assert (stats["subscriptions"], stats["keys"]) == (n, n - n // 5 + 1)
                assert len(public._connections) == n
                assert count_tasks(_is_watch_reader) == n
                await close_all(clients)

                async def released() -> bool:
                    stats = await hub_stats(srv)
                    return (stats["subscriptions"] == stats["keys"] == 0
                            and not public._connections
                            and count_tasks(_any) <= tasks)  # the stack's too

                await wait_until(released)
                left = tracemalloc.get_traced_memory()[0] - before
                kept = ours_in_cycles()
            collected = tracemalloc.get_traced_memory()[0] - before
        finally:
            if started_tracing:
                tracemalloc.stop()
        # A connection held about 45 KB (the stack's share most of it). What is left before
        # any collection is the stack's own cycles (hypercorn's connection objects, a few KB
        # each); ours were 40+ KB a connection, freed only by a full collection.
        assert left < n * 16_000, f"{left / n:.0f} bytes a connection left uncollected"
        assert not kept, f"{len(kept)} objects of ours in reference cycles: {kept[:10]}"
        assert collected < n * 4_000, f"{collected / n:.0f} bytes a connection kept"


async def test_a_payment_id_takes_a_bounded_number_of_watchers(tmp_path: Path) -> None:
    async with running_server(tmp_path) as srv:
        pid, other = PaymentId.generate(), PaymentId.generate()
        clients = await open_subscribed(srv, [pid] * MAX_WATCHERS_PER_KEY)
        try:
            async with watcher(srv) as ws:
                await send(ws, op="subscribe", pid=pid.hex())
                assert await recv(ws) == {
                    "type": "error",
                    "error": f"too many watchers of this payment id: at most "
                             f"{MAX_WATCHERS_PER_KEY} at once"}
                await send(ws, op="ping")  # the connection stays open...
                assert await recv(ws) == {"type": "pong"}
                await send(ws, op="subscribe", pid=other.hex())  # ...and may watch others
                assert (await recv(ws))["type"] == "state"
                assert (await hub_stats(srv))["refused_per_key"] == 1
                await clients.pop().close()  # a watcher that leaves makes room

                async def room() -> bool:
                    return (await hub_stats(srv))["subscriptions"] == MAX_WATCHERS_PER_KEY
                await wait_until(room)
                await send(ws, op="subscribe", pid=pid.hex())
                state = await recv(ws)
                assert (state["type"], state["pid"]) == ("state", pid.hex())
        finally:
            await close_all(clients)


async def test_a_claim_reaches_every_watcher_of_its_ticket_in_order(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    encoded: list[str] = []
    dumps = json.dumps

    def counting_dumps(obj: Any, **kwargs: Any) -> str:
        text = dumps(obj, **kwargs)
        if '"type":"claimed"' in text.replace(" ", ""):
            encoded.append(text)
        return text

    async with running_server(tmp_path) as srv:
        pid = PaymentId.generate()
        clients = await open_subscribed(srv, [pid] * MAX_WATCHERS_PER_KEY)
        try:
            await srv.pay(pid, 500)
            monkeypatch.setattr(json, "dumps", counting_dumps)
            claim = await srv.redeem(pid.hex())
            assert claim.json()["status"] == "success"
            for client in clients:
                seen = [await client.recv() for _ in range(2)]
                assert [(m["type"], m["seq"], m["pid"]) for m in seen] == [
                    ("payment_confirmed", 1, pid.hex()), ("claimed", 2, pid.hex())]
                assert seen[1]["balance"] == 500
            monkeypatch.undo()
            # One encoding of the event for all watchers of the payment id, not one each.
            assert len(encoded) == 1, len(encoded)
        finally:
            await close_all(clients)
