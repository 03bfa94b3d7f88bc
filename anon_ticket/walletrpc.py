"""A trio-native JSON-RPC client for monero-wallet-rpc (and monerod), on httpx.

Transport and protocol failures are translated at this boundary into a small hierarchy
(`RpcUnavailable`, `RpcTimeout`, `RpcProtocolError`, `RpcCallError`), each with a clear
message; nothing above this module sees an httpx exception. Every method has its own timeout:
`refresh` on a real wallet can take minutes, `get_height` should not. Answers are read into
typed records here (`get_transfers` entries: `WalletTransfer`); nothing above sees the JSON.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import httpx

from anon_ticket.domain.transfers import WalletTransfer
from anon_ticket.errors import (
    ConfigError,
    RpcBusy,
    RpcCallError,
    RpcError,
    RpcProtocolError,
    RpcTimeout,
    RpcUnavailable,
)

# Seconds per method; anything not listed gets DEFAULT_TIMEOUT.
TIMEOUTS: dict[str, float] = {
    "refresh": 300.0,
    "get_transfers": 60.0,
    "get_transfer_by_txid": 30.0,
    "get_height": 10.0,
    "get_address": 10.0,
    "query_key": 10.0,
    "get_version": 5.0,
    "create_wallet": 120.0,
    "open_wallet": 120.0,
    "generate_from_keys": 120.0,
    "transfer": 120.0,
    "generateblocks": 300.0,
    "store": 60.0,
}
DEFAULT_TIMEOUT = 30.0
# monero-wallet-rpc error codes we act on
DAEMON_IS_BUSY = -3
NOT_FOUND_TXID = -8
WATCH_ONLY = -29


@contextmanager
def _translate(url: str, method: str, timeout: float) -> Iterator[None]:
    try:
        yield
    except httpx.TimeoutException:
        raise RpcTimeout(f"{method}: no answer from {url} within {timeout:g}s") from None
    except (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError,
            httpx.WriteError) as exc:
        raise RpcUnavailable(f"{method}: {url} unreachable ({type(exc).__name__})") from None
    except httpx.HTTPError as exc:
        raise RpcProtocolError(f"{method}: {type(exc).__name__} talking to {url}") from None


@dataclass(frozen=True, slots=True)
class WalletIdentity:
    primary_address: str
    watch_only: bool

    def check(self, expected: str | None, url: str) -> None:
        """Raise ConfigError (fatal: exit 2) if this is not the configured wallet."""
        if expected is not None and self.primary_address != expected:
            raise ConfigError([
                f"the wallet at {url} has primary address {self.primary_address[:12]}…, "
                f"not the configured {expected[:12]}…"])


class JsonRpc:
    """One JSON-RPC endpoint (`.../json_rpc`); also reaches plain paths of monerod."""

    def __init__(self, url: str, *, login: str | None = None,
                 timeout_cap: float | None = None,
                 client: httpx.AsyncClient | None = None) -> None:
        self.url = url
        self.timeout_cap = timeout_cap
        auth = None
        if login:
            user, _, password = login.partition(":")
            auth = httpx.DigestAuth(user, password)
        self._client = client or httpx.AsyncClient(auth=auth, trust_env=False)
        self._ids = itertools.count(1)

    async def aclose(self) -> None:
        await self._client.aclose()

    async def call(self, method: str, params: dict[str, Any] | None = None,
                   timeout: float | None = None) -> dict[str, Any]:
        timeout = timeout if timeout is not None else TIMEOUTS.get(method, DEFAULT_TIMEOUT)
        if self.timeout_cap is not None:
            timeout = min(timeout, self.timeout_cap)
        body = {"jsonrpc": "2.0", "id": next(self._ids), "method": method,
                "params": params or {}}
        with _translate(self.url, method, timeout):
            resp = await self._client.post(self.url, json=body, timeout=timeout)
        return _result(method, resp)

    async def post_path(self, path: str, body: dict[str, Any],
                        timeout: float = DEFAULT_TIMEOUT) -> dict[str, Any]:
        """monerod's non-JSON-RPC endpoints (`/pop_blocks`, ...)."""
        base = self.url.rsplit("/json_rpc", 1)[0]
        with _translate(base, path, timeout):
            resp = await self._client.post(f"{base}{path}", json=body, timeout=timeout)
        return _json_object(path, resp)


def _json_object(what: str, resp: httpx.Response) -> dict[str, Any]:
    if resp.status_code == 401:
        raise RpcProtocolError(f"{what}: 401 unauthorized (check --monero-rpc-login)")
    if resp.status_code != 200:
        raise RpcProtocolError(f"{what}: HTTP {resp.status_code}")
    try:
        data = resp.json()
    except ValueError:
        raise RpcProtocolError(f"{what}: answer is not JSON") from None
    if not isinstance(data, dict):
        raise RpcProtocolError(f"{what}: answer is not a JSON object")
    return data


def _result(method: str, resp: httpx.Response) -> dict[str, Any]:
    data = _json_object(method, resp)
    error = data.get("error")
    if error is not None:
        if not isinstance(error, dict):
            raise RpcProtocolError(f"{method}: malformed error object")
        code = error.get("code")
        if code == DAEMON_IS_BUSY:
            raise RpcBusy(f"{method}: the wallet's daemon is busy (syncing?)")
        raise RpcCallError(method, code if isinstance(code, int) else 0,
                           str(error.get("message", ""))[:200])
    result = data.get("result")
    if not isinstance(result, dict):
        raise RpcProtocolError(f"{method}: answer has no result object")
    return result


def _int(value: Any, what: str) -> int:
    if type(value) is not int:
        raise RpcProtocolError(f"{what} is not an integer")
    return value


class WalletRpc:
    """The calls the poller makes, with their answers checked."""

    def __init__(self, rpc: JsonRpc) -> None:
        self.rpc = rpc

    @property
    def url(self) -> str:
        return self.rpc.url

    async def aclose(self) -> None:
        await self.rpc.aclose()

    async def refresh(self) -> None:
        await self.rpc.call("refresh")

    async def get_height(self) -> int:
        return _int((await self.rpc.call("get_height")).get("height"), "get_height.height")

    async def identity(self) -> WalletIdentity:
        address = (await self.rpc.call("get_address", {"account_index": 0})).get("address")
        if not isinstance(address, str):
            raise RpcProtocolError("get_address: no address in the answer")
        try:
            await self.rpc.call("query_key", {"key_type": "spend_key"})
        except RpcCallError as exc:
            if exc.code == WATCH_ONLY:
                return WalletIdentity(address, watch_only=True)
            raise
        return WalletIdentity(address, watch_only=False)

    async def incoming(self, min_height: int, max_height: int) -> list[WalletTransfer]:
        """Confirmed incoming transfers with min_height < height <= max_height (I5)."""
        result = await self.rpc.call("get_transfers", {
            "in": True, "filter_by_height": True,
            "min_height": min_height, "max_height": max_height,
        })
        return _entries(result, "in")

    async def pool_and_recent(self, min_height: int) -> list[WalletTransfer]:
        """Pool entries and confirmed ones above `min_height` (announced, not claimable)."""
        result = await self.rpc.call("get_transfers", {
            "in": True, "pool": True, "filter_by_height": True,
            "min_height": min_height, "max_height": 2**62,
        })
        return _entries(result, "in") + _entries(result, "pool")

    async def transfer_exists(self, txid: str) -> bool:
        try:
            await self.rpc.call("get_transfer_by_txid", {"txid": txid})
        except RpcCallError as exc:
            if exc.code == NOT_FOUND_TXID:
                return False
            raise
        return True


def _entries(result: dict[str, Any], key: str) -> list[WalletTransfer]:
    entries = result.get(key, [])  # wallet-rpc omits empty lists
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise RpcProtocolError(f"get_transfers.{key} is not a list of objects")
    return [wallet_transfer(e) for e in entries]


_HEX = frozenset("0123456789abcdef")


def _count(value: object) -> int | None:
    """An amount or a height: a non-negative integer (JSON true is not one)."""
    return value if type(value) is int and value >= 0 else None


def wallet_transfer(entry: dict[str, Any]) -> WalletTransfer:
    """One `get_transfers` entry, typed; never raises, whatever the wallet sent (I7): what
    it means is anon_ticket/domain/transfers.py's to decide."""
    raw_txid = entry.get("txid")
    txid = (bytes.fromhex(raw_txid) if isinstance(raw_txid, str) and len(raw_txid) == 64
            and _HEX.issuperset(raw_txid.lower()) else None)
    payment_id = entry.get("payment_id")
    kind = entry.get("type")
    amount, height = _count(entry.get("amount")), _count(entry.get("height"))
    fingerprint = None
    if txid is None or amount is None or height is None:
        text = json.dumps(entry, sort_keys=True, default=str)
        fingerprint = hashlib.sha3_256(text.encode()).digest()
    return WalletTransfer(
        txid=txid,
        payment_id=payment_id if isinstance(payment_id, str) else None,
        amount=amount,
        height=height,
        type=kind if isinstance(kind, str) else None,
        time_locked=entry.get("unlock_time", 0) != 0,
        fingerprint=fingerprint,
    )


__all__ = ["JsonRpc", "RpcError", "WalletIdentity", "WalletRpc", "wallet_transfer"]
