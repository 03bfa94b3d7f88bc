"""The poller's logic against a scripted wallet: windows, poison, failures, reorgs.

The scripted wallet is fault injection and exact arithmetic; the same behaviour against a real
regtest chain is in tests/e2e.
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path
from typing import Any

import pytest
import trio

from actors.poller import CHUNK_TRANSFERS, Poller, PollerConfig, chunks_at_block_boundaries
from anon_ticket.domain.commands import PausePoller, PollerStatus, RescanFrom, ResumePoller
from anon_ticket.domain.ids import PaymentId
from anon_ticket.domain.messages import (
    Claim,
    ClaimStatus,
    Confirmations,
    LookupToken,
    PaymentSeen,
    ReadCursor,
    RecentTransfers,
    RecordTransfers,
    SightingGone,
    Transfer,
)
from anon_ticket.domain.transfers import WalletTransfer
from anon_ticket.errors import InvalidInput, NotFound, RpcTimeout, RpcUnavailable, Unavailable
from anon_ticket.walletrpc import WalletIdentity, wallet_transfer
from supervisors.mailbox import Mailbox
from tests.actors.core import Core, faulty_disk, run_core

PRIMARY = "4" + "A" * 94


def entry(pid: PaymentId | str | None, height: int, amount: int = 10**12, *,
          kind: str = "in", unlock: int = 0, txid: str | None = None) -> dict[str, Any]:
    text = pid.hex() if isinstance(pid, PaymentId) else pid
    e: dict[str, Any] = {"txid": txid or os.urandom(32).hex(), "amount": amount,
                         "height": height, "type": kind, "unlock_time": unlock}
    if text is not None:
        e["payment_id"] = text
    return e


class ScriptedWallet:
    """Answers like wallet-rpc from a list of entries; can fail on demand."""

    url = "scripted://wallet"

    def __init__(self, height: int) -> None:
        self.height = height
        self.entries: list[dict[str, Any]] = []
        self.pool: list[dict[str, Any]] = []
        self.windows: list[tuple[int, int]] = []
        self.fail: Exception | None = None
        self.forgotten: set[str] = set()

    def _check(self) -> None:
        if self.fail is not None:
            raise self.fail

    async def aclose(self) -> None:
        pass

    async def identity(self) -> WalletIdentity:
        self._check()
        return WalletIdentity(PRIMARY, watch_only=True)

    async def refresh(self) -> None:
        self._check()

    async def get_height(self) -> int:
        self._check()
        return self.height

    async def incoming(self, min_height: int, max_height: int) -> list[WalletTransfer]:
        self._check()
        self.windows.append((min_height, max_height))
        return [wallet_transfer(e) for e in self.entries
                if min_height < e["height"] <= max_height]

    async def pool_and_recent(self, min_height: int) -> list[WalletTransfer]:
        self._check()
        return [wallet_transfer(e) for e in self.entries if e["height"] > min_height] + [
            wallet_transfer(e) for e in self.pool]

    async def transfer_exists(self, txid: str) -> bool:
        self._check()
        return txid not in self.forgotten and any(e["txid"] == txid for e in
                                                  self.entries + self.pool)


async def run_poller(core: Core, wallet: ScriptedWallet, nursery: trio.Nursery,
                     events: Mailbox[Any] | None = None, **cfg: Any) -> Mailbox[Any]:
    mb: Mailbox[Any] = Mailbox("poller", 64)
    config = PollerConfig(**{"min_confirmations": 10, "min_payment_amount": 1000,
                             "poll_interval": 0.01, "start_height": None,
                             "expected_primary": None, "request_timeout": 5.0,
                             "window_blocks": 100, "backoff_initial": 0.01,
                             "backoff_max": 0.05, **cfg})
    poller = Poller(config, lambda: wallet, mb, core.storage, core.metrics,  # type: ignore
                    events=events)
    await nursery.start(poller.run)
    mb.serving = True
    return mb


async def wait_for(predicate: Any, timeout: float = 10) -> None:
    with trio.fail_after(timeout):
        while not await predicate():
            await trio.sleep(0.01)


async def cursor_is(mb: Mailbox[Any], value: int) -> bool:
    return bool((await mb.ask(PollerStatus(), 5))["cursor"] == value)


async def test_windows_cover_every_height_exactly_once(tmp_path: Path) -> None:
    wallet = ScriptedWallet(height=1000)
    pids = [PaymentId.generate() for _ in range(30)]
    wallet.entries = [entry(p, 1 + i * 33) for i, p in enumerate(pids)]
    async with run_core(tmp_path) as core, trio.open_nursery() as n:
        mb = await run_poller(core, wallet, n)
        await wait_for(lambda: cursor_is(mb, 990))
        for _ in range(5):  # blocks arrive one at a time
            wallet.height += 1
            await wait_for(lambda: cursor_is(mb, wallet.height - 10))
        covered: list[int] = []
        for low, high in wallet.windows:
            assert low < high
            covered.extend(range(low + 1, high + 1))
        assert sorted(covered) == list(range(1, wallet.height - 10 + 1))  # once each (I5)
        for p in pids:
            if 1 + pids.index(p) * 33 <= wallet.height - 10:
                assert (await core.storage.ask(Claim(p), 5)).status is ClaimStatus.SUCCESS
        n.cancel_scope.cancel()


async def test_shallow_and_pool_payments_are_announced_not_claimable(tmp_path: Path) -> None:
    wallet = ScriptedWallet(height=200)
    pid = PaymentId.generate()
    pooled = PaymentId.generate()
    wallet.entries = [entry(pid, 195)]  # 5 confirmations of 10
    wallet.pool = [entry(pooled, 0, kind="pool")]
    events: Mailbox[Any] = Mailbox("events", 100)
    async with run_core(tmp_path) as core, trio.open_nursery() as n:
        mb = await run_poller(core, wallet, n, events=events)
        await wait_for(lambda: cursor_is(mb, 190))
        with pytest.raises(NotFound):
            await core.storage.ask(Claim(pid), 5)
        with trio.fail_after(10):  # announced in the tick that moved the cursor
            got = [(await events.inbox.receive()).msg for _ in range(3)]
        seen = {e.pid: e for e in got if isinstance(e, PaymentSeen)}
        assert seen[pid].height == 195 and seen[pooled].height is None
        confs = [e for e in got if isinstance(e, Confirmations)]
        assert confs == [Confirmations(pid, wallet.entries[0]["txid"], 5, 10)]
        wallet.height = 205  # now deep enough
        await wait_for(lambda: cursor_is(mb, 195))
        assert (await core.storage.ask(Claim(pid), 5)).balance == 10**12
        n.cancel_scope.cancel()


async def test_poison_transfers_are_skipped_by_reason_and_never_stall(tmp_path: Path) -> None:
    wallet = ScriptedWallet(height=100)
    good = PaymentId.generate()
    wallet.entries = [
        entry(None, 10), entry("0" * 16, 11), entry("ab" * 32, 12), entry(good, 13, 5),
        entry(PaymentId.generate(), 14, 2**63), entry(PaymentId.generate(), 15, kind="block"),
        entry(PaymentId.generate(), 16, unlock=500), entry("zz" * 8, 17),
        {"height": 18, "amount": "lots", "type": "in"}, entry(good, 19),
    ]
    async with run_core(tmp_path) as core, trio.open_nursery() as n:
        mb = await run_poller(core, wallet, n)
        await wait_for(lambda: cursor_is(mb, 90))
        assert (await core.storage.ask(Claim(good), 5)).balance == 10**12  # the dust one: no
        from anon_ticket.domain.messages import ListSkipped
        rows = await core.storage.ask(ListSkipped(100), 5)
        reasons = sorted(r.reason for r in rows)
        assert reasons == sorted(["no_payment_id", "no_payment_id", "legacy_payment_id", "dust",
                                  "absurd_amount", "not_incoming", "time_locked",
                                  "bad_payment_id", "malformed"])
        n.cancel_scope.cancel()


async def test_wallet_failures_back_off_degrade_and_recover(tmp_path: Path) -> None:
    wallet = ScriptedWallet(height=100)
    pid = PaymentId.generate()
    async with run_core(tmp_path) as core, trio.open_nursery() as n:
        mb = await run_poller(core, wallet, n)
        await wait_for(lambda: cursor_is(mb, 90))
        wallet.fail = RpcTimeout("get_height: no answer")
        wallet.entries = [entry(pid, 95)]
        wallet.height = 110

        async def degraded() -> bool:
            st = await mb.ask(PollerStatus(), 5)
            return bool(st["wallet_reachable"] is False and "no answer" in st["last_error"])

        await wait_for(degraded)
        wallet.fail = RpcUnavailable("refused")

        async def refused() -> bool:
            return "refused" in ((await mb.ask(PollerStatus(), 5))["last_error"] or "")

        await wait_for(refused)
        wallet.fail = None

        async def recovered() -> bool:
            # The cursor moves mid-tick; the failure count clears when the tick completes.
            st = await mb.ask(PollerStatus(), 5)
            return bool(st["cursor"] == 100 and st["wallet_reachable"]
                        and st["last_error"] is None)

        await wait_for(recovered)  # caught up by itself
        assert (await core.storage.ask(Claim(pid), 5)).status is ClaimStatus.SUCCESS
        n.cancel_scope.cancel()


async def test_vanished_transfers_unclaimed_and_claimed(tmp_path: Path) -> None:
    wallet = ScriptedWallet(height=100)
    unclaimed, claimed = PaymentId.generate(), PaymentId.generate()
    wallet.entries = [entry(unclaimed, 85), entry(claimed, 86)]
    async with run_core(tmp_path) as core, trio.open_nursery() as n:
        mb = await run_poller(core, wallet, n)
        await wait_for(lambda: cursor_is(mb, 90))
        token = (await core.storage.ask(Claim(claimed), 5)).token
        # a reorg drops both transactions; the wallet no longer knows them
        wallet.forgotten = {e["txid"] for e in wallet.entries}
        wallet.entries = []
        wallet.height = 101

        async def gone() -> bool:
            return bool(await core.storage.ask(RecentTransfers(0), 5) == ())

        await wait_for(gone)
        with pytest.raises(NotFound):  # vanished and unclaimed: no longer claimable
            await core.storage.ask(Claim(unclaimed), 5)
        info = await core.storage.ask(LookupToken(token), 5)  # the token stays (policy)
        assert info.amount == 0
        assert core.metrics.alerts.labels("claimed_transfer_vanished")._value.get() == 1
        n.cancel_scope.cancel()


async def test_a_transfer_re_mined_lower_counts_once(tmp_path: Path) -> None:
    wallet = ScriptedWallet(height=100)
    pid = PaymentId.generate()
    txid = os.urandom(32).hex()
    wallet.entries = [entry(pid, 88, txid=txid)]
    async with run_core(tmp_path) as core, trio.open_nursery() as n:
        mb = await run_poller(core, wallet, n)
        await wait_for(lambda: cursor_is(mb, 90))
        wallet.entries = [entry(pid, 84, txid=txid)]  # the same tx in a lower block
        wallet.height = 101
        await wait_for(lambda: cursor_is(mb, 91))

        async def moved() -> bool:  # the recent-window scan re-ingested it at 84
            recent = await core.storage.ask(RecentTransfers(0), 5)
            return [r.height for r in recent] == [84]

        await wait_for(moved)
        assert (await core.storage.ask(Claim(pid), 5)).balance == 10**12  # counted once
        n.cancel_scope.cancel()


def test_chunks_end_on_block_boundaries() -> None:
    pid = PaymentId.generate()
    transfers = [Transfer(os.urandom(32), pid, 1, 10 + i // 100) for i in range(1000)]
    msgs = chunks_at_block_boundaries(transfers, [], 50)
    assert sum(len(m.transfers) for m in msgs) == 1000
    assert msgs[-1].cursor == 50
    for m in msgs[:-1]:
        heights = {t.height for t in m.transfers}
        assert m.cursor == max(heights)
        assert len(m.transfers) >= CHUNK_TRANSFERS
    for a, b in itertools.pairwise(msgs):
        assert max(t.height for t in a.transfers) < min(t.height for t in b.transfers)
    assert chunks_at_block_boundaries([], [], 7) == [RecordTransfers((), (), cursor=7)]


class GatedWallet(ScriptedWallet):
    """A scripted wallet whose crediting call can be held in flight."""

    def __init__(self, height: int) -> None:
        super().__init__(height)
        self.gate: trio.Event | None = None
        self.entered = trio.Event()

    async def incoming(self, min_height: int, max_height: int) -> list[dict[str, Any]]:
        if self.gate is not None:
            self.entered.set()
            await self.gate.wait()
        return await super().incoming(min_height, max_height)


async def test_a_rescan_during_a_wallet_call_is_not_lost(tmp_path: Path) -> None:
    # The rescan's reply said the cursor moved; then the tick in flight finished its window
    # and stored that window's cursor over it: the rescan was lost, and a payment the wallet
    # found below the cursor was never credited.
    wallet = GatedWallet(height=1000)
    async with run_core(tmp_path) as core, trio.open_nursery() as n:
        mb = await run_poller(core, wallet, n)
        await wait_for(lambda: cursor_is(mb, 990))
        missed = PaymentId.generate()
        wallet.entries.append(entry(missed, 60))  # e.g. a wallet restored from its seed
        wallet.gate = trio.Event()
        wallet.height = 1100
        with trio.fail_after(10):
            await wallet.entered.wait()  # a crediting window (990, 1090] is in flight
        status = await mb.ask(RescanFrom(50), 5)
        assert status["cursor"] == 49
        assert await core.storage.ask(ReadCursor(), 5) == 49
        wallet.gate.set()
        wallet.gate = None
        await wait_for(lambda: cursor_is(mb, 1090))
        assert (49, 149) in wallet.windows  # scanned again from 50...
        assert (await core.storage.ask(Claim(missed), 5)).status is ClaimStatus.SUCCESS
        assert await core.storage.ask(ReadCursor(), 5) == 1090
        n.cancel_scope.cancel()


async def test_rescan_heights_are_checked_by_the_poller(tmp_path: Path) -> None:
    wallet = ScriptedWallet(height=1000)
    async with run_core(tmp_path) as core, trio.open_nursery() as n:
        mb = await run_poller(core, wallet, n)
        await wait_for(lambda: cursor_is(mb, 990))
        with pytest.raises(InvalidInput, match="above the wallet's height 1000"):
            await mb.ask(RescanFrom(1001), 5)
        for bad in (10**30, -1, 2**63):  # past what storage can hold: refused, no crash
            with pytest.raises(InvalidInput, match="non-negative integer"):
                await mb.ask(RescanFrom(bad), 5)
        assert (await mb.ask(RescanFrom(1000), 5))["cursor"] == 999  # a jump up to the tip
        assert (await mb.ask(RescanFrom(0), 5))["cursor"] == 0
        await wait_for(lambda: cursor_is(mb, 990))
        assert await core.storage.ask(ReadCursor(), 5) == 990
        n.cancel_scope.cancel()


async def test_a_rescan_before_the_wallet_answered_goes_back_but_not_forward(
        tmp_path: Path) -> None:
    # Going back is safe whatever the wallet's height; a jump forward cannot be checked.
    wallet = ScriptedWallet(height=1000)
    wallet.fail = RpcUnavailable("refused")
    async with run_core(tmp_path) as core, trio.open_nursery() as n:
        await core.storage.ask(RecordTransfers((), cursor=100), 5)
        mb = await run_poller(core, wallet, n)
        with pytest.raises(Unavailable, match="wallet's height is not known"):
            await mb.ask(RescanFrom(500), 5)
        assert (await mb.ask(RescanFrom(50), 5))["cursor"] == 49
        assert await core.storage.ask(ReadCursor(), 5) == 49
        n.cancel_scope.cancel()


async def test_a_storage_failure_is_not_blamed_on_the_wallet(tmp_path: Path) -> None:
    wallet = ScriptedWallet(height=100)
    with faulty_disk() as disk:
        async with run_core(tmp_path) as core, trio.open_nursery() as n:
            mb = await run_poller(core, wallet, n)
            await wait_for(lambda: cursor_is(mb, 90))
            disk.full = True
            wallet.entries = [entry(PaymentId.generate(), 95)]
            wallet.height = 110

            async def storage_failing() -> bool:
                return (await mb.ask(PollerStatus(), 5))["storage_error"] is not None

            await wait_for(storage_failing)
            st = await mb.ask(PollerStatus(), 5)
            assert st["state"] == "degraded"
            assert st["wallet_reachable"] is True  # the wallet answered: not its fault
            assert "storage" in st["storage_error"] and "recording" in st["last_error"]
            assert core.metrics.rpc_calls.labels("error")._value.get() == 0
            disk.full = False

            async def recovered() -> bool:
                st = await mb.ask(PollerStatus(), 5)
                return bool(st["cursor"] == 100 and st["storage_error"] is None
                            and st["state"] == "ok")

            await wait_for(recovered)
            n.cancel_scope.cancel()


async def test_the_nth_confirmation_is_announced_before_the_credit_and_gone_is_told(
        tmp_path: Path) -> None:
    # The README's order for a watcher: ..., confirmations N of N, payment_confirmed. The
    # credit's event comes from storage after the poller records the transfer, so the N-th
    # confirmation must be told before the scan that credits it (it used to come after).
    log: list[object] = []

    class Recording(Mailbox[Any]):
        def tell(self, msg: Any) -> None:
            log.append(msg)
            super().tell(msg)

    class Wallet(ScriptedWallet):
        async def incoming(self, min_height: int, max_height: int) -> list[WalletTransfer]:
            log.append(("scan", min_height, max_height))
            return await super().incoming(min_height, max_height)

    wallet = Wallet(height=200)
    pid, pooled = PaymentId.generate(), PaymentId.generate()
    wallet.entries = [entry(pid, 192)]  # 8 of 10
    wallet.pool = [entry(pooled, 0, kind="pool")]
    txid, pool_txid = wallet.entries[0]["txid"], wallet.pool[0]["txid"]
    async with run_core(tmp_path) as core, trio.open_nursery() as n:
        mb = await run_poller(core, wallet, n, events=Recording("events", 100))
        await wait_for(lambda: cursor_is(mb, 190))
        first = [m for m in log if isinstance(m, PaymentSeen)]
        assert {(m.pid, m.confirmations, m.required, m.height) for m in first} == {
            (pid, 8, 10, 192), (pooled, 0, 10, None)}
        wallet.pool = []  # left the pool unmined (a double spend, an expiry)
        wallet.height = 202  # the transfer reaches 10 of 10
        await wait_for(lambda: cursor_is(mb, 192))
        n.cancel_scope.cancel()
    nth = log.index(Confirmations(pid, txid, 10, 10))
    credit = next(i for i, m in enumerate(log)
                  if isinstance(m, tuple) and m[1] < 192 <= m[2])
    assert nth < credit, log
    assert SightingGone(pooled, pool_txid) in log


async def test_a_pause_is_stored_and_a_new_poller_starts_paused(tmp_path: Path) -> None:
    """A pause outlives its poller (a restart, or on PostgreSQL a new leader); one that
    cannot be stored fails and changes nothing."""
    wallet = ScriptedWallet(height=100)
    with faulty_disk() as disk:
        async with run_core(tmp_path) as core:
            async with trio.open_nursery() as n:
                mb = await run_poller(core, wallet, n)
                await wait_for(lambda: cursor_is(mb, 90))
                assert (await mb.ask(PausePoller(), 5))["state"] == "paused"
                n.cancel_scope.cancel()
            wallet.height = 120  # blocks the paused poller must not scan
            scanned = len(wallet.windows)
            async with trio.open_nursery() as n:
                mb = await run_poller(core, wallet, n)
                await wait_for(lambda: state_is(mb, "paused"))
                await trio.sleep(0.2)  # twenty polling intervals
                assert (await mb.ask(PollerStatus(), 5))["cursor"] is None  # never loaded
                assert len(wallet.windows) == scanned
                disk.full = True
                with pytest.raises(Unavailable):
                    await mb.ask(ResumePoller(), 5)
                assert (await mb.ask(PollerStatus(), 5))["state"] == "paused"
                disk.full = False
                assert (await mb.ask(ResumePoller(), 5))["state"] != "paused"
                await wait_for(lambda: cursor_is(mb, 110))
                n.cancel_scope.cancel()
            async with trio.open_nursery() as n:  # resumed is stored too
                mb = await run_poller(core, wallet, n)
                await wait_for(lambda: cursor_is(mb, 110))
                n.cancel_scope.cancel()


async def state_is(mb: Mailbox[Any], state: str) -> bool:
    return bool((await mb.ask(PollerStatus(), 5))["state"] == state)
