"""Several nodes on one PostgreSQL database, on the session's regtest chain (docs/architecture.md
§9): claims race across nodes, the poller's node dies and another takes over, what one node
records or claims is known at once on the other, and the database restarts under load.

Every test gets a fresh database on the session's PostgreSQL server (`pg_dsn`), except the
restart test, which stops a server of its own. In-process nodes are two trees in this trio run
(independent but for the database); the kill -9 test runs two real server processes.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import trio
from trio_websocket import WebSocketConnection, open_websocket_url

from anon_ticket.devchain import DevChainInfo
from anon_ticket.domain.address import integrated_address
from anon_ticket.domain.ids import PaymentId
from anon_ticket.domain.messages import RecordTransfers, Transfer
from tests.chain import mine_sync, pay_sync, rpc_sync
from tests.e2e.test_chain import (
    CONFS,
    XMR,
    mine,
    pay,
    poller,
    server_for,
    wait_scanned,
)
from tests.harness import Server
from tests.pgserver import PgServer, require_bindir
from tests.process.proc import ServerProcess, kill, start_server
from tests.process.test_workers import fresh_client

pytestmark = pytest.mark.chain


# --- in-process nodes ---------------------------------------------------------------------


async def is_leading(srv: Server) -> bool:
    return bool((await poller(srv))["state"] != "standby")


async def wait_leading(srv: Server, timeout: float = 10) -> None:
    with trio.fail_after(timeout):
        while not await is_leading(srv):
            await trio.sleep(0.02)


@asynccontextmanager
async def two_nodes(tmp_path: Path, dsn: str, wallet_url: str,
                    **overrides: Any) -> AsyncIterator[tuple[Server, Server]]:
    """Nodes `node-a` and `node-b` on one database, each with its data directory; A is
    started first and holds the poller lock before B starts, so B stands by."""
    options: dict[str, Any] = {"database_url": dsn, **overrides}
    async with server_for(tmp_path / "a", wallet_url, node_name="node-a", **options) as a:
        await wait_leading(a)
        async with server_for(tmp_path / "b", wallet_url, node_name="node-b", **options) as b:
            assert not await is_leading(b)
            yield a, b


def ws_url(srv: Server) -> str:
    return f"ws://{srv.settings.bind_host}:{srv.settings.bind_port}/api/v1/watch"


async def receive(ws: WebSocketConnection, timeout: float = 60) -> dict[str, Any]:
    with trio.fail_after(timeout):
        msg: dict[str, Any] = json.loads(await ws.get_message())
    return msg


async def subscribe(ws: WebSocketConnection, pid: PaymentId) -> dict[str, Any]:
    await ws.send_message(json.dumps({"op": "subscribe", "pid": pid.hex()}))
    state = await receive(ws, 30)
    assert (state["type"], state["pid"]) == ("state", pid.hex()), state
    return state


async def redeem(client: httpx.AsyncClient, pid: PaymentId) -> httpx.Response:
    return await client.post("/api/v1/redeem", json={"pid": pid.hex()})


def pg_rows(dsn: str, query: str, *args: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn, connect_timeout=10) as conn:
        return conn.execute(query, args).fetchall()


def tokens_in_db(dsn: str, pids: list[PaymentId]) -> dict[str, str | None]:
    rows = pg_rows(dsn, "SELECT pid, token FROM tickets WHERE pid = ANY(%s)",
                   [p.raw for p in pids])
    return {bytes(pid).hex(): None if token is None else bytes(token).hex()
            for pid, token in rows}


# --- a race over two nodes ----------------------------------------------------------------


async def test_500_redeems_of_one_payment_over_two_nodes_claim_it_exactly_once(
        tmp_path: Path, pg_dsn: str, regtest_chain: DevChainInfo) -> None:
    info = regtest_chain
    async with two_nodes(tmp_path, pg_dsn, info.watch_wallet_url) as (a, b):
        await wait_scanned(a, info)
        pid = PaymentId.generate()
        await pay(info, integrated_address(info.primary_address, pid), XMR // 8)
        await mine(info, CONFS)
        await wait_scanned(a, info)  # recorded by A: answered once B applied it too
        answers: list[tuple[str, int, dict[str, Any]]] = []
        # a new connection per request, half of them to each node, all at once
        async with fresh_client(a) as to_a, fresh_client(b) as to_b:
            async def one(name: str, client: httpx.AsyncClient) -> None:
                resp = await redeem(client, pid)
                answers.append((name, resp.status_code, resp.json()))

            async with trio.open_nursery() as nursery:
                for i in range(500):
                    if i % 2:
                        nursery.start_soon(one, "b", to_b)
                    else:
                        nursery.start_soon(one, "a", to_a)
        assert {code for _, code, _ in answers} == {200}, [x for x in answers if x[1] != 200]
        statuses = [body["status"] for _, _, body in answers]
        assert statuses.count("success") == 1
        assert statuses.count("already_claimed") == 499
        assert {name for name, _, _ in answers} == {"a", "b"}
        assert {body["balance"] for _, _, body in answers} == {XMR // 8}
        tokens = {body["service_token"] for _, _, body in answers}
        assert len(tokens) == 1
        assert tokens_in_db(pg_dsn, [pid]) == {pid.hex(): tokens.pop()}


# --- what one node commits, the other knows at once ---------------------------------------


@pytest.mark.parametrize("watched", ["leader", "standby"])
async def test_a_payment_confirmed_to_a_watcher_on_one_node_is_redeemable_at_once_on_the_other(
        tmp_path: Path, pg_dsn: str, regtest_chain: DevChainInfo, watched: str) -> None:
    info = regtest_chain
    redeemed: dict[str, tuple[int, dict[str, Any]]] = {}
    async with two_nodes(tmp_path, pg_dsn, info.watch_wallet_url) as (leader, standby):
        watching, redeeming = (leader, standby) if watched == "leader" else (standby, leader)
        await wait_scanned(leader, info)
        pids = [PaymentId.generate() for _ in range(3)]
        async with open_websocket_url(ws_url(watching)) as ws:
            for pid in pids:
                await subscribe(ws, pid)
            for i, pid in enumerate(pids):
                await pay(info, integrated_address(info.primary_address, pid), XMR // 9 + i)
            await mine(info, CONFS)
            while len(redeemed) < len(pids):
                msg = await receive(ws)
                if msg["type"] == "payment_confirmed":  # redeemed at once on the other node
                    resp = await redeem(redeeming.client, PaymentId.parse(msg["pid"]))
                    redeemed[msg["pid"]] = (resp.status_code, resp.json())
        assert not await is_leading(standby)
    for i, pid in enumerate(pids):
        code, body = redeemed[pid.hex()]
        assert code == 200, (watched, pid.hex(), code, body)
        assert (body["status"], body["balance"]) == ("success", XMR // 9 + i)


async def test_a_watcher_on_one_node_sees_a_claim_made_on_the_other_in_order(
        tmp_path: Path, pg_dsn: str, regtest_chain: DevChainInfo) -> None:
    info = regtest_chain
    async with two_nodes(tmp_path, pg_dsn, info.watch_wallet_url) as (a, b):
        await wait_scanned(a, info)
        pid = PaymentId.generate()
        messages: list[dict[str, Any]] = []
        async with open_websocket_url(ws_url(b)) as ws:
            messages.append(await subscribe(ws, pid))
            await pay(info, integrated_address(info.primary_address, pid), XMR // 6)
            await mine(info, CONFS)
            while (msg := await receive(ws))["type"] != "payment_confirmed":
                messages.append(msg)
            messages.append(msg)
            await wait_scanned(a, info)  # A has it too (see the test above)
            claim = (await redeem(a.client, pid)).json()
            assert claim["status"] == "success"
            while (msg := await receive(ws))["type"] != "claimed":
                messages.append(msg)
            messages.append(msg)
        kinds = [m["type"] for m in messages]
        assert kinds[0] == "state" and kinds.index("payment_confirmed") < kinds.index("claimed")
        committed = [m for m in messages if m["type"] != "state" and "seq" in m]
        seqs = [m["seq"] for m in committed]
        assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs), messages
        assert seqs[0] > messages[0]["seq"]
        assert messages[-1]["pid"] == pid.hex()
        assert {m["epoch"] for m in committed} == {messages[0]["epoch"]}


# --- kill -9 of the polling node ----------------------------------------------------------


def node_process(tmp_path: Path, name: str, dsn: str, info: DevChainInfo,
                 start_height: int) -> ServerProcess:
    """`anon-ticket serve` as node `name` of the database (not yet waited for). One height
    per crediting window: a kill lands between a node's windows as often as not."""
    return start_server(
        tmp_path / name, wait=False,
        env={"DATABASE_URL": dsn, "MONERO_RPC_URL": info.watch_wallet_url},
        args=("--node-name", name, "--min-confirmations", str(CONFS),
              "--poll-interval-secs", "0.1", "--scan-window-blocks", "1",
              "--start-height", str(start_height), "--workers", "1"))


def poller_status(node: ServerProcess) -> dict[str, Any]:
    with node.internal() as internal:
        status: dict[str, Any] = internal.get("/admin/status").json()["poller"]
    return status


def leader_gauge(node: ServerProcess) -> float:
    with node.internal() as internal:
        text = internal.get("/metrics").text
    found = re.search(r"^anon_ticket_poller_leader (\S+)$", text, re.MULTILINE)
    assert found is not None, text
    return float(found[1])


def roles(nodes: list[ServerProcess], timeout: float = 15) -> tuple[ServerProcess, ServerProcess]:
    """(the leader, the node standing by), once one leads and the other stands by."""
    deadline = time.monotonic() + timeout
    while True:
        states = [poller_status(n)["state"] for n in nodes]
        if sorted(s == "standby" for s in states) == [False, True]:
            leader = nodes[states.index("standby") ^ 1]
            return leader, nodes[states.index("standby")]
        assert time.monotonic() < deadline, states
        time.sleep(0.05)


def info_primary(node: ServerProcess, timeout: float = 10) -> str:
    """The primary address `/api/v1/info` names, once it names one."""
    deadline = time.monotonic() + timeout
    while True:
        primary = httpx.get(f"{node.url}/api/v1/info", timeout=5).json()["primary_address"]
        if primary is not None:
            return str(primary)
        assert time.monotonic() < deadline, "no primary address in /api/v1/info"
        time.sleep(0.05)


def wait_cursor(node: ServerProcess, target: int, timeout: float = 60) -> int:
    deadline = time.monotonic() + timeout
    while True:
        cursor = poller_status(node)["cursor"]
        if cursor is not None and cursor >= target:
            return int(cursor)
        assert time.monotonic() < deadline, node.log()
        time.sleep(0.05)


def safe_height(info: DevChainInfo) -> int:
    return int(rpc_sync(info.daemon_url, "get_block_count")["count"]) - CONFS


def stored_cursor(dsn: str) -> int:
    return int(pg_rows(dsn, "SELECT value FROM state WHERE key = 'cursor'")[0][0])


def test_kill_9_of_the_polling_node_another_takes_over_and_nothing_is_lost_or_doubled(
        tmp_path: Path, pg_dsn: str, regtest_chain: DevChainInfo) -> None:
    info = regtest_chain
    start = safe_height(info) - 5  # (a fresh database: the nodes scan from here)
    nodes = [node_process(tmp_path, name, pg_dsn, info, start)
             for name in ("node-a", "node-b")]
    restarted: ServerProcess | None = None
    try:
        for node in nodes:
            node.wait_ready()
        leader, standby = roles(nodes)
        assert (leader_gauge(leader), leader_gauge(standby)) == (1.0, 0.0)
        # Neither node was given PRIMARY_ADDRESS: the standby asked its wallet itself.
        assert info_primary(standby) == info.primary_address
        wait_cursor(leader, safe_height(info))
        paid: dict[str, tuple[str, int]] = {}  # pid -> (txid, amount)

        def payment(i: int) -> None:
            pid = PaymentId.generate()
            amount = XMR // 30 + i
            paid[pid.hex()] = (pay_sync(info, integrated_address(info.primary_address, pid),
                                        amount), amount)

        for i in range(3):
            payment(i)
        mine_sync(info, CONFS)
        wait_cursor(leader, safe_height(info))  # credited by the leader
        for i in range(3, 5):
            payment(i)
            mine_sync(info, 1)
        mine_sync(info, CONFS - 1)  # deep now: the leader is about to credit them, or crediting
        target = safe_height(info)
        before_kill = stored_cursor(pg_dsn)
        killed_at = time.monotonic()
        kill(leader)
        while poller_status(standby)["state"] == "standby":
            assert time.monotonic() < killed_at + 10, standby.log()
            time.sleep(0.01)
        takeover = time.monotonic() - killed_at
        assert leader_gauge(standby) == 1.0
        wait_cursor(standby, target)
        caught_up = time.monotonic() - killed_at
        print(f"kill -9 of the leader: the other node leads after {takeover:.3f} s, "
              f"has credited what the dead one left after {caught_up:.3f} s")
        assert takeover < 3.0  # the lock is freed with the session; the retry is every 1 s
        for i in range(5, 7):
            payment(i)
        mine_sync(info, CONFS)
        wait_cursor(standby, safe_height(info))
        # It resumed from the cursor the dead node had stored, not from the start.
        started = re.findall(r"poller starting.*?cursor=(\d+)", standby.log())
        assert len(started) == 1 and int(started[0]) >= before_kill, standby.log()

        tokens: dict[str, str] = {}
        with httpx.Client(base_url=standby.url, timeout=10) as client:
            for pid, (_, amount) in paid.items():
                body = client.post("/api/v1/redeem", json={"pid": pid}).json()
                assert (body.get("status"), body.get("balance")) == ("success", amount), (
                    pid, body)
                tokens[pid] = body["service_token"]
        # the killed node comes back, stands by, and knows every claim
        restarted = node_process(tmp_path, leader.data_dir.name, pg_dsn, info, start)
        restarted.wait_ready()
        assert poller_status(restarted)["state"] == "standby"
        with httpx.Client(base_url=restarted.url, timeout=10) as client:
            for pid, (_, amount) in paid.items():
                body = client.post("/api/v1/redeem", json={"pid": pid}).json()
                assert body == {"status": "already_claimed", "service_token": tokens[pid],
                                "balance": amount}
        rows = pg_rows(pg_dsn, "SELECT txid, pid, amount FROM transfers WHERE pid = ANY(%s)",
                       [bytes.fromhex(p) for p in paid])
        found = sorted((bytes(txid).hex(), bytes(pid).hex(), amount)
                       for txid, pid, amount in rows)
        assert found == sorted((txid, pid, amount) for pid, (txid, amount) in paid.items())
        assert tokens_in_db(pg_dsn, [PaymentId.parse(p) for p in paid]) == tokens
    finally:
        for node in (*nodes, *([restarted] if restarted else [])):
            node.stop()


# --- PostgreSQL restarted under load ------------------------------------------------------

OUTAGE_SECS = 2.5  # longer than a filter trusts itself without a feed read (2 s)
RECOVERY_SECS = 10.0  # storage reconnects with a backoff capped at 5 s


@dataclass(frozen=True)
class Answer:
    node: str
    kind: str  # "claimed" (before the load), "fresh" (recorded, unclaimed), "unknown"
    pid: str
    at: float  # sent (trio's clock)
    done: float  # answered
    code: int | None  # None: the connection failed
    body: Any = None
    retry_after: str | None = None


def actor_restarts(actors: list[dict[str, Any]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for actor in actors:
        out[actor["name"]] = actor["restarts"]
        out.update(actor_restarts(actor.get("children") or []))
    return out


async def wait_healthy(srv: Server, timeout: float = 20) -> None:
    with trio.fail_after(timeout):
        while True:
            resp = await srv.client.get("/healthz")
            if resp.status_code == 200 and resp.json()["status"] == "ok":
                return
            await trio.sleep(0.05)


async def test_postgresql_restarted_under_load_answers_clean_503s_then_recovers_on_both_nodes(
        tmp_path: Path, regtest_chain: DevChainInfo, caplog: pytest.LogCaptureFixture) -> None:
    info = regtest_chain
    caplog.set_level(logging.INFO, logger="anon_ticket")
    server = PgServer(bindir=require_bindir())  # stopped here: not the session's server
    await trio.to_thread.run_sync(server.start)
    try:
        dsn = server.create_database()
        async with two_nodes(tmp_path, dsn, info.watch_wallet_url,
                             unknown_rate_per_sec=0) as (a, b):
            await wait_scanned(a, info)
            for srv in (a, b):
                await wait_healthy(srv)
            claimed = [PaymentId.generate() for _ in range(20)]
            fresh = [PaymentId.generate() for _ in range(100)]
            # one commit; height 1: far below the poller's reorg window
            await a.tree.mailboxes.storage.ask(RecordTransfers(tuple(
                Transfer(os.urandom(32), pid, XMR // 200, 1) for pid in claimed + fresh)), 10)
            tokens: dict[str, set[str]] = {p.hex(): set() for p in claimed + fresh}
            for pid in claimed:
                tokens[pid.hex()].add((await redeem(b.client, pid)).json()["service_token"])
            answers: list[Answer] = []
            stop = trio.Event()

            async def load(name: str, srv: Server, seed: int) -> None:
                rng = random.Random(seed)
                async with fresh_client(srv) as client:
                    while not stop.is_set():
                        kind = rng.choice(("claimed", "fresh", "unknown"))
                        pid = (rng.choice(claimed) if kind == "claimed" else
                               rng.choice(fresh) if kind == "fresh" else PaymentId.generate())
                        at = trio.current_time()
                        try:
                            resp = await redeem(client, pid)
                        except httpx.TransportError as exc:
                            answers.append(Answer(name, kind, pid.hex(), at,
                                                  trio.current_time(), None, repr(exc)))
                        else:
                            try:
                                body = resp.json()
                            except ValueError:
                                body = resp.text
                            answers.append(Answer(name, kind, pid.hex(), at,
                                                  trio.current_time(), resp.status_code, body,
                                                  resp.headers.get("retry-after")))
                        await trio.sleep(0.01)

            async with trio.open_nursery() as nursery:
                for k in range(6):
                    nursery.start_soon(load, "a", a, k)
                    nursery.start_soon(load, "b", b, 100 + k)
                await trio.sleep(1.0)
                down = trio.current_time()
                await trio.to_thread.run_sync(server.stop)
                await trio.sleep(OUTAGE_SECS)
                await trio.to_thread.run_sync(server.restart)
                up = trio.current_time()
                for srv in (a, b):
                    await wait_healthy(srv, RECOVERY_SECS)
                healthy = trio.current_time()
                await trio.sleep(1.5)  # the load goes on against the recovered nodes
                stop.set()
            phases = {"before": Counter(x.code for x in answers if x.done < down),
                      "outage": Counter(x.code for x in answers if down <= x.done < up),
                      "recovering": Counter(x.code for x in answers if up <= x.done < healthy),
                      "after": Counter(x.code for x in answers if healthy <= x.done)}
            print(f"outage {up - down:.2f} s, /healthz ok on both {healthy - up:.2f} s after "
                  f"the restart; answers by phase: {phases}")

            failed = [x for x in answers if x.code not in (200, 404, 503)]
            assert not failed, failed[:5]  # no 500, no dropped connection
            for x in answers:
                if x.code == 503:  # a clean refusal, and only while the database was away
                    assert isinstance(x.body, dict) and list(x.body) == ["error"], x
                    assert x.retry_after is not None and int(x.retry_after) > 0, x
                    assert x.done >= down and x.at <= healthy, (down, healthy, x)
                elif x.code == 404:
                    assert x.kind == "unknown", x  # never a recorded id
                else:
                    assert x.kind != "unknown", x
                    tokens[x.pid].add(x.body["service_token"])
                    if x.kind == "claimed":
                        assert x.body["status"] == "already_claimed", x
            for node in ("a", "b"):
                assert any(x.code == 503 for x in answers if x.node == node), node
                assert any(x.code == 200 and x.at > healthy for x in answers if x.node == node)
            wins = [x.pid for x in answers if x.code == 200 and x.body["status"] == "success"]
            assert len(wins) == len(set(wins))  # no id claimed twice

            # Both nodes claim again; every id has one token, the one every 200 carried, and
            # it is the stored one. (A claim answered 503 may yet have committed: its client
            # learns the token from its next redeem, as `already_claimed`.)
            for pid in fresh:
                seen = [(await redeem(srv.client, pid)).json() for srv in (a, b, a, b)]
                assert {r.get("status") for r in seen[1:]} == {"already_claimed"}, seen
                tokens[pid.hex()].update(r["service_token"] for r in seen)
                wins.extend([pid.hex()] if seen[0]["status"] == "success" else [])
            assert len(wins) == len(set(wins))
            stored = tokens_in_db(dsn, claimed + fresh)
            for key, seen_tokens in tokens.items():
                assert seen_tokens == {stored[key]}, (key, seen_tokens, stored[key])
            for srv in (a, b):
                status = (await srv.internal.get("/admin/status")).json()
                assert {s["state"] for s in status["actors"]} == {"running"}, status["actors"]
                assert set(actor_restarts(status["actors"]).values()) == {0}, status["actors"]
            with trio.fail_after(10):  # one node polls again, the other stands by
                while sorted([await is_leading(a), await is_leading(b)]) != [False, True]:
                    await trio.sleep(0.05)
    finally:
        await trio.to_thread.run_sync(server.close)
    tracebacks = [r for r in caplog.records if r.exc_info]
    assert not tracebacks, [r.getMessage() for r in tracebacks]
