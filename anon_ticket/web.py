"""HTTP plumbing shared by the listeners: sockets we bind ourselves, JSON errors, hypercorn.

Sockets (I9): hypercorn would unlink whatever sits at a `unix:` path and set modes through the
process umask, so we bind the socket ourselves and hand hypercorn the file descriptor. Only a
stale socket (S_ISSOCK and connection refused) is removed; a live one or any other file is an
error. The mapping of errors to HTTP responses lives here alone (I10).

hypercorn is pinned (0.18.0) and patched by `anon_ticket.hypercorn_fixes`, applied here when
a listener starts: containment of every connection's errors, deadlines for every phase of a
request, a connection cap below the descriptor limit, JSON refusals, HTTP/1.x only.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import stat
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any

import trio
from hypercorn.config import Config as HyperConfig
from hypercorn.trio import serve as hyper_serve
from quart import Response
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from anon_ticket import hypercorn_fixes
from anon_ticket.errors import (
    AnonTicketError,
    ConfigError,
    InvalidInput,
    NotFound,
    Unavailable,
)
from anon_ticket.hypercorn_fixes import STATUS_TEXT, ConnectionPolicy
from anon_ticket.logs import get_logger
from anon_ticket.metrics import Metrics

log = get_logger("web")

MAX_UNIX_PATH = 107
KEEP_ALIVE_SECS = 30.0  # an idle keep-alive connection is closed after this long
READ_TIMEOUT_SECS = 10.0  # a request's head, and then its body, must arrive within this
LISTEN_BACKLOG = 4096  # connections waiting to be accepted (capped by net.core.somaxconn)
WRITE_TIMEOUT_SECS = 10.0  # a response not taken by the client within this ends it
JSON = "application/json"

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


class _App(QuartTrio):
    def log_exception(self, exception_info: tuple[type, BaseException, TracebackType]
                      | tuple[None, None, None]) -> None:
        """Quart's own logs "Exception on request GET <path>" and a traceback for an
        exception that got past the error handlers: token paths are in URLs, and logs never
        hold a token (I10). The type is enough to find the bug."""
        log.error("unhandled error", error=type(exception_info[1]).__name__)


def new_app(name: str, *, max_body_bytes: int, read_timeout: float = READ_TIMEOUT_SECS
            ) -> QuartTrio:
    """A quart-trio app as the listeners serve them: JSON errors everywhere, a body deadline,
    and no redirects (werkzeug merges `//` and redirects to a URL built from the client's
    Host header: a client that followed it would send its payment id elsewhere)."""
    app = _App(name, static_folder=None)  # quart would serve ./static from the cwd
    app.config["MAX_CONTENT_LENGTH"] = max_body_bytes
    app.config["BODY_TIMEOUT"] = read_timeout
    app.url_map.merge_slashes = False
    app.url_map.redirect_defaults = False
    _install_error_handlers(app)
    return app


def _install_error_handlers(app: QuartTrio) -> None:
    """JSON bodies for our errors and for the framework's own 4xx/5xx (Quart's are HTML)."""

    @app.errorhandler(HTTPException)
    async def _http(exc: HTTPException) -> Response:
        code = exc.code or 500
        if 300 <= code < 400:
            code = 404  # a routing redirect: never sent (see new_app)
        response = json_error(code, STATUS_TEXT.get(code, "bad request" if code < 500
                                                    else "error"))
        if code == 405 and getattr(exc, "valid_methods", None):
            response.headers["Allow"] = ", ".join(sorted(exc.valid_methods))  # type: ignore[attr-defined]
        return response

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


def check_socket_path(path: Path) -> bool:
    """Whether `path` is free to bind: True for nothing there, False for a stale socket
    (nobody listens: it may be replaced); ConfigError for a live socket or any other file.
    Changes nothing (the start-up checks use it too)."""
    check_unix_path(path, "socket")
    try:
        st = path.lstat()
    except (FileNotFoundError, NotADirectoryError):
        return True  # nothing there (a bad directory is the data directory's check)
    except OSError as exc:
        raise ConfigError([f"cannot look at {path}: {exc.strerror}"]) from None
    if not stat.S_ISSOCK(st.st_mode):
        raise ConfigError([f"{path} exists and is not a socket; refusing to replace it"])
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except ConnectionRefusedError:
        return False
    except OSError as exc:
        raise ConfigError([f"cannot probe socket {path}: {exc.strerror}"]) from None
    finally:
        probe.close()
    raise ConfigError([f"{path} is a live socket: another process listens there"])


def _remove_if_stale(path: Path) -> None:
    if not check_socket_path(path):
        log.info("removing stale socket", path=str(path))
        path.unlink()


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
    sock.listen(LISTEN_BACKLOG)
    sock.setblocking(False)
    return sock


class PortInUse(ConfigError):
    """EADDRINUSE: another process listens on the address (perhaps one about to exit)."""


def bind_tcp(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise PortInUse([f"{host}:{port} is already in use"]) from None
        raise ConfigError([f"cannot bind {host}:{port}: {exc.strerror}"]) from None
    sock.listen(LISTEN_BACKLOG)
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
                    keep_alive_timeout: float = KEEP_ALIVE_SECS,
                    read_timeout: float = READ_TIMEOUT_SECS,
                    write_timeout: float = WRITE_TIMEOUT_SECS,
                    max_connections: int = 1024,
                    stats: tuple[Metrics, str] | None = None) -> None:
    """Serve `app` on `sock` with the project's hypercorn fixes and connection policy;
    `stats` (metrics, listener name) publishes the policy's counts."""
    hypercorn_fixes.apply()
    cfg = HyperConfig()
    policy = ConnectionPolicy(max_connections, read_timeout, write_timeout)
    cfg.connection_policy = policy  # type: ignore[attr-defined]
    if stats is not None:
        metrics, listener = stats
        metrics.connections.policies[listener] = policy
    # hypercorn wraps the descriptor in a socket object it closes itself: give it a duplicate
    # so our socket (and the unix path it guards) stays ours to close.
    cfg.bind = [f"fd://{os.dup(sock.fileno())}"]
    # hypercorn listens again with its own backlog (100): a burst of new connections past it
    # was answered with resets. The kernel caps this at net.core.somaxconn.
    cfg.backlog = LISTEN_BACKLOG
    cfg.accesslog = None  # token paths are in URLs: no access log
    cfg.errorlog = logging.getLogger("hypercorn.error")
    cfg.graceful_timeout = grace
    cfg.include_server_header = False
    cfg.keep_alive_timeout = keep_alive_timeout
    cfg.websocket_ping_interval = ws_ping_interval
    cfg.websocket_max_message_size = ws_max_message
    await hyper_serve(app, cfg, shutdown_trigger=shutdown, task_status=task_status)
