"""What only the storage actor on PostgreSQL has (actors/storage_pg.py): several nodes writing
one database, statements that fail and abort a transaction, a connection that is lost, the
cluster feed every shared write appends to. The contract both stores keep is in
tests/actors/test_storage.py."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any

import psycopg
import pytest
import trio
from psycopg.conninfo import conninfo_to_dict

from anon_ticket.domain.commands import StorageHealth, StorageStats
from anon_ticket.domain.ids import PaymentId
from anon_ticket.domain.messages import (
    CacheClaim,
    Claim,
    Claimed,
    ClaimStatus,
    EventKind,
    Invalidate,
    LookupToken,
    Publish,
    ReadCursor,
    ReadTicketState,
    Recorded,
    RecordTransfers,
    Revoke,
    SkippedTransfer,
    Transfer,
)
from anon_ticket.domain.tokens import derive_hmac
from anon_ticket.errors import InvalidInput, Unavailable
from anon_ticket.wire import decode_feed
from mailboxes import Failure
from supervisors.mailbox import Envelope
from tests.actors.core import Core, ReplySlot, run_core
from tests.actors.test_storage import pg_rows, pg_transactions
from tests.pgserver import PgServer

SECRETS = {"node-a": b"a" * 32, "node-b": b"b" * 32}


async def sql(url: str, query: str, *args: object) -> list[Any]:
    """`pg_rows` off the loop (storage's own thread may be waiting on the database)."""
    return await trio.to_thread.run_sync(partial(pg_rows, url, query, *args))


async def until(check: Callable[[], Awaitable[bool]], timeout: float = 10) -> None:
    """Poll the database (nothing in it can be awaited) until `check` holds."""
    with trio.fail_after(timeout):
        while not await check():
            await trio.sleep(0.01)


def dbname(url: str) -> str:
    return str(conninfo_to_dict(url)["dbname"])


async def lock_waiters(url: str) -> list[int]:
    """The backends of this database waiting for a lock (storage's, behind a row lock)."""
    rows = await sql(url, "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                          "AND wait_event_type = 'Lock'")
    return [int(r[0]) for r in rows]


async def feed_size(url: str) -> int:
    return int((await sql(url, "SELECT count(*) FROM cluster_events"))[0][0])


def fast_deadlocks(url: str) -> None:
    """Deadlocks found after 100 ms instead of a second (for connections opened later)."""
    pg_rows(url, f'ALTER DATABASE "{dbname(url)}" SET deadlock_timeout = \'100ms\'')


def two_nodes(tmp_path: Path, url: str) -> tuple[Any, Any]:
    """Two nodes' cores on one database, each with a secret of its own: a ticket claimed on
    both would carry two different tokens."""
    cores = []
    for node in ("node-a", "node-b"):
        (tmp_path / node).mkdir()
        cores.append(run_core(tmp_path / node, pg=url, node=node, secret=SECRETS[node]))
    return cores[0], cores[1]


def queue(core: Core, *msgs: Any) -> list[ReplySlot]:
    """Requests queued before storage runs again: one batch, in this order."""
    slots = []
    for msg in msgs:
        slot = ReplySlot()
        core.storage._send.send_nowait(Envelope(msg, slot, math.inf))  # type: ignore[arg-type]
        slots.append(slot)
    return slots


async def answers(slots: list[ReplySlot], timeout: float = 10) -> list[Any]:
    with trio.fail_after(timeout):
        for slot in slots:
            await slot.done.wait()
    return [slot.value for slot in slots]


async def test_two_nodes_racing_for_the_same_ids_issue_exactly_one_token_each(
        tmp_path: Path, pg_dsn: str, caplog: pytest.LogCaptureFixture) -> None:
    # 200 ids claimed on both nodes at once: each node's batch holds its claims' row locks in
    # its own order until COMMIT, so the two deadlock, and the loser's batch runs again. A
    # claim is conditional (`WHERE token IS NULL`): the loser of each id answers
    # already_claimed with the winner's token, never a second token of its own.
    caplog.set_level(logging.WARNING, logger="anon_ticket")
    fast_deadlocks(pg_dsn)
    a_core, b_core = two_nodes(tmp_path, pg_dsn)
    async with a_core as a, b_core as b:
        txids = {PaymentId.generate(): os.urandom(32) for _ in range(200)}
        await a.storage.ask(RecordTransfers(tuple(
            Transfer(txid, pid, 10, 1) for pid, txid in txids.items())), 5)
        got: dict[PaymentId, dict[str, Any]] = {pid: {} for pid in txids}

        async def claim(node: str, core: Core, pid: PaymentId) -> None:
            try:
                got[pid][node] = await core.storage.ask(Claim(pid), 10)
            except Unavailable as exc:
                got[pid][node] = exc

        async with trio.open_nursery() as n:
            for pid in txids:
                n.start_soon(claim, "node-a", a, pid)
                n.start_soon(claim, "node-b", b, pid)
        tokens = dict(await sql(pg_dsn, "SELECT pid, token FROM tickets"))
        for pid, txid in txids.items():
            by_node = got[pid]
            assert all(isinstance(r, Claimed) for r in by_node.values()), by_node
            winners = [node for node, r in by_node.items() if r.status is ClaimStatus.SUCCESS]
            assert len(winners) == 1, by_node
            token = derive_hmac(SECRETS[winners[0]], pid, txid.hex())
            assert by_node == {node: Claimed(status, token, 10) for node, status in (
                (winners[0], ClaimStatus.SUCCESS),
                (({"node-a", "node-b"} - {winners[0]}).pop(), ClaimStatus.ALREADY_CLAIMED))}
            assert tokens[pid.raw] == token.raw
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_a_failing_statement_fails_only_its_request_and_replies_follow_the_commit(
        tmp_path: Path, pg_dsn: str) -> None:
    # A score past 64 bits fails on the server (bigint out of range) and aborts the batch's
    # transaction; it is run again with a savepoint a request: the refused request alone is
    # refused, the claims commit, and nobody hears back before that COMMIT.
    async with run_core(tmp_path, pg=pg_dsn) as core:
        victim, *pids = [PaymentId.generate() for _ in range(4)]
        for pid in (victim, *pids):
            await core.pay(pid)
        token = (await core.storage.ask(Claim(victim), 5)).token
        seen_committed: list[bool] = []

        class AfterCommit(ReplySlot):
            """Notes, as the reply arrives, whether every claim is in the database."""

            def put(self, value: object) -> None:
                # (on the loop, synchronously: the reply must find the claims committed)
                [(claimed,)] = pg_rows(pg_dsn, "SELECT count(token) FROM tickets "
                                               "WHERE pid = ANY(%s)", [p.raw for p in pids])
                seen_committed.append(claimed == len(pids))
                super().put(value)

        feed = await feed_size(pg_dsn)
        msgs = [Claim(pids[0]), Revoke(token, None, 2**63), Claim(pids[1]),
                Revoke(token, "a\x00b", None), Claim(pids[2])]
        slots: list[ReplySlot] = []
        for msg in msgs:
            slot = AfterCommit()
            core.storage._send.send_nowait(Envelope(msg, slot, math.inf))  # type: ignore[arg-type]
            slots.append(slot)
        got = await answers(slots)
        assert [type(r) for r in got] == [Claimed, Failure, Claimed, Failure, Claimed]
        assert all(r.status is ClaimStatus.SUCCESS for r in got[::2])
        assert all(isinstance(r.error, InvalidInput) for r in got[1::2])
        assert seen_committed == [True] * len(msgs)
        assert await feed_size(pg_dsn) == feed + 1  # one transaction, the careful one
        info = await core.storage.ask(LookupToken(token), 5)
        assert (info.revoked, info.abuse_score) == (False, 0)
        assert (await core.storage.ask(StorageHealth(), 5))["writable"]


async def test_a_transfer_two_nodes_record_at_once_is_credited_once(
        tmp_path: Path, pg_dsn: str) -> None:
    # Both nodes see the transfer missing and credit it; the second to insert it trips the
    # primary key (the first committed meanwhile), which aborts its transaction. Run again
    # with savepoints, its request finds the transfer and credits nothing (I1).
    a_core, b_core = two_nodes(tmp_path, pg_dsn)
    async with a_core as a, b_core as b:
        pid = PaymentId.generate()
        await a.pay(pid, 100)
        transfer = RecordTransfers((Transfer(os.urandom(32), pid, 7, 101),))
        with psycopg.connect(pg_dsn) as blocker:  # holds the ticket: both credits queue on it
            blocker.execute("SELECT 1 FROM tickets WHERE pid = %s FOR UPDATE", (pid.raw,))
            first, second = queue(a, transfer)[0], queue(b, transfer)[0]
            await until(lambda: _waiting(pg_dsn, 2))
            blocker.rollback()
            got = await answers([first, second])
        assert sorted(r.credited for r in got) == [0, 1], got
        assert all(isinstance(r, Recorded) for r in got)
        rows = await sql(pg_dsn, "SELECT amount FROM tickets WHERE pid = %s", pid.raw)
        assert rows == [(107,)]
        assert (await sql(pg_dsn, "SELECT count(*) FROM transfers WHERE pid = %s",
                          pid.raw)) == [(2,)]


async def _waiting(url: str, n: int) -> bool:
    return len(await lock_waiters(url)) >= n


# Makes the claim of one ticket hang in its UPDATE (in the server, where only the end of its
# connection stops it): a request in flight that nothing else can let through to its COMMIT.
HOLD = """
    CREATE FUNCTION hold() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        IF NEW.pid = '\\x{pid}'::bytea THEN PERFORM pg_sleep(60); END IF;
        RETURN NEW;
    END $$;
    CREATE TRIGGER hold BEFORE UPDATE ON tickets FOR EACH ROW EXECUTE FUNCTION hold();
"""


async def sleeping(url: str) -> list[int]:
    """The backends of this database inside `pg_sleep` (storage's, in the held claim)."""
    rows = await sql(url, "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                          "AND wait_event = 'PgSleep'")
    return [int(r[0]) for r in rows]


@pytest.mark.parametrize("loss", ["backend terminated", "server restarted"])
async def test_a_lost_connection_fails_what_was_in_flight_and_storage_reconnects_by_itself(
        tmp_path: Path, pg_server: PgServer, pg_dsn: str, loss: str) -> None:
    # The connection goes while a batch is in the server, and the database then refuses
    # connections for a while: the batch's requests get a retryable 503, health says storage
    # cannot write, and once the database takes connections again storage reconnects with
    # no request arriving first. What was committed before is all there; what was in flight
    # was not committed.
    admin = pg_server.dsn("postgres")
    name = dbname(pg_dsn)
    async with run_core(tmp_path, pg=pg_dsn) as core:
        kept, held, other = (PaymentId.generate() for _ in range(3))
        for pid in (kept, held, other):
            await core.pay(pid)
        kept_claim = await core.storage.ask(Claim(kept), 5)
        await sql(pg_dsn, HOLD.format(pid=held.raw.hex()))
        slots = queue(core, Claim(other), Claim(held))  # `other` written, `held` hangs
        await until(lambda: _sleeping_one(pg_dsn))
        [storage_pid] = await sleeping(pg_dsn)
        await sql(admin, f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
        if loss == "backend terminated":
            await sql(admin, "SELECT pg_terminate_backend(%s)", storage_pid)
        else:
            await trio.to_thread.run_sync(pg_server.restart)
        got = await answers(slots)
        assert all(isinstance(r, Failure) and isinstance(r.error, Unavailable) for r in got), got
        health = await core.storage.ask(StorageHealth(), 5)
        assert health["writable"] is False and health["error"], health
        with pytest.raises(Unavailable):  # while the database refuses: 503 at once
            await core.storage.ask(ReadCursor(), 5)
        await sql(admin, f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
        await sql(pg_dsn, "DROP TRIGGER hold ON tickets")

        async def writable() -> bool:  # (a health question is answered, never a probe)
            return bool((await core.storage.ask(StorageHealth(), 5))["writable"])

        await until(writable)

        async def storage_alone() -> bool:  # (the test's own connections end as they close)
            return len(await sql(admin, "SELECT pid FROM pg_stat_activity WHERE datname = %s",
                                 name)) == 1

        await until(storage_alone)  # storage's new connection, opened by itself
        assert await core.storage.ask(Claim(kept), 5) == Claimed(
            ClaimStatus.ALREADY_CLAIMED, kept_claim.token, kept_claim.balance)
        for pid in (held, other):  # in flight: not committed, so claimable now
            assert (await core.storage.ask(Claim(pid), 5)).status is ClaimStatus.SUCCESS
        assert (await core.storage.ask(StorageStats(), 5))["tickets"] == 3
        assert core.supervisor.status()[0].restarts == 0


async def _sleeping_one(url: str) -> bool:
    return len(await sleeping(url)) == 1


async def test_every_shared_write_appends_one_feed_entry_and_a_cache_fill_none(
        tmp_path: Path, pg_dsn: str) -> None:
    # Other nodes follow `cluster_events`: a transaction that changed what they answer (a
    # new id, a claim, a top-up, a revocation) appends exactly one entry, with what changed;
    # one that only read, or whose only effect is filling this node's cache (an
    # already_claimed answer), or that only moved the cursor, appends none.
    async with run_core(tmp_path, pg=pg_dsn, cluster=True) as core:

        async def entries(request: Any) -> list[tuple[Any, Any, Any]]:
            """The feed entries `request` appended (it may fail: none, then)."""
            [(last,)] = await sql(pg_dsn, "SELECT coalesce(max(id), 0) FROM cluster_events")
            try:
                await core.storage.ask(request, 5)
            except InvalidInput:
                pass
            rows = await sql(pg_dsn, "SELECT node, body FROM cluster_events WHERE id > %s "
                                     "ORDER BY id", last)
            assert all(node == "node-a" for node, _ in rows)
            return [decode_feed(bytes(body)) for _, body in rows]

        pid = PaymentId.generate()
        [(committed, pids, events)] = await entries(
            RecordTransfers((Transfer(os.urandom(32), pid, 10, 1),)))
        assert pids == (pid,) and [e.kind for e in events] == [EventKind.PAYMENT_CONFIRMED]
        [(committed, pids, events)] = await entries(Claim(pid))
        assert pids == () and [type(e) for e in committed.effects] == [CacheClaim, Publish]
        token = committed.effects[0].token
        assert await entries(Claim(pid)) == []  # already claimed: a cache fill only
        for read in (LookupToken(token), ReadTicketState(pid, None), ReadCursor(),
                     StorageStats()):
            assert await entries(read) == []
        assert await entries(RecordTransfers((), (SkippedTransfer(os.urandom(32), "dust", 1, 2),),
                                             cursor=2)) == []  # this node's poller's only
        [(committed, _, _)] = await entries(
            RecordTransfers((Transfer(os.urandom(32), pid, 5, 3),)))  # a top-up
        assert [type(e) for e in committed.effects] == [Invalidate, Publish]
        [(committed, _, _)] = await entries(Revoke(token, "abuse", 3))
        assert [type(e) for e in committed.effects] == [Invalidate, Publish]
        assert await entries(Revoke(token, "again", 4)) == []  # revoked already: no change
        assert await entries(Revoke(token, None, 2**63)) == []  # refused: nothing written
        # Concurrent claims: one entry per transaction that wrote them, from that transaction.
        fresh = [PaymentId.generate() for _ in range(50)]
        [(_, pids, _)] = await entries(RecordTransfers(tuple(
            Transfer(os.urandom(32), p, 10, 4) for p in fresh)))
        assert set(pids) == set(fresh)
        before = await feed_size(pg_dsn)
        async with trio.open_nursery() as n:
            for p in fresh:
                n.start_soon(core.storage.ask, Claim(p), 5)
        added = await sql(pg_dsn, "SELECT xmin::text FROM cluster_events ORDER BY id OFFSET %s",
                          before)
        wrote = await sql(pg_dsn, "SELECT DISTINCT xmin::text FROM tickets WHERE pid = ANY(%s)",
                          [p.raw for p in fresh])
        assert sorted(added) == sorted(wrote)
        assert len(added) == pg_transactions(pg_dsn, fresh) < len(fresh)


async def test_a_deadlock_between_two_nodes_runs_the_losing_transaction_again(
        tmp_path: Path, pg_dsn: str, caplog: pytest.LogCaptureFixture) -> None:
    # Two nodes top up the same two tickets in opposite orders. A row lock held by the test
    # lines them up: node a waits for ticket x; node b takes y, then waits for x behind a; the
    # lock goes, a takes x and waits for y: a deadlock, which the database breaks by rolling
    # one back. That one runs again (not a 503): both top-ups are credited, once each.
    caplog.set_level(logging.WARNING, logger="anon_ticket")
    fast_deadlocks(pg_dsn)
    a_core, b_core = two_nodes(tmp_path, pg_dsn)
    async with a_core as a, b_core as b:
        x, y = PaymentId.generate(), PaymentId.generate()
        await a.pay(x, 100)
        await a.pay(y, 100)
        with psycopg.connect(pg_dsn) as blocker:
            blocker.execute("SELECT 1 FROM tickets WHERE pid = %s FOR UPDATE", (x.raw,))
            [first] = queue(a, RecordTransfers((Transfer(os.urandom(32), x, 1, 101),
                                                Transfer(os.urandom(32), y, 2, 101))))
            await until(lambda: _waiting(pg_dsn, 1))
            [second] = queue(b, RecordTransfers((Transfer(os.urandom(32), y, 20, 101),
                                                 Transfer(os.urandom(32), x, 10, 101))))
            await until(lambda: _waiting(pg_dsn, 2))
            blocker.rollback()
            got = await answers([first, second])
        assert [(type(r), r.credited) for r in got] == [(Recorded, 2), (Recorded, 2)], got
        amounts = await sql(pg_dsn, "SELECT pid, amount FROM tickets")
        assert dict(amounts) == {x.raw: 111, y.raw: 122}
        reruns = [getattr(r, "fields", {}).get("error") for r in caplog.records
                  if r.getMessage() == "transaction rolled back by the database; again"]
        assert reruns == ["DeadlockDetected"]
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR]



async def test_a_database_restarted_while_storage_is_idle_costs_no_request_a_503(
        tmp_path: Path, pg_server: PgServer, pg_dsn: str) -> None:
    # Nothing was in flight: the next claim must not be the one that finds the dead session.
    async with run_core(tmp_path, pg=pg_dsn) as core:
        pid = PaymentId.generate()
        await core.pay(pid)
        await trio.to_thread.run_sync(pg_server.restart)
        claimed = await core.storage.ask(Claim(pid), 5)  # at once: the batch runs again
        assert claimed.status is ClaimStatus.SUCCESS
        assert (await core.storage.ask(StorageHealth(), 5))["writable"] is True
        # ...and idle long enough, the session is checked without any request.
        await trio.to_thread.run_sync(pg_server.restart)
        with trio.fail_after(5):
            while (await core.storage.ask(StorageHealth(), 5))["error"] is None:
                await trio.sleep(0.05)  # noticed (and reconnecting)...
        with trio.fail_after(10):
            while not (await core.storage.ask(StorageHealth(), 5))["writable"]:
                await trio.sleep(0.05)  # ...and back
        assert core.supervisor.status()[0].restarts == 0
