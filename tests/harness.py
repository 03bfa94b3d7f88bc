"""Test harness: the whole actor tree in-process, on a real SQLite file and real sockets.

With `ANON_TICKET_TEST_DATABASE=postgres` in the environment (scripts/test.sh reruns the
contract suites so), every server `running_server` starts, and every `make_settings`, gets a
fresh database on the process's one PostgreSQL server (tests/pgserver.py `shared_server`)
instead of its SQLite file: the same tests, unchanged, against the other store. A test that
is about SQLite itself (its file, its disk) says so with `sqlite_only(reason)`."""

from __future__ import annotations

import os
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import trio

from anon_ticket import schema
from anon_ticket.audit import check_database
from anon_ticket.config import Settings, load_settings
from anon_ticket.datadir import DataDir
from anon_ticket.domain.ids import PaymentId
from anon_ticket.domain.messages import RecordTransfers, Transfer
from supervisors.tree import Tree, build_tree
from tests import pgserver

UNUSED_WALLET = "http://127.0.0.1:9/json_rpc"
# Which store the harness's servers use: "sqlite" (the default) or "postgres".
DATABASE_ENV = "ANON_TICKET_TEST_DATABASE"
DATABASES = ("sqlite", "postgres")
# The databases `make_settings` created on the shared PostgreSQL server (name by URL), so
# `running_server` drops its own once the server has stopped.
_created: dict[str, str] = {}


def on_postgres() -> bool:
    """Whether this run puts the harness's servers on PostgreSQL."""
    chosen = os.environ.get(DATABASE_ENV, "sqlite")
    if chosen not in DATABASES:
        raise ValueError(f"{DATABASE_ENV}={chosen!r}: one of {', '.join(DATABASES)}")
    return chosen == "postgres"


def sqlite_only(reason: str) -> pytest.MarkDecorator:
    """Skips a test on a PostgreSQL run: it is about SQLite itself (`reason` says how)."""
    return pytest.mark.skipif(on_postgres(), reason=f"SQLite only: {reason}")


def fresh_database() -> str:
    """A new, empty database on the shared PostgreSQL server: its URL."""
    server = pgserver.shared_server()
    name = server.fresh_name()
    url = server.create_database(name)
    _created[url] = name
    return url


def drop_database(url: str | None) -> None:
    """Drop a database `fresh_database` made (any other URL is left alone)."""
    name = _created.pop(url, None) if url is not None else None
    if name is not None:
        pgserver.shared_server().drop_database(name)


def ledger_problems(settings: Settings) -> list[str]:
    """What the offline audit finds wrong with the server's ledger (empty: healthy). On
    PostgreSQL, which enforces the schema's constraints itself, its two ledger checks: each
    balance is the sum of the ticket's surviving transfers, and a txid credits one id."""
    if settings.postgres_url is None:
        return check_database(settings.database_path)
    with psycopg.connect(settings.postgres_url, connect_timeout=10) as conn:
        balances = conn.execute(
            "SELECT encode(t.pid, 'hex'), t.amount, coalesce(sum(x.amount), 0) FROM tickets t "
            "LEFT JOIN transfers x ON x.pid = t.pid AND x.vanished_at IS NULL "
            "GROUP BY t.pid HAVING t.amount <> coalesce(sum(x.amount), 0)").fetchall()
        shared = conn.execute(
            "SELECT encode(txid, 'hex'), count(DISTINCT pid) FROM transfers GROUP BY txid "
            "HAVING count(DISTINCT pid) > 1").fetchall()
    return ([f"ticket {pid} amount {amount} != sum of its transfers {total}"
             for pid, amount, total in balances]
            + [f"txid {txid} is credited to {n} payment ids" for txid, n in shared])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def count_tasks(matches: Callable[[trio.lowlevel.Task], bool]) -> int:
    """Tasks of this trio run (servers under test run in it) that `matches` picks."""
    root = trio.lowlevel.current_root_task()
    assert root is not None
    count, todo = 0, [root]
    while todo:
        task = todo.pop()
        count += matches(task)
        for nursery in task.child_nurseries:
            todo.extend(nursery.child_tasks)
    return count


def make_settings(data_dir: Path, **overrides: object) -> Settings:
    cli: dict[str, object] = {
        "data_dir": str(data_dir),
        "bind_address": f"127.0.0.1:{free_port()}",
        "monero_rpc_url": UNUSED_WALLET,
        "backoff_initial_secs": "0.05",
        "backoff_max_secs": "0.2",
        "grace_secs": "2",
        "pid_bloom_entries": "10000",
        # the single process; tests of worker processes ask for them, and CI runs the chain
        # tests once more with ANON_TICKET_TEST_WORKERS=2
        "workers": os.environ.get("ANON_TICKET_TEST_WORKERS", "1"),
    }
    if on_postgres() and "database_url" not in overrides:
        cli["database_url"] = fresh_database()
    cli.update({k: str(v) for k, v in overrides.items()})
    return load_settings(cli, {}, None)


@dataclass
class Server:
    settings: Settings
    tree: Tree
    client: httpx.AsyncClient
    internal: httpx.AsyncClient

    @property
    def url(self) -> str:
        return f"http://{self.settings.bind_host}:{self.settings.bind_port}"

    async def pay(self, pid: PaymentId, amount: int = 10**12, height: int = 100,
                  txid: bytes | None = None) -> Any:
        t = Transfer(txid or os.urandom(32), pid, amount, height)
        return await self.tree.mailboxes.storage.ask(RecordTransfers((t,)), 5)

    async def redeem(self, pid: str) -> httpx.Response:
        return await self.client.post("/api/v1/redeem", json={"pid": pid})


@asynccontextmanager
async def running_server(tmp_path: Path, **overrides: Any) -> AsyncIterator[Server]:
    tree_options = overrides.pop("tree_options", {})
    settings = make_settings(tmp_path / "data", **overrides)
    datadir = DataDir(settings.data_dir)
    datadir.ensure()
    if settings.postgres_url is not None:
        schema.migrate_postgres(settings.postgres_url)
    else:
        schema.migrate(settings.database_path)
    tree = build_tree(settings, datadir.token_secret(), **tree_options)
    if settings.unix_socket is not None:
        transport = httpx.AsyncHTTPTransport(uds=str(settings.unix_socket))
        client = httpx.AsyncClient(transport=transport, base_url="http://public")
    else:
        client = httpx.AsyncClient(
            base_url=f"http://{settings.bind_host}:{settings.bind_port}",
            limits=httpx.Limits(max_connections=256), timeout=20)
    internal = httpx.AsyncClient(
        transport=httpx.AsyncHTTPTransport(uds=str(settings.internal_socket_path)),
        base_url="http://internal", timeout=20)
    try:
        async with trio.open_nursery() as nursery, client, internal:
            await nursery.start(tree.root.run)
            try:
                yield Server(settings, tree, client, internal)
            finally:
                tree.root.request_stop("test over")
                nursery.cancel_scope.deadline = trio.current_time() + 30
        for close in tree.closers:
            close()
    finally:
        drop_database(settings.postgres_url)
