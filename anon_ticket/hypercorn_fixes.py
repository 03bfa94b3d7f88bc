"""Workarounds for the HTTP stack (hypercorn 0.18.0, h11 0.16.0), applied by `apply()`.

Every byte a client sends is hostile until parsed (I13, I14; docs/architecture.md, "Hostile
clients"). hypercorn leaves holes there; each patch below says which upstream behaviour it
works around. They are written against exact versions: `apply()` refuses to start with a
clear message when other versions are installed, rather than patch code it has not read.

- Containment: an exception raised inside one connection (hypercorn's own bugs included)
  escapes trio's accept loop and takes the whole server, so the listener actor, down.
  Here it ends that connection only, and is logged (rate-limited).
- A websocket upgrade followed by bytes in the same write: hypercorn answers 400 while the
  app task accepts the same stream, h11 ends in its ERROR state and `LocalProtocolError`
  escapes the connection (the remote kill). Here the stream is refused before any await, the
  app is told the socket went away, and the connection is closed.
- Connections that must close were left open: the close ran in the app's task, which
  quart-trio cancels as the response ends; after a refused websocket upgrade nothing closed
  the connection; and a response write to a client that never reads waited forever
  (shielded, no timeout). Here the close is shielded, refusals close, and every write has a
  deadline.
- Deadlines for every phase: hypercorn has a keep-alive timer (idle between requests) and
  an optional per-read timeout that a client defeats by sending one byte at a time. Here a
  connection has one timer task whose deadline moves (not a task per request): idle for at
  most the keep-alive timeout, a request head complete within the read timeout of its first
  byte; the body's own deadline is the app's (`BODY_TIMEOUT`).
- A cap on connections below the descriptor limit: when it is reached, the oldest connection
  that is not inside a request (idle, or still sending its head) is closed to make room; if
  every connection is busy the new one gets a JSON 503 and is closed. accept() never meets
  EMFILE, so trio's accept loop never spins on it.
- Protocol refusals (h11's 400/431/501, the websocket handshake's 400) carry a JSON body like
  every other error; a request with both Content-Length and Transfer-Encoding (request
  smuggling) is refused, as is any HTTP version but 1.0 and 1.1. h11 limits the size of a
  request head only while it is incomplete: a head that arrives in one read was taken
  whatever its size. Here a head over 16 KiB or 100 fields is refused (431) however it came.
- No cleartext HTTP/2: hypercorn switches to h2c on `Upgrade: h2c` and on the HTTP/2 preface.
  Nothing here needs it, and it is a second protocol stack for clients to attack: the
  upgrade is ignored (served as HTTP/1.1) and the preface is refused.
- A websocket handshake whose key is not 16 bytes of base64 is refused (wsproto accepted any).
- A websocket's keepalive loop ends with its stream (hypercorn's slept a whole ping interval
  before looking, holding every graceful stop for it).
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from importlib.metadata import version
from typing import Any

import h11
import trio
from hypercorn.config import Config as HyperConfig
from hypercorn.events import Closed, RawData
from hypercorn.protocol import h11 as hyper_h11
from hypercorn.protocol.events import Body, Data, EndBody, Request, Response, StreamClosed
from hypercorn.protocol.ws_stream import ASGIWebsocketState, WSStream
from hypercorn.trio import tcp_server
from wsproto.events import Ping

from anon_ticket.errors import ConfigError
from anon_ticket.logs import get_logger

log = get_logger("web")

WRITTEN_FOR = {"hypercorn": "0.18.0", "h11": "0.16.0", "wsproto": "1.3.2"}

MAX_RECV = 2**16
MAX_HEADERS = 100  # header fields a request may carry (431 past it)
JSON = b"application/json"

STATUS_TEXT = {
    400: "bad request",
    404: "not found",
    405: "method not allowed",
    408: "request timeout",
    411: "length required",
    413: "request body too large",
    414: "request uri too long",
    415: "unsupported media type",
    431: "request header fields too large",
    500: "internal error",
    501: "not implemented",
    503: "service temporarily unavailable",
    505: "http version not supported",
}


def error_body(status: int, text: str | None = None) -> bytes:
    return json.dumps({"error": text or STATUS_TEXT.get(status, "bad request")},
                      separators=(",", ":")).encode()


# A whole response for a connection refused before its request was read (no h11 state yet).
_TOO_MANY = error_body(503, "too many connections")
REFUSAL = (b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
           b"content-length: %d\r\nretry-after: 1\r\nconnection: close\r\n\r\n%s"
           % (len(_TOO_MANY), _TOO_MANY))


@dataclass(eq=False)
class ConnectionPolicy:
    """One server's limits and its live connections (kept on its hypercorn `Config`)."""

    max_connections: int
    read_timeout: float
    write_timeout: float
    # admission order: the oldest idle connection is the first to make room
    connections: OrderedDict[Any, None] = field(default_factory=OrderedDict)
    contained: int = 0  # connections ended by an error of their own
    refused: int = 0  # connections turned away: every slot busy
    evicted: int = 0  # idle connections closed to make room
    _logged_at: float = -math.inf

    def admit(self, conn: Any) -> bool:
        if len(self.connections) >= self.max_connections:
            for other in self.connections:
                if other.idle_task.evict():
                    self.evicted += 1
                    del self.connections[other]
                    break
            else:
                self.refused += 1
                return False
        self.connections[conn] = None
        return True

    def release(self, conn: Any) -> None:
        self.connections.pop(conn, None)

    def note_contained(self, exc: BaseException) -> None:
        """Count every contained error; log at most one line a second (a client could flood
        the log otherwise)."""
        self.contained += 1
        now = time.monotonic()
        if now - self._logged_at >= 1.0:
            self._logged_at = now
            log.warning("connection ended by an error in it", error=_describe(exc),
                        contained_total=self.contained)


def policy_of(config: HyperConfig) -> ConnectionPolicy | None:
    return getattr(config, "connection_policy", None)


def _describe(exc: BaseException) -> str:
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return f"{type(exc).__name__}: {exc}"


# --- the connection timer -------------------------------------------------------------------


class ConnectionTimer:
    """A connection's deadlines (hypercorn's `TCPServer.idle_task`): one task for the
    connection's life whose deadline moves, instead of a task started and cancelled for every
    request (hypercorn's way: scheduler rounds and a cancellation per request; and quart-trio
    cancelled its start on `http.disconnect`, so idle connections were never closed).

    Idle (between requests, or before the first): closed after `keep_alive_timeout`. The
    first byte of a request head starts its own deadline, `read_timeout`: dripping bytes do
    not extend it. Inside a request the app's deadlines rule. A stop closes idle connections
    at once and leaves busy ones to finish. Nothing here has a checkpoint, so no cancel can
    lose the timer.
    """

    __slots__ = ("_armed", "_closed", "_deadline", "_head", "_scope", "_server", "_started",
                 "_wake")

    def __init__(self, server: Any) -> None:
        self._server = server  # its TCPServer
        self._armed = self._closed = self._started = self._head = False
        self._deadline = math.inf
        self._scope: trio.CancelScope | None = None
        self._wake = trio.Event()

    def _set(self, deadline: float) -> None:
        self._deadline = deadline
        if self._scope is not None:
            self._scope.deadline = deadline

    async def restart(self, task_group: Any, action: object) -> None:
        """Idle from now (`action`, hypercorn's timer body, is not used)."""
        self._armed, self._head = True, False
        self._set(trio.current_time() + self._server.config.keep_alive_timeout)
        if self._scope is None:
            if not self._started:
                self._started = True
                task_group._nursery.start_soon(self._run, name="keep-alive timer")
            else:
                self._wake.set()

    async def stop(self) -> None:
        """Inside a request: the app's deadlines rule."""
        self._armed = False
        self._set(math.inf)

    def data_received(self) -> None:
        if self._armed and not self._head:
            self._head = True
            policy = policy_of(self._server.config)
            if policy is not None:
                self._set(min(self._deadline, trio.current_time() + policy.read_timeout))

    @property
    def idle(self) -> bool:
        """Not inside a request (between requests, or sending a head): may be evicted."""
        return self._armed and not self._closed

    def evict(self) -> bool:
        """Close now if not inside a request: True if it will."""
        if not self.idle:
            return False
        self._set(-math.inf)
        self._wake.set()
        return True

    def close(self) -> None:
        """The connection is over: the task ends (it would hold the connection's nursery)."""
        self._closed = True
        self._armed = False
        if self._scope is not None:
            self._scope.cancel()
        self._wake.set()

    async def _run(self) -> None:
        server = self._server
        terminated = server.context.terminated
        while not self._closed:
            if not self._armed:
                await self._wake.wait()
                self._wake = trio.Event()
                continue
            with trio.CancelScope(deadline=self._deadline) as self._scope:
                await terminated.wait()
            self._scope = None
            if self._armed and not self._closed and (
                    terminated.is_set() or trio.current_time() >= self._deadline):
                with trio.CancelScope(shield=True):
                    await server._initiate_server_close()
                return


# --- TCPServer: containment, admission, reads and writes with deadlines ---------------------

_tcp_init = tcp_server.TCPServer.__init__
_tcp_run = tcp_server.TCPServer.run
_tcp_protocol_send = tcp_server.TCPServer.protocol_send
_tcp_close = tcp_server.TCPServer._close


def _init(self: Any, *args: Any) -> None:
    _tcp_init(self, *args)
    self.idle_task = ConnectionTimer(self)


async def _run(self: Any) -> None:
    """One connection, start to end: admitted under the cap, and nothing it raises gets
    past it (I13)."""
    policy = policy_of(self.config)
    if policy is not None and not policy.admit(self):
        await _refuse(self.stream)
        return
    try:
        await _tcp_run(self)
    except BaseException as exc:
        cancelled, errors = _split(exc)
        if errors is None:
            raise
        if policy is not None:
            policy.note_contained(errors)
        with trio.CancelScope(shield=True):
            await _abort(self.stream)
        if cancelled is not None:
            raise cancelled from None
    finally:
        self.idle_task.close()
        if policy is not None:
            policy.release(self)
        # The connection is over: break its cycles (server <-> timer, server <-> protocol)
        # so it is freed at once rather than by a full collection.
        self.idle_task._server = None
        self.protocol = None


def _split(exc: BaseException) -> tuple[BaseException | None, BaseException | None]:
    """(what must propagate, what is the connection's own error)."""
    if isinstance(exc, BaseExceptionGroup):
        errors, rest = exc.split(Exception)
        return rest, errors
    if isinstance(exc, Exception):
        return None, exc
    return exc, None


async def _abort(stream: Any) -> None:
    try:
        await stream.aclose()
    except Exception:
        pass


async def _refuse(stream: Any) -> None:
    with trio.move_on_after(1.0):
        try:
            await stream.send_all(REFUSAL)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
    await _abort(stream)


async def _close(self: Any) -> None:
    """hypercorn closes a connection that must close (`Connection: close`, a body left
    unread) from whichever task finished the response, often the app's, which quart-trio
    cancels as the response ends: the close was cancelled and the connection stayed open.
    Closing a socket does not block, so it is shielded."""
    with trio.CancelScope(shield=True):
        await _tcp_close(self)


async def _read_data(self: Any) -> None:
    """hypercorn's read loop, telling the timer when bytes arrive (the head's deadline).

    Handing what arrived to the app waits while the app does not take it (its queue is
    full), and hypercorn waited forever: a websocket client that floods a connection whose
    handler has ended (dropped as a slow consumer, its close frame unwritable) kept it open
    for as long as it kept sending. Now the app must take each read within the read timeout,
    or the connection ends."""
    timer = self.idle_task
    policy = policy_of(self.config)
    limit = policy.read_timeout if policy is not None else math.inf
    try:
        while True:
            try:
                data = await self.stream.receive_some(MAX_RECV)
            except (trio.ClosedResourceError, trio.BrokenResourceError):
                break
            if data:
                timer.data_received()
            with trio.move_on_after(limit) as handed:
                await self.protocol.handle(RawData(bytes(data)))
            if handed.cancelled_caught:
                with trio.CancelScope(shield=True):
                    await _abort(self.stream)
                break
            if not data:
                break
        await self.protocol.handle(Closed())
    finally:
        timer.close()  # its task would hold the connection's nursery open


async def _protocol_send(self: Any, event: Any) -> None:
    """hypercorn's write is shielded from cancellation (a half-sent response would corrupt
    the stream) with no deadline: a client that never reads held the connection forever.
    Now a write that does not finish within the write timeout, or by its caller's deadline,
    ends the connection (a half-written frame leaves nothing else to do)."""
    if not isinstance(event, RawData):
        await _tcp_protocol_send(self, event)
        return
    policy = policy_of(self.config)
    limit = policy.write_timeout if policy is not None else math.inf
    # The caller's own deadline counts too (a websocket's send timeout): explicit cancels
    # (quart-trio's, as a response ends) do not cut a response short, deadlines do.
    deadline = min(trio.current_time() + limit, trio.current_effective_deadline())
    async with self.send_lock:
        broken = False
        try:
            with trio.CancelScope(shield=True, deadline=deadline) as scope:
                await self.stream.send_all(event.data)
            broken = scope.cancelled_caught
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            broken = True
        if broken:
            await self.protocol.handle(Closed())
            with trio.CancelScope(shield=True):
                await _abort(self.stream)  # ends the read loop too


# --- h11: JSON refusals, no smuggling, HTTP/1.x only -----------------------------------------

_create_stream = hyper_h11.H11Protocol._create_stream


async def _send_error_response(self: Any, status_code: int) -> None:
    body = error_body(status_code)
    await self._send_h11_event(h11.Response(
        status_code=status_code,
        headers=[(b"content-type", JSON), (b"content-length", b"%d" % len(body)),
                 (b"connection", b"close"), *self.config.response_headers("h11")]))
    await self._send_h11_event(h11.Data(data=body))
    await self._send_h11_event(h11.EndOfMessage())


async def _check_protocol(self: Any, event: h11.Request) -> None:
    """No switch to cleartext HTTP/2: `Upgrade: h2c` is ignored (RFC 9110 lets a server
    ignore an upgrade) and the preface is refused in `_create_stream` (not HTTP/1.x)."""


async def _create_stream_checked(self: Any, request: h11.Request) -> None:
    status = None
    if request.http_version not in (b"1.0", b"1.1"):
        status = 505
    elif (len(request.headers) > MAX_HEADERS or len(request.target) + sum(
            len(name) + len(value) + 4 for name, value in request.headers)
            > self.config.h11_max_incomplete_size):
        status = 431  # h11 limits only a head that arrives in pieces, not one read whole
    else:
        names = {name for name, _ in request.headers}  # h11 lower-cases them
        if b"content-length" in names and b"transfer-encoding" in names:
            status = 400  # two framings: how requests are smuggled past a proxy
    if status is None:
        await _create_stream(self, request)
        return
    await self._send_error_response(status)
    await self.send(Closed())


# --- websockets -----------------------------------------------------------------------------

_ws_handle = WSStream.handle


async def _ws_send_error_response(self: Any, status_code: int) -> None:
    body = error_body(status_code)
    await self.send(Response(
        stream_id=self.stream_id, status_code=status_code,
        headers=[(b"content-type", JSON), (b"content-length", b"%d" % len(body)),
                 (b"connection", b"close")]))
    await self.send(Body(stream_id=self.stream_id, data=body))
    await self.send(EndBody(stream_id=self.stream_id))


async def _ws_refused(self: Any) -> None:
    """After a refusal: the app (if it started) hears the socket went away, and the
    connection closes (hypercorn left it open, its app task waiting forever)."""
    if self.app_put is not None:
        await self.app_put({"type": "websocket.disconnect", "code": 1006})
    await self.send(StreamClosed(stream_id=self.stream_id))


def _valid_key(headers: list[tuple[bytes, bytes]]) -> bool:
    """RFC 6455: one Sec-WebSocket-Key, 16 random bytes in base64 (wsproto takes any)."""
    keys = [value for name, value in headers if name.lower() == b"sec-websocket-key"]
    if len(keys) != 1:
        return False
    try:
        return len(base64.b64decode(keys[0].strip(), validate=True)) == 16
    except binascii.Error:
        return False


async def _ws_handle_checked(self: Any, event: Any) -> None:
    if isinstance(event, Request) and not _valid_key(event.headers):
        self.closed = True
        await self._send_error_response(400)
        await _ws_refused(self)
        return
    if isinstance(event, StreamClosed):
        scope = getattr(self, "_ping_scope", None)
        if scope is not None:
            scope.cancel()  # the keepalive ends with the stream
    elif (isinstance(event, (Body, Data)) and not self.closed
          and self.state == ASGIWebsocketState.HANDSHAKE):
        # Frames before the 101 (RFC 6455 forbids them). Closed before any await, so the
        # app's accept, which may run meanwhile, is a no-op rather than a second response.
        self.closed = True
        await self._send_error_response(400)
        await _ws_refused(self)
        return
    refused_before = self.closed
    await _ws_handle(self, event)
    if isinstance(event, Request) and self.closed and not refused_before:
        await _ws_refused(self)  # a bad handshake or host: refused, so close it


async def _send_pings(self: Any) -> None:
    """hypercorn's keepalive loop, ended by the stream's close (`_ws_handle_checked`)."""
    with trio.CancelScope() as self._ping_scope:
        while not self.closed:
            await self._send_wsproto_event(Ping())
            await self.context.sleep(self.config.websocket_ping_interval)


# --- applying them --------------------------------------------------------------------------

_applied = False


def check_versions() -> None:
    wrong = [f"{name} {version(name)} is installed; these fixes were written for {want}"
             for name, want in WRITTEN_FOR.items() if version(name) != want]
    if wrong:
        raise ConfigError([*wrong, "install the pinned versions (scripts/setup.sh) or review "
                           "anon_ticket/hypercorn_fixes.py against the new ones"])


def apply() -> None:
    """Patch hypercorn once per process (idempotent); refuses other versions."""
    global _applied
    if _applied:
        return
    check_versions()
    tcp = tcp_server.TCPServer
    tcp.__init__ = _init  # type: ignore[method-assign,assignment]
    tcp.run = _run  # type: ignore[method-assign]
    tcp._read_data = _read_data  # type: ignore[method-assign]
    tcp.protocol_send = _protocol_send  # type: ignore[method-assign]
    tcp._close = _close  # type: ignore[method-assign]
    h11p = hyper_h11.H11Protocol
    h11p._send_error_response = _send_error_response  # type: ignore[method-assign]
    h11p._check_protocol = _check_protocol  # type: ignore[method-assign]
    h11p._create_stream = _create_stream_checked  # type: ignore[method-assign]
    WSStream.handle = _ws_handle_checked  # type: ignore[method-assign]
    WSStream._send_error_response = _ws_send_error_response  # type: ignore[method-assign]
    WSStream._send_pings = _send_pings  # type: ignore[method-assign]
    _applied = True
