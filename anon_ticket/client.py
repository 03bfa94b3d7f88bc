"""Client commands against a running server's public API: redeem, token show, watch.

Exit codes: 0 ok, 1 failure (unreachable, 5xx), 2 bad input (400), 3 not found (404),
4 timed out (`watch --timeout` before `--until` was reached).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import httpx
import trio
from trio_websocket import ConnectionClosed, HandshakeError, open_websocket_url

from anon_ticket.domain.ids import PaymentId, ServiceToken
from anon_ticket.errors import InvalidInput

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_NOT_FOUND, EXIT_TIMEOUT = 0, 1, 2, 3, 4
DEFAULT_URL = "http://127.0.0.1:8080"
REACHED = {
    "claimable": {"claimable", "claimed", "revoked"},
    "claimed": {"claimed", "revoked"},
}
EVENT_STATUS = {"payment_confirmed": "claimable", "claimed": "claimed", "revoked": "revoked"}


def add_client_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    r = sub.add_parser("redeem", help="redeem a payment id for its service token")
    r.add_argument("pid", metavar="PID", help="the payment id (16 hex)")
    r.add_argument("--url", default=DEFAULT_URL, help=f"public API (default {DEFAULT_URL})")
    t = sub.add_parser("token", help="service tokens").add_subparsers(dest="token_cmd",
                                                                       required=True)
    show = t.add_parser("show", help="introspect a service token")
    show.add_argument("token", metavar="TOKEN", help="the service token (64 hex)")
    show.add_argument("--url", default=DEFAULT_URL, help=f"public API (default {DEFAULT_URL})")
    w = sub.add_parser("watch", help="follow a payment id or token live (websocket)")
    w.add_argument("key", metavar="PID|TOKEN", help="a payment id (16 hex) or a token (64 hex)")
    w.add_argument("--url", default=DEFAULT_URL, help=f"public API (default {DEFAULT_URL})")
    w.add_argument("--until", choices=sorted(REACHED), help="exit 0 once this is reached")
    w.add_argument("--timeout", type=float, help="give up after this many seconds (exit 4)")


def _http_exit(resp: httpx.Response) -> int:
    if resp.status_code == 200:
        return EXIT_OK
    if resp.status_code == 404:
        return EXIT_NOT_FOUND
    return EXIT_USAGE if 400 <= resp.status_code < 500 else EXIT_FAILURE


def _show(resp: httpx.Response) -> int:
    try:
        body = resp.json()
    except ValueError:
        body = {"error": f"HTTP {resp.status_code}"}
    out = sys.stdout if resp.status_code == 200 else sys.stderr
    print(json.dumps(body, sort_keys=True), file=out)
    return _http_exit(resp)


def redeem(pid: str, url: str) -> int:
    try:
        resp = httpx.post(f"{url.rstrip('/')}/api/v1/redeem", json={"pid": pid}, timeout=30)
    except httpx.TransportError as exc:
        print(f"anon-ticket: cannot reach {url}: {type(exc).__name__}", file=sys.stderr)
        return EXIT_FAILURE
    return _show(resp)


def token_show(token: str, url: str) -> int:
    try:
        resp = httpx.get(f"{url.rstrip('/')}/api/v1/token/{token}", timeout=30)
    except httpx.TransportError as exc:
        print(f"anon-ticket: cannot reach {url}: {type(exc).__name__}", file=sys.stderr)
        return EXIT_FAILURE
    return _show(resp)


def _subscription(key: str) -> dict[str, Any]:
    if len(key) == 64:
        return {"op": "subscribe", "token": ServiceToken.parse(key).hex()}
    return {"op": "subscribe", "pid": PaymentId.parse(key).hex()}


def _ws_url(url: str) -> str:
    base = url.rstrip("/")
    if base.startswith("https://"):
        return "wss://" + base[len("https://"):] + "/api/v1/watch"
    if base.startswith("http://"):
        return "ws://" + base[len("http://"):] + "/api/v1/watch"
    raise InvalidInput(f"invalid url: {url} (use http://host:port)")


class _Watch:
    """Follow one key; after a dropped connection, resume from the last seq seen."""

    def __init__(self, key: str, url: str, until: str | None) -> None:
        self.subscribe = _subscription(key)
        self.url = _ws_url(url)
        self.until = until
        self.seq: int | None = None
        self.epoch: int | None = None
        self.reached = False

    def _done(self, status: str | None) -> bool:
        return self.until is not None and status in REACHED[self.until]

    async def run(self) -> None:
        delay = 0.5
        while not self.reached:
            try:
                await self._connection()
                delay = 0.5
            except (OSError, HandshakeError, ConnectionClosed, trio.TooSlowError) as exc:
                reason = getattr(exc, "reason", None)
                print(f"anon-ticket: connection lost ({reason or type(exc).__name__}); "
                      "reconnecting", file=sys.stderr)
            if not self.reached:
                await trio.sleep(delay)
                delay = min(delay * 2, 10.0)

    async def _connection(self) -> None:
        # A short handshake timeout: a server that is stopping may still hold its listening
        # socket (connections wait in its backlog) while its grace period runs.
        async with open_websocket_url(self.url, connect_timeout=5, disconnect_timeout=2) as ws:
            request = dict(self.subscribe)
            if self.seq is not None and self.epoch is not None:
                request.update(since=self.seq, epoch=self.epoch)
            await ws.send_message(json.dumps(request))
            while True:
                message = json.loads(await ws.get_message())
                print(json.dumps(message, sort_keys=True), flush=True)
                kind = message.get("type")
                if kind == "error":
                    raise InvalidInput(message.get("error", "error"))
                if "seq" in message:
                    self.seq, self.epoch = message["seq"], message["epoch"]
                status = message.get("status") if kind == "state" else EVENT_STATUS.get(kind)
                if self._done(status):
                    self.reached = True
                    return


def watch(key: str, url: str, until: str | None, timeout: float | None) -> int:
    try:
        follower = _Watch(key, url, until)
    except InvalidInput as exc:
        print(f"anon-ticket: {exc}", file=sys.stderr)
        return EXIT_USAGE

    async def main() -> int:
        with trio.move_on_after(timeout if timeout is not None else float("inf")):
            try:
                await follower.run()
            except InvalidInput as exc:
                print(f"anon-ticket: {exc}", file=sys.stderr)
                return EXIT_NOT_FOUND if "not found" in str(exc) else EXIT_USAGE
            return EXIT_OK
        return EXIT_TIMEOUT

    return trio.run(main)


def run_client(args: argparse.Namespace) -> int:
    if args.command == "redeem":
        return redeem(args.pid, args.url)
    if args.command == "token":
        return token_show(args.token, args.url)
    return watch(args.key, args.url, args.until, args.timeout)
