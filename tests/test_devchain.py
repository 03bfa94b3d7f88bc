"""The dev chain on real monerod + monero-wallet-rpc processes."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import trio

from actors.devchain import DevChainActor
from anon_ticket import devchain, devreap
from anon_ticket.devchain import (
    DevChain,
    DevChainInfo,
    DevChainPorts,
    plan_ports,
    xmr_to_atomic,
)
from anon_ticket.devcli import add_dev_parser, run_dev
from anon_ticket.domain.address import integrated_address
from anon_ticket.domain.ids import PaymentId
from anon_ticket.errors import InvalidInput, RpcCallError
from anon_ticket.walletrpc import WATCH_ONLY, JsonRpc
from tests.chain import mine_sync, pay_sync, refresh_sync, rpc_sync

pytestmark = pytest.mark.chain

REPO = Path(__file__).resolve().parents[1]



def _alive(pid: int) -> bool:
    """Running (a zombie waiting for a reaper counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _wait_dead(pids: list[int], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        left = [p for p in pids if _alive(p)]
        if not left:
            return []
        time.sleep(0.1)
    return [p for p in pids if _alive(p)]


def _pids(root: Path) -> dict[str, int]:
    return {f.stem: int(f.read_text()) for f in (root / "pids").glob("*.pid")}


async def _pool(info: DevChainInfo) -> list[str]:
    daemon = JsonRpc(info.daemon_url)
    try:
        result = await daemon.post_path("/get_transaction_pool_hashes", {})
    finally:
        await daemon.aclose()
    return list(result.get("tx_hashes", []))


# --- the session chain -------------------------------------------------------------------------


async def test_watch_wallet_is_watch_only_with_the_primary_address(
        regtest_chain: DevChainInfo) -> None:
    watch = JsonRpc(regtest_chain.watch_wallet_url)
    try:
        with pytest.raises(RpcCallError) as caught:
            await watch.call("query_key", {"key_type": "spend_key"})
        assert caught.value.code == WATCH_ONLY
        address = await watch.call("get_address", {"account_index": 0})
        assert address["address"] == regtest_chain.primary_address
        view = await watch.call("query_key", {"key_type": "view_key"})
        assert view["key"] == regtest_chain.view_key
    finally:
        await watch.aclose()
    assert regtest_chain.dev_address != regtest_chain.primary_address
    info_file = regtest_chain.root / "devchain.json"
    assert DevChainInfo.from_file(info_file) == regtest_chain
    assert info_file.stat().st_mode & 0o777 == 0o600
    info = regtest_chain
    for url in (info.daemon_url, info.dev_wallet_url, info.watch_wallet_url):
        assert url.startswith("http://127.0.0.1:") and url.endswith("/json_rpc")


async def test_payment_to_an_integrated_address_reaches_the_watch_wallet(
        regtest_chain: DevChainInfo) -> None:
    pid = PaymentId.generate()
    ia = integrated_address(regtest_chain.primary_address, pid)
    amount = 1_500_000_000_000
    txid = await devchain.pay(regtest_chain, ia, amount)
    watch = JsonRpc(regtest_chain.watch_wallet_url)
    try:
        pool = (await watch.call("get_transfers", {"pool": True})).get("pool", [])
        mine = [t for t in pool if t["txid"] == txid]
        assert len(mine) == 1 and mine[0]["payment_id"] == pid.hex()
        assert mine[0]["amount"] == amount and mine[0]["type"] == "pool"

        height = await devchain.mine(regtest_chain, 1)
        assert height == await devchain.height(regtest_chain)
        await watch.call("refresh")
        incoming = (await watch.call("get_transfers", {"in": True})).get("in", [])
        found = [t for t in incoming if t["txid"] == txid]
        assert len(found) == 1
        entry = found[0]
        assert entry["type"] == "in" and entry["payment_id"] == pid.hex()
        assert entry["amount"] == amount and entry["height"] == height - 1
        assert entry["address"] == regtest_chain.primary_address
    finally:
        await watch.aclose()


def test_sync_helpers(regtest_chain: DevChainInfo) -> None:
    pid = PaymentId.generate()
    ia = integrated_address(regtest_chain.primary_address, pid)
    txid = pay_sync(regtest_chain, ia, 10**10)
    before = int(rpc_sync(regtest_chain.daemon_url, "get_block_count")["count"])
    assert mine_sync(regtest_chain, 2) == before + 2
    refresh_sync(regtest_chain.watch_wallet_url)
    got = rpc_sync(regtest_chain.watch_wallet_url, "get_transfer_by_txid", {"txid": txid})
    assert got["transfer"]["payment_id"] == pid.hex()
    assert got["transfer"]["confirmations"] == 2


@pytest.mark.parametrize(("text", "atomic"), [
    ("1", 10**12),
    ("1.5", 1_500_000_000_000),
    ("0.000000000001", 1),
    ("  2.25 ", 2_250_000_000_000),
    ("18446744.073709551615", 2**64 - 1),
    ("0010.100000000000", 10_100_000_000_000),
])
def test_xmr_to_atomic(text: str, atomic: int) -> None:
    assert xmr_to_atomic(text) == atomic


@pytest.mark.parametrize("text", [
    "", "0", "0.0", "-1", "+1", "1.", ".5", "1e3", "1,5", "abc", "0.0000000000001",
    "1.0000000000000", "18446744.073709551616", "nan", "inf", "1 000",
])
def test_xmr_to_atomic_refuses(text: str) -> None:
    with pytest.raises(InvalidInput):
        xmr_to_atomic(text)


# --- chains of their own -----------------------------------------------------------------------


async def test_actor_starts_restarts_on_the_same_chain_and_stops_its_children(
        tmp_path: Path) -> None:
    root = tmp_path / "devchain"
    ports = plan_ports()

    # First run, from nothing; a child that dies is a crash that names it.
    t0 = time.monotonic()
    actor = DevChainActor(root, ports)
    crash = pytest.RaisesExc(RuntimeError, match="wallet-watch")
    with pytest.RaisesGroup(crash, flatten_subgroups=True):
        async with trio.open_nursery() as nursery:
            await nursery.start(actor.run)
            started = time.monotonic() - t0
            info = actor.info
            assert info is not None and (root / "devchain.json").exists()
            height = await devchain.mine(info, 3)
            pids = _pids(root)
            assert set(pids) == {"monerod", "wallet-dev", "wallet-watch"}
            os.kill(pids["wallet-watch"], signal.SIGKILL)
    assert await trio.to_thread.run_sync(_wait_dead, list(pids.values()), 5.0) == []
    assert not (root / "devchain.json").exists()
    assert list((root / "pids").glob("*.pid")) == []
    assert info is not None

    # The supervisor's restart: same root, same ports, same chain and wallets.
    t1 = time.monotonic()
    again = DevChainActor(root, ports)
    async with trio.open_nursery() as nursery:
        await nursery.start(again.run)
        restarted = time.monotonic() - t1
        info2 = again.info
        assert info2 is not None
        assert await devchain.height(info2) >= height
        assert (info2.dev_address, info2.primary_address) == (info.dev_address,
                                                                info.primary_address)
        pids = _pids(root)
        # reorg helpers, on this chain of its own
        top = await devchain.mine(info2, 2)
        ia = integrated_address(info2.primary_address, PaymentId.generate())
        txid = await devchain.pay(info2, ia, 10**11)
        assert await _pool(info2) == [txid]
        await devchain.flush_txpool(info2)
        assert await _pool(info2) == []
        assert await devchain.pop_blocks(info2, 2) == top - 2
        assert await devchain.height(info2) == top - 2
        # popped down to the height where wallet-rpc 0.18.0.0 spins choosing decoys: pay
        # mines back up to SPEND_HEIGHT first
        await devchain.pop_blocks(info2, top - 2 - 86)
        with trio.fail_after(30):
            await devchain.pay(info2, ia, 10**11)
        assert await devchain.height(info2) == devchain.SPEND_HEIGHT
        nursery.cancel_scope.cancel()
    assert await trio.to_thread.run_sync(_wait_dead, list(pids.values()), 5.0) == []
    assert not (root / "devchain.json").exists()
    assert list((root / "pids").glob("*.pid")) == []
    print(f"devchain start from nothing {started:.1f}s, restart {restarted:.1f}s")


def test_reap_leftovers_stops_only_our_processes(tmp_path: Path) -> None:
    chain = DevChain(tmp_path / "devchain", plan_ports())
    procs = chain.spawn()
    try:
        stranger = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        try:
            # A PID file pointing at a process that is not ours must not be signalled.
            (chain.pid_dir / "wallet-stranger.pid").write_text(f"{stranger.pid}\n")
            time.sleep(1.0)  # leftovers are running processes, not ones still starting
            DevChain(chain.root, chain.ports).reap_leftovers()
            assert stranger.poll() is None
            # (an exiting wallet-rpc counts as gone once its command line is; its exit can
            # take longer, as when it crashes on the way out)
            assert all(p.wait(timeout=30) is not None for p in procs)
            assert list(chain.pid_dir.glob("*.pid")) == []
        finally:
            stranger.kill()
            stranger.wait()
    finally:
        chain.terminate(procs, grace=5)


def test_children_die_with_a_parent_killed_by_sigkill(tmp_path: Path) -> None:
    root = tmp_path / "devchain"
    script = textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from anon_ticket.devchain import DevChain, plan_ports
        procs = DevChain(Path({str(root)!r}), plan_ports()).spawn()
        print(" ".join(str(p.pid) for p in procs), flush=True)
        time.sleep(120)
    """)
    parent = subprocess.Popen([sys.executable, "-c", script], cwd=REPO,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout is not None
        pids = [int(p) for p in parent.stdout.readline().split()]
        assert len(pids) == 3 and all(_alive(p) for p in pids)
        names = {pid: name for name, pid in _pids(root).items()}
        time.sleep(1.0)  # let them get going (monerod opens its database)
        parent.kill()
        parent.wait()
        # The reaper stops them as a clean stop would: the wallets (they save), then monerod.
        died: dict[str, float] = {}
        deadline = time.monotonic() + devreap.WALLET_GRACE + devreap.DAEMON_GRACE + 10
        while len(died) < 3 and time.monotonic() < deadline:
            for pid in pids:
                if names[pid] not in died and not _alive(pid):
                    died[names[pid]] = time.monotonic()
            time.sleep(0.01)
        assert set(died) == {"monerod", "wallet-dev", "wallet-watch"}, died
        assert died["monerod"] >= max(died["wallet-dev"], died["wallet-watch"]), died
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        DevChain(root, plan_ports()).reap_leftovers(wait=5.0)


def _dev_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="anon-ticket")
    add_dev_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(list(argv))


def test_dev_cli_pays_and_mines(regtest_chain: DevChainInfo, tmp_path: Path,
                                capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "devchain").mkdir()
    regtest_chain.write(tmp_path / "devchain" / "devchain.json")
    pid = PaymentId.generate()
    ia = integrated_address(regtest_chain.primary_address, pid)
    assert run_dev(tmp_path, _dev_args("dev", "pay", ia, "0.25")) == 0
    txid = capsys.readouterr().out.strip()
    before = int(rpc_sync(regtest_chain.daemon_url, "get_block_count")["count"])
    assert run_dev(tmp_path, _dev_args("dev", "mine", "2")) == 0
    assert capsys.readouterr().out.strip() == str(before + 2)
    refresh_sync(regtest_chain.watch_wallet_url)
    got = rpc_sync(regtest_chain.watch_wallet_url, "get_transfer_by_txid", {"txid": txid})
    assert got["transfer"]["amount"] == 250_000_000_000
    assert got["transfer"]["payment_id"] == pid.hex()

    assert run_dev(tmp_path, _dev_args("dev", "pay", ia, "1.2.3")) == 2
    assert run_dev(tmp_path, _dev_args("dev", "mine", "0")) == 2
    assert "invalid amount" in capsys.readouterr().err


def test_dev_cli_without_a_chain(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_dev(tmp_path, _dev_args("dev", "mine", "1")) == 1
    assert "no dev chain is running" in capsys.readouterr().err
    (tmp_path / "devchain").mkdir()
    stale = DevChainInfo(root=tmp_path / "devchain", ports=DevChainPorts(9, 9, 9),
                         daemon_url="http://127.0.0.1:9/json_rpc",
                         dev_wallet_url="http://127.0.0.1:9/json_rpc",
                         watch_wallet_url="http://127.0.0.1:9/json_rpc",
                         dev_address="4x", primary_address="4y", view_key="00")
    stale.write(tmp_path / "devchain" / "devchain.json")
    assert run_dev(tmp_path, _dev_args("dev", "mine", "1")) == 1
    assert "does not answer" in capsys.readouterr().err


def test_the_reaper_kills_a_child_that_ignores_sigterm(tmp_path: Path) -> None:
    """A wallet-rpc can hang in its own exit (seen once: saved, then stuck in its SIGTERM
    handler); after its grace the reaper sends SIGKILL, so nothing outlives the chain."""
    root = tmp_path / "devchain"
    (root / "pids").mkdir(parents=True)
    stuck = subprocess.Popen(
        [str(root / "monero-wallet-rpc"), "-c", "import signal, time; "
         "signal.signal(signal.SIGTERM, signal.SIG_IGN); print(flush=True); time.sleep(60)",
         f"--wallet-dir={root}/wallets"],
        executable=sys.executable, stdout=subprocess.PIPE)
    try:
        assert stuck.stdout is not None and stuck.stdout.readline()  # SIGTERM ignored now
        (root / "pids" / "wallet-dev.pid").write_text(f"{stuck.pid}\n")
        said: list[tuple[str, str]] = []
        devreap.reap(root, wallet_grace=0.5, say=lambda event, child, pid: said.append(
            (event, child)))
        assert stuck.wait(timeout=5) == -signal.SIGKILL
        assert said == [("stopping", "wallet-dev"), ("sigkill", "wallet-dev")]
        assert list((root / "pids").glob("*.pid")) == []
    finally:
        if stuck.poll() is None:
            stuck.kill()
            stuck.wait()
