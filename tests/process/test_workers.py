"""Worker processes (`--workers N`, docs/architecture.md §8): the owner's tree runs in this test
process on a real SQLite file; its workers are real processes sharing the real public
socket, linked to it over real unix sockets."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families
from trio_websocket import open_websocket_url

from anon_ticket.domain.ids import PaymentId
from tests.harness import Server, running_server

pytestmark = pytest.mark.process

WORKERS = 2


def fresh_client(srv: Server) -> httpx.AsyncClient:
    """A client that opens a new connection per request: the kernel hands each to whichever
    worker accepts it first."""
    return httpx.AsyncClient(base_url=srv.url, timeout=30,
                             limits=httpx.Limits(max_connections=600,
                                                 max_keepalive_connections=0))


async def workers_serving(srv: Server, n: int = WORKERS, timeout: float = 60) -> None:
    """Until /healthz has been answered by each of the n workers."""
    seen: set[int] = set()
    async with fresh_client(srv) as client:
        with trio.fail_after(timeout):
            while len(seen) < n:
                try:
                    resp = await client.get("/healthz")
                    if resp.status_code in (200, 503):  # (503: no wallet here)
                        seen.add(resp.json().get("worker", 1))
                except httpx.TransportError:
                    pass
                await trio.sleep(0.01)


def worker_os_pid(index: int) -> int:
    out = subprocess.run(["pgrep", "-P", str(os.getpid()), "-f", f"anon_ticket.worker {index} "],
                         capture_output=True, text=True).stdout.split()
    assert len(out) == 1, out
    return int(out[0])


async def test_workers_share_the_public_socket_and_the_owner_shows_them(
        tmp_path: Path) -> None:
    async with running_server(tmp_path, workers=WORKERS) as srv:
        await workers_serving(srv)
        status = (await srv.internal.get("/admin/status")).json()
        names = {a["name"]: a["state"] for a in status["actors"]}
        assert names == {"core": "running", "hub": "running", "poller": "running",
                         "internal": "running", "fanout": "running",
                         "worker-1": "running", "worker-2": "running"}
        # an operator restarts one worker: gracefully, and it serves again
        assert (await srv.internal.post("/admin/actors/worker-2/restart")).status_code == 200
        with trio.fail_after(30):
            while True:
                status = (await srv.internal.get("/admin/status")).json()
                worker = next(a for a in status["actors"] if a["name"] == "worker-2")
                if worker["restarts"] == 1 and worker["state"] == "running":
                    break
                await trio.sleep(0.05)
        await workers_serving(srv)


@pytest.mark.parametrize("workers", [1, WORKERS])
async def test_a_500_way_redeem_race_over_the_workers_claims_exactly_once(
        tmp_path: Path, workers: int) -> None:
    # 500 connections at once: with one process too (hypercorn's own listen backlog of 100
    # used to answer such a burst with resets).
    async with running_server(tmp_path, workers=workers) as srv:
        await workers_serving(srv, workers)
        pid = PaymentId.generate()
        await srv.pay(pid, 777)  # answered once every worker has the id queued (I8)
        answers: list[dict[str, Any]] = []
        async with fresh_client(srv) as client:
            async def redeem() -> None:
                resp = await client.post("/api/v1/redeem", json={"pid": pid.hex()})
                assert resp.status_code == 200, resp.text  # never a 404: no false negative
                answers.append(resp.json())

            async with trio.open_nursery() as nursery:
                for _ in range(500):
                    nursery.start_soon(redeem)
        statuses = [a["status"] for a in answers]
        assert statuses.count("success") == 1, statuses.count("success")
        assert statuses.count("already_claimed") == 499
        assert len({a["service_token"] for a in answers}) == 1
        assert {a["balance"] for a in answers} == {777}


async def test_every_new_id_is_in_every_workers_filter_before_the_payment_is_acknowledged(
        tmp_path: Path) -> None:
    async with running_server(tmp_path, workers=WORKERS) as srv:
        await workers_serving(srv)
        async with fresh_client(srv) as client:
            for _ in range(30):
                pid = PaymentId.generate()
                await srv.pay(pid, 5)
                # straight after the acknowledgement, over fresh connections (both workers)
                codes = [(await client.post("/api/v1/redeem", json={"pid": pid.hex()})
                          ).status_code for _ in range(6)]
                assert 404 not in codes, codes


async def test_kill_9_of_a_worker_under_claim_load_loses_and_doubles_nothing(
        tmp_path: Path) -> None:
    async with running_server(tmp_path, workers=WORKERS) as srv:
        await workers_serving(srv)
        pids = [PaymentId.generate() for _ in range(300)]
        for pid in pids:
            await srv.pay(pid, 9)
        seen: dict[str, set[str]] = {p.hex(): set() for p in pids}
        successes: dict[str, int] = {p.hex(): 0 for p in pids}
        async with fresh_client(srv) as client:
            async def claim(pid: str) -> None:
                for _ in range(50):  # a client retries a failed connection or a 503
                    try:
                        resp = await client.post("/api/v1/redeem", json={"pid": pid})
                    except httpx.TransportError:
                        await trio.sleep(0.05)
                        continue
                    if resp.status_code == 503:
                        await trio.sleep(0.05)
                        continue
                    body = resp.json()
                    assert resp.status_code == 200, body
                    seen[pid].add(body["service_token"])
                    successes[pid] += body["status"] == "success"
                    return
                raise AssertionError(f"{pid} never answered")

            async with trio.open_nursery() as nursery:
                for i, pid in enumerate(pids):
                    nursery.start_soon(claim, pid.hex())
                    if i == 100:
                        os.kill(worker_os_pid(1), signal.SIGKILL)
            # the killed worker is back, and every claim resolves to the token its client saw
            await workers_serving(srv)
            for pid in pids:
                body = (await client.post("/api/v1/redeem", json={"pid": pid.hex()})).json()
                assert body["status"] == "already_claimed"
                assert seen[pid.hex()] == {body["service_token"]}
        assert all(n <= 1 for n in successes.values())  # never claimed twice
        status = (await srv.internal.get("/admin/status")).json()
        restarted = {a["name"]: a["restarts"] for a in status["actors"]}
        assert restarted["worker-1"] == 1 and restarted["worker-2"] == 0


async def test_a_restarted_worker_prewarms_and_misses_no_id_recorded_meanwhile(
        tmp_path: Path) -> None:
    async with running_server(tmp_path, workers=WORKERS) as srv:
        await workers_serving(srv)
        before = [PaymentId.generate() for _ in range(50)]
        for pid in before:
            await srv.pay(pid, 3)
        os.kill(worker_os_pid(2), signal.SIGKILL)
        during = []
        for _ in range(50):  # recorded while worker 2 is down and starting again
            pid = PaymentId.generate()
            await srv.pay(pid, 3)
            during.append(pid)
            await trio.sleep(0.02)
        await workers_serving(srv)
        async with fresh_client(srv) as client:
            for pid in before + during:
                for _ in range(3):
                    resp = await client.post("/api/v1/redeem", json={"pid": pid.hex()})
                    assert resp.status_code == 200, (pid.hex(), resp.text)


async def test_watchers_on_every_worker_get_the_events_in_order(tmp_path: Path) -> None:
    async with running_server(tmp_path, workers=WORKERS) as srv:
        await workers_serving(srv)
        pid = PaymentId.generate()
        url = srv.url.replace("http", "ws") + "/api/v1/watch"
        got: list[list[dict[str, Any]]] = []

        async def watch(ready: trio.Event, done: trio.Event) -> None:
            mine: list[dict[str, Any]] = []
            got.append(mine)
            async with open_websocket_url(url) as ws:
                await ws.send_message(json.dumps({"op": "subscribe", "pid": pid.hex()}))
                mine.append(json.loads(await ws.get_message()))
                ready.set()
                while len(mine) < 4:
                    mine.append(json.loads(await ws.get_message()))
            done.set()

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                dones = []
                for _ in range(12):
                    ready, done = trio.Event(), trio.Event()
                    nursery.start_soon(watch, ready, done)
                    await ready.wait()
                    dones.append(done)
                await srv.pay(pid, 100)
                await srv.pay(pid, 50)
                assert (await srv.redeem(pid.hex())).json()["status"] == "success"
        for mine in got:
            assert [(m["type"], m.get("seq")) for m in mine] == [
                ("state", 0), ("payment_confirmed", 1), ("payment_confirmed", 2),
                ("claimed", 3)], mine


async def test_a_top_up_reaches_every_workers_cache_before_it_is_acknowledged(
        tmp_path: Path) -> None:
    async with running_server(tmp_path, workers=WORKERS) as srv:
        await workers_serving(srv)
        async with fresh_client(srv) as client:
            for _ in range(20):
                pid = PaymentId.generate()
                await srv.pay(pid, 100)
                await client.post("/api/v1/redeem", json={"pid": pid.hex()})
                for _ in range(4):  # cached by now in whichever workers answered
                    await client.post("/api/v1/redeem", json={"pid": pid.hex()})
                await srv.pay(pid, 11)  # a top-up: acknowledged once every cache forgot it
                balances = {(await client.post("/api/v1/redeem", json={"pid": pid.hex()})
                             ).json()["balance"] for _ in range(6)}
                assert balances == {111}


async def test_one_metrics_scrape_on_the_owner_covers_every_worker(tmp_path: Path) -> None:
    async with running_server(tmp_path, workers=WORKERS) as srv:
        await workers_serving(srv)
        async with fresh_client(srv) as client:
            for _ in range(40):
                await client.post("/api/v1/redeem", json={"pid": PaymentId.generate().hex()})
        text = (await srv.internal.get("/metrics")).text
    families = {f.name: f for f in text_string_to_metric_families(text)}  # parses: valid
    assert text.count("# TYPE api_redeem_requests_total ") == 1  # each family once
    by_worker = {s.labels.get("worker"): s.value for s in families["api_redeem_requests"].samples
                 if s.labels.get("status") == "not_found"}
    assert set(by_worker) == {"1", "2"}  # each worker's (the owner serves no redeem)
    assert by_worker["1"] + by_worker["2"] == 40
    assert {s.labels.get("worker") for s in families["process_resident_memory_bytes"].samples
            } == {None, "1", "2"}
    assert families["anon_ticket_workers_scraped"].samples[0].value == WORKERS
    if shutil.which("promtool"):  # the exposition as Prometheus reads it
        checked = await trio.run_process(["promtool", "check", "metrics"], stdin=text.encode(),
                                         capture_stdout=True, capture_stderr=True, check=False)
        said = (checked.stdout + checked.stderr).decode().lower()
        assert "error" not in said, said


async def test_a_drain_reaches_every_worker(tmp_path: Path) -> None:
    async with running_server(tmp_path, workers=WORKERS) as srv:
        await workers_serving(srv)
        drained = (await srv.internal.post("/admin/drain")).json()
        assert drained == {"draining": True, "workers": WORKERS, "watchers_closing": 0}
        async with fresh_client(srv) as client:
            answers = [await client.post("/api/v1/redeem",
                                         json={"pid": PaymentId.generate().hex()})
                       for _ in range(20)]
        assert {(r.status_code, r.json()["error"]) for r in answers} == {
            (503, "service is draining")}


@pytest.mark.parametrize("reads", ["local", "owner"])
async def test_token_and_claimed_answers_are_the_same_read_locally_or_asked(
        tmp_path: Path, reads: str) -> None:
    async with running_server(tmp_path, workers=WORKERS, worker_reads=reads,
                              pid_cache_ttl_secs=0) as srv:  # nothing cached: every read
        await workers_serving(srv)
        pid = PaymentId.generate()
        await srv.pay(pid, 42)
        async with fresh_client(srv) as client:
            token = (await client.post("/api/v1/redeem", json={"pid": pid.hex()})
                     ).json()["service_token"]
            for _ in range(6):
                again = (await client.post("/api/v1/redeem", json={"pid": pid.hex()})).json()
                assert again == {"status": "already_claimed", "service_token": token,
                                 "balance": 42}
                info = await client.get(f"/api/v1/token/{token}")
                assert info.status_code == 200 and info.json()["status"] == "active"
            await srv.internal.post(f"/api/v1/token/{token}/revoke", json={"abuse_score": 3})
            for _ in range(6):  # every worker, at once
                info = (await client.get(f"/api/v1/token/{token}")).json()
                assert (info["status"], info["abuse_score"]) == ("revoked", 3)
            missing = await client.get("/api/v1/token/" + "ab" * 32)
            assert missing.status_code == 404
