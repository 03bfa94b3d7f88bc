"""Websocket load for the benchmark: idle subscribers, and claim → event fan-out latency.

Runs as its own process (pinned beside wrk, away from the server):

    python -m anon_ticket.bench.watchload URL --idle N [--fanout PIDS_FILE]

It opens N websocket connections to `/api/v1/watch`, each subscribed to a payment id that
was never paid (the server keeps them registered and pings them; they get no events), and
prints one JSON line `{"ready": ...}` once all got their `state`. Then it obeys lines on
stdin:

- `fanout`: for each payment id in PIDS_FILE (recorded, unclaimed, 16 hex a line) open a
  watcher subscribed to it, then claim them one after the other over HTTP and time the
  `claimed` event: from sending the redeem request (an upper bound of commit → event) and
  from receiving its response. Prints one JSON line with the latencies.
- `quit` (or end of input): closes every connection and exits.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, connect_websocket_url

from anon_ticket.domain.ids import PaymentId

CONNECT_CONCURRENCY = 50


def _say(obj: dict[str, Any]) -> None:
    print(json.dumps(obj), flush=True)


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
                ws = await self.subscribe(nursery, PaymentId.generate().hex())
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
            if "fanout" in commands:
                result = await load.fanout(nursery, fanout_pids)
                _say({"fanout": result})
            if "quit" in commands:
                break
        _say({"idle_closed_by_server": load.closed_idle,
              "messages_to_idle": load.messages_to_idle})
        await close_all(load.idle)
        nursery.cancel_scope.cancel()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m anon_ticket.bench.watchload")
    parser.add_argument("url")
    parser.add_argument("--idle", type=int, default=1000)
    parser.add_argument("--fanout", type=Path, default=None)
    args = parser.parse_args()
    trio.run(main, args.url, args.idle, args.fanout.read_text().split() if args.fanout else [])
    gc.freeze()  # ending: the closing collections need not walk a thousand closed connections
