"""Watching and steering on a real regtest chain: the event stream, pause, resume, rescan."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import trio
from trio_websocket import open_websocket_url

from anon_ticket.devchain import DevChainInfo
from anon_ticket.domain.address import integrated_address
from anon_ticket.domain.ids import PaymentId
from anon_ticket.errors import Unavailable
from tests.e2e.test_chain import CONFS, XMR, mine, pay, poller, server_for, wait_scanned
from tests.harness import ledger_problems

pytestmark = pytest.mark.chain


@pytest.mark.parametrize("workers", [1, 2])
async def test_a_watcher_sees_the_whole_life_of_a_real_payment(
        tmp_path: Path, regtest_chain: DevChainInfo, workers: int) -> None:
    info = regtest_chain
    async with server_for(tmp_path, info.watch_wallet_url, workers=workers) as srv:
        await wait_scanned(srv, info)
        pid = PaymentId.generate()
        url = f"ws://{srv.settings.bind_host}:{srv.settings.bind_port}/api/v1/watch"
        messages: list[dict[str, Any]] = []
        async with open_websocket_url(url) as ws:
            async def recv() -> dict[str, Any]:
                with trio.fail_after(60):
                    msg: dict[str, Any] = json.loads(await ws.get_message())
                messages.append(msg)
                return msg

            async def late_state() -> dict[str, Any]:
                """What a watcher that subscribes now is told."""
                async with open_websocket_url(url) as late:
                    await late.send_message(json.dumps({"op": "subscribe", "pid": pid.hex()}))
                    with trio.fail_after(30):
                        state: dict[str, Any] = json.loads(await late.get_message())
                assert state["type"] == "state"
                return state

            await ws.send_message(json.dumps({"op": "subscribe", "pid": pid.hex()}))
            assert (await recv())["type"] == "state"
            await pay(info, integrated_address(info.primary_address, pid), XMR // 5)
            assert (await recv())["type"] == "payment_seen"
            # A watcher that comes after the pool sighting learns it from its state.
            assert (await late_state())["pending"] == [
                {"amount": XMR // 5, "in_pool": True, "confirmations": 0, "required": CONFS}]
            for k in range(1, CONFS):
                await mine(info, 1)
                while (await recv())["type"] != "confirmations":
                    pass
                if k == 2:
                    late = await late_state()
                    assert (late["status"], late["pending"]) == ("waiting", [
                        {"amount": XMR // 5, "in_pool": False, "confirmations": 2,
                         "required": CONFS}])
            await mine(info, 1)  # the N-th confirmation: deep enough, credited
            while (await recv())["type"] != "payment_confirmed":
                pass
            token = (await srv.redeem(pid.hex())).json()["service_token"]
            while (await recv())["type"] != "claimed":
                pass
            # the token's own stream: a real top-up, then a revocation
            await ws.send_message(json.dumps({"op": "subscribe", "token": token}))
            while (msg := await recv())["type"] != "state" or "token" not in msg:
                pass
            await pay(info, integrated_address(info.primary_address, pid), XMR // 10)
            await mine(info, CONFS)
            while not ((msg := await recv())["type"] == "topped_up" and "token" in msg):
                pass
            await srv.internal.post(f"/api/v1/token/{token}/revoke", json={})
            while not ((msg := await recv())["type"] == "revoked" and "token" in msg):
                pass
        kinds = [m["type"] for m in messages if "pid" in m]
        order = ["state", "payment_seen", "confirmations", "payment_confirmed", "claimed"]
        assert [k for k in kinds if k in order][:1] == ["state"]
        firsts = [kinds.index(k) for k in order]
        assert firsts == sorted(firsts), kinds
        confs = [m["confirmations"] for m in messages if m["type"] == "confirmations"]
        assert confs[:CONFS] == list(range(1, CONFS + 1))  # k of N, up to N (then the top-up)
        # N of N comes before the credit it announces, as the README shows
        nth = next(i for i, m in enumerate(messages) if m.get("confirmations") == CONFS)
        assert nth < [m["type"] for m in messages].index("payment_confirmed"), kinds
        seqs = [m["seq"] for m in messages if "seq" in m and "pid" in m and m["type"] != "state"]
        assert seqs == sorted(seqs) and len(seqs) == len(set(seqs))
        token_kinds = [m["type"] for m in messages if "token" in m]
        assert token_kinds == ["state", "topped_up", "revoked"]


async def poller_status(srv: Any) -> dict[str, Any]:
    """The poller's status, or `restarting` while its mailbox is not served."""
    try:
        return await poller(srv)
    except Unavailable:
        return {"state": "restarting"}


async def test_pause_resume_restart_and_rescan_lose_and_double_nothing(
        tmp_path: Path, regtest_chain: DevChainInfo) -> None:
    info = regtest_chain
    async with server_for(tmp_path, info.watch_wallet_url) as srv:
        start = await wait_scanned(srv, info)
        paid: dict[PaymentId, int] = {}

        async def payment(i: int) -> None:
            pid = PaymentId.generate()
            await pay(info, integrated_address(info.primary_address, pid), XMR // 50 + i)
            paid[pid] = XMR // 50 + i
            await mine(info, 1)

        assert (await srv.internal.post("/admin/poller/pause")).json()["state"] == "paused"
        for i in range(3):
            await payment(i)
        assert (await poller(srv))["cursor"] <= start  # paused: nothing scanned
        # The pause is stored: a restarted poller (or, on PostgreSQL, a new leader) holds it.
        resp = await srv.internal.post("/admin/actors/poller/restart")
        assert resp.status_code == 200
        with trio.fail_after(10):
            while (await poller_status(srv))["state"] != "paused":
                await trio.sleep(0.05)
        await mine(info, 1)
        await trio.sleep(1)  # ten polling intervals
        assert (await poller(srv))["cursor"] in (None, *range(start + 1))
        assert (await srv.internal.post("/admin/poller/resume")).status_code == 200
        await payment(3)
        resp = await srv.internal.post("/admin/actors/poller/restart")
        assert resp.status_code == 200
        await payment(4)
        await mine(info, CONFS)
        await wait_scanned(srv, info)
        rescan = await srv.internal.post("/admin/poller/rescan", json={"from_height": 1})
        assert rescan.status_code == 200
        await mine(info, 1)
        await wait_scanned(srv, info)
        for pid, amount in paid.items():
            body = (await srv.redeem(pid.hex())).json()
            assert (body["status"], body["balance"]) == ("success", amount)  # not doubled
        # balances equal the sums of transfers, and no transfer is credited twice (I1)
        assert ledger_problems(srv.settings) == []
