"""Faults on a real regtest chain: kill -9 mid catch-up, wallet-rpc down or frozen, reorgs."""

from __future__ import annotations

import json
import random
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from trio_websocket import open_websocket_url

from anon_ticket.devchain import DevChain, DevChainInfo, flush_txpool, plan_ports, pop_blocks
from anon_ticket.domain.address import integrated_address
from anon_ticket.domain.ids import PaymentId
from tests.chain import mine_sync, pay_sync, rpc_sync
from tests.e2e.test_chain import (
    CONFS,
    XMR,
    chain_height,
    mine,
    pay,
    poller,
    server_for,
    wait_scanned,
)
from tests.harness import free_port
from tests.process.proc import cli, kill, start_server

pytestmark = pytest.mark.chain


def test_kill_9_during_catch_up_loses_nothing_and_credits_nothing_twice(
        tmp_path: Path, regtest_chain: DevChainInfo) -> None:
    info = regtest_chain
    paid: dict[str, int] = {}
    for i in range(12):
        pid = PaymentId.generate()
        amount = XMR // 20 + i
        pay_sync(info, integrated_address(info.primary_address, pid), amount)
        paid[pid.hex()] = amount
        if i % 3 == 2:
            mine_sync(info, 1)  # spread them over several blocks
    mine_sync(info, CONFS)
    data = tmp_path / "data"
    env = {"MONERO_RPC_URL": info.watch_wallet_url}
    # One height per window: a long catch-up, killed at random instants (I4).
    args = ("--min-confirmations", str(CONFS), "--scan-window-blocks", "1",
            "--poll-interval-secs", "0.1")
    rng = random.Random(4)
    for _ in range(4):
        server = start_server(data, env=env, args=args)
        time.sleep(rng.uniform(0.05, 0.6))
        kill(server)
    server = start_server(data, env=env, args=args)
    try:
        target = int(rpc_sync(info.daemon_url, "get_block_count")["count"]) - CONFS
        deadline = time.monotonic() + 120
        with server.internal() as internal:
            while True:  # the cursor is null until the poller's first tick has read it
                cursor = internal.get("/admin/status").json()["poller"]["cursor"]
                if cursor is not None and cursor >= target:
                    break
                assert time.monotonic() < deadline, server.log()
                time.sleep(0.1)
        with httpx.Client(base_url=server.url, timeout=10) as client:
            for pid, amount in paid.items():
                body = client.post("/api/v1/redeem", json={"pid": pid}).json()
                assert (body["status"], body["balance"]) == ("success", amount)
    finally:
        server.stop()
    check = cli(data, "db", "check")  # balances = sums of transfers, none credited twice
    assert check.returncode == 0, check.stdout + check.stderr


def test_a_killed_dev_chain_server_leaves_no_child_behind(tmp_path: Path) -> None:
    data = tmp_path / "data"
    server = start_server(data, env={"MONERO_RPC_URL": ""}, args=("--dev-chain",))
    server.wait_ready(timeout=120)
    pids = [int(p.read_text()) for p in (data / "devchain" / "pids").glob("*.pid")]
    assert len(pids) == 3
    kill(server)
    # PDEATHSIG sends all three SIGTERM at once (no wallets-first order as in a stop): the
    # wallets save and monerod flushes its database before exiting. Typically 2 s; once more
    # than 20 s on a loaded 2-core machine. What this test guards is that they go.
    started = time.monotonic()
    while any(Path(f"/proc/{p}").exists() for p in pids):
        assert time.monotonic() < started + 90, "dev chain children outlived the server"
        time.sleep(0.1)


class WalletProcess:
    """Our own watch-only wallet-rpc (a copy of the shared one), to stop and freeze."""

    def __init__(self, info: DevChainInfo, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/json_rpc"
        wallets = root / "wallets"
        wallets.mkdir(parents=True)
        for name in ("receiver-watch", "receiver-watch.keys"):
            shutil.copy(info.root / "wallets" / name, wallets / name)
        daemon_port = info.daemon_url.split(":")[2].split("/")[0]
        self.cmd = [
            "monero-wallet-rpc", "--daemon-address", f"127.0.0.1:{daemon_port}",
            "--trusted-daemon", "--daemon-ssl", "disabled", "--rpc-ssl", "disabled",
            "--rpc-bind-ip", "127.0.0.1", "--rpc-bind-port", str(self.port),
            "--disable-rpc-login", "--disable-rpc-ban", "--wallet-dir", str(wallets),
            "--shared-ringdb-dir", str(root / "ringdb"), "--no-dns", "--non-interactive",
            "--log-file", str(root / "wallet.log"),
        ]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 60
        while True:
            try:
                rpc_sync(self.url, "open_wallet", {"filename": "receiver-watch",
                                                   "password": ""})
                return
            except (httpx.TransportError, httpx.HTTPStatusError):
                assert time.monotonic() < deadline
                time.sleep(0.1)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


async def test_wallet_rpc_down_then_frozen_degrades_and_recovers(
        tmp_path: Path, regtest_chain: DevChainInfo) -> None:
    info = regtest_chain
    wallet = WalletProcess(info, tmp_path / "wallet")
    await trio.to_thread.run_sync(wallet.start)
    try:
        async with server_for(tmp_path, wallet.url, rpc_timeout_secs=2) as srv:
            await wait_scanned(srv, info, timeout=120)
            health = (await srv.client.get("/healthz")).json()
            assert health["status"] == "ok", health["chain"]["last_error"]
            for outage in ("stopped", "frozen"):
                pid = PaymentId.generate()
                if outage == "stopped":
                    await trio.to_thread.run_sync(wallet.stop)
                else:
                    assert wallet.proc is not None
                    wallet.proc.send_signal(signal.SIGSTOP)
                await pay(info, integrated_address(info.primary_address, pid), XMR // 7)
                await mine(info, CONFS)
                with trio.fail_after(30):  # times out or is refused, backs off, degrades
                    while (await srv.client.get("/healthz")).json()["status"] != "degraded":
                        await trio.sleep(0.1)
                health = await srv.client.get("/healthz")
                assert health.status_code == 200  # redemption still works
                age_1 = (await poller(srv))["last_success_age_secs"]
                await trio.sleep(1.0)
                assert (await poller(srv))["last_success_age_secs"] > age_1  # lag grows
                metrics = (await srv.internal.get("/metrics")).text
                assert "anon_ticket_last_successful_poll_age_seconds" in metrics
                assert (await srv.redeem(pid.hex())).status_code == 404
                if outage == "stopped":
                    await trio.to_thread.run_sync(wallet.start)
                else:
                    assert wallet.proc is not None
                    wallet.proc.send_signal(signal.SIGCONT)
                await wait_scanned(srv, info, timeout=120)  # recovers by itself
                body = (await srv.redeem(pid.hex())).json()
                assert (body["status"], body["balance"]) == ("success", XMR // 7)
                with trio.fail_after(30):
                    while (await srv.client.get("/healthz")).json()["status"] != "ok":
                        await trio.sleep(0.1)
    finally:
        await trio.to_thread.run_sync(wallet.stop)


@pytest.fixture(scope="module")
def reorg_chain(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A chain of its own: popping blocks would disturb the shared one."""
    chain = DevChain(tmp_path_factory.mktemp("reorg-chain"), plan_ports())
    procs = chain.spawn()
    try:
        yield trio.run(chain.bootstrap)
    finally:
        chain.terminate(procs)


async def test_a_reorg_under_recorded_payments(tmp_path: Path,
                                               reorg_chain: DevChainInfo) -> None:
    info = reorg_chain
    async with server_for(tmp_path, info.watch_wallet_url) as srv:
        url = f"ws://{srv.settings.bind_host}:{srv.settings.bind_port}/api/v1/watch"
        for claim_first in (False, True):
            pid = PaymentId.generate()
            async with open_websocket_url(url) as ws:
                await ws.send_message(json.dumps({"op": "subscribe", "pid": pid.hex()}))
                assert json.loads(await ws.get_message())["type"] == "state"
                await pay(info, integrated_address(info.primary_address, pid), XMR // 3)
                fork = await chain_height(info)
                await mine(info, CONFS + 1)
                await wait_scanned(srv, info)
                token = None
                if claim_first:
                    body = (await srv.redeem(pid.hex())).json()
                    assert body["status"] == "success"
                    token = body["service_token"]
                # Pop the blocks under the payment, drop it from the pool, mine past it.
                await pop_blocks(info, await chain_height(info) - fork)
                await flush_txpool(info)
                await mine(info, CONFS + 3)
                with trio.fail_after(60):  # the watcher hears of it, numbered like any fact
                    while (reorg := json.loads(await ws.get_message()))["type"] != "reorg":
                        pass
            assert reorg["claimed"] is claim_first and reorg["amount"] == XMR // 3
            if token is None:
                assert (await srv.redeem(pid.hex())).status_code == 404
            else:  # alert raised, token kept
                view = (await srv.client.get(f"/api/v1/token/{token}")).json()
                assert view["status"] == "active" and view["amount"] == 0
                metrics = (await srv.internal.get("/metrics")).text
                assert 'anon_ticket_alerts_total{kind="claimed_transfer_vanished"} 1.0' in metrics
