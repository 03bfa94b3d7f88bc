"""The adversary suite: a catalog of attacks run against a live anon-ticket server.

Each attack says what the server must do (expected) and what it did (observed); the suite
passes only if every attack fails to do harm and, afterwards, the server is alive and healthy,
every token a client was handed still resolves to the same ticket, no actor restarted, and its
descriptors and memory are back near where they started (docs/architecture.md, "Hostile
clients"). `bounded` sizes every attack for CI (about a minute); `full` is the long run.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import trio

from tests.rawhttp import (
    BINARY,
    PING,
    TEXT,
    UPGRADE,
    frame,
    json_error,
    open_websocket,
    parse_response,
    read_response,
    read_until_closed,
    text,
)

Json = dict[str, Any]


@dataclass
class Target:
    """Where the server is and what the suite may assume about it."""

    host: str
    port: int
    internal_socket: Path | None = None
    server_pid: int | None = None
    claimable: list[str] = field(default_factory=list)  # paid, unclaimed PIDs to race on
    read_timeout: float = 10.0
    keep_alive: float = 30.0
    write_timeout: float = 10.0
    watch_send_timeout: float = 10.0
    max_body_bytes: int = 4096
    full: bool = False

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def scale(self, bounded: int, full: int) -> int:
        return full if self.full else bounded

    def client(self, timeout: float, max_connections: int | None = None,
               keep_alive: bool = True) -> httpx.AsyncClient:
        """An honest client of the public port. It lets go of an idle connection well
        before the server closes it (httpx keeps one 5 s by default): a request sent on a
        connection the server is closing at that moment meets a reset, which is the
        client's race to avoid, not the server's fault."""
        limits = httpx.Limits(max_connections=max_connections,
                              max_keepalive_connections=None if keep_alive else 0,
                              keepalive_expiry=min(5.0, self.keep_alive / 2))
        return httpx.AsyncClient(base_url=self.url, timeout=timeout, limits=limits)


@dataclass
class Outcome:
    name: str
    category: str
    expected: str
    observed: str
    ok: bool
    seconds: float = 0.0
    details: Json = field(default_factory=dict)


@dataclass
class Ledger:
    """Every success a client of the suite was handed: it must still hold at the end."""

    tokens: dict[str, str] = field(default_factory=dict)  # pid -> token


class Probe:
    """The server's own account of itself: actor restarts, descriptors, memory."""

    def __init__(self, target: Target) -> None:
        self.target = target

    async def internal(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        assert self.target.internal_socket is not None
        transport = httpx.AsyncHTTPTransport(uds=str(self.target.internal_socket))
        async with httpx.AsyncClient(transport=transport, base_url="http://internal",
                                     timeout=15) as client:
            return await client.request(method, path, **kwargs)

    async def restarts(self) -> dict[str, int] | None:
        if self.target.internal_socket is None:
            return None
        body = (await self.internal("GET", "/admin/status")).json()
        out: dict[str, int] = {}

        def walk(states: list[Json]) -> None:
            for s in states:
                out[s["name"]] = s["restarts"]
                walk(s["children"])
        walk(body["actors"])
        return out

    def processes(self) -> list[int]:
        """The server and its worker processes (children: `--workers N`)."""
        pid = self.target.server_pid
        if pid is None:
            return []
        # (not /proc/PID/task/PID/children: trio starts processes from a thread of its own)
        kids = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True,
                              text=True).stdout.split()
        return [pid, *(int(k) for k in kids)]

    def fds(self) -> int | None:
        """Descriptors of the server and its workers, together."""
        pids = self.processes()
        return sum(len(os.listdir(f"/proc/{p}/fd")) for p in pids) if pids else None

    def rss_mb(self) -> float | None:
        """Resident memory of the server and its workers, together."""
        total = None
        for pid in self.processes():
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total = (total or 0.0) + int(line.split()[1]) / 1024
        return total

    async def db_misses(self) -> float | None:
        if self.target.internal_socket is None:
            return None
        for line in (await self.internal("GET", "/metrics")).text.splitlines():
            if line.startswith("api_redeem_bloom_db_miss_total "):
                return float(line.split()[1])
        return 0.0


# --- raw exchanges --------------------------------------------------------------------------


async def exchange(t: Target, data: bytes, *, limit: float = 10,
                   shutdown_write: bool = False) -> bytes | None:
    """Send raw bytes, read one response (or whatever came before the close). None: the
    server held the connection past `limit` without answering or closing."""
    stream = await trio.open_tcp_stream(t.host, t.port)
    async with stream:
        try:
            await stream.send_all(data)
            if shutdown_write:
                await stream.send_eof()
        except trio.BrokenResourceError:
            pass
        try:
            return await read_response(stream, limit)
        except trio.TooSlowError:
            return None


def judge_http(data: bytes | None, allowed: set[int], *, may_close: bool = False
               ) -> tuple[bool, str]:
    """A refusal is one of the allowed statuses with a JSON error body (or, where the
    server cannot answer, a close). Never a 5xx we did not allow, never a hang."""
    if data is None:
        return False, "held open, no answer"
    if not data:
        return may_close, "closed without an answer"
    status, error = json_error(data)
    if status not in allowed:
        return False, f"status {status}"
    if status >= 400 and error is None:
        return False, f"status {status} without a JSON error body"
    return True, f"status {status}"


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in _leaves(inner)]
    return [exc]


async def timed(name: str, category: str, expected: str,
                body: Callable[[], Awaitable[tuple[bool, str, Json]]]) -> Outcome:
    started = time.monotonic()
    try:
        ok, observed, details = await body()
    except Exception as exc:
        leaves = _leaves(exc)  # what went wrong, not the nurseries it went wrong in
        ok, observed, details = False, "suite error: " + "; ".join(
            f"{type(e).__name__}: {e}" for e in leaves[:3]), {}
    return Outcome(name, category, expected, observed, ok, round(time.monotonic() - started, 3),
                   details)


# --- the catalog ----------------------------------------------------------------------------

Attack = Callable[[Target, Ledger, Probe], Awaitable[list[Outcome]]]

JSON_HEAD = b"Content-Type: application/json\r\n"


def _post(path: bytes, body: bytes, extra: bytes = b"") -> bytes:
    return (b"POST " + path + b" HTTP/1.1\r\nHost: x\r\n" + JSON_HEAD + extra
            + b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body)


def malformed_catalog(t: Target) -> list[tuple[str, bytes, set[int], bool]]:
    """(name, bytes, statuses allowed, whether a plain close is acceptable)."""
    big = b"a" * 70_000
    pid = b'{"pid":"0123456789abcdef"}'
    return [
        ("garbage bytes", b"\x00\xff\x13\x37garbage\r\n\r\n", {400}, False),
        ("no Host", b"GET /healthz HTTP/1.1\r\n\r\n", {400}, False),
        ("request line without target", b"GET\r\n\r\n", {400}, False),
        ("HTTP/0.9 request", b"GET /\r\n\r\n", {400}, False),
        ("HTTP/2.0 request line", b"GET /healthz HTTP/2.0\r\nHost: x\r\n\r\n", {505}, False),
        ("HTTP/2 preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", {400, 505}, True),
        ("URL over the limit", b"GET /" + big + b" HTTP/1.1\r\nHost: x\r\n\r\n", {400, 414, 431},
         False),
        ("header over the limit", b"GET /healthz HTTP/1.1\r\nHost: x\r\nX: " + big + b"\r\n\r\n",
         {431}, False),
        ("thousands of headers", b"GET /healthz HTTP/1.1\r\nHost: x\r\n"
         + b"".join(b"X-%d: y\r\n" % i for i in range(3000)) + b"\r\n", {431}, False),
        ("header without a colon", b"GET /healthz HTTP/1.1\r\nHost: x\r\nBroken\r\n\r\n", {400},
         False),
        ("space before the colon", b"GET /healthz HTTP/1.1\r\nHost : x\r\n\r\n", {400}, False),
        # RFC 9112 lets a server unfold it (h11 does) or refuse it.
        ("obsolete line folding", b"GET /healthz HTTP/1.1\r\nHost: x\r\nX: a\r\n b\r\n"
         b"Connection: close\r\n\r\n", {200, 400}, False),
        ("NUL in the target", b"GET /\x00 HTTP/1.1\r\nHost: x\r\n\r\n", {400}, False),
        ("two Content-Lengths", b"POST /api/v1/redeem HTTP/1.1\r\nHost: x\r\n"
         b"Content-Length: 2\r\nContent-Length: 3\r\n\r\n{}", {400}, False),
        ("negative Content-Length", b"POST /api/v1/redeem HTTP/1.1\r\nHost: x\r\n"
         b"Content-Length: -5\r\n\r\n", {400}, False),
        ("Content-Length not a number", b"POST /api/v1/redeem HTTP/1.1\r\nHost: x\r\n"
         b"Content-Length: 1e3\r\n\r\n", {400}, False),
        ("unknown transfer coding", b"POST /api/v1/redeem HTTP/1.1\r\nHost: x\r\n"
         b"Transfer-Encoding: gzip\r\n\r\n", {501}, False),
        ("Content-Length and chunked (smuggling)", b"POST /api/v1/redeem HTTP/1.1\r\nHost: x\r\n"
         + JSON_HEAD + b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
         {400}, False),
        ("bad chunk size", b"POST /api/v1/redeem HTTP/1.1\r\nHost: x\r\n" + JSON_HEAD
         + b"Transfer-Encoding: chunked\r\n\r\nzz\r\n", {400}, True),
        ("chunked body over the limit", b"POST /api/v1/redeem HTTP/1.1\r\nHost: x\r\n" + JSON_HEAD
         + b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
         + b"".join(b"1000\r\n" + b"a" * 4096 + b"\r\n" for _ in range(4)) + b"0\r\n\r\n",
         {413}, True),
        ("body over the limit", _post(b"/api/v1/redeem", b"{" + b" " * (t.max_body_bytes * 4)
                                      + b"}"), {413}, True),
        ("not JSON", _post(b"/api/v1/redeem", b"{pid:"), {400}, False),
        ("JSON nested deep", _post(b"/api/v1/redeem", b"[" * 2000 + b"]" * 2000), {400, 413},
         False),
        ("huge number", _post(b"/api/v1/redeem", b'{"pid": 1' + b"0" * 3000 + b"}"), {400},
         False),
        ("invalid UTF-8", _post(b"/api/v1/redeem", b'{"pid":"\xff\xfe"}'), {400}, False),
        ("wrong content type", b"POST /api/v1/redeem HTTP/1.1\r\nHost: x\r\nContent-Type: "
         b"text/plain\r\nContent-Length: 26\r\nConnection: close\r\n\r\n" + pid, {400}, False),
        ("unknown method", b"BREW /api/v1/redeem HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
         {405}, False),
        ("double slash path", _post(b"/api/v1//redeem", pid), {404}, False),
        ("the framework's static folder", b"GET /static/anon-ticket.db HTTP/1.1\r\nHost: x\r\n"
         b"Connection: close\r\n\r\n", {404}, False),
        ("h2c upgrade", b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, "
         b"HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n"
         b"Connection: close\r\n\r\n", {200}, False),
    ]


async def malformed(t: Target, ledger: Ledger, probe: Probe) -> list[Outcome]:
    outcomes = []
    for name, data, allowed, may_close in malformed_catalog(t):
        async def one(data: bytes = data, allowed: set[int] = allowed,
                      may_close: bool = may_close) -> tuple[bool, str, Json]:
            ok, observed = judge_http(await exchange(t, data), allowed, may_close=may_close)
            return ok, observed, {}
        outcomes.append(await timed(name, "malformed", f"one of {sorted(allowed)} with a JSON "
                                    "error" + (" (or a close)" if may_close else ""), one))
    # A truncated chunked body: the client gives up mid-chunk and half-closes.
    async def truncated() -> tuple[bool, str, Json]:
        data = await exchange(t, b"POST /api/v1/redeem HTTP/1.1\r\nHost: x\r\n" + JSON_HEAD
                              + b"Transfer-Encoding: chunked\r\n\r\n5\r\nab",
                              shutdown_write=True)
        ok, observed = judge_http(data, {400}, may_close=True)
        return ok, observed, {}
    outcomes.append(await timed("truncated chunked body", "malformed",
                                "a JSON 400 or a close", truncated))
    return outcomes


async def slow(t: Target, ledger: Ledger, probe: Probe) -> list[Outcome]:
    """Slow requests of every kind, all at once: each must be cut off by its deadline."""
    slack = 5.0

    async def drip_head() -> tuple[bool, str, Json]:
        stream = await trio.open_tcp_stream(t.host, t.port)
        started = time.monotonic()
        async with stream:
            with trio.move_on_after(t.read_timeout + slack):
                for byte in b"GET /healthz HTTP/1.1\r\nX-Slow: " + b"a" * 100_000:
                    try:
                        await stream.send_all(bytes([byte]))
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        waited = time.monotonic() - started
                        return True, f"closed after {waited:.1f} s", {"seconds": waited}
                    await trio.sleep(0.2)
        return False, "still open after the read timeout and more", {}

    async def drip_body() -> tuple[bool, str, Json]:
        stream = await trio.open_tcp_stream(t.host, t.port)
        async with stream:
            await stream.send_all(b"POST /api/v1/redeem HTTP/1.1\r\nHost: x\r\n" + JSON_HEAD
                                  + b"Content-Length: 1000\r\n\r\n{")
            try:
                data = await read_until_closed(stream, 2 * t.read_timeout + slack)
            except trio.TooSlowError:
                return False, "still open", {}
            ok, observed = judge_http(data, {408}, may_close=True)
            return ok, observed, {}

    async def idle() -> tuple[bool, str, Json]:
        stream = await trio.open_tcp_stream(t.host, t.port)
        async with stream:
            try:
                await read_until_closed(stream, t.keep_alive + t.read_timeout + slack)
            except trio.TooSlowError:
                return False, "still open", {}
            return True, "closed", {}

    async def never_reads() -> tuple[bool, str, Json]:
        sock = trio.socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        await sock.connect((t.host, t.port))
        stream = trio.SocketStream(sock)
        async with stream:
            request = b"GET /api/v1/info HTTP/1.1\r\nHost: x\r\n\r\n" * 50
            with trio.move_on_after(t.write_timeout + t.read_timeout + slack) as scope:
                try:
                    while True:
                        await stream.send_all(request)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
            if scope.cancelled_caught:
                return False, "still accepting requests it never answered", {}
            return True, "closed", {}

    results: list[Outcome] = []
    specs = [
        ("request head dripped a byte at a time", drip_head, "closed within the read timeout"),
        ("request body never completed", drip_body, "408 JSON, closed"),
        ("connection never used", idle, "closed after the keep-alive timeout"),
        ("pipelined requests, responses never read", never_reads,
         "closed within the write timeout"),
    ]

    async def run(name: str, body: Any, expected: str) -> None:
        results.append(await timed(name, "slow", expected, body))
    async with trio.open_nursery() as nursery:
        for name, body, expected in specs:
            nursery.start_soon(run, name, body, expected)
    return results


async def pipelining(t: Target, ledger: Ledger, probe: Probe) -> list[Outcome]:
    async def many() -> tuple[bool, str, Json]:
        n = 100
        request = b"GET /api/v1/info HTTP/1.1\r\nHost: x\r\n\r\n"
        stream = await trio.open_tcp_stream(t.host, t.port)
        async with stream:
            await stream.send_all(request * (n - 1) + request.replace(
                b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n"))
            data = await read_until_closed(stream, 20)
        count = data.count(b"HTTP/1.1 200")
        return count == n, f"{count} of {n} answered in order", {}
    return [await timed("100 pipelined requests", "pipelining", "100 answers, in order", many)]


async def websocket(t: Target, ledger: Ledger, probe: Probe) -> list[Outcome]:
    outcomes: list[Outcome] = []

    async def refused(data: bytes, allowed: set[int]) -> tuple[bool, str, Json]:
        ok, observed = judge_http(await exchange(t, data), allowed)
        return ok, observed, {}

    for name, data, allowed in [
        ("upgrade with a byte after it", UPGRADE + b"x", {400}),
        ("upgrade with a frame after it", UPGRADE + text({"op": "ping"}), {400}),
        ("upgrade without a key", UPGRADE.replace(
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n", b""), {400}),
        ("upgrade with version 12", UPGRADE.replace(b"Version: 13", b"Version: 12"), {400, 426}),
        ("upgrade with a key that is no key", UPGRADE.replace(b"dGhlIHNhbXBsZSBub25jZQ==", b"x"),
         {400}),
        ("upgrade by POST", UPGRADE.replace(b"GET", b"POST"), {405}),
    ]:
        outcomes.append(await timed(name, "websocket", f"one of {sorted(allowed)} with a JSON "
                                    "error, closed",
                                    lambda d=data, a=allowed: refused(d, a)))

    async def broken_frame(data: bytes) -> tuple[bool, str, Json]:
        stream, reader = await open_websocket(t.host, t.port)
        async with stream:
            await stream.send_all(data)
            with trio.move_on_after(10) as scope:
                code = await reader.close_code()
            if scope.cancelled_caught:
                return False, "the connection stayed open", {}
            return True, f"closed ({code})", {"code": code}

    for name, data in [
        ("unmasked frame", frame(TEXT, b'{"op":"ping"}', mask=False)),
        ("reserved opcode", frame(0x3, b"x")),
        ("reserved bits set", frame(TEXT, b'{"op":"ping"}', rsv=4)),
        ("invalid UTF-8 text", frame(TEXT, b"\xff\xfe\xfd")),
        ("fragmented ping", frame(PING, b"x", fin=False)),
        ("message over the limit", frame(BINARY, b"a" * (t.max_body_bytes * 16))),
        ("continuation without a start", frame(0x0, b"x")),
    ]:
        outcomes.append(await timed(name, "websocket", "the connection closed, nothing else",
                                    lambda d=data: broken_frame(d)))

    async def bad_messages() -> tuple[bool, str, Json]:
        stream, reader = await open_websocket(t.host, t.port)
        async with stream:
            errors = 0
            bad: list[Json | bytes] = [b"not json", b"[]", b'{"op":"nope"}',
                                       {"op": "subscribe"}, {"op": "subscribe", "pid": "zz"},
                                       {"op": "subscribe", "pid": "0" * 16},
                                       {"op": "subscribe", "pid": "0123456789abcdef",
                                        "token": "ab" * 32},
                                       {"op": "subscribe", "pid": "0123456789abcdef",
                                        "since": "x"}]
            for message in bad:
                payload = message if isinstance(message, bytes) else json.dumps(message).encode()
                await stream.send_all(frame(TEXT, payload))
                with trio.fail_after(10):
                    reply = await reader.message()
                if reply is None:
                    return False, "closed on a bad message", {}
                errors += reply.get("type") == "error"
            await stream.send_all(text({"op": "ping"}))
            with trio.fail_after(10):
                pong = await reader.message()
        ok = errors == len(bad) and pong == {"type": "pong"}
        return ok, f"{errors} of {len(bad)} answered with an error, then a pong", {}
    outcomes.append(await timed("messages that break the protocol", "websocket",
                                "an error message each, the connection stays", bad_messages))

    async def too_many() -> tuple[bool, str, Json]:
        stream, reader = await open_websocket(t.host, t.port)
        async with stream:
            states = errors = 0
            for _ in range(17):
                await stream.send_all(text({"op": "subscribe", "pid": os.urandom(8).hex()}))
            with trio.fail_after(15):
                while states + errors < 17:
                    reply = await reader.message()
                    if reply is None:
                        break
                    states += reply.get("type") == "state"
                    errors += reply.get("type") == "error"
        return (states == 16 and errors == 1), f"{states} states, {errors} errors", {}
    outcomes.append(await timed("17 subscriptions on one connection", "websocket",
                                "16 states, one error", too_many))

    async def pong_flood() -> tuple[bool, str, Json]:
        # A watcher that asks and never reads: its replies pile up until the server gives up.
        sock = trio.socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        await sock.connect((t.host, t.port))
        stream = trio.SocketStream(sock)
        async with stream:
            await stream.send_all(UPGRADE)
            head = b""
            with trio.move_on_after(5):
                while b"\r\n\r\n" not in head:  # the 101, before any frame (else: refused)
                    head += await stream.receive_some(4096)
            if not head.startswith(b"HTTP/1.1 101"):
                return False, f"no upgrade: {head[:40]!r}", {}
            ping = text({"op": "ping"}) * 200
            limit = t.watch_send_timeout + t.write_timeout + 10
            with trio.move_on_after(limit) as scope:
                try:
                    while True:
                        await stream.send_all(ping)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
            if scope.cancelled_caught:
                return False, f"still open after {limit:.0f} s", {}
            return True, "closed", {}
    outcomes.append(await timed("a watcher that never reads its pongs", "websocket",
                                "closed as a slow consumer", pong_flood))
    return outcomes


async def _honest_redeems(t: Target, ledger: Ledger, n: int = 10) -> tuple[int, int]:
    """(successful answers, tries) for redeems of PIDs the suite already claimed."""
    ok = 0
    known = list(ledger.tokens) or ["0123456789abcdef"]
    pids = [known[i % len(known)] for i in range(n)]
    async with t.client(15) as client:
        for pid in pids:
            try:
                r = await client.post("/api/v1/redeem", json={"pid": pid})
            except httpx.TransportError:
                continue
            ok += r.status_code in (200, 404)
    return ok, len(pids)


async def floods(t: Target, ledger: Ledger, probe: Probe) -> list[Outcome]:
    outcomes = []

    async def connections() -> tuple[bool, str, Json]:
        n = t.scale(600, 5000)
        held: list[socket.socket] = []
        try:
            for _ in range(n):
                try:
                    held.append(socket.create_connection((t.host, t.port), timeout=5))
                except OSError:
                    break
            ok, tries = await _honest_redeems(t, ledger)
        finally:
            for sock in held:
                sock.close()
        return ok == tries, f"{len(held)} idle connections held; {ok} of {tries} honest " \
            "redeems answered", {"held": len(held)}
    outcomes.append(await timed("idle connection flood", "flood",
                                "honest requests still answered", connections))

    async def subscriptions() -> tuple[bool, str, Json]:
        n = t.scale(150, 2000)
        opened: list[trio.SocketStream] = []
        try:
            for _ in range(n):
                try:
                    stream, _ = await open_websocket(t.host, t.port)
                except (OSError, ConnectionError):
                    break
                opened.append(stream)
                await stream.send_all(b"".join(
                    text({"op": "subscribe", "pid": os.urandom(8).hex()}) for _ in range(16)))
            ok, tries = await _honest_redeems(t, ledger)
        finally:
            for stream in opened:
                await stream.aclose()
        return ok == tries, f"{len(opened)} watchers x 16 subscriptions; {ok} of {tries} " \
            "honest redeems answered", {"watchers": len(opened)}
    outcomes.append(await timed("subscription flood", "flood",
                                "honest requests still answered", subscriptions))
    return outcomes


async def races(t: Target, ledger: Ledger, probe: Probe) -> list[Outcome]:
    ways = t.scale(64, 500)
    pids = t.claimable[: t.scale(3, 10)]
    if not pids:
        return [Outcome("double-redeem race", "race", "one success", "skipped: no claimable "
                        "PIDs given", False)]
    outcomes = []
    for pid in pids:
        async def race(pid: str = pid) -> tuple[bool, str, Json]:
            answers: list[tuple[int, Json]] = []
            async with t.client(30, max_connections=ways, keep_alive=False) as client:
                go = trio.Event()

                async def one() -> None:
                    await go.wait()
                    r = await client.post("/api/v1/redeem", json={"pid": pid})
                    answers.append((r.status_code, r.json()))
                async with trio.open_nursery() as nursery:
                    for _ in range(ways):
                        nursery.start_soon(one)
                    await trio.sleep(0.05)
                    go.set()
            statuses = [a[1].get("status") for a in answers if a[0] == 200]
            tokens = {a[1].get("service_token") for a in answers if a[0] == 200}
            success = statuses.count("success")
            others = [a for a in answers if a[0] != 200]
            ok = success == 1 and len(tokens) == 1 and not others and len(statuses) == ways
            if len(tokens) == 1:
                ledger.tokens[pid] = next(iter(tokens))  # type: ignore[arg-type]
            return ok, f"{success} success, {statuses.count('already_claimed')} " \
                f"already_claimed, {len(tokens)} distinct tokens, {len(others)} other answers", {}
        outcomes.append(await timed(f"{ways}-way redeem race", "race",
                                    "one success, the rest already_claimed, one token", race))
    return outcomes


async def spray(t: Target, ledger: Ledger, probe: Probe) -> list[Outcome]:
    n = t.scale(2000, 100_000)
    outcomes = []

    async def sprayed(path: Callable[[], tuple[str, str, Json | None]], expect: int
                      ) -> tuple[int, int, float]:
        counts = {"expected": 0, "other": 0}
        started = time.monotonic()
        async with t.client(30, max_connections=32) as client:
            todo = iter(range(n))

            async def worker() -> None:
                for _ in todo:
                    method, url, body = path()
                    r = await client.request(method, url, json=body)
                    counts["expected" if r.status_code == expect else "other"] += 1
            async with trio.open_nursery() as nursery:
                for _ in range(32):
                    nursery.start_soon(worker)
        return counts["expected"], counts["other"], time.monotonic() - started

    async def pids() -> tuple[bool, str, Json]:
        before = await probe.db_misses()
        found, other, seconds = await sprayed(
            lambda: ("POST", "/api/v1/redeem", {"pid": os.urandom(8).hex()}), 404)
        after = await probe.db_misses()
        misses = None if before is None or after is None else after - before
        rate = None if misses is None else misses / n
        # At the default 1e-6 even the full run expects no false positive at all.
        ok = other == 0 and (misses is None or misses <= max(3, math.ceil(n * 1e-4)))
        return ok, f"{found} of {n} answered 404 in {seconds:.1f} s ({n / seconds:.0f}/s); " \
            f"database hits {misses} (false-positive rate {rate})", {
                "requests": n, "per_second": round(n / seconds), "db_hits": misses,
                "false_positive_rate": rate}
    outcomes.append(await timed("unknown payment id spray", "spray",
                                "every one 404, the Bloom filter answers", pids))

    async def tokens() -> tuple[bool, str, Json]:
        found, other, seconds = await sprayed(
            lambda: ("GET", f"/api/v1/token/{os.urandom(32).hex()}", None), 404)
        return other == 0, f"{found} of {n} answered 404 in {seconds:.1f} s", {
            "requests": n, "per_second": round(n / seconds)}
    outcomes.append(await timed("unknown token spray", "spray", "every one 404", tokens))
    return outcomes


async def enumeration(t: Target, ledger: Ledger, probe: Probe) -> list[Outcome]:
    async def watch() -> tuple[bool, str, Json]:
        stream, reader = await open_websocket(t.host, t.port)
        shapes = set()
        async with stream:
            for _ in range(16):
                pid = os.urandom(8).hex()
                await stream.send_all(text({"op": "subscribe", "pid": pid}))
                with trio.fail_after(10):
                    reply = await reader.message()
                assert reply is not None
                reply.pop("pid", None)
                reply.pop("epoch", None)
                shapes.add(json.dumps(reply, sort_keys=True))
            token = os.urandom(32).hex()
            await stream.send_all(text({"op": "subscribe", "token": token}))
            with trio.fail_after(10):
                token_reply = await reader.message()
        ok = len(shapes) == 1 and json.loads(next(iter(shapes)))["status"] == "waiting"
        return ok, f"{len(shapes)} distinct answers for 16 random ids: {sorted(shapes)}; an " \
            f"unknown token: {token_reply}", {}
    return [await timed("enumerate payment ids through watch", "enumeration",
                        "every unknown id looks the same (waiting)", watch)]


INTERNAL_PATHS = [
    ("GET", "/metrics"), ("GET", "/admin/status"), ("GET", "/admin/bloom"),
    ("GET", "/admin/skipped"), ("POST", "/admin/backup"), ("POST", "/admin/drain"),
    ("POST", "/admin/shutdown"), ("POST", "/admin/actors/public/restart"),
    ("POST", "/admin/poller/pause"), ("POST", "/admin/poller/rescan"),
    ("POST", f"/api/v1/token/{'ab' * 32}/revoke"),
]


def encodings(path: str) -> list[str]:
    return [
        path, path.upper(), path + "/", "/" + path, path.replace("/", "//"),
        path.replace("/", "%2F"), path.replace("/", "%2f", 2), path.replace("a", "%61"),
        "/api/v1/../.." + path, "/./" + path.lstrip("/"), path + "%00", path + ";x",
        path + "?x=1", path.replace("/", "\\"), "/api/v1/redeem/../.." + path,
        "http://localhost" + path,
    ]


async def internal_on_public(t: Target, ledger: Ledger, probe: Probe) -> list[Outcome]:
    async def tried() -> tuple[bool, str, Json]:
        bad: list[str] = []
        n = 0
        for method, path in INTERNAL_PATHS:
            for variant in encodings(path):
                for host in (b"x", b"localhost", b"internal"):
                    n += 1
                    request = (method.encode() + b" " + variant.encode() + b" HTTP/1.1\r\nHost: "
                               + host + b"\r\n" + JSON_HEAD + b"Authorization: Bearer x\r\n"
                               b"Content-Length: 2\r\nConnection: close\r\n\r\n{}")
                    data = await exchange(t, request)
                    if data is None:
                        bad.append(f"{method} {variant}: held open")
                        continue
                    if not data:
                        bad.append(f"{method} {variant}: closed without an answer")
                        continue
                    status, _, _ = parse_response(data)
                    ok, observed = judge_http(data, {400, 404, 405})
                    if not ok or status < 400:
                        bad.append(f"{method} {variant}: {observed}")
        return not bad, f"{n} tries, {len(bad)} not refused" + (f": {bad[:5]}" if bad else ""), {}
    return [await timed("internal routes on the public port", "separation",
                        "every one a JSON 400/404/405", tried)]


def internal_bad_inputs() -> list[tuple[str, str, bytes | None, str]]:
    """(method, path, body, content type): each must be refused with a 4xx."""
    tok = "ab" * 32
    j = "application/json"
    out: list[tuple[str, str, bytes | None, str]] = []
    for value in ["1" + "0" * 30, "-1", "1.5", '"5"', "null", "true", "[]", "{}"]:
        out.append(("POST", "/admin/poller/rescan", b'{"from_height": %s}' % value.encode(), j))
    out += [("POST", "/admin/poller/rescan", b"{}", j),
            ("POST", "/admin/poller/rescan", b"not json", j),
            ("POST", "/admin/poller/rescan", b'{"from_height": 5}', "text/plain")]
    for path in ["/proc/self/mem", "/dev/null", "relative/path.tar", "/", "/nonexistent/dir/x.tar",
                 "/sys/kernel/x", "", "\u0000"]:
        out.append(("POST", "/admin/backup", json.dumps({"path": path}).encode(), j))
    out += [("POST", "/admin/backup", b'{"path": 5}', j), ("POST", "/admin/backup", b"[]", j)]
    out += [("POST", "/api/v1/token/zz/revoke", b"{}", j),
            ("POST", f"/api/v1/token/{tok}/revoke", json.dumps({"reason": "x" * 5000}).encode(),
             j),
            ("POST", f"/api/v1/token/{tok}/revoke", b'{"abuse_score": 1099511627776}', j),
            ("POST", f"/api/v1/token/{tok}/revoke", b'{"abuse_score": "x"}', j),
            ("POST", f"/api/v1/token/{tok}/revoke", b'{"abuse_score": true}', j),
            ("POST", f"/api/v1/token/{tok}/revoke", b"[" * 3000, j),
            ("POST", "/admin/actors/nobody/restart", None, j),
            ("POST", "/admin/actors/..%2F..%2Fetc/restart", None, j),
            ("GET", "/admin/skipped?limit=abc", None, j),
            ("GET", "/admin/skipped?limit=0", None, j),
            ("GET", "/admin/skipped?limit=" + "9" * 40, None, j),
            ("GET", "/admin/poller/rescan", None, j),
            ("DELETE", "/metrics", None, j),
            ("POST", "/admin/backup", b"{" + b" " * 2_000_000 + b"}", j)]
    return out


async def internal_inputs(t: Target, ledger: Ledger, probe: Probe) -> list[Outcome]:
    if t.internal_socket is None:
        return [Outcome("internal routes with bad input", "operator", "4xx", "skipped: no "
                        "internal socket given", True)]

    async def tried() -> tuple[bool, str, Json]:
        bad: list[str] = []
        cases = internal_bad_inputs()
        for method, path, body, ctype in cases:
            try:
                r = await probe.internal(method, path, content=body,
                                         headers={"content-type": ctype})
            except httpx.TransportError as exc:
                bad.append(f"{method} {path[:40]}: {type(exc).__name__}")
                continue
            json_body = r.headers.get("content-type", "").startswith("application/json")
            if not 400 <= r.status_code < 500 or not json_body or "error" not in r.json():
                bad.append(f"{method} {path[:40]} {(body or b'')[:40]!r}: {r.status_code} "
                           f"{r.text[:80]}")
        return not bad, f"{len(cases)} tries, {len(bad)} not a JSON 4xx" + (
            f": {bad[:5]}" if bad else ""), {}
    return [await timed("internal routes with bad input", "operator",
                        "every one a JSON 4xx, no actor restarts", tried)]


CATALOG: list[tuple[str, Attack]] = [
    ("races", races),
    ("malformed", malformed),
    ("pipelining", pipelining),
    ("websocket", websocket),
    ("internal_on_public", internal_on_public),
    ("internal_inputs", internal_inputs),
    ("enumeration", enumeration),
    ("spray", spray),
    ("slow", slow),
    ("floods", floods),
]


async def aftermath(t: Target, ledger: Ledger, probe: Probe, before: Json) -> list[Outcome]:
    async def alive() -> tuple[bool, str, Json]:
        async with t.client(15) as client:
            r = await client.get("/healthz")
        return r.status_code == 200, f"/healthz {r.status_code} {r.json().get('status')}", {}

    async def tokens() -> tuple[bool, str, Json]:
        wrong: list[str] = []
        async with t.client(15) as client:
            for pid, token in ledger.tokens.items():
                again = await client.post("/api/v1/redeem", json={"pid": pid})
                info = await client.get(f"/api/v1/token/{token}")
                if again.json().get("service_token") != token or info.status_code != 200:
                    wrong.append(pid[:6])
        return not wrong, f"{len(ledger.tokens) - len(wrong)} of {len(ledger.tokens)} tokens " \
            "handed out still resolve", {}

    async def restarts() -> tuple[bool, str, Json]:
        now = await probe.restarts()
        if now is None:
            return True, "not checked (no internal socket)", {}
        changed = {k: v for k, v in now.items() if v != before["restarts"].get(k)}
        return not changed, f"restarts changed: {changed}" if changed else "no restarts", {}

    async def resources() -> tuple[bool, str, Json]:
        # What the attacks opened is being closed: give the server a moment to see it.
        deadline = time.monotonic() + 15
        slack = 10 * max(1, len(probe.processes()))  # per process: the owner and each worker
        fds, rss = probe.fds(), probe.rss_mb()
        while fds is not None and fds > before["fds"] + slack and time.monotonic() < deadline:
            await trio.sleep(0.2)
            fds = probe.fds()
        rss = probe.rss_mb()
        if fds is None or rss is None:
            return True, "not checked (no server pid)", {}
        ok_fds = fds <= before["fds"] + slack
        # Memory a flood made is reused, not always returned to the system: bounded, not equal.
        ok_rss = rss <= before["rss_mb"] * 1.5 + 40
        return ok_fds and ok_rss, f"descriptors {before['fds']} -> {fds}; RSS " \
            f"{before['rss_mb']:.0f} -> {rss:.0f} MB (peak {before['peak_rss_mb']:.0f})", {
                "fds_before": before["fds"], "fds_after": fds,
                "rss_mb_before": before["rss_mb"], "rss_mb_after": rss,
                "rss_mb_peak": before["peak_rss_mb"]}

    return [await timed("alive and healthy", "aftermath", "/healthz 200", alive),
            await timed("every token handed out resolves", "aftermath", "all of them", tokens),
            await timed("no actor restarted", "aftermath", "restarts unchanged", restarts),
            await timed("descriptors and memory back", "aftermath",
                        "descriptors at baseline, memory bounded", resources)]


async def run_suite(t: Target, only: set[str] | None = None) -> list[Outcome]:
    probe = Probe(t)
    ledger = Ledger()
    before: Json = {"restarts": await probe.restarts() or {}, "fds": probe.fds(),
                    "rss_mb": probe.rss_mb(), "peak_rss_mb": probe.rss_mb()}
    outcomes: list[Outcome] = []
    for name, attack in CATALOG:
        if only is None or name in only:
            outcomes.extend(await attack(t, ledger, probe))
            rss = probe.rss_mb()
            if rss is not None:
                before["peak_rss_mb"] = max(before["peak_rss_mb"], rss)
    outcomes.extend(await aftermath(t, ledger, probe, before))
    return outcomes


def report(outcomes: list[Outcome], t: Target) -> Json:
    return {"target": t.url, "mode": "full" if t.full else "bounded",
            "passed": all(o.ok for o in outcomes),
            "attacks": len(outcomes), "failed": [o.name for o in outcomes if not o.ok],
            "outcomes": [asdict(o) for o in outcomes]}


def table(outcomes: list[Outcome]) -> str:
    rows = [("", "attack", "expected", "observed", "s")]
    rows += [("ok" if o.ok else "FAIL", f"{o.category}: {o.name}", o.expected, o.observed[:90],
              f"{o.seconds:.1f}") for o in outcomes]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    return "\n".join(
        "  ".join(r[i].ljust(widths[i]) for i in range(4)) + "  " + r[4] for r in rows)
