"""Hostile clients against the public listener over real sockets (I13, I14, docs/architecture.md).

Each test names the finding it guards: bytes and connection patterns that used to crash the
listener, hold a connection forever, redirect a client elsewhere or answer without JSON.
"""

from __future__ import annotations

import json
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from actors.storage import Storage
from anon_ticket.domain.ids import PaymentId
from tests.harness import Server, running_server, sqlite_only
from tests.rawhttp import UPGRADE, parse_response, read_response, read_until_closed, text

# A masked text frame carrying `{"op":"ping"}`: valid on its own, but sent before the 101.
FRAME = text({"op": "ping"})


def restarts(srv: Server, name: str) -> int:
    def find(states: Any) -> int | None:
        for s in states:
            if s.name == name:
                return int(s.restarts)
            found = find(s.children)
            if found is not None:
                return found
        return None
    found = find(srv.tree.root.status())
    assert found is not None, name
    return found


@asynccontextmanager
async def raw(srv: Server) -> AsyncIterator[trio.SocketStream]:
    stream = await trio.open_tcp_stream(srv.settings.bind_host, srv.settings.bind_port)
    async with stream:
        yield stream


def assert_json(data: bytes, status: int) -> dict[str, Any]:
    got, headers, body = parse_response(data)
    assert got == status, data
    assert headers.get("content-type", "").startswith("application/json"), data
    parsed: dict[str, Any] = json.loads(body[: int(headers["content-length"])])
    assert set(parsed) == {"error"}, parsed
    return parsed


async def still_serving(srv: Server) -> None:
    pid = PaymentId.generate()
    await srv.pay(pid)
    resp = await srv.redeem(pid.hex())
    assert resp.status_code == 200 and resp.json()["status"] == "success"


# --- finding 1: client bytes never reach an actor's crash path ------------------------------


@pytest.mark.parametrize("extra", [b"x", FRAME], ids=["one byte", "a valid frame"])
async def test_bytes_sent_with_a_websocket_upgrade_end_that_connection_only(
        tmp_path: Path, extra: bytes) -> None:
    async with running_server(tmp_path) as srv:
        intensity = srv.settings.restart_intensity
        for _ in range(intensity + 3):  # more than enough to escalate if each crashed public
            async with raw(srv) as stream:
                await stream.send_all(UPGRADE + extra)
                answer = await read_until_closed(stream)
            assert_json(answer, 400)
        assert restarts(srv, "public") == 0
        await still_serving(srv)


async def test_an_error_inside_one_connection_ends_that_connection_only(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Fault injection: whatever a connection's protocol code raises (upstream bugs included)
    # is contained in that connection.
    from hypercorn.protocol.h11 import H11Protocol

    handle = H11Protocol.handle

    async def exploding(self: Any, event: Any) -> None:
        if b"EXPLODE" in getattr(event, "data", b""):
            raise RuntimeError("a bug in the protocol stack")
        await handle(self, event)

    monkeypatch.setattr(H11Protocol, "handle", exploding)
    async with running_server(tmp_path) as srv, raw(srv) as bystander:
        await bystander.send_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await read_response(bystander)).startswith(b"HTTP/1.1 200")
        for _ in range(srv.settings.restart_intensity + 3):
            async with raw(srv) as stream:
                await stream.send_all(b"GET /EXPLODE HTTP/1.1\r\nHost: x\r\n\r\n")
                await read_until_closed(stream)
        assert restarts(srv, "public") == 0
        await bystander.send_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await read_response(bystander)).startswith(b"HTTP/1.1 200")
        await still_serving(srv)


# --- finding 2: every phase of a request has a deadline -------------------------------------

READ_TIMEOUT = 1.0


async def closed_within(stream: trio.SocketStream, limit: float) -> tuple[float, bytes]:
    started = trio.current_time()
    data = await read_until_closed(stream, limit)
    return trio.current_time() - started, data


async def test_a_body_that_never_completes_is_cut_off(tmp_path: Path) -> None:
    async with running_server(tmp_path, read_timeout_secs=READ_TIMEOUT) as srv, \
            raw(srv) as stream:
        await stream.send_all(b"POST /api/v1/redeem HTTP/1.1\r\nHost: x\r\n"
                              b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n"
                              b'{"pid": ')
        waited, data = await closed_within(stream, READ_TIMEOUT + 5)
        assert waited >= READ_TIMEOUT * 0.8
        assert_json(data, 408)


async def test_a_body_on_a_route_that_reads_none_is_cut_off_too(tmp_path: Path) -> None:
    async with running_server(tmp_path, read_timeout_secs=READ_TIMEOUT) as srv, \
            raw(srv) as stream:
        await stream.send_all(b"POST /nowhere HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nab")
        _, data = await closed_within(stream, READ_TIMEOUT + 5)
        assert_json(data, 404)


async def test_a_dripped_request_head_is_cut_off_however_busy(tmp_path: Path) -> None:
    # One byte every tenth of a second never lets the connection look idle for long, and
    # the keep-alive timeout is far away: only the head's own deadline ends it.
    async with running_server(tmp_path, read_timeout_secs=READ_TIMEOUT,
                              keep_alive_secs=60) as srv, raw(srv) as stream:
        started = trio.current_time()
        with trio.fail_after(READ_TIMEOUT + 5):
            for byte in b"GET /healthz HTTP/1.1\r\nX-Slow: " + b"a" * 1000:
                try:
                    await stream.send_all(bytes([byte]))
                except trio.BrokenResourceError:
                    break
                await trio.sleep(0.1)
        assert trio.current_time() - started >= READ_TIMEOUT * 0.8


async def test_an_idle_connection_is_closed_after_the_keep_alive_timeout(tmp_path: Path) -> None:
    async with running_server(tmp_path, keep_alive_secs=1) as srv, raw(srv) as stream:
        await stream.send_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        waited, data = await closed_within(stream, 6)
        assert data.startswith(b"HTTP/1.1 200")
        assert waited >= 0.8


async def test_a_client_that_never_reads_its_responses_is_closed(tmp_path: Path) -> None:
    # Requests pipelined by a client that never reads: the responses fill the socket buffers
    # and the server's write waits. It must give up after the write timeout.
    async with running_server(tmp_path, write_timeout_secs=READ_TIMEOUT) as srv:
        sock = trio.socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        await sock.connect((srv.settings.bind_host, srv.settings.bind_port))
        stream = trio.SocketStream(sock)
        request = b"GET /api/v1/info HTTP/1.1\r\nHost: x\r\n\r\n"
        with trio.move_on_after(READ_TIMEOUT + 10):
            try:
                for _ in range(20_000):
                    await stream.send_all(request * 50)
            except trio.BrokenResourceError:
                pass
        # The server closed it: what was buffered drains and then the stream ends.
        got = 0
        with trio.fail_after(10):
            try:
                while chunk := await stream.receive_some(1 << 20):
                    got += len(chunk)
            except trio.BrokenResourceError:
                pass
        await stream.aclose()
        assert got > 0
        await still_serving(srv)


# --- finding 3: connections are capped below the descriptor limit ----------------------------


async def test_idle_connections_are_evicted_for_real_requests(tmp_path: Path) -> None:
    cap = 40
    async with running_server(tmp_path, max_connections=cap) as srv:
        idle = [await trio.open_tcp_stream(srv.settings.bind_host, srv.settings.bind_port)
                for _ in range(cap * 2)]
        try:
            for _ in range(10):  # every real request gets through, idle ones make room
                await still_serving(srv)
        finally:
            for stream in idle:
                await stream.aclose()


async def test_when_every_connection_is_busy_a_new_one_is_refused_clearly(
        tmp_path: Path) -> None:
    cap = 16
    async with running_server(tmp_path, max_connections=cap, read_timeout_secs=30) as srv:
        busy = []
        try:
            for _ in range(cap):  # each inside a request whose body never comes
                stream = await trio.open_tcp_stream(srv.settings.bind_host,
                                                    srv.settings.bind_port)
                await stream.send_all(b"POST /api/v1/redeem HTTP/1.1\r\nHost: x\r\n"
                                      b"Content-Type: application/json\r\n"
                                      b"Content-Length: 50\r\n\r\n{")
                busy.append(stream)
            policy = srv.tree.metrics.connections.policies["public"]
            with trio.fail_after(10):  # every one admitted and inside its request
                while len(policy.connections) < cap or any(
                        conn.idle_task.idle for conn in policy.connections):
                    await trio.sleep(0.01)
            async with raw(srv) as stream:
                await stream.send_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                data = await read_until_closed(stream)
            status, headers, _ = parse_response(data)
            assert status == 503 and "retry-after" in headers
            assert_json(data, 503)
        finally:
            for stream in busy:
                await stream.aclose()
        await still_serving(srv)


# --- finding 6: no redirects, ever ---------------------------------------------------------


@pytest.mark.parametrize("request_line", [
    b"POST /api/v1//redeem HTTP/1.1",
    b"GET /api//v1/token/" + b"ab" * 32 + b" HTTP/1.1",
    b"POST /api/v1/redeem/ HTTP/1.1",
    b"GET /static/x HTTP/1.1",  # quart serves ./static of the cwd unless told not to
])
async def test_a_path_the_api_does_not_have_is_a_json_404_never_a_redirect(
        tmp_path: Path, request_line: bytes) -> None:
    async with running_server(tmp_path) as srv, raw(srv) as stream:
        await stream.send_all(request_line + b"\r\nHost: evil.example\r\n"
                              b"Content-Type: application/json\r\nContent-Length: 26\r\n"
                              b"Connection: close\r\n\r\n" + b'{"pid":"0123456789abcdef"}')
        data = await read_until_closed(stream)
        assert b"evil.example" not in data
        assert_json(data, 404)


# --- finding 7: protocol-level refusals are JSON too --------------------------------------


@pytest.mark.parametrize(("raw_request", "status"), [
    (b"GET /healthz HTTP/1.1\r\n\r\n", 400),  # no Host
    (b"POST /api/v1/redeem HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
     b"Content-Length: 3\r\n\r\n{}", 400),
    (b"POST /api/v1/redeem HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n", 501),
    (b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n", 431),
    # One read whole: h11 limits only a head that arrives in pieces.
    (b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: y\r\n" % i for i in range(3000))
     + b"\r\n", 431),
    (b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n", 431),
    (b"GET /api/v1/watch HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
     b"Sec-WebSocket-Version: 13\r\n\r\n", 400),  # no key: a broken upgrade
    (UPGRADE.replace(b"dGhlIHNhbXBsZSBub25jZQ==", b"x"), 400),  # a key that is no key
    # Both framings at once is how requests are smuggled past proxies: refused.
    (b"POST /api/v1/redeem HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
     b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    (b"GET /healthz HTTP/2.0\r\nHost: x\r\n\r\n", 505),
], ids=["no host", "two lengths", "unknown coding", "huge headers", "many headers",
        "a big head in one read", "broken upgrade", "bad websocket key",
        "length and chunked", "http/2.0 line"])
async def test_protocol_refusals_are_json(tmp_path: Path, raw_request: bytes, status: int) -> None:
    async with running_server(tmp_path) as srv, raw(srv) as stream:
        try:
            await stream.send_all(raw_request)
        except trio.BrokenResourceError:
            pass  # refused before it was all sent: the answer is still there to read
        assert_json(await read_until_closed(stream), status)
        assert restarts(srv, "public") == 0


async def test_cleartext_http2_is_not_spoken(tmp_path: Path) -> None:
    # hypercorn answers `Upgrade: h2c` with a 101 and the HTTP/2 preface with HTTP/2: the
    # public port speaks HTTP/1.1 only (docs/architecture.md).
    async with running_server(tmp_path) as srv:
        async with raw(srv) as stream:
            await stream.send_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n"
                                  b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
                                  b"HTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n")
            data = await read_response(stream)
            assert data.startswith(b"HTTP/1.1 200"), data
        async with raw(srv) as stream:
            await stream.send_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            data = await read_until_closed(stream)
            assert not data or data.startswith(b"HTTP/1.1 "), data
            if data:
                assert_json(data, 505)
        assert restarts(srv, "public") == 0


async def test_a_watcher_that_floods_and_never_reads_is_closed(tmp_path: Path) -> None:
    # It sends pings and never reads the pongs: dropped as a slow consumer, its close frame
    # cannot be written, and hypercorn's read loop then waited forever to hand its next
    # message to a handler that had ended, for as long as the client kept sending.
    async with running_server(tmp_path, watch_send_timeout_secs=1, write_timeout_secs=1,
                              read_timeout_secs=1) as srv:
        sock = trio.socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        await sock.connect((srv.settings.bind_host, srv.settings.bind_port))
        async with trio.SocketStream(sock) as stream:
            await stream.send_all(UPGRADE)
            head = b""
            while b"\r\n\r\n" not in head:  # the 101 first: bytes before it are refused
                head += await stream.receive_some(4096)
            assert head.startswith(b"HTTP/1.1 101")
            pings = text({"op": "ping"}) * 200
            with trio.move_on_after(15) as flooding:
                try:
                    while True:
                        await stream.send_all(pings)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
            assert not flooding.cancelled_caught, "still open after 15 s of flooding"


class SlowStorage(Storage):
    """Every batch waits `delay` seconds first (a database under load)."""

    delay = 0.0

    async def _run_transactions(self, groups: Any) -> None:
        await trio.sleep(self.delay)
        await super()._run_transactions(groups)


@sqlite_only("its slow store is a subclass of the SQLite actor; the HTTP layer it tests is "
             "the same on both stores")
async def test_a_request_the_app_answers_slowly_gets_its_answer_not_a_reset(
        tmp_path: Path) -> None:
    """The read timeout bounds how long a client may take to send; it does not bound how
    long the app may take to answer (its request timeout does). A redeem that waited on
    storage longer than the read timeout was cut off with a reset."""
    async with running_server(tmp_path, read_timeout_secs=READ_TIMEOUT,
                              tree_options={"storage_factory": SlowStorage}) as srv:
        pid = PaymentId.generate()
        await srv.pay(pid)
        SlowStorage.delay = READ_TIMEOUT * 1.5
        try:
            async with raw(srv) as stream:
                body = json.dumps({"pid": pid.hex()}).encode()
                await stream.send_all(
                    b"POST /api/v1/redeem HTTP/1.1\r\nHost: x\r\nContent-Type: "
                    b"application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
                with trio.fail_after(READ_TIMEOUT * 5):
                    head = await read_response(stream)
        finally:
            SlowStorage.delay = 0.0
        assert head.startswith(b"HTTP/1.1 200"), head[:200]
