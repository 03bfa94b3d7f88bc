"""The storage actor on PostgreSQL: the same requests, statements and contract as on SQLite
(actors/storage.py), for several nodes sharing one database (docs/architecture.md §9).

What stays: one actor per node is its only writer; group commit (a batch's single-statement
requests in one transaction, each multi-statement request in its own); replies only after
COMMIT; one failing request never sinks its batch.

What differs:
- The statements run in a thread of the actor's own (psycopg's sync API: its async API is
  asyncio-only), one hop per batch: every transaction of the batch runs there, then the loop
  delivers the answers in order. A claim costs two round trips on the socket; a thread hop
  per statement would cost more than the statement.
- PostgreSQL aborts a transaction at its first failing statement, where SQLite undoes the
  statement alone. So a batch runs without savepoints and, should a statement fail, is rolled
  back and run again with a savepoint around each request (rare: a value PostgreSQL cannot
  hold, a constraint another node's race tripped). A deadlock or serialization failure
  between nodes reruns the transaction as it was, after a short pause.
- Each write transaction other nodes must hear of appends one entry to `cluster_events`
  (holding a transaction-level advisory lock until its COMMIT, so entries are numbered in
  commit order); its new ids and settles are answered through this node's cluster actor,
  once every live node has applied the entry.
- A lost connection fails the transaction's requests with a retryable error (503) and marks
  storage unwritable (/healthz); the actor reconnects with backoff, in the background too,
  and never exits for it: no crash loop while the database is away.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from typing import Any

import psycopg
import trio

from actors.storage import Handled, Outcome, Storage, StorageConfig, _Forward, _Undo
from anon_ticket.domain.commands import Backup, Figures
from anon_ticket.domain.inboxes import ClusterMsg, FilterMsg, StorageMsg
from anon_ticket.domain.messages import (
    NOTHING_RECORDED,
    AddPids,
    AfterFeed,
    Announce,
    CacheClaim,
    Confirmations,
    Note,
    PaymentSeen,
    Settle,
    SightingGone,
)
from anon_ticket.domain.timefmt import rfc3339
from anon_ticket.errors import (
    AnonTicketError,
    BackupFailed,
    StorageError,
    Unavailable,
)
from anon_ticket.logs import get_logger
from anon_ticket.metrics import Metrics
from anon_ticket.schema import FEED_CHANNEL, LOCK_EVENTS, pg_reason
from anon_ticket.wire import encode_feed
from mailboxes import Envelope, Failure, Mailbox

log = get_logger("storage")

# Bounds on one statement and on waiting for another node's row lock: a batch never hangs
# the actor for longer than a client waits (the request timeout is 5 s by default).
SESSION_OPTIONS = "-c statement_timeout=15000 -c lock_timeout=5000 " \
                  "-c idle_in_transaction_session_timeout=60000"
CONNECT_TIMEOUT_SECS = 5
# Reconnecting: first after this long, doubling up to the cap.
RECONNECT_INITIAL_SECS = 0.2
RECONNECT_MAX_SECS = 5.0
# A transaction that a deadlock or a serialization failure (another node) rolled back is run
# again up to this many times.
TRANSIENT_RETRIES = 3
# New ids reach this node's filters (and its workers') within this, or the transaction is
# rolled back and the poller records them again later.
LOCAL_ADD_TIMEOUT_SECS = 5.0
# An idle session is checked this often (a restarted database is noticed within it).
IDLE_PING_SECS = 1.0
# ...after a pause of about this long (doubling each time, with jitter): the other side holds
# its locks until it commits, and a transaction run again at once takes its rows in its own
# order again, straight into the next deadlock (two batches of the same 200 claims in other
# orders deadlocked on every rerun until the retries ran out: 503 for all of them).
RERUN_PAUSE_SECS = 0.02
# Those failures (SQLSTATE class 40). psycopg maps each SQLSTATE to a class of its own under
# OperationalError: DeadlockDetected (40P01) and SerializationFailure (40001) are not
# subclasses of TransactionRollback (40000), so all three are named.
TRANSIENT = (psycopg.errors.TransactionRollback, psycopg.errors.SerializationFailure,
             psycopg.errors.DeadlockDetected)
BACKUP_REFUSED = ("the database is PostgreSQL: back it up with pg_dump (or the server's own "
                  "backups); `ctl backup` copies an SQLite file")


def connect(url: str) -> psycopg.Connection[Any]:
    """A session for the storage actor: autocommit (transactions are explicit), bounded
    statements, TCP keepalives (a dead peer is noticed in about a minute, not hours)."""
    return psycopg.connect(url, autocommit=True, connect_timeout=CONNECT_TIMEOUT_SECS,
                           options=SESSION_OPTIONS, keepalives=1, keepalives_idle=20,
                           keepalives_interval=5, keepalives_count=3)


def lost(conn: psycopg.Connection[Any] | None) -> bool:
    return conn is None or conn.closed or conn.broken


class _Careful(Exception):
    """A statement failed and aborted the transaction: run it again, a savepoint a request."""


@dataclass(frozen=True, slots=True)
class PgConfig:
    url: str
    node: str  # this node's name in `cluster_events` and `cluster_nodes`


class PgStorage(Storage):
    def __init__(self, config: StorageConfig, mailbox: Mailbox[StorageMsg],
                 filter_mailbox: Mailbox[FilterMsg], metrics: Metrics, *, pg: PgConfig,
                 cluster: Mailbox[ClusterMsg] | None = None, **_: Any) -> None:
        super().__init__(config, mailbox, filter_mailbox, metrics)
        self.pg = pg
        self.cluster = cluster
        self._db: psycopg.Connection[Any] | None = None
        self._thread = trio.CapacityLimiter(1)  # the connection's one thread at a time
        self._sql: dict[str, str] = {}
        self._reconnect_at = -math.inf
        self._reconnect_delay = RECONNECT_INITIAL_SECS
        self._used_at = -math.inf  # the last transaction or ping (monotonic)
        self._committing = False  # the current transaction's COMMIT is on its way
        # The poller's announcements (the tree sends them here, not to the hub): into the
        # feed in the order they come, ahead of the crediting that follows them.
        for note in (PaymentSeen, Confirmations, SightingGone):
            self._handlers[note] = self._note
            self._kinds[note] = "announce"
            self._counters[note] = metrics.storage_requests.labels("announce")

    # --- the connection ---------------------------------------------------------------------

    async def _open(self) -> None:
        """Connect if the database answers; if not, start all the same (every request gets a
        503 until it does) and keep trying in the background."""
        await self._in_thread(self._ensure_connection)

    def _close(self) -> None:
        if self._db is not None:
            self._db.close()
        self._db = None

    def _db_name(self) -> str:
        return "postgresql"

    def _start_background(self, nursery: trio.Nursery) -> None:
        nursery.start_soon(self._reconnector)

    async def _in_thread(self, fn: Any, *args: Any) -> Any:
        return await trio.to_thread.run_sync(fn, *args, limiter=self._thread)

    def _ensure_connection(self) -> psycopg.Connection[Any] | None:
        """In the thread: the live connection, or a new one when the backoff allows; None
        while the database is unreachable."""
        if not lost(self._db):
            return self._db
        if self._db is not None:
            self._db.close()
            self._db = None
        now = time.monotonic()
        if now < self._reconnect_at:
            return None
        try:
            conn = connect(self.pg.url)
            row = conn.execute("SELECT value FROM state WHERE key = 'epoch'").fetchone()
        except psycopg.Error as exc:
            self._reconnect_at = now + self._reconnect_delay
            self._reconnect_delay = min(self._reconnect_delay * 2, RECONNECT_MAX_SECS)
            self._write_failed(exc)
            return None
        if row is None:
            conn.close()
            raise StorageError("the database has no event epoch: run its migrations")
        self._epoch = int(row[0])
        self._db = conn
        self._cur = conn.cursor()  # type: ignore[assignment]
        self._reconnect_delay = RECONNECT_INITIAL_SECS
        if self._write_error is not None:
            self._write_recovered()
        log.info("storage connected", node=self.pg.node)
        return conn

    def _drop(self, exc: BaseException) -> None:
        log.error("storage lost its database connection", error=pg_reason(exc))
        if self._db is not None:
            self._db.close()
        self._db = None
        self._reconnect_at = time.monotonic() + RECONNECT_INITIAL_SECS

    async def _reconnector(self) -> None:
        """While the database is away, try again in the background (with backoff), so
        /healthz recovers with it and not only when the next request comes."""
        while True:
            await trio.sleep(RECONNECT_INITIAL_SECS)
            if lost(self._db):
                await self._in_thread(self._ensure_connection)
            elif time.monotonic() - self._used_at >= IDLE_PING_SECS:
                await self._in_thread(self._ping)

    def _ping(self) -> None:
        """An idle session is checked now and then: a database that restarted meanwhile is
        found here (health says so, the reconnect starts) rather than by the next claim."""
        conn = self._db
        if lost(conn):
            return
        assert conn is not None
        self._used_at = time.monotonic()
        try:
            conn.execute("SELECT 1").fetchone()
        except psycopg.Error as exc:
            if lost(conn):
                self._write_failed(exc)
                self._drop(exc)

    # --- statements -------------------------------------------------------------------------

    def _pg(self, sql: str) -> str:
        """The statement with psycopg's placeholders (the shared text uses SQLite's `?`; no
        statement has a `?` or `%` of its own)."""
        text = self._sql.get(sql)
        if text is None:
            text = self._sql[sql] = sql.replace("?", "%s")
        return text

    def _one(self, sql: str, args: tuple[Any, ...]) -> Any:
        cur = self._cur
        assert cur is not None
        cur.execute(self._pg(sql), args)
        if cur.description is None:
            return None
        return cur.fetchone()

    def _all(self, sql: str, args: tuple[Any, ...]) -> list[Any]:
        cur = self._cur
        assert cur is not None
        cur.execute(self._pg(sql), args)
        return cur.fetchall()

    def _note(self, msg: Note) -> Handled:
        return None, (Announce((msg,)),)

    # --- transactions -----------------------------------------------------------------------

    async def _run_transactions(self, groups: list[list[Envelope[StorageMsg]]]) -> None:
        """One thread hop for the whole batch, then the deliveries in order."""
        if not groups:
            return
        outcomes: list[Outcome] = await self._in_thread(self._execute_all, groups)
        for outcome in outcomes:
            await self._deliver(outcome)

    def _execute_all(self, groups: list[list[Envelope[StorageMsg]]]) -> list[Outcome]:
        return [self._execute(group) for group in groups]

    def _execute(self, group: list[Envelope[StorageMsg]]) -> Outcome:
        conn = self._ensure_connection()
        if conn is None:
            return Outcome.failed(group, Unavailable("the database is not reachable; retry",
                                                     retry_after=1))
        self._used_at = time.monotonic()
        careful = False
        reconnected = False
        for attempt in range(TRANSIENT_RETRIES + 1):
            self._committing = False
            try:
                return self._attempt(conn, group, careful)
            except _Careful:
                careful = True
            except TRANSIENT as exc:  # a deadlock, a serialization failure
                log.warning("transaction rolled back by the database; again",
                            size=len(group), error=type(exc).__name__)
                if attempt < TRANSIENT_RETRIES:
                    time.sleep(random.uniform(0.5, 1.5) * RERUN_PAUSE_SECS * 2**attempt)
            except psycopg.Error as exc:
                if lost(conn) and not self._committing and not reconnected:
                    # The session broke before its COMMIT was sent (the database restarted
                    # while this node was idle, say): nothing of it can have committed, so
                    # once reconnected the transaction runs again. (Broken during the COMMIT,
                    # its outcome is unknown: its requesters get a 503 and retry.)
                    self._drop(exc)
                    self._reconnect_at = -math.inf
                    fresh = self._ensure_connection()
                    if fresh is not None:
                        conn, reconnected = fresh, True
                        continue
                self._transaction_lost(len(group), exc)
                if lost(conn):
                    self._drop(exc)
                return Outcome.failed(group, Unavailable("storage could not commit; retry",
                                                         retry_after=1))
        return Outcome.failed(group, Unavailable("storage is contended; retry", retry_after=1))

    def _attempt(self, conn: psycopg.Connection[Any], group: list[Envelope[StorageMsg]],
                 careful: bool) -> Outcome:
        started = time.perf_counter()
        answers: list[tuple[Envelope[StorageMsg], object]] = []
        effects: list[Any] = []
        self._now = rfc3339(time.time())
        multi = self._multi_write
        feed: int | None = None
        try:
            with conn.transaction():
                for env in group:
                    kind = type(env.msg)
                    answer, more = self._request(conn, kind, env.msg, careful)
                    if kind in multi and isinstance(answer, Failure):
                        raise _Undo(answer)  # alone in this transaction: roll back its part
                    answers.append((env, answer))
                    effects.extend(more)
                self._filters_first(answers)
                feed = self._append_feed(answers, effects)
                self._committing = True  # leaving the block sends the COMMIT
        except _Undo as undo:
            return Outcome(group, [], [], undo=undo.answer)
        if self._write_error is not None:
            self._write_recovered()
        return Outcome(group, answers, effects, time.perf_counter() - started, feed=feed)

    def _request(self, conn: psycopg.Connection[Any], kind: type, msg: Any,
                 careful: bool) -> Handled:
        handler = self._handlers[kind]
        try:
            if not careful:
                return handler(msg)
            with conn.transaction():  # a savepoint: a failure undoes this request alone
                return handler(msg)
        except AnonTicketError as exc:
            return Failure(exc), ()
        except TRANSIENT:
            raise  # the whole transaction is run again
        except (psycopg.OperationalError, psycopg.InterfaceError):
            if lost(conn):
                raise  # the connection is gone: the whole transaction is
            if not careful:
                raise _Careful() from None
            log.error("request failed", request=self._kinds[kind], error="OperationalError")
            return Failure(Unavailable("storage error")), ()
        except psycopg.DataError as exc:  # a value PostgreSQL cannot hold
            if not careful:
                raise _Careful() from None
            return self._unstorable(kind, exc), ()
        except psycopg.Error as exc:
            if not careful:
                raise _Careful() from None
            log.error("request failed", request=self._kinds[kind], error=type(exc).__name__)
            return Failure(Unavailable("storage error")), ()
        except (OverflowError, UnicodeError, ValueError) as exc:
            if not careful:
                raise _Careful() from None
            return self._unstorable(kind, exc), ()

    def _filters_first(self, answers: list[tuple[Envelope[StorageMsg], object]]) -> None:
        """New ids into this node's Bloom filters (its workers' too) before the COMMIT: once
        committed, the feed may bring them to another node's watchers within milliseconds,
        and a client told there may redeem here at once. An id in the filter before its
        row is committed only costs a lookup that finds nothing. Their acknowledgement and
        events still wait for every node (the cluster actor)."""
        pids = tuple(p for _, answer in answers
                     if isinstance(answer, _Forward) and isinstance(answer.msg, AddPids)
                     for p in answer.msg.pids)
        if not pids:
            return
        try:
            trio.from_thread.run(self.filter.ask, AddPids(pids, NOTHING_RECORDED, ()),
                                 LOCAL_ADD_TIMEOUT_SECS)
        except AnonTicketError as exc:  # the filter is restarting: the poller tries again
            raise _Undo(Failure(Unavailable(f"filter not ready: {exc}", retry_after=1))) \
                from None

    def _append_feed(self, answers: list[tuple[Envelope[StorageMsg], object]],
                     effects: list[Any]) -> int | None:
        """The transaction's entry in the cluster feed, if other nodes must hear of it: new
        ids, invalidations, events (a cache fill alone stays here)."""
        pids: list[Any] = []
        events: list[Any] = []
        settles = False
        for _, answer in answers:
            if isinstance(answer, _Forward):
                if isinstance(answer.msg, AddPids):
                    pids.extend(answer.msg.pids)
                    events.extend(answer.msg.events)
                else:
                    settles = True
        if not pids and not settles and all(type(e) is CacheClaim for e in effects):
            return None
        body = encode_feed(tuple(effects), tuple(pids), tuple(events))
        cur = self._cur
        assert cur is not None
        # Held until COMMIT: entries become visible in the order of their numbers, so a node
        # that read up to N never misses a smaller one committed later.
        cur.execute("SELECT pg_advisory_xact_lock(%s)", (LOCK_EVENTS,))
        # ...and the other nodes' followers are woken at the COMMIT (one round trip for both).
        cur.execute("WITH e AS (INSERT INTO cluster_events (node, body) VALUES (%s, %s) "
                    "RETURNING id) SELECT id, pg_notify(%s, %s) FROM e",
                    (self.pg.node, body, FEED_CHANNEL, self.pg.node))
        row = cur.fetchone()
        assert row is not None
        return int(row[0])

    def _forward(self, env: Envelope[StorageMsg], msg: AddPids | Settle,
                 feed: int | None) -> None:
        if self.cluster is not None and feed is not None:
            self.cluster.forward(AfterFeed(feed, msg), env)  # then to the filter
        else:
            self.filter.forward(msg, env)

    # --- health and backups -----------------------------------------------------------------

    def _health(self) -> Figures:
        """Answered at once from what the last transaction (or reconnect) found: the
        reconnector probes in the background, the loop never waits on the database."""
        return {"writable": self._write_error is None and self._db is not None,
                "error": self._write_error if self._write_error is not None
                else (None if self._db is not None else "not connected")}

    async def _backup(self, env: Envelope[Backup]) -> None:
        env.fail(BackupFailed(BACKUP_REFUSED))
