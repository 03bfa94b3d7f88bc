"""Exactly one poller across nodes, on a real PostgreSQL database: the node holding the
advisory lock runs it, the others stand by and take over when its session goes
(supervisors/leadership.py, docs/architecture.md §9)."""

from __future__ import annotations

import psycopg
import pytest
import trio

from anon_ticket.domain.commands import PausePoller, PollerStatus
from anon_ticket.errors import ConfigError, InvalidInput, RpcUnavailable
from anon_ticket.metrics import Metrics
from anon_ticket.schema import LOCK_POLLER, migrate_postgres
from anon_ticket.walletrpc import WalletIdentity
from mailboxes import Mailbox
from supervisors.leadership import Leadership


class FakePoller:
    """Counts how many nodes run a poller at once; serves the poller's mailbox as a
    leader would."""

    running: set[str] = set()  # noqa: RUF012 (shared across nodes on purpose)
    starts: dict[str, int] = {}  # noqa: RUF012
    stops: dict[str, int] = {}  # noqa: RUF012
    most = 0

    def __init__(self, node: str, mailbox: Mailbox[object]) -> None:
        self.node = node
        self.mailbox = mailbox

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        FakePoller.running.add(self.node)
        FakePoller.starts[self.node] = FakePoller.starts.get(self.node, 0) + 1
        FakePoller.most = max(FakePoller.most, len(FakePoller.running))
        try:
            task_status.started()
            await trio.sleep_forever()
        finally:
            FakePoller.running.discard(self.node)
            FakePoller.stops[self.node] = FakePoller.stops.get(self.node, 0) + 1


def node(dsn: str, name: str) -> tuple[Leadership, Mailbox[object]]:
    mailbox: Mailbox[object] = Mailbox(f"poller-{name}", 16)
    lead = Leadership(dsn, name, lambda: FakePoller(name, mailbox), mailbox,  # type: ignore[arg-type]
                      Metrics(), retry_secs=0.1, check_secs=0.1)
    return lead, mailbox


async def _until(cond: object, timeout: float = 5) -> float:
    started = trio.current_time()
    with trio.fail_after(timeout):
        while not cond():  # type: ignore[operator]
            await trio.sleep(0.01)
    return trio.current_time() - started


async def _serve(lead: Leadership, mailbox: Mailbox[object], scope: trio.CancelScope) -> None:
    with scope:
        mailbox.serving = True
        await lead.run()


async def test_one_node_leads_and_another_takes_over_when_its_session_goes(
        pg_dsn: str) -> None:
    migrate_postgres(pg_dsn)
    FakePoller.running.clear()
    FakePoller.starts.clear()
    FakePoller.stops.clear()
    FakePoller.most = 0
    a, amb = node(pg_dsn, "a")
    b, bmb = node(pg_dsn, "b")
    scope_a, scope_b = trio.CancelScope(), trio.CancelScope()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_serve, a, amb, scope_a)
        await _until(lambda: a.leading)
        nursery.start_soon(_serve, b, bmb, scope_b)
        await trio.sleep(0.5)  # b tried several times: the lock is a's
        assert FakePoller.running == {"a"} and not b.leading
        status = await bmb.ask(PollerStatus(), 5)
        assert status["state"] == "standby"
        with pytest.raises(InvalidInput, match="stands by"):
            await bmb.ask(PausePoller(), 5)
        # a's node dies (its connections close with it): b takes over within its retry.
        scope_a.cancel()
        took = await _until(lambda: b.leading)
        assert took < 1.0
        assert FakePoller.running == {"b"}
        assert FakePoller.most == 1
        scope_b.cancel()


async def test_a_leader_whose_session_breaks_stops_its_poller_at_once(pg_dsn: str) -> None:
    migrate_postgres(pg_dsn)
    FakePoller.running.clear()
    FakePoller.starts.clear()
    FakePoller.stops.clear()
    FakePoller.most = 0
    a, amb = node(pg_dsn, "a")
    async with trio.open_nursery() as nursery:
        scope = trio.CancelScope()
        nursery.start_soon(_serve, a, amb, scope)
        await _until(lambda: a.leading)
        # The database ends the lock's session (a restart, a network cut look the same).
        with psycopg.connect(pg_dsn, autocommit=True) as admin:
            ended = admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory' "
                "AND objid = %s AND database = (SELECT oid FROM pg_database "
                "WHERE datname = current_database())", (LOCK_POLLER & 0xFFFFFFFF,)).fetchall()
        assert ended == [(True,)]
        await _until(lambda: FakePoller.stops.get("a") == 1, timeout=2)
        # ...and, the lock being free, the node leads again with a new session.
        await _until(lambda: a.leading and FakePoller.starts.get("a") == 2)
        assert FakePoller.most == 1
        scope.cancel()


async def test_a_standby_names_its_wallet_and_refuses_the_wrong_one(
        pg_dsn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A standby asks its wallet who it is (retrying while it is away), so its status, and
    `/api/v1/info` with it, name the primary address without PRIMARY_ADDRESS; a wallet other
    than the configured one is fatal on a standby too, as in the poller."""
    import supervisors.leadership as leadership
    monkeypatch.setattr(leadership, "IDENTIFY_RETRY_SECS", 0.05)
    migrate_postgres(pg_dsn)
    asked = 0

    async def identify() -> WalletIdentity:
        nonlocal asked
        asked += 1
        if asked < 3:
            raise RpcUnavailable("the wallet is away")
        return WalletIdentity("4right", watch_only=True)

    a, amb = node(pg_dsn, "a")
    scope_a = trio.CancelScope()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_serve, a, amb, scope_a)
        await _until(lambda: a.leading)
        b_mb: Mailbox[object] = Mailbox("poller-b", 16)
        b = Leadership(pg_dsn, "b", lambda: FakePoller("b", b_mb), b_mb,  # type: ignore[arg-type]
                       Metrics(), retry_secs=0.1, check_secs=0.1, identify=identify,
                       expected_primary="4right")
        scope_b = trio.CancelScope()
        nursery.start_soon(_serve, b, b_mb, scope_b)
        await _until(lambda: b.identity is not None)
        status = await b_mb.ask(PollerStatus(), 5)
        assert (status["state"], status["primary_address"], status["watch_only"]) == (
            "standby", "4right", True)
        assert asked == 3
        scope_b.cancel()

        wrong_mb: Mailbox[object] = Mailbox("poller-c", 16)
        wrong = Leadership(pg_dsn, "c", lambda: FakePoller("c", wrong_mb), wrong_mb,  # type: ignore[arg-type]
                           Metrics(), retry_secs=0.1, identify=identify,
                           expected_primary="4other")
        wrong_mb.serving = True
        with pytest.raises(BaseExceptionGroup) as raised:  # (out of the standby's nursery)
            await wrong.run()
        fatal = raised.value.subgroup(ConfigError)
        assert fatal is not None and "not the configured 4other" in repr(fatal)
        scope_a.cancel()
