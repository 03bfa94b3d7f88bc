"""The poller's leadership across nodes (PostgreSQL: docs/architecture.md §9).

Several nodes share one database; exactly one of them may poll the wallet. The one that
holds a session-level advisory lock (`pg_try_advisory_lock`, on a connection of its own) runs
the poller; every other node stands by, trying for the lock every `retry_secs`, and answers
`PollerStatus` itself (`state: standby`). The lock lives and dies with its session: when the
leading node's process dies (kill -9 included) its connection closes, PostgreSQL frees the
lock at once, and a standby takes it within `retry_secs` and resumes from the stored cursor
(crediting is once per transfer, I1, so even an overlap could not pay twice).

While leading, the session is checked every `check_secs`; if it is lost (a network cut, a
database restart) the poller is stopped at once and the node stands by again: it cannot know
whether another node has taken the lock meanwhile.

A standby asks its wallet who it is once (`identify`), as the poller does when it starts: its
`/api/v1/info` then names the primary address without `PRIMARY_ADDRESS` set, and a node
pointed at the wrong wallet exits 2 at start, not at its first takeover.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import psycopg
import trio

from anon_ticket.domain.commands import Figures, PausePoller, PollerStatus, RescanFrom, ResumePoller
from anon_ticket.domain.inboxes import PollerMsg
from anon_ticket.errors import AnonTicketError, InvalidInput
from anon_ticket.logs import get_logger
from anon_ticket.metrics import Metrics
from anon_ticket.schema import LOCK_POLLER, pg_reason
from anon_ticket.walletrpc import WalletIdentity
from mailboxes import Dispatch, Envelope, Mailbox
from supervisors.supervisor import Runnable

log = get_logger("leadership")

IDENTIFY_RETRY_SECS = 5.0  # a standby whose wallet is away asks again this often

STANDBY = ("this node stands by: the poller runs on the node that holds the poller lock "
           "(its `ctl status` shows it)")


def _connect(url: str) -> psycopg.Connection[Any]:
    return psycopg.connect(url, autocommit=True, connect_timeout=5, keepalives=1,
                           keepalives_idle=5, keepalives_interval=2, keepalives_count=3,
                           options="-c statement_timeout=5000")


class Leadership:
    """Stands in the tree where the poller would: named `poller`, serving its mailbox while
    on standby, running it while leading."""

    name = "poller"

    def __init__(self, url: str, node: str, make_poller: Callable[[], Runnable],
                 mailbox: Mailbox[PollerMsg], metrics: Metrics, *, retry_secs: float = 1.0,
                 check_secs: float = 1.0,
                 connect: Callable[[str], psycopg.Connection[Any]] = _connect,
                 identify: Callable[[], Awaitable[WalletIdentity]] | None = None,
                 expected_primary: str | None = None) -> None:
        self.url = url
        self.node = node
        self.make_poller = make_poller
        self.mailbox = mailbox
        self.metrics = metrics
        self.retry_secs = retry_secs
        self.check_secs = check_secs
        self._connect = connect
        self._identify = identify
        self.expected_primary = expected_primary
        self.identity: WalletIdentity | None = None  # the wallet's, once a standby asked it
        self.leading = False

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()  # a node serves on standby: nothing waits for the lock
        while True:
            conn = await self._standby()
            try:
                await self._lead(conn)
            finally:
                self.leading = False
                self.metrics.poller_leader.set(0)
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(conn.close, abandon_on_cancel=True)

    async def _standby(self) -> psycopg.Connection[Any]:
        """Serve the poller's mailbox with standby answers until the lock is ours."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.mailbox.serve, Dispatch(self.name, {
                PollerStatus: self._standby_status,
                PausePoller: self._refuse,
                ResumePoller: self._refuse,
                RescanFrom: self._refuse,
            }))
            if self._identify is not None and self.identity is None:
                nursery.start_soon(self._identify_wallet, self._identify)
            conn = await self._acquire()
            nursery.cancel_scope.cancel()
        return conn

    async def _acquire(self) -> psycopg.Connection[Any]:
        announced = False
        while True:
            try:
                conn = await trio.to_thread.run_sync(self._try_lock, abandon_on_cancel=True)
            except psycopg.Error as exc:
                log.warning("poller lock unreachable", error=pg_reason(exc))
                conn = None
            if conn is not None:
                return conn
            if not announced:
                log.info("poller standing by: another node holds the poller lock",
                         node=self.node)
                announced = True
            await trio.sleep(self.retry_secs)

    def _try_lock(self) -> psycopg.Connection[Any] | None:
        conn = self._connect(self.url)
        try:
            row = conn.execute("SELECT pg_try_advisory_lock(%s)", (LOCK_POLLER,)).fetchone()
        except BaseException:
            conn.close()
            raise
        if row is None or not row[0]:
            conn.close()
            return None
        return conn

    async def _lead(self, conn: psycopg.Connection[Any]) -> None:
        log.info("poller leadership taken", node=self.node)
        async with trio.open_nursery() as nursery:
            await nursery.start(self.make_poller().run)
            self.leading = True  # (once its poller runs)
            self.metrics.poller_leader.set(1)
            await self._hold(conn)
            nursery.cancel_scope.cancel()

    async def _hold(self, conn: psycopg.Connection[Any]) -> None:
        """Returns when the lock's session is gone (the poller is then stopped)."""
        while True:
            await trio.sleep(self.check_secs)
            try:
                with trio.fail_after(self.check_secs * 5):
                    await trio.to_thread.run_sync(
                        lambda: conn.execute("SELECT 1").fetchone(), abandon_on_cancel=True)
            except (psycopg.Error, trio.TooSlowError) as exc:
                reason = pg_reason(exc) if isinstance(exc, psycopg.Error) else "no answer"
                log.error("poller leadership lost: stopping the poller", node=self.node,
                          error=reason)
                return

    async def _identify_wallet(self, identify: Callable[[], Awaitable[WalletIdentity]]) -> None:
        """Until the wallet answers once (a takeover cancels it: the poller asks then)."""
        while True:
            try:
                identity = await identify()
            except AnonTicketError as exc:
                log.warning("standby: wallet not identified yet", node=self.node,
                            error=str(exc), retry_secs=IDENTIFY_RETRY_SECS)
                await trio.sleep(IDENTIFY_RETRY_SECS)
                continue
            identity.check(self.expected_primary, "this node's wallet")  # fatal: exit 2
            log.info("standby: wallet identified", node=self.node,
                     primary_address=identity.primary_address, watch_only=identity.watch_only)
            self.identity = identity
            return

    def _standby_status(self, env: Envelope[PollerStatus]) -> None:
        identity = self.identity
        figures: Figures = {
            "state": "standby", "wallet_reachable": None, "storage_error": None,
            "wallet_height": None, "cursor": None, "lag_blocks": None,
            "last_success_age_secs": None, "last_error": None,
            "primary_address": identity.primary_address if identity else None,
            "watch_only": identity.watch_only if identity else None,
        }
        env.reply(figures)

    def _refuse(self, env: Envelope[Any]) -> None:
        env.fail(InvalidInput(STANDBY))
