"""The storage actor: the only writer of the database (APSW, WAL, synchronous=NORMAL).

Group commit: the actor drains what waits in its mailbox (up to `batch_limit`), drops requests
whose deadline has passed, and runs the batch in order in as few transactions as it can: every
run of single-statement requests (claims, revocations, reads) in one, each request that writes
more than one statement (a chunk of transfers, a reorg) in one of its own, rolled back alone
should it fail halfway. A single statement is atomic by itself, so either way one failing
request sinks no other. Only after its COMMIT do a transaction's requests get their replies
and the filter hear what changed (one message, before the next transaction runs, so what is
committed reaches the filter and the hub in commit order). If a transaction is lost (a failed
COMMIT, or SQLite rolling it back on FULL/IOERR/NOMEM), every request in it gets a retryable
error and nothing is replied as done. Storage remembers why (until a later write commits):
/healthz asks (`StorageHealth`), and while writes fail, asking probes with a tiny write, so
health recovers with the disk and not only when the next claim comes.

The SQL runs inline on the trio loop: one batch costs tens of microseconds per request, far
less than a thread round trip. What is slow (checkpoints, backups) runs on its own connection
in a worker thread.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import apsw
import trio

from anon_ticket import backup
from anon_ticket.datadir import create_private
from anon_ticket.domain.commands import Backup, BackupDone, Figures, StorageHealth, StorageStats
from anon_ticket.domain.ids import PaymentId, ServiceToken
from anon_ticket.domain.inboxes import FilterMsg, StorageMsg
from anon_ticket.domain.messages import (
    AddPids,
    CacheClaim,
    Claim,
    Claimed,
    ClaimStatus,
    Committed,
    Effect,
    EventKind,
    Invalidate,
    ListSkipped,
    LookupToken,
    MarkVanished,
    PollerPauseFlag,
    Publish,
    ReadCursor,
    ReadTicketState,
    RecentTransfers,
    Recorded,
    RecordedTransfer,
    RecordTransfers,
    Revoke,
    Settle,
    SkippedRow,
    TicketEvent,
    TicketState,
    TokenInfo,
    Vanished,
)
from anon_ticket.domain.timefmt import rfc3339
from anon_ticket.domain.tokens import Derivation, derive
from anon_ticket.errors import (
    AnonTicketError,
    BackupFailed,
    InvalidInput,
    NotFound,
    StorageError,
    Unavailable,
)
from anon_ticket.logs import get_logger
from anon_ticket.metrics import Metrics
from anon_ticket.reads import TOKEN_INFO, token_info_row
from mailboxes import Dispatch, Envelope, Failure, Mailbox

log = get_logger("storage")

NOT_FOUND = "payment not found"
# A claim reads the ticket and its first surviving transfer (the token's input) at once...
CLAIM_READ = (
    "SELECT amount, token, (SELECT txid FROM transfers WHERE transfers.pid = tickets.pid "
    "AND vanished_at IS NULL ORDER BY height, txid LIMIT 1) FROM tickets WHERE pid = ?")
# ...and writes token, time and the ticket's next event number in one statement.
# Conditional (claimed only if unclaimed): with several nodes on one PostgreSQL database two
# of them may race on one id; the loser's statement changes nothing and it answers
# already_claimed with the winner's token (docs/architecture.md §9).
CLAIM_WRITE = ("UPDATE tickets SET token = ?, claimed_at = ?, seq = seq + 1 "
               "WHERE pid = ? AND token IS NULL RETURNING seq")
# Crediting a transfer: is it known already (and vanished in a reorg?) ...
TRANSFER_READ = "SELECT height, vanished_at FROM transfers WHERE txid = ? AND pid = ?"
# ...create its ticket or add to it, numbering the event...
CREDIT = ("INSERT INTO tickets (pid, amount, created_at, seq) VALUES (?, ?, ?, 1) "
          "ON CONFLICT (pid) DO UPDATE SET amount = tickets.amount + excluded.amount, "
          "seq = tickets.seq + 1 RETURNING amount, token, revoked_at, seq")
# ...and keep it (I1: once per (txid, pid)).
TRANSFER_INSERT = ("INSERT INTO transfers (txid, pid, amount, height, recorded_at) "
                   "VALUES (?, ?, ?, ?, ?)")
CURSOR_WRITE = ("INSERT INTO state (key, value) VALUES ('cursor', ?) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value")
CACHE_KIB = 32 * 1024
# A passive checkpoint runs (off the loop) once this many pages were written to the WAL
# since the last one...
CHECKPOINT_WAL_PAGES = 2000
# ...but SQLite starts the log over only once a checkpoint has copied all of it, which a
# steady writer never allows, and a long log makes every write dearer: a claim's statements
# and COMMIT cost 1.1x at 10,000 pages, 1.5x at 40,000 and 1.6x from 50,000 on (a tight loop,
# against the same claims on a log kept short). So the writer starts it over with a RESTART
# between two batches, right after a passive checkpoint has finished (requests queue in the
# mailbox meanwhile); the RESTART then has only what was written during the passive one left
# to copy and sync: 10 ms or so under claim load, where one on its own took 50 to 300 ms.
# That happens once the log is this long...
RESTART_WAL_PAGES = 8000  # 32 MB of 4 KB pages
# ...if no more than this was written while the passive checkpoint ran (a RESTART with 270
# pages to copy took 12 ms, with 2,000 47 ms); a catch-up writing thousands of pages a
# second would otherwise stall on every one...
RESTART_MAX_BACKLOG = 1000
# ...and, whatever was written meanwhile, once it is this long.
FORCE_RESTART_WAL_PAGES = 64_000  # 256 MB
# After a RESTART the log file is cut back to this size (it would keep its largest size).
WAL_SIZE_LIMIT = 64 * 1024 * 1024
# A RESTART that a reader held up (a backup, say) is tried again after this many seconds.
RESTART_RETRY_SECS = 1.0
# While writes fail, a health question probes with a tiny write at most this often.
WRITE_PROBE_SECS = 1.0
# The probe: one row of `state` set to a new value (a write that changes nothing is skipped).
WRITE_PROBE = ("INSERT INTO state (key, value) VALUES ('write_probe', ?) "
               "ON CONFLICT (key) DO UPDATE SET value = excluded.value")
# A statement failing with one of these means the disk refuses writes, not a bad request.
DISK_ERRORS = (apsw.FullError, apsw.IOError, apsw.ReadOnlyError, apsw.CantOpenError,
               apsw.CorruptError, apsw.NotADBError)


def restart_due(pages: int, copied: int | None) -> bool:
    """After a passive checkpoint: start the log over now? `pages` is the log's length,
    `copied` how much of it the checkpoint copied (None: it could copy nothing)."""
    if pages >= FORCE_RESTART_WAL_PAGES:
        return True
    return copied is not None and pages >= RESTART_WAL_PAGES and (
        pages - copied <= RESTART_MAX_BACKLOG)


@dataclass(frozen=True, slots=True)
class StorageConfig:
    db_path: Path
    secret: bytes
    secret_path: Path
    derivation: Derivation = Derivation.HMAC
    batch_limit: int = 256


class _Undo(Exception):
    """A request that writes several statements failed halfway: its transaction is rolled
    back and it gets this answer."""

    def __init__(self, answer: Failure) -> None:
        super().__init__()
        self.answer = answer


@dataclass(frozen=True, slots=True)
class _Forward:
    """Answer through the filter, after this transaction's effects: it replies once the new
    payment ids are in the Bloom filter (AddPids), or once invalidated cached answers are
    gone everywhere (Settle)."""

    msg: AddPids | Settle


# A handler's answer (the reply, a Failure, or a _Forward) and what the filter must hear.
Handled = tuple[object, tuple[Effect, ...]]


@dataclass(slots=True)
class Outcome:
    """What one transaction came to, delivered on the loop once it has run (with PostgreSQL
    it runs in the storage actor's thread): the committed requests' answers and effects, or
    the one failure every request of it gets, or (`undo`) the answer of a request that ran
    alone and was rolled back."""

    group: list[Envelope[StorageMsg]]
    answers: list[tuple[Envelope[StorageMsg], object]]
    effects: list[Effect]
    seconds: float = 0.0
    lost: AnonTicketError | None = None
    undo: Failure | None = None
    feed: int | None = None  # PostgreSQL: this transaction's entry in `cluster_events`

    @classmethod
    def failed(cls, group: list[Envelope[StorageMsg]], error: AnonTicketError) -> Outcome:
        return cls(group, [], [], lost=error)


def open_connection(path: Path) -> apsw.Connection:
    create_private(path)  # (exists as a rule: migrations ran) a new file is never 0644
    conn = apsw.Connection(str(path))
    conn.setbusytimeout(5000)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = NORMAL")
    conn.execute(f"PRAGMA journal_size_limit = {WAL_SIZE_LIMIT}")
    conn.execute("PRAGMA foreign_keys = ON")
    # The writer's page cache (default 2 MB): a catch-up touches pages all over the tickets
    # and transfers B-trees (ids are random), and re-reading them costs more than RAM here.
    conn.execute(f"PRAGMA cache_size = -{CACHE_KIB}")
    return conn


class Storage:
    name = "storage"

    def __init__(
        self,
        config: StorageConfig,
        mailbox: Mailbox[StorageMsg],
        filter_mailbox: Mailbox[FilterMsg],
        metrics: Metrics,
        *,
        on_open: Callable[[apsw.Connection], None] | None = None,
    ) -> None:
        self.config = config
        self.mailbox = mailbox
        self.filter = filter_mailbox
        self.metrics = metrics
        self._on_open = on_open
        self._conn: apsw.Connection | None = None
        self._cur: apsw.Cursor | None = None
        self._handlers: dict[type, Callable[[Any], Handled]] = {
            Claim: self._claim,
            LookupToken: self._lookup_token,
            Revoke: self._revoke,
            RecordTransfers: self._record,
            ReadCursor: self._read_cursor,
            PollerPauseFlag: self._pause_flag,
            RecentTransfers: self._recent,
            MarkVanished: self._vanish,
            ReadTicketState: self._ticket_state,
            ListSkipped: self._list_skipped,
            StorageStats: self._stats,
        }
        self._route = Dispatch(self.name, {})  # made by `run`, from the handlers then
        self._batch: list[Envelope[StorageMsg]] = []  # the live requests of this batch
        self._nursery: trio.Nursery | None = None
        self._kinds = {t: t.__name__.lower() for t in self._handlers}
        # Requests that write more than one statement run in a transaction of their own; a
        # single statement is atomic by itself (SQLite undoes a failed statement alone).
        self._multi_write = {RecordTransfers, MarkVanished}
        self._counters = {t: metrics.storage_requests.labels(k) for t, k in self._kinds.items()}
        self._now = ""  # the transaction's timestamp: one clock reading each
        self._checkpoint_wanted = trio.Event()
        self._wal_pages = 0  # the log's length after the last commit (from the WAL hook)
        self._wal_gauge = metrics.wal_pages
        self._wal_copied = 0  # ...and how much of it the last checkpoint copied
        self._checkpoints: apsw.Connection | None = None  # the checkpointer's own connection
        self._checkpoint_lock = trio.Lock()  # one checkpoint at a time on that connection
        self._restart_due = False  # a passive checkpoint has just run, the log is long
        self._restart_after = 0.0  # after a RESTART a reader blocked: not again before this
        self._epoch = 0
        # Why the last write transaction was lost; None once a later one wrote and committed.
        self._write_error: str | None = None
        self._probed_at = -math.inf

    # --- running ----------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        await self._open()
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                # Requests for a transaction are queued for it; the others are answered, or
                # started, as they arrive.
                self._route = Dispatch(self.name, {
                    **dict.fromkeys(self._handlers, self._queue),
                    Backup: self._start_backup,
                    StorageHealth: self._answer_health,
                })
                self._start_background(nursery)
                log.info("storage ready", db=self._db_name(),
                         batch_limit=self.config.batch_limit)
                task_status.started()
                await self._serve()
        finally:
            self._close()

    # The database's own parts (PostgreSQL's storage overrides these: actors/storage_pg.py).

    async def _open(self) -> None:
        conn = self._conn = open_connection(self.config.db_path)
        self._cur = conn.cursor()
        # Replaces SQLite's autocheckpoint, which would run inline in a COMMIT on the loop.
        conn.setwalhook(self._wal_hook)
        row = conn.execute("SELECT value FROM state WHERE key = 'epoch'").fetchone()
        if row is None:
            conn.close()
            raise StorageError("the database has no event epoch: run its migrations")
        self._epoch = int(row[0])
        if self._on_open is not None:
            self._on_open(conn)

    def _close(self) -> None:
        if self._conn is not None:
            self._conn.close()
        self._conn = self._cur = None
        if self._checkpoints is not None:
            self._checkpoints.close()
            self._checkpoints = None

    def _start_background(self, nursery: trio.Nursery) -> None:
        nursery.start_soon(self._checkpointer)

    def _db_name(self) -> str:
        return self.config.db_path.name

    async def _run_transactions(self, groups: list[list[Envelope[StorageMsg]]]) -> None:
        """Each transaction, then its delivery, before the next runs: what is committed is
        never lost to a later one's failure."""
        for group in groups:
            await self._deliver(self._execute(group))

    async def _serve(self) -> None:
        inbox = self.mailbox.inbox
        limit = self.config.batch_limit
        while True:
            batch = [await inbox.receive()]
            while len(batch) < limit:
                try:
                    batch.append(inbox.receive_nowait())
                except trio.WouldBlock:
                    break
            try:
                await self._run_transactions(list(self._transactions(self._live(batch))))
            except BaseException:
                # A bug, not a database condition: nobody of this batch waits forever.
                for env in batch:
                    env.fail(Unavailable("storage is restarting"))
                raise
            if self._restart_due and trio.current_time() >= self._restart_after:
                await self._restart_log()

    def _live(self, batch: list[Envelope[StorageMsg]]) -> list[Envelope[StorageMsg]]:
        """The batch without requests past their deadline, nor those answered (health, an
        unknown message) or started (a backup, off the loop) as they arrive."""
        now = trio.current_time()
        live: list[Envelope[StorageMsg]] = []
        self._batch = live
        route = self._route
        for env in batch:
            if env.expired(now):
                self.metrics.expired_dropped.inc()
                env.reply_to = None  # its sender has given up
            else:
                route(env)
        return live

    def _queue(self, env: Envelope[StorageMsg]) -> None:
        self._batch.append(env)

    def _start_backup(self, env: Envelope[Backup]) -> None:
        assert self._nursery is not None
        self._nursery.start_soon(self._backup, env)

    def _answer_health(self, env: Envelope[StorageHealth]) -> None:
        env.reply(self._health())

    async def _tell_filter(self, effects: list[Effect]) -> None:
        committed = Committed(tuple(effects))
        if all(type(e) is CacheClaim for e in effects):
            try:
                self.filter.tell(committed)  # cache fills alone may be dropped
            except Unavailable:
                pass
        else:
            await self.filter.tell_wait(committed)  # must not be lost

    def _transactions(self, live: list[Envelope[StorageMsg]]
                      ) -> Iterator[list[Envelope[StorageMsg]]]:
        """The batch in order, as transactions: each request that writes more than one
        statement alone (so undoing it, should it fail halfway, is a ROLLBACK and not a
        savepoint, whose page copies made ingestion a third slower), every run of the others
        together (a single statement is atomic by itself: one failing sinks nothing else)."""
        multi = self._multi_write
        group: list[Envelope[StorageMsg]] = []
        for env in live:
            if type(env.msg) in multi:
                if group:
                    yield group
                    group = []
                yield [env]
            else:
                group.append(env)
        if group:
            yield group

    def _execute(self, group: list[Envelope[StorageMsg]]) -> Outcome:
        """Run one transaction; answer nobody yet (`_deliver` does, on the loop)."""
        conn = self._conn
        assert conn is not None
        started = time.perf_counter()
        answers: list[tuple[Envelope[StorageMsg], object]] = []
        effects: list[Effect] = []
        self._now = rfc3339(time.time())
        multi = self._multi_write
        changes = conn.total_changes()
        try:
            with conn:  # one COMMIT for the whole group (BEGIN at the outermost level)
                for env in group:
                    kind = type(env.msg)
                    try:
                        answer, more = self._handlers[kind](env.msg)
                    except AnonTicketError as exc:
                        answer, more = Failure(exc), ()
                    except apsw.Error as exc:
                        if conn.getautocommit():
                            raise  # SQLite rolled the whole transaction back
                        log.error("request failed", request=self._kinds[kind],
                                  error=type(exc).__name__)
                        if isinstance(exc, DISK_ERRORS):
                            self._write_failed(exc)
                        answer, more = Failure(Unavailable("storage error")), ()
                    except (OverflowError, UnicodeError, ValueError) as exc:
                        # A value SQLite cannot hold (an integer past 64 bits, a lone
                        # surrogate): refused before any statement of it ran.
                        answer, more = self._unstorable(kind, exc), ()
                    if kind in multi and isinstance(answer, Failure):
                        raise _Undo(answer)  # alone in this transaction: roll back its part
                    answers.append((env, answer))
                    effects.extend(more)
        except _Undo as undo:
            return Outcome(group, [], [], undo=undo.answer)
        except apsw.Error as exc:
            self._transaction_lost(len(group), exc)
            return Outcome.failed(group, Unavailable("storage could not commit; retry"))
        if self._write_error is not None and conn.total_changes() > changes:
            self._write_recovered()
        return Outcome(group, answers, effects, time.perf_counter() - started)

    def _unstorable(self, kind: type, exc: Exception) -> Failure:
        log.error("request refused", request=self._kinds[kind], error=type(exc).__name__)
        return Failure(InvalidInput("invalid request: a value cannot be stored"))

    def _transaction_lost(self, size: int, exc: BaseException) -> None:
        self.metrics.batches_failed.inc()
        log.error("transaction lost", size=size, error=type(exc).__name__)
        self._write_failed(exc)

    async def _deliver(self, outcome: Outcome) -> None:
        """On the loop, after the COMMIT: the replies, then (before anything else runs) what
        the filter must hear, then the answers that go through the filter."""
        group = outcome.group
        if outcome.undo is not None:
            self._counters[type(group[0].msg)].inc()
            group[0].reply(outcome.undo)
            return
        if outcome.lost is not None:
            for env in group:
                env.fail(outcome.lost)
            return
        # Committed: only now does anyone hear about it.
        self.metrics.batch_size.observe(len(group))
        self.metrics.commit_seconds.observe(outcome.seconds)
        counts: dict[type, int] = {}
        forwards: list[tuple[Envelope[StorageMsg], AddPids | Settle]] = []
        for env, answer in outcome.answers:
            kind = type(env.msg)
            counts[kind] = counts.get(kind, 0) + 1
            if isinstance(answer, _Forward):
                forwards.append((env, answer.msg))  # after the effects, in order
            else:
                env.reply(answer)
        for kind, n in counts.items():
            counter = self._counters.get(kind)
            if counter is not None:  # (not for a handler added after construction)
                counter.inc(n)
        if outcome.effects:  # before the next transaction: nothing committed is lost
            await self._tell_filter(outcome.effects)
        for env, msg in forwards:  # answered by the filter (or the fanout)
            self._forward(env, msg, outcome.feed)

    def _forward(self, env: Envelope[StorageMsg], msg: AddPids | Settle,
                 feed: int | None) -> None:
        self.filter.forward(msg, env)

    # --- write health ------------------------------------------------------------------------

    def _write_failed(self, exc: BaseException) -> None:
        reason = (str(exc).strip() or type(exc).__name__)[:200]
        if self._write_error is None:
            log.error("storage cannot write", error=reason)
        self._write_error = reason

    def _write_recovered(self) -> None:
        log.info("storage writes again", after=self._write_error)
        self._write_error = None

    def _health(self) -> Figures:
        """Whether writes work; while they failed, a tiny write transaction (rate-limited)
        tells whether they work again: no claim needs to arrive first."""
        now = trio.current_time()
        if self._write_error is not None and now - self._probed_at >= WRITE_PROBE_SECS:
            self._probed_at = now
            self._probe()
        return {"writable": self._write_error is None, "error": self._write_error}

    def _probe(self) -> None:
        conn = self._conn
        assert conn is not None
        try:
            with conn:
                conn.execute(WRITE_PROBE, (time.time_ns(),))
        except apsw.Error as exc:
            self._write_failed(exc)
            return
        self._write_recovered()

    # --- request handlers (inside a transaction) -----------------------------------------------

    def _one(self, sql: str, args: tuple[Any, ...]) -> Any:
        """The first row, with the statement run to completion: a half-stepped
        `UPDATE ... RETURNING` would keep its write open and hold back the COMMIT."""
        assert self._cur is not None
        rows = self._cur.execute(sql, args).fetchall()
        return rows[0] if rows else None

    def _all(self, sql: str, args: tuple[Any, ...]) -> list[Any]:
        assert self._cur is not None
        return self._cur.execute(sql, args).fetchall()

    def _event(self, kind: EventKind, pid: PaymentId, token: bytes | None, seq: int,
               **fields: object) -> TicketEvent:
        """A committed fact of one ticket, numbered by the statement that wrote it
        (`seq = seq + 1 ... RETURNING seq`, in this transaction, so in commit order)."""
        return TicketEvent(kind, pid, ServiceToken(token) if token else None, seq, self._epoch,
                           tuple(fields.items()))

    def _claim(self, msg: Claim) -> Handled:
        raw = msg.pid.raw
        row = self._one(CLAIM_READ, (raw,))
        if row is None:
            raise NotFound(NOT_FOUND)
        amount, token_raw, first_txid = row
        if token_raw is not None:
            token = ServiceToken(token_raw)
            return (Claimed(ClaimStatus.ALREADY_CLAIMED, token, amount),
                    (CacheClaim(msg.pid, token, amount),))
        if first_txid is None or amount <= 0:
            raise NotFound(NOT_FOUND)
        token = derive(self.config.derivation, self.config.secret, msg.pid, first_txid.hex())
        # Claim, token and the event's number are one statement (I3).
        written = self._one(CLAIM_WRITE, (token.raw, self._now, raw))
        if written is None:  # another node claimed it since the read: its token stands
            amount, token_raw, _ = self._one(CLAIM_READ, (raw,))
            token = ServiceToken(token_raw)
            return (Claimed(ClaimStatus.ALREADY_CLAIMED, token, amount),
                    (CacheClaim(msg.pid, token, amount),))
        (seq,) = written
        event = self._event(EventKind.CLAIMED, msg.pid, token.raw, seq, balance=amount)
        return Claimed(ClaimStatus.SUCCESS, token, amount), (
            CacheClaim(msg.pid, token, amount), Publish((event,)))

    def _token_info(self, token: ServiceToken) -> tuple[bytes, TokenInfo]:
        row = self._one(TOKEN_INFO, (token.raw,))  # a worker reads the same (reads.py)
        if row is None:
            raise NotFound(NOT_FOUND)
        return token_info_row(row)

    def _lookup_token(self, msg: LookupToken) -> Handled:
        return self._token_info(msg.token)[1], ()

    def _revoke(self, msg: Revoke) -> Handled:
        pid, info = self._token_info(msg.token)
        if info.revoked:
            return info, ()  # the first reason and score stay
        score = info.abuse_score if msg.abuse_score is None else msg.abuse_score
        (seq,) = self._one(
            "UPDATE tickets SET revoked_at = ?, revoke_reason = ?, abuse_score = ?, "
            "seq = seq + 1 WHERE pid = ? RETURNING seq", (self._now, msg.reason, score, pid))
        log.info("token revoked", token=msg.token.redacted(), abuse_score=score)
        event = self._event(EventKind.REVOKED, PaymentId(pid), msg.token.raw, seq,
                            abuse_score=score)
        return (_Forward(Settle(self._token_info(msg.token)[1])),
                (Invalidate((PaymentId(pid),)), Publish((event,))))

    def _record(self, msg: RecordTransfers) -> Handled:
        now = self._now
        new_pids: list[PaymentId] = []
        topped: list[PaymentId] = []
        events: list[TicketEvent] = []
        credited = 0
        one = self._one
        for t in msg.transfers:
            raw = t.pid.raw
            row = one(TRANSFER_READ, (t.txid, raw))
            if row is not None and row[1] is None:
                if row[0] != t.height:  # re-mined at another height after a reorg
                    one("UPDATE transfers SET height = ? WHERE txid = ? AND pid = ?",
                        (t.height, t.txid, raw))
                continue  # credited already (I1)
            balance, token_raw, revoked_at, seq = one(CREDIT, (raw, t.amount, now))
            if row is None:
                one(TRANSFER_INSERT, (t.txid, raw, t.amount, t.height, now))
            else:  # vanished in a reorg, now back
                one("UPDATE transfers SET vanished_at = NULL, height = ?, amount = ? "
                    "WHERE txid = ? AND pid = ?", (t.height, t.amount, t.txid, raw))
            credited += 1
            if token_raw is not None:
                topped.append(t.pid)
                log.info("token topped up", pid=t.pid.redacted(), amount=t.amount)
                if revoked_at is not None:
                    self.metrics.alerts.labels("revoked_topped_up").inc()
                    log.warning("alert: revoked token topped up", pid=t.pid.redacted(),
                                amount=t.amount)
            elif balance - t.amount <= 0:
                new_pids.append(t.pid)  # new, or claimable again after a reorg took it all
            kind = EventKind.TOPPED_UP if token_raw else EventKind.PAYMENT_CONFIRMED
            events.append(self._event(kind, t.pid, token_raw, seq, amount=t.amount,
                                      balance=balance))
        for s in msg.skipped:
            self._one("INSERT INTO skipped (txid, reason, amount, height, payment_id, "
                      "recorded_at) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                      (s.txid, s.reason, s.amount, s.height, s.payment_id, now))
        if msg.cursor is not None:
            self._one(CURSOR_WRITE, (msg.cursor,))
        recorded = Recorded(credited, tuple(new_pids), tuple(topped), msg.cursor)
        effects: tuple[Effect, ...] = (Invalidate(tuple(topped)),) if topped else ()
        if new_pids:
            # The filter adds the ids, then acknowledges, then hands the events to the hub.
            return _Forward(AddPids(tuple(new_pids), recorded, tuple(events))), effects
        if events:
            effects = (*effects, Publish(tuple(events)))
        return (_Forward(Settle(recorded)) if topped else recorded), effects

    def _read_cursor(self, msg: ReadCursor) -> Handled:
        row = self._one("SELECT value FROM state WHERE key = 'cursor'", ())
        return (row[0] if row else None), ()

    def _pause_flag(self, msg: PollerPauseFlag) -> Handled:
        if msg.paused is None:
            row = self._one("SELECT value FROM state WHERE key = 'poller_paused'", ())
            return bool(row and row[0]), ()
        row = self._one("INSERT INTO state (key, value) VALUES ('poller_paused', ?) "
                        "ON CONFLICT (key) DO UPDATE SET value = excluded.value "
                        "RETURNING value", (int(msg.paused),))
        return bool(row[0]), ()

    def _recent(self, msg: RecentTransfers) -> Handled:
        rows = self._all(
            "SELECT txid, pid, height FROM transfers WHERE height > ? AND vanished_at IS NULL",
            (msg.above_height,))
        return tuple(RecordedTransfer(r[0], PaymentId(r[1]), r[2]) for r in rows), ()

    def _vanish(self, msg: MarkVanished) -> Handled:
        raw = msg.pid.raw
        row = self._one("UPDATE transfers SET vanished_at = ? WHERE txid = ? AND pid = ? "
                        "AND vanished_at IS NULL RETURNING amount", (self._now, msg.txid, raw))
        if row is None:
            raise NotFound("no such surviving transfer")
        amount = row[0]
        token, seq = self._one("UPDATE tickets SET amount = amount - ?, seq = seq + 1 "
                               "WHERE pid = ? RETURNING token, seq", (amount, raw))
        claimed = token is not None
        event = self._event(EventKind.REORG, msg.pid, token, seq, amount=amount,
                            claimed=claimed)
        if claimed:
            # Policy: the token stays; an operator must look at it.
            self.metrics.alerts.labels("claimed_transfer_vanished").inc()
            log.warning("alert: transfer of a claimed ticket vanished (reorg)",
                        pid=msg.pid.redacted(), txid=msg.txid.hex()[:6] + "…", amount=amount)
        else:
            log.warning("transfer vanished (reorg); no longer claimable",
                        pid=msg.pid.redacted(), amount=amount)
        return (_Forward(Settle(Vanished(msg.pid, amount, claimed))),
                (Invalidate((msg.pid,)), Publish((event,))))

    def _ticket_state(self, msg: ReadTicketState) -> Handled:
        if msg.token is not None:
            row = self._one("SELECT pid, amount, token, revoked_at, seq FROM tickets "
                            "WHERE token = ?", (msg.token.raw,))
            if row is None:
                raise NotFound(NOT_FOUND)
        else:
            assert msg.pid is not None
            row = self._one("SELECT pid, amount, token, revoked_at, seq FROM tickets "
                            "WHERE pid = ?", (msg.pid.raw,))
            if row is None:  # never paid (yet): a watcher just waits
                return TicketState(msg.pid, None, 0, self._epoch, "waiting", 0), ()
        pid, amount, token, revoked_at, seq = row
        status = ("revoked" if revoked_at else "claimed" if token else
                  "claimable" if amount > 0 else "waiting")
        return TicketState(PaymentId(pid), ServiceToken(token) if token else None, seq,
                           self._epoch, status, amount), ()

    def _list_skipped(self, msg: ListSkipped) -> Handled:
        rows = self._all(
            "SELECT txid, reason, amount, height, recorded_at FROM skipped "
            "ORDER BY recorded_at DESC, txid LIMIT ?", (msg.limit,))
        return tuple(SkippedRow(r[0].hex(), r[1], r[2], r[3], r[4]) for r in rows), ()

    def _stats(self, msg: StorageStats) -> Handled:
        tickets, claimed, revoked = self._one(
            "SELECT count(*), count(token), count(revoked_at) FROM tickets", ())
        (transfers,) = self._one("SELECT count(*) FROM transfers", ())
        (skipped,) = self._one("SELECT count(*) FROM skipped", ())
        cursor = self._read_cursor(ReadCursor())[0]
        return {"tickets": tickets, "claimed": claimed, "revoked": revoked,
                "transfers": transfers, "skipped": skipped, "cursor": cursor,
                "write_error": self._write_error}, ()

    # --- off the loop -----------------------------------------------------------------------

    async def _backup(self, env: Envelope[Backup]) -> None:
        msg = env.msg
        try:
            result = await trio.to_thread.run_sync(
                backup.write_backup, self.config.db_path, self.config.secret_path, Path(msg.path))
        except BackupFailed as exc:  # the destination's fault: the operator's to fix (400)
            log.warning("backup failed", error=str(exc))
            env.fail(exc)
            return
        except Exception as exc:  # a backup's failure is its own: storage goes on serving
            log.error("backup failed", error=f"{type(exc).__name__}: {exc}")
            env.fail(StorageError(f"backup failed: {type(exc).__name__}"))
            return
        log.info("backup written", path=str(result.path), bytes=result.bytes,
                 seconds=round(result.seconds, 3))
        env.reply(BackupDone(str(result.path), result.bytes, result.seconds))

    def _wal_hook(self, conn: apsw.Connection, dbname: str, pages: int) -> int:
        """After each COMMIT: `pages` is the log's length. What asks for a checkpoint is the
        growth since the last one: the length itself stays high until the log starts over,
        and asking on every commit meant one checkpoint after another."""
        if pages < self._wal_copied:
            self._wal_copied = 0  # the log started over
        self._wal_pages = pages
        self._wal_gauge.set(pages)
        if pages - self._wal_copied >= CHECKPOINT_WAL_PAGES:
            self._checkpoint_wanted.set()
        return apsw.SQLITE_OK

    async def _checkpointer(self) -> None:
        """PASSIVE checkpoints in a worker thread: they copy what they can and never wait for,
        or hold back, the writer. After one, the writer may be due to start the log over
        (`restart_due`): it does after its batch, and no checkpoint runs until it has."""
        while True:
            await self._checkpoint_wanted.wait()
            self._checkpoint_wanted = trio.Event()
            if self._restart_due:
                continue
            async with self._checkpoint_lock:
                copied = await trio.to_thread.run_sync(self._checkpoint, "PASSIVE")
            self.metrics.wal_checkpoints.labels("passive").inc()
            if copied is not None:
                self._wal_copied = copied
            self._restart_due = restart_due(self._wal_pages, copied)

    async def _restart_log(self) -> None:
        """Called between batches, right after a passive checkpoint: the writer's connection
        is idle, so the RESTART needs no lock it holds, and has only what was written during
        the passive one left to copy; the mailbox queues requests meanwhile."""
        async with self._checkpoint_lock:
            done = await trio.to_thread.run_sync(self._checkpoint, "RESTART")
        self.metrics.wal_checkpoints.labels("restart").inc()
        self._restart_due = False
        if done is None:  # a reader (a backup, say) still uses the log: after another passive
            self._restart_after = trio.current_time() + RESTART_RETRY_SECS
        else:
            self._wal_pages = self._wal_copied = 0

    def _checkpoint(self, mode: str) -> int | None:
        """In a worker thread, on a connection of its own (opened once): the pages copied, or
        None when a RESTART could not finish. No busy handler: a RESTART that would have to
        wait for a reader gives up at once instead of holding the writer (the loop) back."""
        if self._checkpoints is None:
            self._checkpoints = apsw.Connection(str(self.config.db_path))
        try:
            row = self._checkpoints.execute(f"PRAGMA wal_checkpoint({mode})").fetchone()
        except apsw.BusyError:
            return None
        except apsw.Error as exc:  # a full or failing disk: the log keeps everything; later
            log.warning("checkpoint failed", mode=mode, error=str(exc))
            return None
        if row is None or (mode == "RESTART" and row[0] != 0) or row[2] < 0:
            return None  # (-1: nothing could be checkpointed at all)
        return 0 if mode == "RESTART" else int(row[2])  # after a RESTART the log starts over

