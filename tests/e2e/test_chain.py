"""Payments on a real regtest chain (monerod + monero-wallet-rpc), end to end.

One chain serves the whole session (tests/chain.py); each test draws its own payment ids, and
its server (the real actor tree, in-process) scans the chain from the start.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import trio

from anon_ticket.devchain import DevChainInfo
from anon_ticket.domain.address import integrated_address
from anon_ticket.domain.commands import PollerStatus
from anon_ticket.domain.ids import PaymentId
from anon_ticket.domain.messages import Confirmations, PaymentSeen
from supervisors.mailbox import Mailbox
from tests.chain import mine_sync, pay_sync, rpc_sync
from tests.e2e.proxy import recording_proxy
from tests.harness import Server, running_server

pytestmark = pytest.mark.chain

XMR = 10**12
CONFS = 3


def server_for(tmp_path: Path, wallet_url: str, events: Mailbox[Any] | None = None,
               **overrides: Any) -> Any:
    options: dict[str, Any] = {
        "monero_rpc_url": wallet_url, "min_confirmations": CONFS,
        "poll_interval_secs": 0.1, "tree_options": {"events": events},
    }
    options.update(overrides)
    return running_server(tmp_path, **options)


async def chain_height(info: DevChainInfo) -> int:
    result = await trio.to_thread.run_sync(rpc_sync, info.daemon_url, "get_block_count")
    return int(result["count"])


async def pay(info: DevChainInfo, address: str, amount: int) -> str:
    return await trio.to_thread.run_sync(pay_sync, info, address, amount)


async def mine(info: DevChainInfo, n: int) -> int:
    return await trio.to_thread.run_sync(mine_sync, info, n)


async def poller(srv: Server) -> dict[str, Any]:
    status: dict[str, Any] = await srv.tree.mailboxes.poller.ask(PollerStatus(), 10)
    return status


async def wait_scanned(srv: Server, info: DevChainInfo, timeout: float = 60) -> int:
    """Wait until the poller has credited everything deep enough at the current height."""
    target = await chain_height(info) - CONFS
    with trio.fail_after(timeout):
        while True:
            status = await poller(srv)
            if (status["cursor"] or -1) >= target and status["wallet_reachable"]:
                return target
            await trio.sleep(0.05)


async def next_event(events: Mailbox[Any], kind: type, pid: PaymentId,
                     timeout: float = 30) -> Any:
    with trio.fail_after(timeout):
        while True:
            msg = (await events.inbox.receive()).msg
            if isinstance(msg, kind) and msg.pid == pid:
                return msg


@pytest.mark.parametrize("workers", [1, 2])
async def test_pay_wait_for_depth_then_redeem(tmp_path: Path, regtest_chain: DevChainInfo,
                                              workers: int) -> None:
    info = regtest_chain
    events: Mailbox[Any] = Mailbox("events", 10_000)
    async with server_for(tmp_path, info.watch_wallet_url, events, workers=workers) as srv:
        await wait_scanned(srv, info)
        pid = PaymentId.generate()
        ia = integrated_address(info.primary_address, pid)
        await pay(info, ia, math.floor(1.25 * XMR))
        seen = await next_event(events, PaymentSeen, pid)
        assert seen.height is None and seen.amount == 1_250_000_000_000  # in the pool
        assert (await srv.redeem(pid.hex())).status_code == 404
        await mine(info, 1)
        first = await next_event(events, Confirmations, pid)
        assert (first.confirmations, first.required) == (1, CONFS)
        assert (await srv.redeem(pid.hex())).status_code == 404  # 1 of 3: not claimable
        await mine(info, CONFS - 1)
        await wait_scanned(srv, info)
        resp = await srv.redeem(pid.hex())
        assert resp.status_code == 200, resp.text
        assert resp.json()["status"] == "success"
        assert resp.json()["balance"] == 1_250_000_000_000


async def test_steady_state_every_height_in_exactly_one_window(
        tmp_path: Path, regtest_chain: DevChainInfo) -> None:
    info = regtest_chain
    paid: dict[PaymentId, int] = {}
    async with recording_proxy(info.watch_wallet_url) as proxy, \
            server_for(tmp_path, proxy.url) as srv:
        start = await wait_scanned(srv, info)
        for block in range(30):
            if block % 5 != 4:  # payments in most blocks
                pid = PaymentId.generate()
                amount = XMR // 10 + block
                await pay(info, integrated_address(info.primary_address, pid), amount)
                paid[pid] = amount
            await mine(info, 1)
            await wait_scanned(srv, info)  # the poller ticks between blocks
        await mine(info, CONFS)
        end = await wait_scanned(srv, info)
        for pid, amount in paid.items():
            body = (await srv.redeem(pid.hex())).json()
            assert (body["status"], body["balance"]) == ("success", amount)
        covered: list[int] = []
        for low, high in proxy.crediting_windows():
            covered.extend(range(low + 1, high + 1))  # min_height is exclusive (I5)
        assert sorted(covered) == list(range(1, end + 1))
        assert len(covered) == len(set(covered))
        assert end - start >= 30


async def test_a_top_up_after_the_claim_is_credited(tmp_path: Path,
                                                    regtest_chain: DevChainInfo) -> None:
    info = regtest_chain
    async with server_for(tmp_path, info.watch_wallet_url) as srv:
        pid = PaymentId.generate()
        ia = integrated_address(info.primary_address, pid)
        await pay(info, ia, XMR // 2)
        await mine(info, CONFS)
        await wait_scanned(srv, info)
        first = (await srv.redeem(pid.hex())).json()
        assert (first["status"], first["balance"]) == ("success", XMR // 2)
        await pay(info, ia, XMR // 4)
        await mine(info, CONFS)
        await wait_scanned(srv, info)
        again = (await srv.redeem(pid.hex())).json()
        assert again == {"status": "already_claimed", "service_token": first["service_token"],
                         "balance": XMR // 2 + XMR // 4}
        token = (await srv.client.get(f"/api/v1/token/{first['service_token']}")).json()
        assert token["amount"] == XMR // 2 + XMR // 4


async def test_no_pid_dust_and_time_locked_are_never_redeemable(
        tmp_path: Path, regtest_chain: DevChainInfo) -> None:
    info = regtest_chain
    async with server_for(tmp_path, info.watch_wallet_url) as srv:
        plain = await pay(info, info.primary_address, XMR // 10)
        dust_pid = PaymentId.generate()
        dust = await pay(info, integrated_address(info.primary_address, dust_pid), 10**9)
        locked_pid = PaymentId.generate()
        height = await chain_height(info)
        rpc_sync(info.dev_wallet_url, "refresh")
        locked = rpc_sync(info.dev_wallet_url, "transfer", {
            "destinations": [{"amount": XMR // 10, "address": integrated_address(
                info.primary_address, locked_pid)}],
            "priority": 0, "unlock_time": height + 500})["tx_hash"]
        await mine(info, CONFS)
        await wait_scanned(srv, info)
        for pid in (dust_pid, locked_pid):
            assert (await srv.redeem(pid.hex())).status_code == 404
        rows = (await srv.internal.get("/admin/skipped?limit=10000")).json()["skipped"]
        reasons = {r["txid"]: r["reason"] for r in rows}
        assert reasons[plain] == "no_payment_id"
        assert reasons[dust] == "dust"
        assert reasons[locked] == "time_locked"
