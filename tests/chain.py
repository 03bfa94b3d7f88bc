"""One real regtest chain for the whole test session, and sync helpers to drive it.

The fixture is registered once for the whole suite, in tests/conftest.py:

    from tests.chain import regtest_chain  # noqa: F401

Test modules name `regtest_chain` as a parameter and mark themselves
`pytestmark = pytest.mark.chain`; they must NOT import the fixture: a fixture imported into a
module is registered again for that module, and a second session chain would start.

The chain (monerod + a funded dev wallet + the watch-only receiver) starts once, on first use
(~10 s), in a temporary directory, and is stopped at the end of the session. Tests share it:
draw a fresh payment id per test, and keep reorgs (`pop_blocks`) on a chain of their own.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import trio

from anon_ticket.devchain import (
    SPEND_HEIGHT,
    TOP_UP_BLOCKS,
    DevChain,
    DevChainInfo,
    plan_ports,
)

_ids = itertools.count(1)


@pytest.fixture(scope="session")
def regtest_chain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevChainInfo]:
    chain = DevChain(tmp_path_factory.mktemp("devchain"), plan_ports())
    procs = chain.spawn()  # fixtures run in the main thread, as PR_SET_PDEATHSIG wants
    try:
        yield trio.run(chain.bootstrap)
    finally:
        chain.terminate(procs)


class RpcFailed(Exception):
    def __init__(self, method: str, code: int, message: str) -> None:
        super().__init__(f"{method}: error {code}: {message}")
        self.code = code
        self.message = message


def rpc_sync(url: str, method: str, params: dict[str, Any] | None = None,
             timeout: float = 120.0) -> dict[str, Any]:
    """One JSON-RPC call; an error object raises `RpcFailed`."""
    body = {"jsonrpc": "2.0", "id": next(_ids), "method": method, "params": params or {}}
    with httpx.Client(trust_env=False, timeout=timeout) as client:
        data = client.post(url, json=body).raise_for_status().json()
    if "error" in data:
        err = data["error"]
        raise RpcFailed(method, int(err.get("code", 0)), str(err.get("message", "")))
    result: dict[str, Any] = data["result"]
    return result


def mine_sync(info: DevChainInfo, n: int, to: str | None = None) -> int:
    """Mine `n` blocks (to the dev wallet); return the chain height (block count) afterwards."""
    result = rpc_sync(info.daemon_url, "generateblocks",
                      {"amount_of_blocks": n, "wallet_address": to or info.dev_address})
    return int(result["height"]) + 1


def pay_sync(info: DevChainInfo, address: str, amount: int) -> str:
    """Send `amount` atomic units from the dev wallet to `address`; return the txid.
    Like `anon_ticket.devchain.pay`: mines up to SPEND_HEIGHT first if blocks were popped
    (monero-wallet-rpc 0.18.0.0 can spin forever choosing decoys on a tiny chain)."""
    params = {"destinations": [{"amount": amount, "address": address}], "priority": 0}
    count = int(rpc_sync(info.daemon_url, "get_block_count")["count"])
    if count < SPEND_HEIGHT:
        mine_sync(info, SPEND_HEIGHT - count)
    rpc_sync(info.dev_wallet_url, "refresh")
    try:
        result = rpc_sync(info.dev_wallet_url, "transfer", params)
    except RpcFailed as exc:
        if "not enough unlocked" not in exc.message and "not enough outputs" not in exc.message:
            raise
        mine_sync(info, TOP_UP_BLOCKS)
        rpc_sync(info.dev_wallet_url, "refresh")
        result = rpc_sync(info.dev_wallet_url, "transfer", params)
    return str(result["tx_hash"])


def refresh_sync(url: str) -> None:
    """Make a wallet catch up with the daemon now (auto-refresh runs only every 20 s)."""
    rpc_sync(url, "refresh")
