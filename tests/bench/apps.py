"""The stack's ceilings: what hypercorn's trio worker (and quart-trio on it) can do at best.

`python -m tests.bench.apps quart|raw|hop HOST:PORT` serves one of these trivial apps exactly
as the public listener serves ours: a socket bound by `anon_ticket.web.bind_tcp`, handed to
hypercorn by `anon_ticket.web.serve_app` (same worker, same hypercorn settings), stopped by
SIGTERM. The benchmark pins it to the same core as the real server.

- `quart`: a quart-trio JSON POST endpoint that reads the body, parses it and returns a small
  JSON object, the way our redeem handler reads and answers (no filter, no storage).
- `raw`: a bare ASGI callable on the same worker doing the same (no framework at all).
- `hop`: the `quart` endpoint plus one round trip through our `Mailbox` to an actor task that
  answers at once: what one mailbox hop costs inside a request (the redeem path makes one for
  the filter, and one more for storage on a claim).
"""

from __future__ import annotations

import json
import signal
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import trio
from quart import Response, request
from quart_trio import QuartTrio

from anon_ticket import gctune
from anon_ticket.web import bind_tcp, serve_app
from mailboxes import Envelope, Mailbox

PATH = "/echo"
MAX_BODY = 4096
_JSON = "application/json"


def _answer(body: bytes | str) -> bytes:
    try:
        data = json.loads(body) if body else {}
    except ValueError:
        data = {}
    pid = data.get("pid") if isinstance(data, dict) else None
    return json.dumps({"status": "ok", "pid": pid}, separators=(",", ":")).encode()


def quart_app() -> QuartTrio:
    app = QuartTrio("tests.bench.ceiling")
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY

    @app.post(PATH)
    async def echo() -> Response:
        body = await request.get_data(cache=False)
        return Response(_answer(body), status=200, content_type=_JSON)

    return app


class Echo:
    """The hop's request: a body, answered with the endpoint's JSON. `_message` and `_reply`
    state its type for the mailbox (the actor protocol reads requests structurally); they
    are never called."""

    __slots__ = ("body",)

    def __init__(self, body: bytes | str) -> None:
        self.body = body

    def _message(self) -> Echo:
        raise NotImplementedError

    def _reply(self) -> bytes:
        raise NotImplementedError


def hop_app(box: Mailbox[Echo]) -> QuartTrio:
    app = QuartTrio("tests.bench.hop")
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY

    @app.post(PATH)
    async def echo() -> Response:
        body = await request.get_data(cache=False)
        answer: bytes = await box.ask(Echo(body), 5.0)
        return Response(answer, status=200, content_type=_JSON)

    return app


async def echo_actor(box: Mailbox[Echo]) -> None:
    env: Envelope[Echo]
    async for env in box.inbox:
        env.reply(_answer(env.msg.body))


Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


async def raw_app(scope: dict[str, Any], receive: Receive, send: Send) -> None:
    if scope["type"] == "lifespan":  # hypercorn requires it of a raw app
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] != "http":
        return
    chunks: list[bytes] = []
    more = True
    while more:
        message = await receive()
        chunks.append(message.get("body", b""))
        more = bool(message.get("more_body", False))
    if scope["path"] != PATH or scope["method"] != "POST":
        out, status = b'{"error":"not found"}', 404
    else:
        out, status = _answer(b"".join(chunks)), 200
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", _JSON.encode()),
                            (b"content-length", str(len(out)).encode())]})
    await send({"type": "http.response.body", "body": out})


async def _serve(kind: str, host: str, port: int) -> None:
    box: Mailbox[Echo] = Mailbox("echo", 4096)
    box.serving = True
    app: Any = quart_app() if kind == "quart" else hop_app(box) if kind == "hop" else raw_app
    sock = bind_tcp(host, port)
    stop = trio.Event()

    async def watch_signals() -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for _ in signals:
                stop.set()
                return

    # The server's collector settings: the comparison is of code, not of GC settings (with
    # Python's default this app spends 11-12% of its CPU in the collector, the server as much).
    gctune.settle()
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch_signals)
            if kind == "hop":
                nursery.start_soon(echo_actor, box)
            await serve_app(app, sock, grace=1.0, shutdown=stop.wait)
            nursery.cancel_scope.cancel()
    finally:
        sock.close()


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("quart", "raw", "hop"):
        print("usage: python -m tests.bench.apps quart|raw|hop HOST:PORT",
              file=sys.stderr)
        return 2
    host, _, port = argv[1].rpartition(":")
    trio.run(_serve, argv[0], host, int(port))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
