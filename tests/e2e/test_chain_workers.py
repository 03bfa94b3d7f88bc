"""Worker processes on a real regtest chain: no false Bloom negative while workers restart
and payments arrive (docs/architecture.md §8)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import trio

from anon_ticket.devchain import DevChainInfo
from anon_ticket.domain.address import integrated_address
from anon_ticket.domain.ids import PaymentId
from tests.e2e.test_chain import CONFS, XMR, mine, pay, server_for, wait_scanned
from tests.process.test_workers import fresh_client, worker_os_pid, workers_serving

pytestmark = pytest.mark.chain


async def test_payments_arriving_while_workers_restart_are_never_a_404(
        tmp_path: Path, regtest_chain: DevChainInfo) -> None:
    info = regtest_chain
    async with server_for(tmp_path, info.watch_wallet_url, workers=2) as srv:
        await wait_scanned(srv, info)
        await workers_serving(srv)
        paid: list[PaymentId] = []
        for i in range(6):
            pid = PaymentId.generate()
            await pay(info, integrated_address(info.primary_address, pid), XMR // 20 + i)
            paid.append(pid)
            await mine(info, 1)
            if i in (1, 3):  # kill -9 a worker while payments keep arriving
                os.kill(worker_os_pid(1 + i // 2 % 2), signal.SIGKILL)
            await trio.sleep(0.3)
        await mine(info, CONFS)
        await wait_scanned(srv, info)
        await workers_serving(srv)
        async with fresh_client(srv) as client:
            for pid in paid:
                codes = {(await client.post("/api/v1/redeem", json={"pid": pid.hex()})
                          ).status_code for _ in range(6)}
                assert codes == {200}, (pid.hex(), codes)
        status = (await srv.internal.get("/admin/status")).json()
        restarts = {a["name"]: a["restarts"] for a in status["actors"]}
        assert restarts["worker-1"] + restarts["worker-2"] == 2
