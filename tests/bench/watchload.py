"""Websocket load for the benchmark: idle subscribers, claim → event fan-out latency, and one
watcher that stops reading.

Runs as its own process (pinned beside wrk, away from the server):

    python -m tests.bench.watchload URL --idle N [--fanout PIDS_FILE]

It opens N websocket connections to `/api/v1/watch`, each subscribed to a payment id that
was never paid (the server keeps them registered and pings them; they get no events), and
prints one JSON line `{"ready": ...}` once all got their `state`. Then it obeys lines on
stdin:

- `fanout`: for each payment id in PIDS_FILE (recorded, unclaimed, 16 hex a line) open a
  watcher subscribed to it, then claim them one after the other over HTTP and time the
  `claimed` event: from sending the redeem request (an upper bound of commit → event) and
  from receiving its response. Prints one JSON line with the latencies.
- `watch reading PID` / `watch stuck PID`: open one more watcher subscribed to PID that reads
  everything (and counts it), or that never reads again after its subscribe (a receive buffer
  of 4 KB, like a client that hung); `unwatch`: close it and say what the server did with it
  (a stuck one: whether the server closed it, and with which close code).
- `quit` (or end of input): closes every connection and exits.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import socket as stdsocket
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import trio
import wsproto
from trio_websocket import ConnectionClosed, WebSocketConnection, connect_websocket_url
from wsproto.events import AcceptConnection, CloseConnection, Message, Request, TextMessage

CONNECT_CONCURRENCY = 50


def _say(obj: dict[str, Any]) -> None:
    print(json.dumps(obj), flush=True)


def random_pid() -> str:
    """A payment id nobody paid (16 hex, never all zeros)."""
    while (raw := os.urandom(8)) == bytes(8):
        pass
    return raw.hex()


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


class Load:
    def __init__(self, url: str) -> None:
        self.http_url = url.rstrip("/")
        self.ws_url = "ws" + self.http_url[len("http"):] + "/api/v1/watch"
        self.idle: list[WebSocketConnection] = []
        self.messages_to_idle = 0
        self.closed_idle = 0
        self.watcher: Stuck | tuple[WebSocketConnection, list[int]] | None = None

    async def watch(self, nursery: trio.Nursery, mode: str, pid: str) -> None:
        """One more watcher of `pid`: `reading` reads and counts everything, `stuck` never
        reads after its subscribe."""
        if mode == "stuck":
            host, _, port = self.http_url.removeprefix("http://").rpartition(":")
            self.watcher = await Stuck.open(host, int(port), pid)
            return
        ws = await self.subscribe(nursery, pid)
        count = [0]

        async def read() -> None:
            try:
                while True:
                    await ws.get_message()
                    count[0] += 1
            except ConnectionClosed:
                pass

        nursery.start_soon(read)
        self.watcher = (ws, count)

    async def unwatch(self) -> dict[str, Any]:
        watcher, self.watcher = self.watcher, None
        if isinstance(watcher, Stuck):
            return await watcher.finish()
        assert watcher is not None
        ws, count = watcher
        closed = ws.closed is not None
        await ws.aclose()
        return {"mode": "reading", "closed_by_server": closed, "messages": count[0]}

    async def subscribe(self, nursery: trio.Nursery, pid: str) -> WebSocketConnection:
        ws = await connect_websocket_url(nursery, self.ws_url)
        await ws.send_message(json.dumps({"op": "subscribe", "pid": pid}))
        first = json.loads(await ws.get_message())
        if first.get("type") != "state":
            raise RuntimeError(f"subscribe answered {first}")
        return ws

    async def _drain_idle(self, ws: WebSocketConnection) -> None:
        try:
            while True:
                await ws.get_message()
                self.messages_to_idle += 1
        except ConnectionClosed:
            self.closed_idle += 1

    async def open_idle(self, nursery: trio.Nursery, count: int) -> float:
        started = time.perf_counter()
        limit = trio.Semaphore(CONNECT_CONCURRENCY)

        async def one() -> None:
            async with limit:
                ws = await self.subscribe(nursery, random_pid())
            self.idle.append(ws)
            nursery.start_soon(self._drain_idle, ws)

        async with trio.open_nursery() as connecting:
            for _ in range(count):
                connecting.start_soon(one)
        return time.perf_counter() - started

    async def fanout(self, nursery: trio.Nursery, pids: list[str]) -> dict[str, Any]:
        got: dict[str, float] = {}
        arrived = {pid: trio.Event() for pid in pids}
        watchers: list[WebSocketConnection] = []

        async def watch(ws: WebSocketConnection, pid: str) -> None:
            try:
                while pid not in got:
                    msg = json.loads(await ws.get_message())
                    if msg.get("type") == "claimed":
                        got[pid] = time.perf_counter()
                        arrived[pid].set()
            except ConnectionClosed:
                pass

        for pid in pids:
            ws = await self.subscribe(nursery, pid)
            watchers.append(ws)
            nursery.start_soon(watch, ws, pid)
        from_send: list[float] = []
        from_response: list[float] = []
        statuses: dict[str, int] = {}
        async with httpx.AsyncClient(base_url=self.http_url, timeout=10) as client:
            for pid in pids:
                sent = time.perf_counter()
                resp = await client.post("/api/v1/redeem", json={"pid": pid})
                answered = time.perf_counter()
                key = f"{resp.status_code}:{resp.json().get('status', '')}"
                statuses[key] = statuses.get(key, 0) + 1
                with trio.move_on_after(5):
                    await arrived[pid].wait()
                if pid in got:
                    from_send.append((got[pid] - sent) * 1000)
                    from_response.append((got[pid] - answered) * 1000)
                await trio.sleep(0.005)
        await close_all(watchers)
        return {
            "claims": len(pids), "events": len(from_send), "statuses": statuses,
            "from_send_ms": _dist(from_send), "from_response_ms": _dist(from_response),
        }


class Stuck:
    """A watcher that subscribes and then never reads (a 4 KB receive buffer): the server's
    writer for it fills the kernel's buffers and then waits, until its send timeout or its
    queue (the hub's events for it) runs out and the server drops it."""

    def __init__(self, stream: trio.SocketStream, ws: wsproto.WSConnection) -> None:
        self.stream, self.ws = stream, ws
        self.opened = time.perf_counter()

    @classmethod
    async def open(cls, host: str, port: int, pid: str) -> Stuck:
        sock = trio.socket.socket()
        sock.setsockopt(stdsocket.SOL_SOCKET, stdsocket.SO_RCVBUF, 4096)
        await sock.connect((host, port))
        stream = trio.SocketStream(sock)
        ws = wsproto.WSConnection(wsproto.ConnectionType.CLIENT)
        await stream.send_all(ws.send(Request(host="localhost", target="/api/v1/watch")))
        accepted = False
        while not accepted:
            ws.receive_data(await stream.receive_some(4096))
            accepted = any(isinstance(e, AcceptConnection) for e in ws.events())
        await stream.send_all(ws.send(TextMessage(json.dumps({"op": "subscribe",
                                                              "pid": pid}))))
        return cls(stream, ws)

    async def finish(self) -> dict[str, Any]:
        """Read what is left (until the server's EOF; at most 2 s, or half a second with
        nothing more, while the server still sends): was it closed by the server, and with
        which close code."""
        held = round(time.perf_counter() - self.opened, 2)
        messages, code, closed = 0, None, False
        deadline = trio.current_time() + 2.0
        while not closed and trio.current_time() < deadline:
            with trio.move_on_after(0.5):
                try:
                    data = await self.stream.receive_some(65536)
                except trio.BrokenResourceError:
                    data = b""
                closed = not data
                self.ws.receive_data(data or None)
                for event in self.ws.events():
                    if isinstance(event, Message) and event.message_finished:
                        messages += 1
                    elif isinstance(event, CloseConnection):
                        code = int(event.code)
                continue
            break  # nothing more for half a second: still open
        await self.stream.aclose()
        return {"mode": "stuck", "closed_by_server": closed, "close_code": code,
                "messages_left_unread": messages, "held_s": held}


async def close_all(connections: list[WebSocketConnection]) -> None:
    """Close them side by side: each close waits for the server's close frame, and one after
    the other 1,000 took seconds of the benchmark's time."""
    async with trio.open_nursery() as closing:
        for ws in connections:
            closing.start_soon(ws.aclose)


def _dist(values: list[float]) -> dict[str, float | None]:
    def r(x: float | None) -> float | None:
        return round(x, 3) if x is not None else None
    return {"p50": r(percentile(values, 0.5)), "p99": r(percentile(values, 0.99)),
            "max": r(max(values) if values else None)}


async def main(url: str, idle: int, fanout_pids: list[str]) -> None:
    load = Load(url)
    async with trio.open_nursery() as nursery:
        connect_s = await load.open_idle(nursery, idle)
        _say({"ready": True, "idle": len(load.idle), "connect_s": round(connect_s, 3)})
        stdin = trio.lowlevel.FdStream(sys.stdin.fileno())
        buffer = b""
        while True:
            chunk = await stdin.receive_some(1024)
            if not chunk:
                break
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            commands = [line.strip().decode() for line in lines]
            for command in commands:
                words = command.split()
                if words[:1] == ["fanout"]:
                    _say({"fanout": await load.fanout(nursery, fanout_pids)})
                elif words[:1] == ["watch"]:
                    await load.watch(nursery, words[1], words[2])
                    _say({"watching": words[1]})
                elif words[:1] == ["unwatch"]:
                    _say({"unwatched": await load.unwatch()})
            if "quit" in commands:
                break
        _say({"idle_closed_by_server": load.closed_idle,
              "messages_to_idle": load.messages_to_idle})
        await close_all(load.idle)
        nursery.cancel_scope.cancel()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m tests.bench.watchload")
    parser.add_argument("url")
    parser.add_argument("--idle", type=int, default=1000)
    parser.add_argument("--fanout", type=Path, default=None)
    args = parser.parse_args()
    trio.run(main, args.url, args.idle, args.fanout.read_text().split() if args.fanout else [])
    gc.freeze()  # ending: the closing collections need not walk a thousand closed connections
