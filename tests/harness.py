"""Test harness: the whole actor tree in-process, on a real SQLite file and real sockets."""

from __future__ import annotations

import os
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import trio

from anon_ticket import schema
from anon_ticket.config import Settings, load_settings
from anon_ticket.datadir import DataDir
from anon_ticket.domain.ids import PaymentId
from anon_ticket.domain.messages import RecordTransfers, Transfer
from supervisors.tree import Tree, build_tree

UNUSED_WALLET = "http://127.0.0.1:9/json_rpc"


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
    async with trio.open_nursery() as nursery, client, internal:
        await nursery.start(tree.root.run)
        try:
            yield Server(settings, tree, client, internal)
        finally:
            tree.root.request_stop("test over")
            nursery.cancel_scope.deadline = trio.current_time() + 30
    for close in tree.closers:
        close()
