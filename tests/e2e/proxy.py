"""A recording JSON-RPC proxy in front of wallet-rpc: what did the poller ask for?"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import trio
from hypercorn.config import Config
from hypercorn.trio import serve

from tests.asgi import lifespan, read_body
from tests.harness import free_port


class RecordingProxy:
    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/json_rpc"
        self._client = httpx.AsyncClient(trust_env=False, timeout=300)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await lifespan(receive, send)
            return
        body = await read_body(receive)
        try:
            call = json.loads(body)
            self.calls.append((call.get("method", ""), call.get("params", {})))
        except ValueError:
            pass
        resp = await self._client.post(self.upstream, content=body,
                                       headers={"content-type": "application/json"})
        await send({"type": "http.response.start", "status": resp.status_code,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": resp.content})

    def crediting_windows(self) -> list[tuple[int, int]]:
        """The `get_transfers` calls for confirmed transfers only (the pool scan is apart)."""
        return [(p["min_height"], p["max_height"]) for m, p in self.calls
                if m == "get_transfers" and p.get("in") and not p.get("pool")]


@asynccontextmanager
async def recording_proxy(upstream: str) -> AsyncIterator[RecordingProxy]:
    proxy = RecordingProxy(upstream)
    cfg = Config()
    cfg.bind = [f"127.0.0.1:{proxy.port}"]
    cfg.accesslog = None
    async with trio.open_nursery() as nursery:
        await nursery.start(serve, proxy, cfg)  # type: ignore[arg-type]
        yield proxy
        nursery.cancel_scope.cancel()
    await proxy._client.aclose()
