"""HTTP plumbing shared by the listeners: sockets we bind ourselves, JSON errors, hypercorn.

Sockets (I9): hypercorn would unlink whatever sits at a `unix:` path and set modes through the
process umask, so we bind the socket ourselves and hand hypercorn the file descriptor. Only a
stale socket (S_ISSOCK and connection refused) is removed; a live one or any other file is an
error. The mapping of errors to HTTP responses lives here alone (I10).

hypercorn is pinned (0.18.0) and patched below, each patch explained where it is made: a
websocket's keepalive loop ends with its stream, and a connection's keep-alive timer is one
task whose deadline moves rather than a task started and cancelled for every request.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import socket
import stat
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import trio
from hypercorn.config import Config as HyperConfig
from hypercorn.protocol.events import StreamClosed
from hypercorn.protocol.ws_stream import WSStream
from hypercorn.trio import serve as hyper_serve
from hypercorn.trio import tcp_server
from quart import Response
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException
from wsproto.events import Ping

from anon_ticket.errors import (
    AnonTicketError,
    ConfigError,
    InvalidInput,
    NotFound,
    Unavailable,
)
from anon_ticket.logs import get_logger

log = get_logger("web")

MAX_UNIX_PATH = 107
KEEP_ALIVE_SECS = 30.0  # an idle keep-alive connection is closed after this long
JSON = "application/json"

_HTTP_TEXT = {
    400: "bad request",
    404: "not found",
    405: "method not allowed",
    408: "request timeout",
    411: "length required",
    413: "request body too large",
    414: "request uri too long",
    415: "unsupported media type",
    431: "request header fields too large",
}


async def _send_pings(self: Any) -> None:
    """hypercorn 0.18's websocket keepalive loop, but it ends when its stream closes: the
    original sleeps a whole ping interval (20 s) before it looks, and the connection, and so
    a graceful stop, waits for it (every stop with watchers waited out the whole grace
    period). Closing the stream cancels this scope (`_handle` below): an idle watcher costs
    one wake-up per ping interval, nothing more."""
    with trio.CancelScope() as self._ping_scope:
        while not self.closed:
            await self._send_wsproto_event(Ping())
            await self.context.sleep(self.config.websocket_ping_interval)


_ws_handle = WSStream.handle


async def _handle(self: Any, event: Any) -> None:
    """Once a stream is accepted (the keepalive starts there), only `StreamClosed` closes it;
    it ends the keepalive before hypercorn awaits the app's disconnect event. (A stream closed
    before the keepalive starts is seen by its `while not self.closed`.)"""
    if isinstance(event, StreamClosed):
        scope = getattr(self, "_ping_scope", None)
        if scope is not None:
            scope.cancel()
    await _ws_handle(self, event)


class _IdleTimer:
    """hypercorn's keep-alive timer for one connection (`TCPServer.idle_task`): one task for
    the connection's life whose deadline moves, instead of a task started and cancelled for
    every request.

    hypercorn starts a task (`nursery.start`) each time a connection goes idle and cancels it
    when the next request arrives: scheduler round trips and a cancellation for every
    request. Here going idle sets a deadline and going busy lifts it; neither wakes anything
    and neither has a checkpoint, so a cancelled request task cannot lose the timer either
    (quart-trio cancels the request task on `http.disconnect`, in the very call chain that
    starts the timer: with hypercorn's own timer, idle connections were never closed). Same
    rules as hypercorn's: an idle connection is closed once `keep_alive_timeout` passes, or
    at once when the server stops; a busy one is left to finish.
    """

    __slots__ = ("_armed", "_closed", "_deadline", "_scope", "_server", "_started", "_wake")

    def __init__(self, server: Any) -> None:
        self._server = server  # its TCPServer
        self._armed = self._closed = self._started = False
        self._deadline = math.inf
        self._scope: trio.CancelScope | None = None
        self._wake = trio.Event()

    async def restart(self, task_group: Any, action: object) -> None:
        """Idle from now (`action`, hypercorn's timer body, is not used)."""
        self._armed = True
        self._deadline = trio.current_time() + self._server.config.keep_alive_timeout
        if self._scope is not None:
            self._scope.deadline = self._deadline
        elif not self._started:
            self._started = True
            task_group._nursery.start_soon(self._run, name="keep-alive timer")
        else:
            self._wake.set()

    async def stop(self) -> None:
        self._armed = False
        if self._scope is not None:
            self._scope.deadline = math.inf

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


_tcp_init = tcp_server.TCPServer.__init__
_read_data = tcp_server.TCPServer._read_data


def _init_with_timer(self: Any, *args: Any) -> None:
    _tcp_init(self, *args)
    self.idle_task = _IdleTimer(self)


async def _read_data_then_end_timer(self: Any) -> None:
    try:
        await _read_data(self)
    finally:
        self.idle_task.close()


# hypercorn pinned at 0.18.0
WSStream._send_pings = _send_pings  # type: ignore[method-assign]
WSStream.handle = _handle  # type: ignore[method-assign]
tcp_server.TCPServer.__init__ = _init_with_timer  # type: ignore[method-assign,assignment]
tcp_server.TCPServer._read_data = _read_data_then_end_timer  # type: ignore[method-assign]


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None
                  ) -> Response:
    return Response(json.dumps(body, separators=(",", ":")), status=status,
                    content_type=JSON, headers=headers)


def json_error(status: int, text: str, retry_after: int | None = None) -> Response:
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
    return json_response({"error": text}, status, headers)


def error_response(exc: AnonTicketError) -> Response:
    """The one mapping from our errors to HTTP."""
    if isinstance(exc, InvalidInput):
        return json_error(400, str(exc))
    if isinstance(exc, NotFound):
        return json_error(404, str(exc) or "not found")
    if isinstance(exc, Unavailable):
        return json_error(503, "service temporarily unavailable", exc.retry_after)
    log.error("internal error", error=type(exc).__name__)
    return json_error(500, "internal error")


def install_error_handlers(app: QuartTrio) -> None:
    """JSON bodies for our errors and for the framework's own 4xx/5xx (Quart's are HTML)."""

    @app.errorhandler(HTTPException)
    async def _http(exc: HTTPException) -> Response:
        code = exc.code or 500
        return json_error(code, _HTTP_TEXT.get(code, "bad request" if code < 500 else "error"))

    @app.errorhandler(AnonTicketError)
    async def _ours(exc: AnonTicketError) -> Response:
        return error_response(exc)

    @app.errorhandler(Exception)
    async def _bug(exc: Exception) -> Response:
        log.error("unhandled error", error=type(exc).__name__)
        return json_error(500, "internal error")


async def read_json_object(request: Any) -> dict[str, Any]:
    """The body as a JSON object, or InvalidInput with a clear reason (never a traceback).

    The size limit is the app's MAX_CONTENT_LENGTH (413), for chunked bodies too."""
    if request.mimetype != JSON:
        raise InvalidInput("invalid request: content type must be application/json")
    body = await request.get_data(cache=False)
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        raise InvalidInput("invalid request: body is not valid JSON") from None
    if not isinstance(data, dict):
        raise InvalidInput("invalid request: body must be a JSON object")
    return data


# --- sockets --------------------------------------------------------------------------------


def check_unix_path(path: Path, what: str) -> None:
    if len(os.fsencode(path)) > MAX_UNIX_PATH:
        raise ConfigError([f"{what}: unix socket path {path} is longer than {MAX_UNIX_PATH} "
                           "bytes; choose a shorter path"])


def _remove_if_stale(path: Path) -> None:
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ConfigError([f"{path} exists and is not a socket; refusing to replace it"])
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except ConnectionRefusedError:
        log.info("removing stale socket", path=str(path))
        path.unlink()
        return
    except OSError as exc:
        raise ConfigError([f"cannot probe socket {path}: {exc.strerror}"]) from None
    finally:
        probe.close()
    raise ConfigError([f"{path} is a live socket: another process listens there"])


def bind_unix(path: Path, mode: int, dir_mode: int | None = None) -> socket.socket:
    """Bind and listen on a unix socket with exactly `mode` (independent of the umask)."""
    check_unix_path(path, "socket")
    path.parent.mkdir(parents=True, exist_ok=True)
    if dir_mode is not None:
        os.chmod(path.parent, dir_mode)
    _remove_if_stale(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o777 ^ mode)
    try:
        sock.bind(str(path))
    except OSError:
        sock.close()
        raise
    finally:
        os.umask(old)
    os.chmod(path, mode)
    sock.listen(1024)
    sock.setblocking(False)
    return sock


def bind_tcp(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise ConfigError([f"{host}:{port} is already in use"]) from None
        raise ConfigError([f"cannot bind {host}:{port}: {exc.strerror}"]) from None
    sock.listen(1024)
    sock.setblocking(False)
    return sock


@contextmanager
def listening_socket(*, unix_path: Path | None, mode: int = 0o600, dir_mode: int | None = None,
                     host: str | None = None, port: int | None = None
                     ) -> Iterator[socket.socket]:
    """A listening socket of ours for one listener run: on a unix path (exact mode, stale
    socket only replaced) or TCP; closed, and its path removed, when the run ends."""
    if unix_path is not None:
        sock = bind_unix(unix_path, mode, dir_mode=dir_mode)
    else:
        assert host is not None and port is not None
        sock = bind_tcp(host, port)
    try:
        yield sock
    finally:
        sock.close()
        if unix_path is not None:
            unix_path.unlink(missing_ok=True)


def describe_socket(sock: socket.socket) -> str:
    if sock.family == socket.AF_UNIX:
        return f"unix:{sock.getsockname()}"
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


async def serve_app(app: QuartTrio, sock: socket.socket, *, grace: float,
                    shutdown: Callable[[], Awaitable[None]],
                    task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED,
                    ws_ping_interval: float | None = None,
                    ws_max_message: int = 16 * 1024,
                    keep_alive_timeout: float = KEEP_ALIVE_SECS) -> None:
    cfg = HyperConfig()
    # hypercorn wraps the descriptor in a socket object it closes itself: give it a duplicate
    # so our socket (and the unix path it guards) stays ours to close.
    cfg.bind = [f"fd://{os.dup(sock.fileno())}"]
    cfg.accesslog = None  # token paths are in URLs: no access log
    cfg.errorlog = logging.getLogger("hypercorn.error")
    cfg.graceful_timeout = grace
    cfg.include_server_header = False
    cfg.keep_alive_timeout = keep_alive_timeout
    cfg.websocket_ping_interval = ws_ping_interval
    cfg.websocket_max_message_size = ws_max_message
    await hyper_serve(app, cfg, shutdown_trigger=shutdown, task_status=task_status)
