"""The storage actor on a real SQLite file and on a real PostgreSQL database (the `backend`
fixture: the same contract on both): group commit, failures undone alone, exactly once.
What is about SQLite itself (its log, checkpoints, a disk that fills up) runs on SQLite only;
what only PostgreSQL has (several nodes, a lost connection): tests/actors/test_storage_pg.py."""

from __future__ import annotations

import math
import os
import threading
from pathlib import Path
from typing import Any

import apsw
import psycopg
import pytest
import trio

from actors.hub import Replay
from actors.storage import Storage, StorageConfig
from actors.storage_pg import PgConfig, PgStorage
from anon_ticket import schema
from anon_ticket.domain.commands import Backup, FilterStats, StorageHealth, StorageStats
from anon_ticket.domain.ids import PaymentId, ServiceToken
from anon_ticket.domain.messages import (
    Claim,
    Claimed,
    ClaimStatus,
    Committed,
    EventKind,
    Invalidate,
    Lookup,
    LookupToken,
    PollerPauseFlag,
    Presence,
    ReadCursor,
    Recorded,
    RecordTransfers,
    Revoke,
    Settle,
    SkippedTransfer,
    Transfer,
)
from anon_ticket.domain.tokens import derive_hmac
from anon_ticket.errors import BackupFailed, InvalidInput, NotFound, Unavailable
from anon_ticket.metrics import Metrics
from mailboxes import Failure, Mailbox
from supervisors.mailbox import Envelope
from tests.actors.core import Core, ReplySlot, faulty_disk, run_core


class CommitCounter:
    def __init__(self) -> None:
        self.commits = 0
        self.veto = False

    def install(self, conn: apsw.Connection) -> None:
        conn.setcommithook(self)

    def __call__(self) -> bool:
        self.commits += 1
        return self.veto  # True turns the COMMIT into a ROLLBACK


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest) -> str | None:
    """None for SQLite, or a fresh PostgreSQL database's URL (only that param starts the
    server)."""
    if request.param == "sqlite":
        return None
    url: str = request.getfixturevalue("pg_dsn")
    return url


def core_on(backend: str | None, tmp_path: Path, **options: Any) -> Any:
    """The core as the tree runs it on that store: with PostgreSQL, the cluster actor too
    (without it the filter never trusts itself and answers nothing alone)."""
    return run_core(tmp_path, pg=backend, cluster=backend is not None, **options)


def pg_rows(url: str, sql: str, *args: object) -> list[Any]:
    """Rows of one statement (none for DDL) on a connection of the test's own."""
    with psycopg.connect(url, autocommit=True) as conn:
        cur = conn.execute(sql, args or None)
        return cur.fetchall() if cur.description is not None else []


def pg_transactions(url: str, pids: list[PaymentId]) -> int:
    """How many committed transactions last wrote these tickets (each row's `xmin`; a
    savepoint's writes carry an xid of their own, so only for transactions without any)."""
    [(n,)] = pg_rows(url, "SELECT count(DISTINCT xmin::text) FROM tickets WHERE pid = ANY(%s)",
                     [p.raw for p in pids])
    return int(n)


def count_tickets(core: Core, pid: PaymentId | None = None) -> int:
    """Rows of `tickets` (of one id), read past the storage actor."""
    if core.pg is not None:
        if pid is None:
            return int(pg_rows(core.pg, "SELECT count(*) FROM tickets")[0][0])
        return int(pg_rows(core.pg, "SELECT count(*) FROM tickets WHERE pid = %s",
                           pid.raw)[0][0])
    conn = apsw.Connection(str(core.db_path))
    try:
        if pid is None:
            rows = conn.execute("SELECT count(*) FROM tickets").fetchall()
        else:
            rows = conn.execute("SELECT count(*) FROM tickets WHERE pid = ?",
                                (pid.raw,)).fetchall()
        (count,) = rows[0]
        assert isinstance(count, int)
        return count
    finally:
        conn.close()


async def test_claim_then_retry_returns_the_stored_token(
        tmp_path: Path, backend: str | None) -> None:
    async with core_on(backend, tmp_path) as core:
        pid = PaymentId.generate()
        txid = os.urandom(32)
        recorded = await core.pay(pid, 5 * 10**11, txid=txid)
        assert isinstance(recorded, Recorded) and recorded.new_pids == (pid,)
        first = await core.storage.ask(Claim(pid), 5)
        assert first.status is ClaimStatus.SUCCESS
        assert first.balance == 5 * 10**11
        assert first.token == derive_hmac(b"s" * 32, pid, txid.hex())
        again = await core.storage.ask(Claim(pid), 5)
        assert again == Claimed(ClaimStatus.ALREADY_CLAIMED, first.token, 5 * 10**11)
        info = await core.storage.ask(LookupToken(first.token), 5)
        assert (info.revoked, info.amount, info.abuse_score) == (False, 5 * 10**11, 0)
        assert info.issued_at.endswith("Z")


async def test_unknown_pid_and_token_are_not_found(tmp_path: Path, backend: str | None) -> None:
    async with core_on(backend, tmp_path) as core:
        with pytest.raises(NotFound):
            await core.storage.ask(Claim(PaymentId.generate()), 5)
        with pytest.raises(NotFound):
            await core.storage.ask(LookupToken(ServiceToken(os.urandom(32))), 5)


async def test_a_transfer_credits_once_and_top_ups_add(tmp_path: Path, backend: str | None) -> None:
    async with core_on(backend, tmp_path) as core:
        pid = PaymentId.generate()
        txid = os.urandom(32)
        await core.pay(pid, 100, txid=txid)
        again = await core.pay(pid, 100, txid=txid)  # the same transfer, seen again (I1)
        assert again.credited == 0
        claimed = await core.storage.ask(Claim(pid), 5)
        assert claimed.balance == 100
        # the answer is now cached by the filter
        assert await core.filter.ask(Lookup(pid), 5) == Claimed(
            ClaimStatus.ALREADY_CLAIMED, claimed.token, 100)
        topped = await core.pay(pid, 50)
        assert topped.topped_up == (pid,)
        # the cache was invalidated in commit order: the next lookup goes to storage
        assert await core.filter.ask(Lookup(pid), 5) is Presence.MAYBE
        after = await core.storage.ask(Claim(pid), 5)
        assert after == Claimed(ClaimStatus.ALREADY_CLAIMED, claimed.token, 150)
        info = await core.storage.ask(LookupToken(claimed.token), 5)
        assert info.amount == 150


async def test_cursor_moves_with_its_transfers(tmp_path: Path, backend: str | None) -> None:
    async with core_on(backend, tmp_path) as core:
        assert await core.storage.ask(ReadCursor(), 5) is None
        pid = PaymentId.generate()
        t = Transfer(os.urandom(32), pid, 10, 7)
        skipped = SkippedTransfer(os.urandom(32), "no_payment_id", 5, 7)
        await core.storage.ask(RecordTransfers((t,), (skipped,), cursor=7), 5)
        assert await core.storage.ask(ReadCursor(), 5) == 7


async def test_the_poller_pause_is_stored_and_read_back(
        tmp_path: Path, backend: str | None) -> None:
    async with core_on(backend, tmp_path) as core:
        assert await core.storage.ask(PollerPauseFlag(), 5) is False  # never paused
        assert await core.storage.ask(PollerPauseFlag(True), 5) is True
        assert await core.storage.ask(PollerPauseFlag(), 5) is True
        assert await core.storage.ask(PollerPauseFlag(True), 5) is True  # again: no conflict
        assert await core.storage.ask(PollerPauseFlag(False), 5) is False
        assert await core.storage.ask(PollerPauseFlag(), 5) is False


async def test_group_commit_batches_concurrent_claims(
        tmp_path: Path, backend: str | None) -> None:
    counter = CommitCounter()
    async with core_on(backend, tmp_path, on_open=counter.install) as core:
        pids = [PaymentId.generate() for _ in range(200)]
        await core.storage.ask(RecordTransfers(tuple(
            Transfer(os.urandom(32), p, 10, 1) for p in pids)), 5)
        counter.commits = 0
        results: list[Any] = []

        async def claim(p: PaymentId) -> None:
            results.append(await core.storage.ask(Claim(p), 5))

        async with trio.open_nursery() as n:
            for p in pids:
                n.start_soon(claim, p)
        assert [r.status for r in results] == [ClaimStatus.SUCCESS] * 200
        # (PostgreSQL: the transactions that wrote the 200 claims, counted by the database)
        commits = counter.commits if backend is None else pg_transactions(backend, pids)
        assert 1 <= commits < 200 / 2, commits
        sizes = core.metrics.batch_size.collect()[0].samples
        count = next(s.value for s in sizes if s.name.endswith("_count"))
        total = next(s.value for s in sizes if s.name.endswith("_sum"))
        assert total / count > 1.0


async def test_one_failing_request_does_not_sink_its_batch(
        tmp_path: Path, backend: str | None) -> None:
    counter = CommitCounter()
    async with core_on(backend, tmp_path, on_open=counter.install) as core:
        paid = [PaymentId.generate() for _ in range(3)]
        for p in paid:
            await core.pay(p)
        good, half = PaymentId.generate(), PaymentId.generate()
        # `half` is credited before the next transfer violates the txid CHECK: undone with it.
        bad = RecordTransfers((Transfer(os.urandom(32), half, 10, 1),
                               Transfer(b"short", PaymentId.generate(), 10, 1)))
        outcomes: dict[str, Any] = {}

        async def send(name: str, msg: Any) -> None:
            try:
                outcomes[name] = await core.storage.ask(msg, 5)
            except Unavailable as exc:
                outcomes[name] = exc

        counter.commits = 0
        async with trio.open_nursery() as n:  # all queued before storage wakes: one batch
            n.start_soon(send, "bad", bad)
            n.start_soon(send, "good", RecordTransfers((Transfer(os.urandom(32), good, 10, 1),)))
            for i, p in enumerate(paid):
                n.start_soon(send, f"claim{i}", Claim(p))
        assert isinstance(outcomes["bad"], Unavailable)
        assert isinstance(outcomes["good"], Recorded)
        assert all(outcomes[f"claim{i}"].status is ClaimStatus.SUCCESS for i in range(3))
        # One commit for `good` and one or two for the claims (before, after or between the
        # chunks: trio starts a batch of tasks in order or reversed); none for `bad`.
        # (PostgreSQL: the transactions that last wrote `good` and the claimed tickets.)
        commits = counter.commits if backend is None else pg_transactions(
            backend, [good, *paid])
        assert 2 <= commits <= 4, commits
        assert (await core.storage.ask(Claim(good), 5)).status is ClaimStatus.SUCCESS
        with pytest.raises(NotFound):
            await core.storage.ask(Claim(half), 5)
        assert count_tickets(core, half) == 0
        if backend is None:
            conn = apsw.Connection(str(core.db_path))
            assert conn.execute("SELECT count(*) FROM transfers WHERE pid = ?",
                                (half.raw,)).fetchone() == (0,)
            conn.close()
        else:
            assert pg_rows(backend, "SELECT count(*) FROM transfers WHERE pid = %s",
                           half.raw) == [(0,)]


async def test_events_reach_the_hub_in_commit_order_across_a_batch(
        tmp_path: Path, backend: str | None) -> None:
    # A claim and, in the same batch, a top-up of that ticket with a new payment: the top-up's
    # events travel with the new id's Bloom acknowledgement, the claim's in the batch's
    # effects. Those once left at the end of the batch, after the acknowledgement: the hub got
    # seq 3 before seq 2 (and a live watcher dropped 2 as already seen).
    async with core_on(backend, tmp_path) as core:
        pid, new = PaymentId.generate(), PaymentId.generate()
        await core.pay(pid)  # seq 1
        claim, record = ReplySlot(), ReplySlot()
        top_up = RecordTransfers((Transfer(os.urandom(32), pid, 5, 2),
                                  Transfer(os.urandom(32), new, 5, 2)))
        # Both queued before storage runs again: one batch, the claim first.
        core.storage._send.send_nowait(Envelope(Claim(pid), claim, math.inf))  # type: ignore[arg-type]
        core.storage._send.send_nowait(Envelope(top_up, record, math.inf))  # type: ignore[arg-type]
        with trio.fail_after(5):
            await claim.done.wait()
            await record.done.wait()
        assert claim.value.status is ClaimStatus.SUCCESS
        assert record.value.new_pids == (new,)
        # The filter handed both transactions' events to the hub before it acknowledged the
        # top-up (the claim's first): they are ahead of this question in the hub's mailbox.
        # (On PostgreSQL the cluster actor acknowledges the new id, then hands its events to
        # the filter: a question to the filter first puts this one behind them.)
        if backend is not None:
            await core.filter.ask(FilterStats(), 5)
        events = await core.hub.ask(Replay(pid.raw, 0, 3), 5)
        assert events is not None
        assert [(e.seq, e.kind) for e in events] == [
            (1, EventKind.PAYMENT_CONFIRMED), (2, EventKind.CLAIMED), (3, EventKind.TOPPED_UP)]


# PostgreSQL's veto: a deferred constraint trigger, checked at COMMIT, that fails it.
PG_VETO = """
    CREATE FUNCTION veto() RETURNS trigger LANGUAGE plpgsql AS
        $$ BEGIN RAISE EXCEPTION 'commit vetoed by the test'; END $$;
    CREATE CONSTRAINT TRIGGER veto AFTER INSERT OR UPDATE ON tickets
        DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION veto();
"""


async def test_a_vetoed_commit_fails_every_request_it_held(
        tmp_path: Path, backend: str | None) -> None:
    counter = CommitCounter()
    async with core_on(backend, tmp_path, on_open=counter.install) as core:
        pids = [PaymentId.generate() for _ in range(20)]
        counter.veto = True
        if backend is not None:
            pg_rows(backend, PG_VETO)
        outcomes: list[Any] = []

        async def pay(p: PaymentId) -> None:
            try:
                outcomes.append(await core.pay(p))
            except Unavailable as exc:
                outcomes.append(exc)

        async with trio.open_nursery() as n:
            for p in pids:
                n.start_soon(pay, p)
        assert len(outcomes) == 20
        assert all(isinstance(o, Unavailable) for o in outcomes)
        assert not (await core.storage.ask(StorageHealth(), 5))["writable"]
        counter.veto = False
        if backend is not None:
            pg_rows(backend, "DROP TRIGGER veto ON tickets")
        for p in pids:  # nothing was recorded: not in the filter, not in storage
            # (PostgreSQL's storage puts new ids into the filter before the COMMIT, so they
            # may be there: a lookup that finds nothing)
            assert await core.filter.ask(Lookup(p), 5) in (
                (Presence.ABSENT,) if backend is None else (Presence.ABSENT, Presence.MAYBE))
            with pytest.raises(NotFound):
                await core.storage.ask(Claim(p), 5)
        assert count_tickets(core) == 0
        await core.pay(pids[0])  # a write that commits: writable again
        assert (await core.storage.ask(StorageHealth(), 5))["writable"]


async def test_requests_past_their_deadline_are_dropped_and_gone_senders_are_harmless(
        tmp_path: Path, backend: str | None) -> None:
    async with core_on(backend, tmp_path) as core:
        pid = PaymentId.generate()
        await core.pay(pid)
        # A sender that gives up (closed reply channel) before storage answers.
        with trio.move_on_after(0):
            await core.storage.ask(Claim(pid), 5)
        # Storage survived and the claim either happened once or not at all.
        result = await core.storage.ask(Claim(pid), 5)
        assert result.status in (ClaimStatus.SUCCESS, ClaimStatus.ALREADY_CLAIMED)
        before = core.metrics.expired_dropped._value.get()
        with pytest.raises(Unavailable):
            await core.storage.ask(Claim(pid), 0)  # deadline already passed when it arrives
        await core.storage.ask(ReadCursor(), 5)  # same FIFO: the expired one was seen first
        assert core.metrics.expired_dropped._value.get() == before + 1


async def test_revoke_keeps_the_first_reason_and_score(tmp_path: Path, backend: str | None) -> None:
    async with core_on(backend, tmp_path) as core:
        pid = PaymentId.generate()
        await core.pay(pid)
        token = (await core.storage.ask(Claim(pid), 5)).token
        first = await core.storage.ask(Revoke(token, "abuse", 7), 5)
        assert first.revoked and first.abuse_score == 7 and first.revoke_reason == "abuse"
        second = await core.storage.ask(Revoke(token, "other", 1), 5)
        assert (second.revoke_reason, second.abuse_score, second.revoked_at) == (
            "abuse", 7, first.revoked_at)
        # a revoked token is still credited by a top-up, and an alert is raised
        await core.pay(pid, 5)
        assert (await core.storage.ask(LookupToken(token), 5)).amount == 10**12 + 5
        alerts = core.metrics.alerts.labels("revoked_topped_up")._value.get()
        assert alerts == 1


def _checkpoints(core: Any, mode: str) -> float:
    return float(core.metrics.wal_checkpoints.labels(mode)._value.get())


@pytest.fixture
def small_wal(monkeypatch: pytest.MonkeyPatch) -> None:
    """A checkpoint per 40 pages, a RESTART at 160 (320 whatever was written during the
    checkpoint before it), retried at once after a blocked one."""
    from actors import storage
    monkeypatch.setattr(storage, "CHECKPOINT_WAL_PAGES", 40)
    monkeypatch.setattr(storage, "RESTART_WAL_PAGES", 160)
    monkeypatch.setattr(storage, "RESTART_MAX_BACKLOG", 160)
    monkeypatch.setattr(storage, "FORCE_RESTART_WAL_PAGES", 320)
    monkeypatch.setattr(storage, "RESTART_RETRY_SECS", 0.0)


@pytest.mark.usefixtures("small_wal")
async def test_the_wal_stays_bounded_under_one_commit_per_claim(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Claims one at a time (a commit each, as under light HTTP load): the log must not grow
    # without bound, and a checkpoint must not follow every commit (it did: one per 10 claims).
    # The writer restarts the log only right after a passive checkpoint that finished with the
    # log past the bound, so the RESTART has only what was written meanwhile to copy.
    from actors import storage
    calls: list[tuple[str, int]] = []
    checkpoint = storage.Storage._checkpoint

    def spy(self: storage.Storage, mode: str) -> int | None:
        calls.append((mode, self._wal_pages))
        return checkpoint(self, mode)

    monkeypatch.setattr(storage.Storage, "_checkpoint", spy)
    pids = [PaymentId.generate() for _ in range(600)]
    async with run_core(tmp_path, batch_limit=1) as core:
        for pid in pids:
            await core.pay(pid)
        longest = written = 0.0
        last = core.metrics.wal_pages._value.get()
        before = _checkpoints(core, "passive")
        for pid in pids:
            assert (await core.storage.ask(Claim(pid), 5)).status is ClaimStatus.SUCCESS
            now = core.metrics.wal_pages._value.get()
            written += now - last if now >= last else now  # the log may have started over
            longest, last = max(longest, now), now
        passive = _checkpoints(core, "passive") - before
        restart = _checkpoints(core, "restart")
    # Past the bound by what the passive checkpoints let through: the hard bound and what is
    # written while the checkpoint thread waits for a core (on a loaded 2-core machine, more
    # than one checkpoint's worth: 487 pages seen). Without restarts, 600 claims a commit
    # each write about 1,800 pages.
    assert 160 <= longest <= 2 * 320
    assert restart >= 1
    assert passive <= written / 40 * 1.25 + 2  # one per 40 pages written, not per commit
    restarts = [i for i, (mode, _) in enumerate(calls) if mode == "RESTART"]
    assert len(restarts) == restart
    for i in restarts:  # each right after a passive one, and only once the log was long
        assert calls[i - 1][0] == "PASSIVE" and calls[i][1] >= 160, calls[max(0, i - 3):i + 1]


def test_the_log_starts_over_when_long_and_little_was_written_during_the_checkpoint() -> None:
    from actors import storage
    soft, backlog, hard = (storage.RESTART_WAL_PAGES, storage.RESTART_MAX_BACKLOG,
                           storage.FORCE_RESTART_WAL_PAGES)
    assert not storage.restart_due(soft - 1, soft - 1)  # short: no need
    assert storage.restart_due(soft, soft - backlog)  # long, and a RESTART would copy little
    assert not storage.restart_due(soft + 10, soft + 10 - backlog - 1)  # a catch-up: a stall
    assert not storage.restart_due(hard - 1, None)  # the checkpoint copied nothing (a reader)
    assert storage.restart_due(hard, None) and storage.restart_due(hard, 0)  # too long


def _size(path: str) -> int:
    return os.path.getsize(path)  # a stat of a local file: no need for a worker thread


@pytest.mark.usefixtures("small_wal")
async def test_the_log_file_is_cut_back_after_a_restart(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # SQLite reuses the log file from its start after a RESTART but keeps its largest size,
    # unless a size limit is set: then the first commit after it truncates the file.
    from actors import storage
    limit = 16 * 4096
    monkeypatch.setattr(storage, "WAL_SIZE_LIMIT", limit)
    pids = [PaymentId.generate() for _ in range(400)]
    async with run_core(tmp_path, batch_limit=1) as core:
        wal = f"{core.db_path}-wal"
        largest = 0
        after_restart: list[int] = []
        restarts = _checkpoints(core, "restart")
        for pid in pids:
            await core.pay(pid)
            largest = max(largest, _size(wal))
            if _checkpoints(core, "restart") > restarts:
                restarts = _checkpoints(core, "restart")
                await core.pay(PaymentId.generate())  # the first commit after it
                after_restart.append(_size(wal))
    assert largest > 140 * 4096  # the log reached the RESTART bound (160 pages)...
    assert after_restart and max(after_restart) <= limit + 8 * 4200  # ...and was cut back


@pytest.mark.usefixtures("small_wal")
async def test_a_reader_holding_the_log_delays_its_restart_but_no_claim(tmp_path: Path) -> None:
    pids = [PaymentId.generate() for _ in range(300)]
    async with run_core(tmp_path, batch_limit=1) as core:
        for pid in pids[:50]:
            await core.pay(pid)
        reader = apsw.Connection(str(core.db_path))  # e.g. a backup: a snapshot held open
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM tickets").fetchall()
        for pid in pids[50:]:
            await core.pay(pid)  # every write lands while the reader holds its snapshot
        held = core.metrics.wal_pages._value.get()
        assert held > 160  # the log could not start over...
        assert _checkpoints(core, "restart") >= 1  # ...though a RESTART was tried: no error
        reader.execute("COMMIT")
        reader.close()
        lengths = []
        for pid in pids:
            assert (await core.storage.ask(Claim(pid), 5)).status is ClaimStatus.SUCCESS
            lengths.append(core.metrics.wal_pages._value.get())
        assert min(lengths) < 40 and max(lengths[-100:]) <= 320 + 160  # started over, bounded


@pytest.mark.usefixtures("small_wal")
async def test_a_passive_checkpoint_in_flight_never_holds_the_writer(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # While a passive checkpoint runs (held here until the test lets it go: a slow disk),
    # payments and claims go on, even past the bound where the log must start over; the
    # RESTART comes once the passive one is done, after the next batch. (It used to wait for
    # the checkpoint's lock with the writer idle: every request behind it waited too.)
    from actors import storage
    checkpoint, due = storage.Storage._checkpoint, storage.restart_due
    held, release = threading.Event(), threading.Event()
    calls: list[str] = []
    decided = trio.Event()

    def held_passive(self: storage.Storage, mode: str) -> int | None:
        calls.append(mode)
        if mode == "PASSIVE" and not release.is_set():
            held.set()
            release.wait(30)  # in the checkpoint's worker thread
        return checkpoint(self, mode)

    def restart_due(pages: int, copied: int | None) -> bool:  # on the loop, after a PASSIVE
        decided.set()
        return due(pages, copied)

    monkeypatch.setattr(storage.Storage, "_checkpoint", held_passive)
    monkeypatch.setattr(storage, "restart_due", restart_due)
    pids = iter([PaymentId.generate() for _ in range(400)])
    async with run_core(tmp_path, batch_limit=1) as core:
        while not held.is_set():  # a commit each: the log grows to the first checkpoint
            await core.pay(next(pids))
        while core.metrics.wal_pages._value.get() < 320:  # past the bound that forces it
            pid = next(pids)
            with trio.fail_after(2):  # (the old code: stuck until the checkpoint ends)
                await core.pay(pid)
                assert (await core.storage.ask(Claim(pid), 5)).status is ClaimStatus.SUCCESS
        assert _checkpoints(core, "restart") == 0 and calls == ["PASSIVE"]
        release.set()
        await decided.wait()
        await core.pay(next(pids))  # a batch, and after it the RESTART...
        await core.pay(next(pids))  # ...which this one waited for
        assert _checkpoints(core, "restart") == 1 and calls == ["PASSIVE", "RESTART"]
        assert core.metrics.wal_pages._value.get() < 40  # the log started over


async def test_a_full_disk_is_reported_by_health_and_a_probe_sees_it_recover(
        tmp_path: Path) -> None:
    # Claims fail while the disk is full (every write: SQLITE_FULL); health must say storage
    # cannot write and why, and say it can again once the disk has room, with no claim or
    # payment arriving first: asking for health probes with a tiny write.
    from actors import storage
    with faulty_disk() as disk:
        async with run_core(tmp_path) as core:
            pid = PaymentId.generate()
            await core.pay(pid)
            assert await core.storage.ask(StorageHealth(), 5) == {"writable": True,
                                                                  "error": None}
            disk.full = True
            with pytest.raises(Unavailable):
                await core.storage.ask(Claim(pid), 5)
            health = await core.storage.ask(StorageHealth(), 5)
            assert health == {"writable": False, "error": "database or disk is full"}
            assert (await core.storage.ask(StorageStats(), 5))["write_error"] == health["error"]
            disk.full = False
            with trio.fail_after(5):  # a probe at most once a second
                while not (await core.storage.ask(StorageHealth(), 5))["writable"]:
                    await trio.sleep(storage.WRITE_PROBE_SECS / 10)
            assert (await core.storage.ask(Claim(pid), 5)).status is ClaimStatus.SUCCESS
            assert core.supervisor.status()[0].restarts == 0


async def test_a_commit_after_a_failed_one_clears_the_failure(tmp_path: Path) -> None:
    with faulty_disk() as disk:
        async with run_core(tmp_path) as core:
            disk.full = True
            with pytest.raises(Unavailable):
                await core.pay(PaymentId.generate())
            assert not (await core.storage.ask(StorageHealth(), 5))["writable"]
            disk.full = False
            await core.pay(PaymentId.generate())  # a write that commits: writable again
            assert (await core.storage.ask(StorageHealth(), 5))["writable"]


def unstorable(backend: str | None, token: ServiceToken) -> list[Any]:
    """Requests with a value the database cannot hold: past 64 bits (the first one past,
    2**63, too), a lone surrogate; on PostgreSQL also a NUL in a text (SQLite keeps it)."""
    return [RecordTransfers((), cursor=10**30), RecordTransfers((), cursor=-2**64),
            RecordTransfers((), cursor=2**63), Revoke(token, None, 10**30),
            Revoke(token, None, 2**63), Revoke(token, "\ud800", None),
            *([Revoke(token, "a\x00b", None)] if backend is not None else [])]


async def test_values_the_database_cannot_hold_are_refused_not_a_crash(
        tmp_path: Path, backend: str | None) -> None:
    # Defence behind the internal listener's checks: a cursor past 64 bits (the operator's
    # rescan of 10**30 crashed storage, then the poller), a score past 64 bits, a lone
    # surrogate in a reason, a NUL in a backup path: a failure reply, storage stays up.
    async with core_on(backend, tmp_path) as core:
        pid = PaymentId.generate()
        await core.pay(pid)
        token = (await core.storage.ask(Claim(pid), 5)).token
        for msg in unstorable(backend, token):
            with pytest.raises(InvalidInput):
                await core.storage.ask(msg, 5)
        for path in ("/proc/self/mem", "/tmp/a\x00b", "relative.tar", str(tmp_path),
                     str(core.db_path)):
            with pytest.raises(BackupFailed):
                await core.storage.ask(Backup(path), 5)
        assert core.supervisor.status()[0].restarts == 0
        assert not (await core.storage.ask(LookupToken(token), 5)).revoked
        assert await core.storage.ask(ReadCursor(), 5) is None
        assert (await core.storage.ask(StorageHealth(), 5))["writable"]  # the input's fault


async def test_a_value_the_database_cannot_hold_fails_only_its_request_in_a_batch(
        tmp_path: Path, backend: str | None) -> None:
    # The refused requests share one batch (one transaction) with claims: on PostgreSQL the
    # first failing statement aborts the whole transaction, which is then run again with a
    # savepoint a request. Each refused request alone is refused; every claim commits.
    async with core_on(backend, tmp_path) as core:
        victim, *pids = [PaymentId.generate() for _ in range(9)]
        for p in (victim, *pids):
            await core.pay(p)
        token = (await core.storage.ask(Claim(victim), 5)).token
        bad = unstorable(backend, token)
        batch: list[tuple[Any, ReplySlot]] = []
        for i, p in enumerate(pids):  # claims before, between and after the refused ones
            batch.append((Claim(p), ReplySlot()))
            if i < len(bad):
                batch.append((bad[i], ReplySlot()))
        for msg in bad[len(pids):]:
            batch.append((msg, ReplySlot()))
        for msg, slot in batch:  # all queued before storage runs again: one batch
            core.storage._send.send_nowait(Envelope(msg, slot, math.inf))  # type: ignore[arg-type]
        with trio.fail_after(10):
            for _, slot in batch:
                await slot.done.wait()
        for msg, slot in batch:
            if isinstance(msg, Claim):
                assert slot.value.status is ClaimStatus.SUCCESS, (msg, slot.value)
            else:
                assert isinstance(slot.value, Failure), (msg, slot.value)
                assert isinstance(slot.value.error, InvalidInput), (msg, slot.value)
        for p in pids:  # committed: claimed once, for good
            again = await core.storage.ask(Claim(p), 5)
            assert again.status is ClaimStatus.ALREADY_CLAIMED
        info = await core.storage.ask(LookupToken(token), 5)
        assert (info.revoked, info.abuse_score) == (False, 0)
        assert await core.storage.ask(ReadCursor(), 5) is None
        assert core.supervisor.status()[0].restarts == 0


async def test_a_checkpoint_on_a_full_disk_is_skipped_not_a_crash(tmp_path: Path) -> None:
    # The checkpointer copies the log into the database: on a full disk that fails too, and
    # it crashed storage (a crash loop while the disk stayed full). The log holds everything.
    with faulty_disk() as disk:
        async with run_core(tmp_path) as core:
            for _ in range(5):
                await core.pay(PaymentId.generate())
            actor = core.supervisor._children[0].actor
            assert isinstance(actor, Storage)
            disk.full = True
            assert await trio.to_thread.run_sync(actor._checkpoint, "PASSIVE") is None
            disk.full = False
            assert await trio.to_thread.run_sync(actor._checkpoint, "PASSIVE") is not None
            assert core.supervisor.status()[0].restarts == 0


async def test_a_revoke_and_a_top_up_are_answered_through_the_filter_after_their_effects(
        tmp_path: Path, backend: str | None) -> None:
    # With worker processes, cached answers live in several processes: the requester of a
    # revoke or a top-up hears back only once the filter (and through it every worker) has
    # the invalidation. So storage hands the answer on as a Settle, after the Committed.
    db = tmp_path / "anon-ticket.db"
    smb: Mailbox[Any] = Mailbox("storage")
    fmb: Mailbox[Any] = Mailbox("filter")  # we play the filter
    fmb.serving = True
    config = StorageConfig(db, b"s" * 32, tmp_path / "token.secret")
    storage: Storage
    if backend is None:
        schema.migrate(db)
        storage = Storage(config, smb, fmb, Metrics())
    else:  # (a node without its cluster actor: answers go straight to the filter)
        schema.migrate_postgres(backend)
        storage = PgStorage(config, smb, fmb, Metrics(), pg=PgConfig(backend, "node-a"))
    async with trio.open_nursery() as nursery:
        await nursery.start(storage.run)
        smb.serving = True
        pid = PaymentId.generate()

        async def add_pids() -> None:  # answer them as the filter would (on PostgreSQL
            while True:  # one comes before the COMMIT too)
                env = await fmb.inbox.receive()
                if env.reply_to is not None:
                    env.reply(env.msg.ack)

        async with trio.open_nursery() as filter_side:
            filter_side.start_soon(add_pids)
            await smb.ask(RecordTransfers((Transfer(os.urandom(32), pid, 5, 10),)), 5)
            filter_side.cancel_scope.cancel()
        token = (await smb.ask(Claim(pid), 5)).token
        for request in (RecordTransfers((Transfer(os.urandom(32), pid, 6, 11),)),
                        Revoke(token, "abuse", 1)):
            answered: list[object] = []

            async def ask(request: Any = request, answered: list[object] = answered) -> None:
                answered.append(await smb.ask(request, 5))

            nursery.start_soon(ask)
            got: list[Any] = []
            with trio.fail_after(5):
                while not got or type(got[-1]) is not Settle:
                    env = await fmb.inbox.receive()
                    got.append(env.msg)
            assert type(got[-2]) is Committed and type(got[-1]) is Settle
            assert any(isinstance(e, Invalidate) for e in got[-2].effects)
            await trio.testing.wait_all_tasks_blocked()
            assert answered == []  # not before the filter says so
            env.reply(env.msg.answer)
            await trio.testing.wait_all_tasks_blocked()
            assert len(answered) == 1
        nursery.cancel_scope.cancel()
