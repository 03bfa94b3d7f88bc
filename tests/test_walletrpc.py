"""The wallet-rpc client's boundary: every transport or protocol failure is one of ours."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
from hypercorn.config import Config
from hypercorn.trio import serve

from anon_ticket.errors import (
    RpcBusy,
    RpcCallError,
    RpcProtocolError,
    RpcTimeout,
    RpcUnavailable,
)
from anon_ticket.walletrpc import JsonRpc, WalletRpc
from tests.asgi import lifespan, read_body
from tests.harness import free_port


class Scripted:
    """Answers each JSON-RPC method as the test says: (status, body bytes) or a hang."""

    def __init__(self) -> None:
        self.answers: dict[str, tuple[int, bytes] | None] = {}

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await lifespan(receive, send)
            return
        body = await read_body(receive)
        answer = self.answers[json.loads(body)["method"]]
        if answer is None:
            await trio.sleep_forever()
            return
        status, payload = answer
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": payload})


@asynccontextmanager
async def wallet(app: Scripted) -> AsyncIterator[WalletRpc]:
    port = free_port()
    cfg = Config()
    cfg.bind = [f"127.0.0.1:{port}"]
    async with trio.open_nursery() as nursery:
        await nursery.start(serve, app, cfg)  # type: ignore[arg-type]
        client = WalletRpc(JsonRpc(f"http://127.0.0.1:{port}/json_rpc", timeout_cap=0.5))
        yield client
        await client.aclose()
        nursery.cancel_scope.cancel()


def ok(result: dict[str, Any]) -> tuple[int, bytes]:
    return 200, json.dumps({"jsonrpc": "2.0", "id": 1, "result": result}).encode()


def err(code: int, message: str) -> tuple[int, bytes]:
    return 200, json.dumps({"jsonrpc": "2.0", "id": 1,
                            "error": {"code": code, "message": message}}).encode()


async def test_answers_and_errors_map_to_the_hierarchy() -> None:
    app = Scripted()
    async with wallet(app) as w:
        app.answers["get_height"] = ok({"height": 42})
        assert await w.get_height() == 42
        app.answers["get_height"] = ok({"height": "42"})
        with pytest.raises(RpcProtocolError, match="not an integer"):
            await w.get_height()
        app.answers["get_height"] = (200, b"<html>proxy error</html>")
        with pytest.raises(RpcProtocolError, match="not JSON"):
            await w.get_height()
        app.answers["get_height"] = (401, b"")
        with pytest.raises(RpcProtocolError, match="unauthorized"):
            await w.get_height()
        app.answers["get_height"] = (500, b"")
        with pytest.raises(RpcProtocolError, match="HTTP 500"):
            await w.get_height()
        app.answers["refresh"] = err(-3, "daemon is busy")
        with pytest.raises(RpcBusy):
            await w.refresh()
        app.answers["get_transfer_by_txid"] = err(-8, "Transaction not found.")
        assert await w.transfer_exists("ab" * 32) is False
        app.answers["get_transfer_by_txid"] = err(-13, "No wallet file")
        with pytest.raises(RpcCallError) as called:
            await w.transfer_exists("ab" * 32)
        assert called.value.code == -13
        app.answers["get_transfers"] = ok({})  # wallet-rpc omits empty lists
        assert await w.incoming(0, 10) == []
        app.answers["get_transfers"] = ok({"in": "nope"})
        with pytest.raises(RpcProtocolError):
            await w.incoming(0, 10)
        app.answers["get_address"] = ok({"address": "4abc"})
        app.answers["query_key"] = err(-29, "The wallet is watch-only.")
        identity = await w.identity()
        assert identity.primary_address == "4abc" and identity.watch_only
        app.answers["get_height"] = None  # hangs: the per-call timeout holds
        with trio.fail_after(5), pytest.raises(RpcTimeout, match=r"within 0\.5s"):
            await w.get_height()


async def test_nothing_listening_is_unavailable() -> None:
    w = WalletRpc(JsonRpc(f"http://127.0.0.1:{free_port()}/json_rpc"))
    with pytest.raises(RpcUnavailable, match="unreachable"):
        await w.get_height()
    await w.aclose()
