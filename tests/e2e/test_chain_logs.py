"""The real server's JSON log over a real run on the session's regtest chain: payments,
redeems, token lookups, websocket watches, bad requests, a revocation, operator commands and a
stop. Every line must parse as JSON, carry the keys docs/logs.md documents and nothing else,
and hold no payment id, token or txid in full and no address or port of this test's own
connections (docs/architecture.md, I10). The test connects from a loopback address of its
own (127.0.0.42), so any client address in the log is ours to find."""

from __future__ import annotations

import json
import re
import sys
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from trio_websocket import WebSocketConnection, wrap_client_stream

from anon_ticket.devchain import DevChainInfo
from anon_ticket.domain.address import integrated_address
from anon_ticket.domain.ids import PaymentId
from tests.e2e.test_chain import CONFS, XMR, chain_height, mine, pay
from tests.process.proc import BIN, ServerProcess, start_server
from tests.rawhttp import read_until_closed
from tests.test_logs import CORE, documented, leaks

pytestmark = [pytest.mark.chain, pytest.mark.process]

CLIENT_IP = "127.0.0.42"


class Client:
    """This test's connections to the server, all from CLIENT_IP; their ports are kept."""

    def __init__(self, server: ServerProcess) -> None:
        self.server = server
        self.ports: set[int] = set()
        self.http = httpx.AsyncClient(  # a connection a request: more ports to look for
            base_url=server.url, timeout=30, transport=httpx.AsyncHTTPTransport(
                local_address=CLIENT_IP, limits=httpx.Limits(max_keepalive_connections=0)))

    async def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        async with self.http.stream(method, path, **kwargs) as resp:
            # read while the connection is open: it closes with the response
            self.ports.add(resp.extensions["network_stream"].get_extra_info("client_addr")[1])
            await resp.aread()
        return resp

    async def connect(self) -> trio.SocketStream:
        sock = trio.socket.socket()
        await sock.bind((CLIENT_IP, 0))
        await sock.connect(("127.0.0.1", self.server.port))
        self.ports.add(sock.getsockname()[1])
        return trio.SocketStream(sock)

    async def watch(self, nursery: trio.Nursery) -> WebSocketConnection:
        return await wrap_client_stream(nursery, await self.connect(), "127.0.0.1",
                                        "/api/v1/watch")


async def until(ws: WebSocketConnection, kind: str, key: str, timeout: float = 90
                ) -> dict[str, Any]:
    with trio.fail_after(timeout):
        while True:
            msg: dict[str, Any] = json.loads(await ws.get_message())
            if msg.get("type") == kind and key in msg:
                return msg


async def ctl(server: ServerProcess, *args: str) -> str:
    done = await trio.run_process(
        [*BIN, "--data-dir", str(server.data_dir), "ctl", "--socket",
         str(server.internal_socket), *args], capture_stdout=True, capture_stderr=True)
    return str(done.stdout.decode())


async def wait_scanned(server: ServerProcess, info: DevChainInfo) -> None:
    target = await chain_height(info) - CONFS
    async with httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(
            uds=str(server.internal_socket)), base_url="http://internal") as internal:
        with trio.fail_after(90):
            while True:
                poller = (await internal.get("/admin/status")).json()["poller"]
                if (poller["cursor"] or -1) >= target:
                    return
                await trio.sleep(0.05)


async def test_a_real_runs_json_log_holds_no_pid_token_txid_or_client_address(
        tmp_path: Path, regtest_chain: DevChainInfo) -> None:
    info = regtest_chain
    server = await trio.to_thread.run_sync(partial(
        start_server, tmp_path / "data", env={"MONERO_RPC_URL": info.watch_wallet_url},
        args=("--log-format", "json", "--log-filter", "debug", "--min-confirmations",
              str(CONFS), "--poll-interval-secs", "0.1")))
    secrets: list[str] = []
    client = Client(server)
    try:
        await wait_scanned(server, info)
        pid, other = PaymentId.generate(), PaymentId.generate()
        secrets += [pid.hex(), other.hex()]
        async with trio.open_nursery() as nursery, client.http:
            ws = await client.watch(nursery)
            await ws.send_message(json.dumps({"op": "subscribe", "pid": pid.hex()}))
            await until(ws, "state", "pid")
            for each in (pid, other):
                address = integrated_address(info.primary_address, each)
                secrets.append(await pay(info, address, XMR // 5))
            await until(ws, "payment_seen", "pid")
            await mine(info, CONFS)
            await until(ws, "payment_confirmed", "pid")
            await wait_scanned(server, info)

            redeem = partial(client.request, "POST", "/api/v1/redeem")
            first = await redeem(json={"pid": pid.hex()})
            assert first.json()["status"] == "success", first.text
            token = first.json()["service_token"]
            secrets.append(token)
            assert (await redeem(json={"pid": pid.hex().upper()})).json()["status"] == \
                "already_claimed"
            second = (await redeem(json={"pid": other.hex()})).json()["service_token"]
            secrets.append(second)
            unknown = PaymentId.generate().hex()
            secrets.append(unknown)
            assert (await redeem(json={"pid": unknown})).status_code == 404
            assert (await redeem(json={"pid": "xyz"})).status_code == 400
            assert (await redeem(content=b"{", headers={"content-type": "application/json"})
                    ).status_code == 400
            assert (await client.request("GET", f"/api/v1/token/{token}")).status_code == 200
            assert (await client.request("GET", f"/api/v1/token/{'ab' * 32}")).status_code == 404
            assert (await client.request("GET", "/api/v1/token/0xyz")).status_code == 400
            assert (await client.request("GET", f"/nothing/{token}")).status_code == 404
            # a request the HTTP parser refuses (no Host): 400 before any route
            raw = await client.connect()
            await raw.send_all(b"GET /api/v1/token/" + token.encode() + b" HTTP/1.1\r\n\r\n")
            assert b" 400 " in (await read_until_closed(raw))[:20]
            # a bad websocket message, then the token's own stream through its revocation
            await ws.send_message(json.dumps({"op": "subscribe", "pid": token}))
            assert "error" in await until(ws, "error", "error")
            await ws.send_message(json.dumps({"op": "subscribe", "token": token}))
            await until(ws, "state", "token")
            revoked = await ctl(server, "revoke", token, "--reason", "abuse", "--abuse-score",
                                "7")
            assert "revoked" in revoked
            await until(ws, "revoked", "token")
            # a top-up of the revoked token: the log's alert names the payment id (redacted)
            secrets.append(await pay(info, integrated_address(info.primary_address, pid),
                                     XMR // 10))
            await mine(info, CONFS)
            await until(ws, "topped_up", "token")
            await ws.aclose()
            assert "running" in await ctl(server, "status")
            assert "restarted" in await ctl(server, "restart", "filter")
            assert "size" in await ctl(server, "backup", str(tmp_path / "backup.tar"))
    finally:
        await trio.to_thread.run_sync(server.stop)
    assert server.proc.returncode == 0, server.log()

    lines = server.log().splitlines()
    doc = documented()
    ours = frozenset().union(*(d.actors for d in doc.values()))
    seen: set[str] = set()
    server_ports = {server.port, *(int(u.rsplit(":", 1)[1].split("/")[0]) for u in (
        info.watch_wallet_url, info.daemon_url, info.dev_wallet_url))}
    # A client port that happens to equal a server's cannot be told apart in the log (the
    # address check still holds for it).
    ports = client.ports - server_ports
    assert len(ports) >= 10
    problems: list[str] = []
    for n, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except ValueError:
            problems.append(f"line {n} is not JSON: {line[:200]}")
            continue
        if list(record)[:4] != list(CORE) or not re.fullmatch(
                r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", record["ts"]):
            problems.append(f"line {n} does not start with {CORE}: {line[:200]}")
        event = record.get("event")
        if event in doc:
            seen.add(event)
            extra = set(record) - set(CORE) - doc[event].fields
            if extra or record["level"] not in doc[event].levels:
                problems.append(f"line {n}: {extra or record['level']} not documented for "
                                f"{event!r}")
        elif record.get("actor") in ours or set(record) != set(CORE):
            problems.append(f"line {n}: undocumented event: {line[:200]}")
        problems += [f"line {n}: {what}: {line[:300]}"
                     for what in leaks(line, secrets, CLIENT_IP, ports)]
    assert not problems, "\n".join(problems)
    # the paths that log payment ids and tokens (redacted) did run
    assert {"payment seen", "token revoked", "audit: revoke", "alert: revoked token topped up",
            "token topped up", "audit: backup", "backup written", "actor restarted on request",
            "starting", "stopping gracefully", "stopped"} <= seen, sorted(seen)
    print(f"{len(lines)} log lines, {len(seen)} events, {len(ports)} client ports",
          file=sys.stderr)
