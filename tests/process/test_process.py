"""The real process: signals, the data-directory lock, sockets, kill -9, exit codes, CLI."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from anon_ticket.domain.ids import PaymentId
from tests.process.proc import (
    LegacyRow,
    cli,
    import_legacy,
    kill,
    start_server,
    write_legacy_db,
)

pytestmark = pytest.mark.process


def legacy_rows(n: int) -> list[LegacyRow]:
    """`n` payments of the original (pid, txid, amount, height), random ids."""
    return [(PaymentId.generate().raw, os.urandom(32).hex(), 10**12 + i, 100 + i % 7)
            for i in range(n)]


def prepared(tmp_path: Path, n: int,
             env: dict[str, str] | None = None) -> tuple[Path, list[str]]:
    """A data directory whose database (its SQLite file, or `DATABASE_URL` in `env`) holds
    `n` unclaimed tickets, imported as an operator would (`db import-legacy`)."""
    rows = legacy_rows(n)
    data = tmp_path / "data"
    import_legacy(data, write_legacy_db(tmp_path / "legacy.db", rows), env=env)
    return data, [r[0].hex() for r in rows]


def redeem(url: str, pid: str) -> httpx.Response:
    return httpx.post(f"{url}/api/v1/redeem", json={"pid": pid}, timeout=10)


def test_sigterm_exits_0_and_the_lock_refuses_a_second_server(tmp_path: Path) -> None:
    data, pids = prepared(tmp_path, 3)
    server = start_server(data)
    try:
        assert redeem(server.url, pids[0]).json()["status"] == "success"
        second = start_server(data, wait=False)
        assert second.wait_exit() == 2
        assert "in use by another anon-ticket process" in second.log()
        # writers refuse while the server holds the directory; readers work online
        refused = cli(data, "db", "import-legacy", str(tmp_path / "legacy.db"))
        assert refused.returncode == 1 and "in use" in refused.stderr
        check = cli(data, "db", "check")
        assert check.returncode == 0, check.stdout + check.stderr
        backup = cli(data, "db", "backup", str(tmp_path / "online.tar"))
        assert backup.returncode == 0, backup.stderr
    finally:
        server.signal(signal.SIGTERM)
    assert server.wait_exit() == 0
    assert "stopped" in server.log()
    assert not server.internal_socket.exists()


def test_serve_without_a_chain_is_a_usage_error(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "MONERO_RPC_URL"}
    done = cli(tmp_path / "data", "serve", env=env | {"MONERO_RPC_URL": ""})
    assert done.returncode == 2
    assert "MONERO_RPC_URL" in done.stderr
    bad = cli(tmp_path / "data", "--min-confirmations", "zero", "serve")
    assert bad.returncode == 2 and "min-confirmations" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_a_stale_socket_is_replaced_a_live_one_is_not(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    stale = data / "internal.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(stale))
    s.close()  # the file stays, nobody listens: stale
    server = start_server(data)
    try:
        with server.internal() as internal:
            assert internal.get("/admin/status").status_code == 200
        # a second server (own data dir) pointed at the live socket refuses, leaving it alone
        other = start_server(tmp_path / "other", wait=False,
                             env={"API_INTERNAL_UNIX_SOCKET": str(stale)})
        assert other.wait_exit() == 2
        assert "live socket" in other.log()
        with server.internal() as internal:
            assert internal.get("/admin/status").status_code == 200
        # and a regular file in the way is never removed
        blocker = tmp_path / "blocker"
        blocker.write_text("keep me")
        third = start_server(tmp_path / "third", wait=False,
                             env={"API_INTERNAL_UNIX_SOCKET": str(blocker)})
        assert third.wait_exit() == 2
        assert blocker.read_text() == "keep me"
    finally:
        server.stop()


@pytest.mark.parametrize("workers", [1, 2])
def wait_for_no_workers(owner: int, timeout: float = 10) -> list[int]:
    """Worker processes of the killed `owner` still running after `timeout` seconds: its
    children, or orphans (re-parented to init). They should notice their link close and end."""
    deadline = time.monotonic() + timeout
    while True:
        found = subprocess.run(["pgrep", "-f", "anon_ticket.worker"], capture_output=True,
                               text=True).stdout.split()
        left = [int(p) for p in found if _parent(int(p)) in (owner, 1)]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.05)


def _parent(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def test_workers_still_starting_die_with_their_owner_and_free_the_port(tmp_path: Path) -> None:
    """A kill -9 of the owner while its workers are still starting (importing, prewarming:
    nothing in them reads the link yet): the kernel ends them with it (PR_SET_PDEATHSIG),
    so the public port is free for the restart at once, not when they notice."""
    server = start_server(tmp_path / "data", args=("--workers", "2"), wait=False)
    deadline = time.monotonic() + 30
    while server.log().count('"worker started"') < 2:
        assert time.monotonic() < deadline and server.proc.poll() is None, server.log()
        time.sleep(0.005)
    kill(server)
    orphans = wait_for_no_workers(server.proc.pid, timeout=1.0)
    assert not orphans, f"workers outlived their owner: {orphans}"
    probe = socket.socket()
    try:
        probe.bind(("127.0.0.1", server.port))  # nothing listens on it any more
    finally:
        probe.close()


@pytest.mark.parametrize("workers", [1, 2])
def test_sigkill_during_a_burst_of_claims_loses_no_token(tmp_path: Path, workers: int) -> None:
    """I3: claim and token are one transaction; a success a client saw survives a kill -9
    (with worker processes: of the owner, whose workers then end by themselves)."""
    data, pids = prepared(tmp_path, 400)
    args = ("--workers", str(workers))
    server = start_server(data, args=args)
    seen: dict[str, str] = {}
    lock = threading.Lock()
    killed = threading.Event()

    def worker(chunk: list[str]) -> None:
        with httpx.Client(timeout=10) as client:
            for pid in chunk:
                if killed.is_set():
                    return
                try:
                    resp = client.post(f"{server.url}/api/v1/redeem", json={"pid": pid})
                except httpx.TransportError:
                    return
                body = resp.json()
                assert resp.status_code == 200, body
                with lock:
                    seen[pid] = body["service_token"]
                    if len(seen) >= 150 and not killed.is_set():
                        killed.set()
                        kill(server)

    chunks = [pids[i::16] for i in range(16)]
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(worker, chunks))
    assert killed.is_set() and server.proc.returncode == -signal.SIGKILL
    assert 150 <= len(seen) < 400
    orphans = wait_for_no_workers(server.proc.pid)
    assert not orphans, f"workers outlived their owner: {orphans}"

    check = cli(data, "db", "check")
    assert check.returncode == 0, check.stdout + check.stderr
    server = start_server(data, args=args)  # the lock of the killed process is gone with it
    try:
        with httpx.Client(timeout=10) as client:
            for pid, token in seen.items():
                body = client.post(f"{server.url}/api/v1/redeem", json={"pid": pid}).json()
                assert body == {"status": "already_claimed", "service_token": token,
                                "balance": body["balance"]}
            for pid in pids:
                if pid in seen:
                    continue
                first = client.post(f"{server.url}/api/v1/redeem", json={"pid": pid}).json()
                # committed but unanswered when killed → already_claimed; else a fresh success
                assert first["status"] in ("success", "already_claimed")
                again = client.post(f"{server.url}/api/v1/redeem", json={"pid": pid}).json()
                assert again["status"] == "already_claimed"
                assert again["service_token"] == first["service_token"]
        with server.internal() as internal:  # the process's garbage-collector tuning
            text = internal.get("/metrics").text
        assert 'anon_ticket_gc_seconds_total{generation="2"}' in text
        assert 'anon_ticket_gc_threshold{generation="0"} 10000.0' in text  # not Python's 700
    finally:
        server.stop()
    final = json.loads(cli(data, "db", "check", "--json").stdout.rsplit("}", 1)[0] + "}")
    assert final["claimed"] == 400


def test_a_database_that_cannot_be_reopened_escalates_to_exit_1(tmp_path: Path) -> None:
    data, _ = prepared(tmp_path, 2)
    server = start_server(data, args=("--restart-intensity", "2", "--backoff-initial-secs",
                                      "0.01", "--backoff-max-secs", "0.05"))
    db = data / "anon-ticket.db"
    garbage = tmp_path / "garbage"
    garbage.write_bytes(os.urandom(8192))
    os.replace(garbage, db)  # the disk now holds something that is not a database
    with server.internal() as internal:
        assert internal.post("/admin/actors/storage/restart").status_code == 200
    assert server.wait_exit() == 1
    assert "giving up" in server.log()


def test_operator_cli(tmp_path: Path) -> None:
    data, pids = prepared(tmp_path, 2)
    server = start_server(data)
    try:
        token = redeem(server.url, pids[0]).json()["service_token"]
        sock = ["ctl", "--json", "--socket", str(server.internal_socket)]  # scripts' format
        status = cli(data, *sock, "status")
        assert status.returncode == 0
        assert json.loads(status.stdout)["storage"]["claimed"] == 1
        revoked = cli(data, *sock, "revoke", token, "--reason", "spam", "--abuse-score", "3")
        assert revoked.returncode == 0 and json.loads(revoked.stdout)["abuse_score"] == 3
        assert cli(data, *sock, "revoke", "ab" * 32).returncode == 3  # not found
        assert cli(data, "ctl", "skipped").returncode == 0  # socket found through the data dir
        assert cli(data, *sock, "backup", str(tmp_path / "b.tar")).returncode == 0
        paused = cli(data, *sock, "poller", "pause")
        assert paused.returncode == 0 and json.loads(paused.stdout)["state"] == "paused"
        resumed = cli(data, *sock, "poller", "resume")
        assert json.loads(resumed.stdout)["state"] != "paused"
        assert cli(data, *sock, "poller", "rescan").returncode == 2  # needs --from
        rescan = cli(data, *sock, "poller", "rescan", "--from", "5")
        assert rescan.returncode == 0 and json.loads(rescan.stdout)["cursor"] == 4
        assert json.loads(cli(data, *sock, "bloom").stdout)["enabled"] is True
        assert cli(data, *sock, "restart", "filter").returncode == 0
        assert cli(data, *sock, "restart", "nobody").returncode == 3
        assert json.loads(cli(data, *sock, "drain").stdout)["draining"] is True
        assert redeem(server.url, pids[1]).status_code == 503
    finally:
        server.stop()
    log = server.log()
    assert "audit: revoke" in log
    assert token not in log and pids[0] not in log and token not in revoked.stderr
    restore = cli(data, "db", "restore", str(tmp_path / "b.tar"))
    assert restore.returncode == 0, restore.stderr
    out = cli(data, "pid", "new", "--address",
              "49XASeahoRpUSX2YtQx9qV1TVA3ozWTuF1361PZBTCuT1F6XhbkmbPdcmKjo"
              "rkm4UFh8HpXArx25SVnzxAXjSPCAVqajDFX")
    lines = out.stdout.splitlines()
    assert lines[0].startswith("Payment ID: ") and len(lines[0]) == len("Payment ID: ") + 16
    assert lines[1].startswith("Integrated address: 4") and len(lines[1]) == 20 + 106
    bad = cli(data, "pid", "new", "--address", "nonsense")
    assert bad.returncode == 2 and "invalid address" in bad.stderr


def test_client_commands_and_watch_across_a_restart(tmp_path: Path) -> None:
    import subprocess
    import sys

    data, pids = prepared(tmp_path, 3)
    server = start_server(data)
    url = server.url
    try:
        first = cli(data, "redeem", pids[0], "--url", url)
        assert first.returncode == 0 and json.loads(first.stdout)["status"] == "success"
        token = json.loads(first.stdout)["service_token"]
        again = cli(data, "redeem", pids[0].upper(), "--url", url)
        assert json.loads(again.stdout)["status"] == "already_claimed"
        assert cli(data, "redeem", "0123456789abcdef", "--url", url).returncode == 3
        assert cli(data, "redeem", "xyz", "--url", url).returncode == 2
        shown = cli(data, "token", "show", token, "--url", url)
        assert shown.returncode == 0 and json.loads(shown.stdout)["status"] == "active"
        assert cli(data, "token", "show", "ab" * 32, "--url", url).returncode == 3
        timed_out = cli(data, "watch", PaymentId.generate().hex(), "--url", url,
                        "--timeout", "1")
        assert timed_out.returncode == 4
        assert json.loads(timed_out.stdout.splitlines()[0])["status"] == "waiting"

        # watch until claimed; the server restarts meanwhile: it reconnects and resumes
        watch = subprocess.Popen(
            [sys.executable, "-m", "anon_ticket", "watch", pids[1], "--url", url,
             "--until", "claimed", "--timeout", "60"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert watch.stdout is not None
        state = json.loads(watch.stdout.readline())
        assert (state["type"], state["status"]) == ("state", "claimable")
        server.stop()
        server = start_server(data, port=server.port)
        assert redeem(url, pids[1]).json()["status"] == "success"
        out, err = watch.communicate(timeout=60)
        assert watch.returncode == 0, err
        lines = [json.loads(line) for line in out.splitlines()]
        # resumed before the claim: the live `claimed` event; after it: the replay buffer
        # died with the old server, so `gap` and a `state` that says claimed
        last = lines[-1]
        assert last["type"] == "claimed" or (last["type"], last["status"]) == (
            "state", "claimed"), lines
        seqs = [m["seq"] for m in lines if "seq" in m]
        assert len(seqs) == len(set(seqs))  # resumed: nothing repeated
        assert "reconnecting" in err
    finally:
        server.stop()


def test_drain_then_shutdown_with_redeems_in_flight(tmp_path: Path) -> None:
    data, pids = prepared(tmp_path, 300)
    server = start_server(data)
    results: dict[str, tuple[int, dict[str, object]]] = {}
    errors: list[str] = []
    lock = threading.Lock()
    drained = threading.Event()

    def worker(chunk: list[str]) -> None:
        with httpx.Client(timeout=10) as client:
            for pid in chunk:
                try:
                    resp = client.post(f"{server.url}/api/v1/redeem", json={"pid": pid})
                except httpx.TransportError as exc:
                    errors.append(type(exc).__name__)
                    return
                with lock:
                    results[pid] = (resp.status_code, resp.json())
                    if len(results) == 60 and not drained.is_set():
                        drained.set()
                        with server.internal() as internal:
                            assert internal.post("/admin/drain").status_code == 200
                if resp.status_code == 503:
                    return  # draining: this client stops, as a client should

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(worker, [pids[i::16] for i in range(16)]))
    with server.internal() as internal:
        assert internal.post("/admin/shutdown").status_code == 200
    assert server.wait_exit() == 0
    assert not errors
    statuses = {status for status, _ in results.values()}
    assert statuses <= {200, 503} and 503 in statuses
    succeeded = {pid: body["service_token"] for pid, (status, body) in results.items()
                 if status == 200}
    assert len(succeeded) >= 60
    server = start_server(data)
    try:
        with httpx.Client(base_url=server.url, timeout=10) as client:
            for pid, token in succeeded.items():
                assert client.get(f"/api/v1/token/{token}").status_code == 200
                body = client.post("/api/v1/redeem", json={"pid": pid}).json()
                assert (body["status"], body["service_token"]) == ("already_claimed", token)
    finally:
        server.stop()


def test_idle_keep_alive_clients_do_not_hold_up_a_stop(tmp_path: Path) -> None:
    # A reverse proxy keeps idle keep-alive connections open: SIGTERM must still stop the
    # server at once (it waited out the whole 10 s grace with quart-trio's connection class).
    server = start_server(tmp_path / "data")
    public = socket.create_connection(("127.0.0.1", server.port))
    internal = socket.socket(socket.AF_UNIX)
    internal.connect(str(server.internal_socket))
    try:
        for sock in (public, internal):
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
                         if sock is public else
                         b"GET /admin/status HTTP/1.1\r\nHost: x\r\n\r\n")
            assert sock.recv(65536).startswith(b"HTTP/1.1 200")  # now idle, kept alive
        started = time.monotonic()
        server.signal(signal.SIGTERM)
        assert server.wait_exit(timeout=8) == 0
        assert time.monotonic() - started < 5
        public.settimeout(5)
        while public.recv(65536):  # the rest of the response, then the server's close
            pass
    finally:
        public.close()
        internal.close()
        server.stop()
