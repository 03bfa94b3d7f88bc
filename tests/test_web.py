"""hypercorn as the listeners run it (`anon_ticket.web.serve_app`): keep-alive connections."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial

import trio
import trio.testing
from quart import Response
from quart_trio import QuartTrio

from anon_ticket.web import bind_tcp, serve_app
from tests.harness import count_tasks

SHORT = 0.5  # a keep-alive timeout to wait out
LONG = 10.0  # one that must not be what ends a connection
REQUEST = b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\n"


def _timers() -> int:
    return count_tasks(lambda task: task.name == "keep-alive timer")


@asynccontextmanager
async def _serving(keep_alive: float) -> AsyncIterator[tuple[int, trio.Event]]:
    """A one-route app served as the listeners serve theirs; the event stops it."""
    app = QuartTrio("keepalive-test")

    @app.get("/ping")
    async def ping() -> Response:
        return Response("pong", content_type="text/plain")

    stop = trio.Event()
    sock = bind_tcp("127.0.0.1", 0)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(partial(serve_app, app, sock, grace=5.0, shutdown=stop.wait,
                                        keep_alive_timeout=keep_alive))
            yield sock.getsockname()[1], stop
            stop.set()
    finally:
        sock.close()


async def _request(stream: trio.SocketStream) -> None:
    await stream.send_all(REQUEST)
    data = b""
    while not data.endswith(b"pong"):
        chunk = await stream.receive_some(65536)
        assert chunk, "the server closed a connection that was waiting for its response"
        data += chunk
    assert data.startswith(b"HTTP/1.1 200")


async def _closed_by_server(stream: trio.SocketStream) -> float:
    """Seconds until the server closes the connection (EOF)."""
    started = trio.current_time()
    with trio.fail_after(10):
        assert await stream.receive_some(65536) == b""
    return trio.current_time() - started


# The two tests below wait out timeouts of a second or less: on trio's clock that jumps
# to the next deadline whenever every task waits (real sockets on loopback are read first),
# so that a shared machine's pauses cannot move them.


async def test_an_idle_connection_is_closed_after_the_keep_alive_timeout(
        autojump_clock: trio.testing.MockClock) -> None:
    # quart-trio cancelled the request task on `http.disconnect`, which cancelled hypercorn's
    # timer start: after its first request an idle connection stayed open forever.
    async with _serving(SHORT) as (port, _), \
            await trio.open_tcp_stream("127.0.0.1", port) as stream:
        for _ in range(5):
            await _request(stream)
        waited = await _closed_by_server(stream)
        assert SHORT * 0.8 <= waited <= SHORT + 0.1


async def test_a_busy_connection_is_kept_past_the_timeout(
        autojump_clock: trio.testing.MockClock) -> None:
    # Every request moves the deadline: a client asking every 0.2 s for three timeouts'
    # worth is never cut off, and is closed once it stops asking.
    timeout = 1.0
    async with _serving(timeout) as (port, _), \
            await trio.open_tcp_stream("127.0.0.1", port) as stream:
        await _request(stream)
        for _ in range(15):
            await trio.sleep(timeout / 5)
            await _request(stream)
        assert await _closed_by_server(stream) >= timeout * 0.8


async def test_one_timer_a_connection_and_it_ends_with_the_connection() -> None:
    async with _serving(LONG) as (port, _):
        streams = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(3)]
        for stream in streams:
            for _ in range(3):
                await _request(stream)
        assert _timers() == 3  # one each, however many requests
        for stream in streams:  # clients that leave while idle
            await stream.aclose()
        # Everything the server does about it (read the EOF, end the connection) is done
        # once every task waits again; the timers would fire only after LONG seconds.
        with trio.fail_after(LONG / 2):
            await trio.testing.wait_all_tasks_blocked()
        assert _timers() == 0


async def test_a_stop_closes_idle_connections_at_once() -> None:
    async with _serving(LONG) as (port, stop), \
            await trio.open_tcp_stream("127.0.0.1", port) as stream:
        await _request(stream)
        stop.set()
        assert await _closed_by_server(stream) < LONG / 2
