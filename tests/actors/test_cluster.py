"""Several nodes on one real PostgreSQL database, in-process: each node's storage, filter,
cluster actor and hub (docs/architecture.md §9). What one node commits reaches every node's
filter before anybody hears of it; a node cut off from the feed stops answering alone."""

from __future__ import annotations

import json
import os
from pathlib import Path

import psycopg
import trio

from anon_ticket.domain.ids import PaymentId
from anon_ticket.domain.messages import (
    Claim,
    Claimed,
    ClaimStatus,
    Confirmations,
    FeedSynced,
    Lookup,
    PaymentSeen,
    Presence,
    Revoke,
)
from anon_ticket.domain.watch import Subscribe, WatchEvent
from tests.actors.core import Core, run_core


class Watcher:
    """A hub subscriber that keeps what it is sent ((type, seq) of each event; an
    announcement has no seq) and sets `until` when an event of the kind `stop` comes."""

    def __init__(self, stop: str) -> None:
        self.keys: set[bytes] = set()
        self.slow = False
        self.stop = stop
        self.seen: list[tuple[str, int | None]] = []
        self.until = trio.Event()

    def put(self, item: object) -> bool:
        if isinstance(item, WatchEvent):
            kind = json.loads(item.text)["type"]
            self.seen.append((kind, item.seq))
            if kind == self.stop:
                self.until.set()
        return True

    def mark_slow(self) -> None:
        raise AssertionError("never slow here")


async def _feed_length(dsn: str) -> int:
    def read() -> int:
        with psycopg.connect(dsn) as conn:
            row = conn.execute("SELECT count(*) FROM cluster_events").fetchone()
            assert row is not None
            return int(row[0])
    return await trio.to_thread.run_sync(read)


async def test_new_ids_acknowledged_on_one_node_are_in_every_nodes_filter(
        tmp_path: Path, pg_dsn: str) -> None:
    async with run_core(tmp_path / "a", pg=pg_dsn, node="a", cluster=True) as a, \
            run_core(tmp_path / "b", pg=pg_dsn, node="b", cluster=True) as b:
        for _ in range(20):
            pid = PaymentId.generate()
            assert await b.filter.ask(Lookup(pid), 5) is Presence.ABSENT
            await a.pay(pid)  # answered once every live node has applied it
            assert await b.filter.ask(Lookup(pid), 5) is Presence.MAYBE
            claimed = await b.storage.ask(Claim(pid), 5)
            assert claimed.status is ClaimStatus.SUCCESS


async def test_without_the_barrier_the_other_node_can_be_behind(
        tmp_path: Path, pg_dsn: str) -> None:
    """The previous test's property is the barrier's doing: storage answering directly (no
    cluster actor on node a) lets node b miss ids it is asked about right away."""
    async with run_core(tmp_path / "a", pg=pg_dsn, node="a") as a, \
            run_core(tmp_path / "b", pg=pg_dsn, node="b", cluster=True, listen=False) as b:
        # (b polls: notifications would only narrow the window, not close it)
        missed = 0
        for _ in range(20):
            pid = PaymentId.generate()
            await a.pay(pid)
            missed += await b.filter.ask(Lookup(pid), 5) is Presence.ABSENT
        assert missed > 0


async def test_a_commit_wakes_the_other_nodes_and_an_idle_node_reads_rarely(
        tmp_path: Path, pg_dsn: str) -> None:
    """Each entry's COMMIT notifies the other nodes' followers, so they apply it at once
    though they read the feed only every `idle_interval` (here 5 s) when nothing happens."""
    slow = {"idle_interval": 5.0, "trust_secs": 30.0}
    async with run_core(tmp_path / "a", pg=pg_dsn, node="a", cluster=True, **slow) as a, \
            run_core(tmp_path / "b", pg=pg_dsn, node="b", cluster=True, **slow) as b:
        followers = [a.made["cluster"], b.made["cluster"]]
        with trio.fail_after(5):
            while not all(f.listening for f in followers):
                await trio.sleep(0.01)
        await trio.sleep(0.2)  # (reads that were under way when listening began)
        idle = [f.rounds for f in followers]
        await trio.sleep(1.0)
        assert [f.rounds for f in followers] == idle  # nothing committed: nothing read
        for _ in range(10):
            pid = PaymentId.generate()
            started = trio.current_time()
            await a.pay(pid)  # answered once b has applied it: b was woken, not polling
            assert trio.current_time() - started < 1.0
            assert await b.filter.ask(Lookup(pid), 5) is Presence.MAYBE


async def test_a_lost_listening_connection_is_made_again_and_polled_around(
        tmp_path: Path, pg_dsn: str) -> None:
    async with run_core(tmp_path / "a", pg=pg_dsn, node="a", cluster=True) as a, \
            run_core(tmp_path / "b", pg=pg_dsn, node="b", cluster=True) as b:
        follower = b.made["cluster"]
        with trio.fail_after(5):
            while not follower.listening:
                await trio.sleep(0.01)

        def end_listeners() -> int:
            with psycopg.connect(pg_dsn, autocommit=True) as admin:
                return len(admin.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE query LIKE 'LISTEN %' AND datname = current_database()"
                ).fetchall())

        assert await trio.to_thread.run_sync(end_listeners) == 2  # a's and b's
        with trio.fail_after(5):  # noticed within its notifications' 1 s wait
            while follower.listening:
                await trio.sleep(0.01)
        pid = PaymentId.generate()
        started = trio.current_time()
        await a.pay(pid)  # b polls meanwhile: no slower than before notifications
        assert trio.current_time() - started < 1.0
        assert await b.filter.ask(Lookup(pid), 5) is Presence.MAYBE
        with trio.fail_after(10):
            while not follower.listening:
                await trio.sleep(0.01)


async def test_a_top_up_on_one_node_reaches_the_others_cache_before_its_answer(
        tmp_path: Path, pg_dsn: str) -> None:
    async with run_core(tmp_path / "a", pg=pg_dsn, node="a", cluster=True) as a, \
            run_core(tmp_path / "b", pg=pg_dsn, node="b", cluster=True) as b:
        pid = PaymentId.generate()
        await a.pay(pid, 100)
        first = await b.storage.ask(Claim(pid), 5)
        # b's cache holds the claim (its own commit)...
        assert await b.filter.ask(Lookup(pid), 5) == Claimed(
            ClaimStatus.ALREADY_CLAIMED, first.token, 100)
        topped = await a.pay(pid, 50)  # ...until a's top-up, settled on every node first
        assert topped.topped_up == (pid,)
        assert await b.filter.ask(Lookup(pid), 5) is Presence.MAYBE
        assert (await b.storage.ask(Claim(pid), 5)).balance == 150
        info = await a.storage.ask(Revoke(first.token, "abuse", 7), 5)
        assert info.revoked


async def test_a_watcher_on_one_node_sees_a_claim_made_on_another_in_order(
        tmp_path: Path, pg_dsn: str) -> None:
    async with run_core(tmp_path / "a", pg=pg_dsn, node="a", cluster=True) as a, \
            run_core(tmp_path / "b", pg=pg_dsn, node="b", cluster=True) as b:
        pid = PaymentId.generate()
        watcher = Watcher("claimed")
        await b.hub.ask(Subscribe(watcher, pid.raw), 5)
        await a.pay(pid)
        claimed = await a.storage.ask(Claim(pid), 5)
        assert claimed.status is ClaimStatus.SUCCESS
        with trio.fail_after(5):
            await watcher.until.wait()
        assert [k for k, _ in watcher.seen] == ["payment_confirmed", "claimed"]
        seqs = [q for _, q in watcher.seen if q is not None]
        assert len(seqs) == 2 and seqs == sorted(seqs)


async def test_a_node_that_stops_hearing_the_feed_asks_storage_instead_of_a_404(
        tmp_path: Path, pg_dsn: str) -> None:
    async with run_core(tmp_path / "a", pg=pg_dsn, node="a", cluster=True,
                        trust_secs=0.3) as a:
        unknown = PaymentId.generate()
        assert await a.filter.ask(Lookup(unknown), 5) is Presence.ABSENT
        a.supervisor.request_stop("cut off")  # (stops the cluster actor with the rest)
    # The filter itself: trusted only for the duration the last read allows.
    async with run_core(tmp_path / "c", pg=pg_dsn, node="c") as c:
        # (no cluster actor: nothing ever says the feed was read)
        assert await c.filter.ask(Lookup(unknown), 5) is Presence.MAYBE
        c.filter.tell(FeedSynced(0.2))
        assert await c.filter.ask(Lookup(unknown), 5) is Presence.ABSENT
        await trio.sleep(0.3)
        assert await c.filter.ask(Lookup(unknown), 5) is Presence.MAYBE


async def test_an_answer_waits_for_a_live_node_behind_at_most_its_bound(
        tmp_path: Path, pg_dsn: str) -> None:
    async with run_core(tmp_path / "a", pg=pg_dsn, node="a", cluster=True,
                        trust_secs=0.5) as a:
        # A node that keeps reading the feed (seen, so live) but never applies anything.
        def seen(conn: psycopg.Connection[tuple[object, ...]]) -> None:
            conn.execute("INSERT INTO cluster_nodes (node, applied, seen_at) "
                         "VALUES ('stuck', 0, now()) ON CONFLICT (node) DO UPDATE "
                         "SET seen_at = now()")

        async def keep_reading(conn: psycopg.Connection[tuple[object, ...]]) -> None:
            while True:
                await trio.to_thread.run_sync(seen, conn)
                await trio.sleep(0.05)

        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            await trio.to_thread.run_sync(seen, conn)  # registered before the payment
            async with trio.open_nursery() as nursery:
                nursery.start_soon(keep_reading, conn)
                started = trio.current_time()
                await a.pay(PaymentId.generate())
                waited = trio.current_time() - started
                nursery.cancel_scope.cancel()
        # trust_secs + margin: by then the stuck node has stopped trusting its filter
        assert 0.9 <= waited < 3, waited
        assert _alerts(a, "cluster_node_behind") == 1
        # Gone quiet (not seen within trust_secs): no longer waited for.
        await trio.sleep(0.6)
        started = trio.current_time()
        await a.pay(PaymentId.generate())
        assert trio.current_time() - started < 0.5
        assert _alerts(a, "cluster_node_behind") == 1


def _alerts(core: Core, kind: str) -> float:
    value = core.metrics.registry.get_sample_value("anon_ticket_alerts_total", {"kind": kind})
    return value or 0.0


async def test_only_shared_writes_enter_the_feed(tmp_path: Path, pg_dsn: str) -> None:
    async with run_core(tmp_path / "a", pg=pg_dsn, node="a", cluster=True) as a:
        pid = PaymentId.generate()
        await a.pay(pid)
        assert await _feed_length(pg_dsn) == 1  # new id (and its event)
        await a.storage.ask(Claim(pid), 5)
        assert await _feed_length(pg_dsn) == 2  # the claim's event
        await a.storage.ask(Claim(pid), 5)  # already claimed: a cache fill only
        assert await _feed_length(pg_dsn) == 2
        await a.pay(pid, txid=os.urandom(32))
        assert await _feed_length(pg_dsn) == 3  # a top-up: invalidation and event


async def test_the_pollers_announcements_reach_every_nodes_hub_ahead_of_the_credit(
        tmp_path: Path, pg_dsn: str) -> None:
    async with run_core(tmp_path / "a", pg=pg_dsn, node="a", cluster=True) as a, \
            run_core(tmp_path / "b", pg=pg_dsn, node="b", cluster=True) as b:
        pid = PaymentId.generate()
        watcher = Watcher("payment_confirmed")
        await b.hub.ask(Subscribe(watcher, pid.raw), 5)
        txid = os.urandom(32)
        # The leading node's poller hands its announcements to its storage (the tree does)
        a.storage.tell(PaymentSeen(pid, txid.hex(), 10**12, None, 0, 2))
        a.storage.tell(Confirmations(pid, txid.hex(), 1, 2))
        await a.pay(pid, 10**12, txid=txid)
        with trio.fail_after(5):
            await watcher.until.wait()
        assert [k for k, _ in watcher.seen] == [
            "payment_seen", "confirmations", "payment_confirmed"]
