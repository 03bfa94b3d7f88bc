"""The filter actor: sizing from the database, prewarm, acknowledged additions."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from anon_ticket.domain.bloom import BloomFilter
from anon_ticket.domain.commands import FilterStats
from anon_ticket.domain.ids import PaymentId
from anon_ticket.domain.messages import (
    ClaimStatus,
    Lookup,
    Presence,
    RecordTransfers,
    Redeem,
    Transfer,
)
from anon_ticket.errors import Unavailable
from tests.actors.core import run_core


async def test_sized_for_twice_the_recorded_ids_and_prewarmed(tmp_path: Path) -> None:
    pids = [PaymentId.generate() for _ in range(300)]
    async with run_core(tmp_path, bloom_entries=10) as core:
        await core.storage.ask(RecordTransfers(tuple(
            Transfer(os.urandom(32), p, 10, 1) for p in pids)), 5)
        # every recorded id is in the filter once the recorder hears back (I8)
        for p in pids:
            assert await core.filter.ask(Lookup(p), 5) is Presence.MAYBE
    # a new run sizes by the database (2 x 300 > 10) and prewarms every id
    async with run_core(tmp_path, bloom_entries=10) as core:
        stats = await core.filter.ask(FilterStats(), 5)
        assert stats["bits"] >= BloomFilter.optimal_bits(600, 1e-6)
        for p in pids:
            assert await core.filter.ask(Lookup(p), 5) is Presence.MAYBE
        unknown = [PaymentId.generate() for _ in range(200)]
        absent = [await core.filter.ask(Lookup(p), 5) for p in unknown]
        assert absent.count(Presence.ABSENT) >= 199


async def test_without_bloom_every_lookup_is_maybe(tmp_path: Path) -> None:
    async with run_core(tmp_path, bloom_entries=0) as core:
        assert await core.filter.ask(Lookup(PaymentId.generate()), 5) is Presence.MAYBE
        assert (await core.filter.ask(FilterStats(), 5))["enabled"] is False


async def test_a_redeem_waits_once_whoever_answers(tmp_path: Path) -> None:
    async with run_core(tmp_path) as core:
        pid = PaymentId.generate()
        await core.pay(pid)
        storage_claims = core.metrics.storage_requests.labels("claim")
        # unknown: the Bloom filter answers, storage never hears of it
        assert await core.filter.ask(Redeem(PaymentId.generate()), 5) is Presence.ABSENT
        assert storage_claims._value.get() == 0
        # recorded: forwarded to storage, whose answer reaches the requester directly
        first = await core.filter.ask(Redeem(pid), 5)
        assert first.status is ClaimStatus.SUCCESS and storage_claims._value.get() == 1
        # a retry: the positive cache answers (storage queued the fill to the filter in the
        # same step as its reply, so it is there before this request)
        again = await core.filter.ask(Redeem(pid), 5)
        assert again.status is ClaimStatus.ALREADY_CLAIMED
        assert again.token == first.token and storage_claims._value.get() == 1
        # storage not serving (restarting): a clear 503, not a request left hanging
        other = PaymentId.generate()
        await core.pay(other)
        core.storage.serving = False
        with pytest.raises(Unavailable):
            await core.filter.ask(Redeem(other), 5)  # a Bloom maybe: only storage knows
        core.storage.serving = True
        assert (await core.filter.ask(Redeem(other), 5)).status is ClaimStatus.SUCCESS
