"""The devchain actor: a private regtest chain (monerod + two wallet-rpcs) as child processes.

Run only with `--dev-chain`. At start it stops whatever a previous run left behind (PID files
under its root), spawns the three children, bootstraps the chain (wallets created the first
time, reused afterwards: the chain survives restarts) and reports ready. Then it watches the
children: one that exits is a crash (`RuntimeError` naming it), so the supervisor restarts the
whole chain on the same ports and files. On a stop or a crash the children are stopped
gracefully (wallets first, so they save), shielded from cancellation, and `devchain.json`
is removed.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import trio

from anon_ticket.devchain import DevChain, DevChainInfo, DevChainPorts
from anon_ticket.logs import get_logger

log = get_logger("devchain")

POLL_SECS = 0.5


class DevChainActor:
    name = "devchain"

    def __init__(self, root: Path, ports: DevChainPorts, *, grace: float = 20.0) -> None:
        self.root = root
        self.ports = ports
        self.grace = grace
        self.info: DevChainInfo | None = None
        self.chain = DevChain(root, ports)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        chain = self.chain
        procs: list[subprocess.Popen[bytes]] = []
        try:
            chain.remove_info()
            await trio.to_thread.run_sync(chain.reap_leftovers)
            # Forked from the trio thread (the main thread), never from a worker thread:
            # PR_SET_PDEATHSIG fires when the forking thread exits.
            procs = chain.spawn()
            info = await chain.bootstrap()
            self.info = info
            log.info("dev chain running", primary_address=info.primary_address,
                     watch_wallet_url=info.watch_wallet_url, data_dir=self.root.parent)
            log.info("dev chain: to pay, build an integrated address (anon-ticket pid new "
                     "--address <primary address>), then",
                     pay="anon-ticket dev pay <integrated address> 1.5",
                     confirm="anon-ticket dev mine 10")
            task_status.started()
            while True:
                for name, proc in list(chain.children.items()):
                    code = proc.poll()
                    if code is not None:
                        raise RuntimeError(
                            f"dev chain child {name} (pid {proc.pid}) exited with code {code}")
                await trio.sleep(POLL_SECS)
        finally:
            self.info = None
            with trio.CancelScope(shield=True):
                if procs:
                    await trio.to_thread.run_sync(chain.terminate, procs, self.grace)
                chain.remove_info()
                log.info("dev chain stopped")
