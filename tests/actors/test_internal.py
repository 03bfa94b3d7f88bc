"""The internal listener over its real unix socket (README "Internal socket", I9)."""

from __future__ import annotations

import errno
import json as jsonlib
import os
import re
import socket
import stat
import sys
import tarfile
from pathlib import Path
from typing import Any

import apsw
import httpx
import pytest
import trio

from actors.storage_pg import BACKUP_REFUSED
from anon_ticket.domain.ids import PaymentId
from anon_ticket.domain.messages import RecordTransfers, SkippedTransfer
from tests.actors.test_public import assert_json_error
from tests.harness import Server, on_postgres, running_server, sqlite_only

README = Path(__file__).resolve().parents[2] / "README.md"
# On PostgreSQL a backup that passes the route's checks reaches storage, which refuses it.
PG_BACKUP_REFUSED = BACKUP_REFUSED

INTERNAL_ROUTES = [
    ("GET", "/metrics"),
    ("GET", "/admin/status"),
    ("GET", "/admin/bloom"),
    ("GET", "/admin/skipped"),
    ("POST", "/admin/backup"),
    ("POST", "/admin/actors/storage/restart"),
    ("POST", "/admin/shutdown"),
    ("POST", "/admin/drain"),
    ("POST", "/admin/poller/pause"),
    ("POST", "/admin/poller/resume"),
    ("POST", "/admin/poller/rescan"),
    ("POST", "/api/v1/token/" + "a" * 64 + "/revoke"),
]


async def test_socket_is_private(tmp_path: Path) -> None:
    async with running_server(tmp_path) as srv:
        path = srv.settings.internal_socket_path
        assert path is not None
        st = path.lstat()
        assert stat.S_ISSOCK(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == 0o600
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700


async def test_public_listener_serves_no_internal_route(tmp_path: Path) -> None:
    async with running_server(tmp_path) as srv:
        for method, route in INTERNAL_ROUTES:
            resp = await srv.client.request(method, route, json={})
            assert_json_error(resp, 404)
        assert srv.tree.root.stop_reason is None  # the shutdown route did nothing


async def test_revoke(tmp_path: Path) -> None:
    async with running_server(tmp_path) as srv:
        pid = PaymentId.generate()
        await srv.pay(pid, 99)
        token = (await srv.redeem(pid.hex())).json()["service_token"]
        resp = await srv.internal.post(f"/api/v1/token/{token}/revoke",
                                       json={"reason": "abuse", "abuse_score": 12})
        assert resp.status_code == 200
        assert resp.json()["abuse_score"] == 12
        again = await srv.internal.post(f"/api/v1/token/{token}/revoke", json={})
        assert again.status_code == 200
        assert again.json()["reason"] == "abuse" and again.json()["abuse_score"] == 12
        view = (await srv.client.get(f"/api/v1/token/{token}")).json()
        assert view["status"] == "revoked" and view["revoked_at"].endswith("Z")
        assert view["abuse_score"] == 12
        # an empty body is valid, bad fields are 400, unknown tokens 404
        other = PaymentId.generate()
        await srv.pay(other)
        token2 = (await srv.redeem(other.hex())).json()["service_token"]
        assert (await srv.internal.post(f"/api/v1/token/{token2}/revoke")).status_code == 200
        for body in ({"abuse_score": 40000}, {"abuse_score": "x"}, {"abuse_score": True},
                     {"reason": 5}):
            resp = await srv.internal.post(f"/api/v1/token/{token}/revoke", json=body)
            assert_json_error(resp, 400)
        assert_json_error(await srv.internal.post(f"/api/v1/token/{'c' * 64}/revoke", json={}),
                          404, "payment not found")
        assert_json_error(await srv.internal.post("/api/v1/token/xyz/revoke", json={}), 400)


async def test_metrics_keep_the_original_names(tmp_path: Path) -> None:
    async with running_server(tmp_path) as srv:
        await srv.redeem(PaymentId.generate().hex())
        resp = await srv.internal.get("/metrics")
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/plain")
        text = resp.text
        for name in ("api_redeem_requests_total", "api_redeem_cache_hints_total",
                     "api_redeem_bloom_db_miss_total", "api_token_requests_total",
                     "monitor_wallet_height", "monitor_last_height", "monitor_rpc_calls_total",
                     "monitor_payments_ingested_total", "anon_ticket_mailbox_depth",
                     "anon_ticket_storage_batch_size", "anon_ticket_storage_commit_seconds"):
            assert name in text, name
        assert 'api_redeem_requests_total{status="not_found"} 1.0' in text
        assert "_created" not in text


async def test_every_actor_the_readme_names_restarts_and_the_server_serves_after(
        tmp_path: Path) -> None:
    readme = README.read_text()
    row = next(line for line in readme.splitlines()
               if line.startswith("| `POST /admin/actors/{name}/restart`"))
    named = set(re.findall(r"`([a-z]+)`", row.split("|")[3]))
    async with running_server(tmp_path) as srv:
        status = (await srv.internal.get("/admin/status")).json()
        running = {a["name"] for a in status["actors"]} | {
            c["name"] for a in status["actors"] for c in a.get("children", [])}
        # only with --dev-chain, and only on PostgreSQL
        assert named - running == ({"devchain"} if on_postgres() else {"devchain", "cluster"})
        assert running <= named, f"restartable but not in the README: {running - named}"
        pid = PaymentId.generate()
        await srv.pay(pid, 5)
        for name in sorted(running):
            # answered even when it is the internal listener itself that restarts
            assert (await srv.internal.post(f"/admin/actors/{name}/restart")).status_code == 200
            with trio.fail_after(10):
                while True:
                    try:
                        tree = (await srv.internal.get("/admin/status")).json()["actors"]
                    except httpx.TransportError:  # the internal listener, coming back
                        tree = []
                    if (tree and all(a["state"] == "running" for a in tree)
                            and (await srv.redeem(pid.hex())).status_code == 200):
                        break
                    await trio.sleep(0.05)


async def test_status_bloom_and_skipped(tmp_path: Path) -> None:
    async with running_server(tmp_path) as srv:
        status = (await srv.internal.get("/admin/status")).json()
        names = [a["name"] for a in status["actors"]]
        assert names == ["core", "hub", "poller", "public", "internal"]
        assert status["poller"]["wallet_reachable"] is False  # the harness has no wallet
        core = status["actors"][0]
        assert [c["name"] for c in core["children"]] == ["storage", "filter"] + (
            ["cluster"] if on_postgres() else [])
        assert all(c["state"] == "running" for c in core["children"])
        assert status["storage"]["tickets"] == 0
        bloom = (await srv.internal.get("/admin/bloom")).json()
        assert bloom["enabled"] and bloom["hashes"] > 0 and bloom["bits"] > 0
        txid = os.urandom(32)
        await srv.tree.mailboxes.storage.ask(RecordTransfers(
            (), (SkippedTransfer(txid, "dust", 5, 10),), cursor=10), 5)
        skipped = (await srv.internal.get("/admin/skipped")).json()["skipped"]
        assert skipped == [{"txid": txid.hex(), "reason": "dust", "amount": 5, "height": 10,
                            "recorded_at": skipped[0]["recorded_at"]}]
        assert_json_error(await srv.internal.get("/admin/skipped?limit=abc"), 400)


async def test_online_backup_and_actor_restart(tmp_path: Path) -> None:
    async with running_server(tmp_path) as srv:
        pid = PaymentId.generate()
        await srv.pay(pid)
        dest = tmp_path / "backups" / "b1.tar"
        dest.parent.mkdir()  # (a directory that does not exist is refused)
        resp = await srv.internal.post("/admin/backup", json={"path": str(dest)})
        if on_postgres():  # pg_dump's job: refused, saying so, and nothing written
            assert (resp.status_code, resp.json()) == (400, {"error": PG_BACKUP_REFUSED})
            assert not dest.exists()
        else:
            assert resp.status_code == 200, resp.text
            assert stat.S_IMODE(dest.stat().st_mode) == 0o600
            with tarfile.open(dest) as tar:
                assert set(tar.getnames()) == {"anon-ticket.db", "token.secret"}
                tar.extractall(tmp_path / "x", filter="data")
            conn = apsw.Connection(str(tmp_path / "x" / "anon-ticket.db"))
            assert conn.execute("SELECT count(*) FROM tickets").fetchone() == (1,)
        assert_json_error(await srv.internal.post("/admin/backup", json={"path": "rel"}), 400)

        resp = await srv.internal.post("/admin/actors/storage/restart")
        assert resp.status_code == 200
        assert_json_error(await srv.internal.post("/admin/actors/nobody/restart"), 404)
        # storage serves again after the restart, and nothing was lost
        for _ in range(100):
            r = await srv.redeem(pid.hex())
            if r.status_code == 200:
                break
        assert r.json()["status"] == "success"


async def test_internal_tcp_requires_its_bearer_token(tmp_path: Path) -> None:
    import httpx

    from tests.harness import free_port

    port = free_port()
    token = "t" * 32
    async with running_server(tmp_path, internal_bind_address=f"127.0.0.1:{port}",
                              internal_token=token) as srv:
        assert srv.settings.internal_socket_path is None
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as c:
            assert_json_error(await c.get("/admin/status"), 401, "unauthorized")
            wrong = await c.get("/admin/status", headers={"Authorization": "Bearer nope"})
            assert_json_error(wrong, 401)
            ok = await c.get("/admin/status", headers={"Authorization": f"Bearer {token}"})
            assert ok.status_code == 200


def _restarts(srv: Server) -> dict[str, int]:
    """Every actor's restart count (crashes and operator restarts alike)."""
    out: dict[str, int] = {}
    todo = list(srv.tree.root.status())
    while todo:
        state = todo.pop()
        out[state.name] = state.restarts
        todo.extend(state.children)
    return out


async def test_operator_input_is_refused_with_a_clear_400_and_crashes_nothing(
        tmp_path: Path) -> None:
    # An attack run crashed storage (then the poller) with a rescan from 10**30 and got a 500
    # for a backup to /proc/self/mem. Every field of every internal route is checked here.
    async with running_server(tmp_path, max_body_bytes=65536) as srv:
        pid = PaymentId.generate()
        await srv.pay(pid)
        token = (await srv.redeem(pid.hex())).json()["service_token"]
        before = _restarts(srv)
        sock = tmp_path / "a.sock"
        listener = socket.socket(socket.AF_UNIX)
        listener.bind(str(sock))
        fifo = tmp_path / "fifo"
        os.mkfifo(fifo)
        db = srv.settings.database_path
        # On PostgreSQL there is no database file (a path through it does not exist), and a
        # path that passes the route's checks reaches storage, which refuses every backup.
        pg = on_postgres()
        own_file = PG_BACKUP_REFUSED if pg else "the service's own files"

        async def post(route: str, json: dict[str, Any] | None = None) -> httpx.Response:
            # ASCII JSON, so a lone surrogate travels as `\ud800`, as any client may send it
            return await srv.internal.post(route, content=jsonlib.dumps(json or {}),
                                           headers={"content-type": "application/json"})

        bad: list[tuple[str, dict[str, Any], str]] = [
            *[("/admin/poller/rescan", {"from_height": h}, "`from_height` must be")
              for h in (10**30, 2**63, -1, "5", True, 1.5, None)],
            ("/admin/poller/rescan", {}, "`from_height` must be"),
            ("/admin/poller/rescan", {"from_height": 5, "to": 9}, "unknown field `to`"),
            ("/admin/backup", {"path": "/proc/self/mem"}, "special file system"),
            ("/admin/backup", {"path": "/dev/null"}, "special file system"),
            ("/admin/backup", {"path": "/sys/kernel/x.tar"}, "special file system"),
            ("/admin/backup", {"path": str(tmp_path / "no" / "b.tar")}, "does not exist"),
            ("/admin/backup", {"path": str(tmp_path)}, "is a directory"),
            ("/admin/backup", {"path": str(sock)}, "special file"),
            ("/admin/backup", {"path": str(fifo)}, "special file"),
            ("/admin/backup", {"path": str(db / "x.tar")},
             "does not exist" if pg else "is not a directory"),
            ("/admin/backup", {"path": str(db)}, own_file),
            ("/admin/backup", {"path": str(db.parent / "token.secret")}, own_file),
            ("/admin/backup", {"path": "/tmp/a\x00b"}, "without NUL"),
            ("/admin/backup", {"path": "/tmp/\ud800"}, "without NUL"),
            ("/admin/backup", {"path": "/" + "a" * 5000}, "at most 4096 bytes"),
            ("/admin/backup", {"path": "b.tar"}, "absolute path"),
            ("/admin/backup", {"path": ["/tmp/b.tar"]}, "absolute path"),
            ("/admin/backup", {"path": "/tmp/b.tar", "mode": 644}, "unknown field `mode`"),
            *[(f"/api/v1/token/{token}/revoke", body, "invalid request")
              for body in ({"reason": "a\x00b"}, {"reason": "\ud800"}, {"reason": "x" * 1025},
                           {"abuse_score": 10**30}, {"abuse_score": -(2**64)})],
            ("/admin/actors/" + "x" * 100 + "/restart", {}, "actor's name"),
            ("/admin/actors/Storage!/restart", {}, "actor's name"),
            *[(f"/admin/{route}", {"force": True}, "unknown field `force`")
              for route in ("poller/pause", "poller/resume", "drain", "shutdown",
                            "actors/storage/restart")],
        ]
        for route, body, text in bad:
            resp = await post(route, json=body)
            assert resp.status_code == 400, (route, body, resp.status_code, resp.text)
            if text != PG_BACKUP_REFUSED:  # (which names SQLite, on purpose)
                assert_json_error(resp, 400)
            assert text in resp.json()["error"], (route, body, resp.json())
        for raw in ("²", "0", "10001", "9" * 5000, "-1", "1e3", " 5"):
            resp = await srv.internal.get("/admin/skipped", params={"limit": raw})
            assert_json_error(resp, 400, "invalid request: limit must be an integer from 1 "
                                         "to 10000")
        assert_json_error(await post("/admin/actors/nobody/restart"), 404)
        # The harness has no wallet: its height is unknown, and a 503 says so.
        resp = await post("/admin/poller/rescan", json={"from_height": 5})
        assert_json_error(resp, 503)
        assert "wallet's height is not known" in resp.json()["error"]
        assert resp.headers["Retry-After"] == "5"
        listener.close()
        # Nothing crashed, restarted, stopped or drained; nothing was revoked or written.
        assert _restarts(srv) == before
        assert srv.tree.root.stop_reason is None
        view = (await srv.client.get(f"/api/v1/token/{token}")).json()
        assert view["status"] == "active"
        assert (await srv.redeem(pid.hex())).json()["status"] == "already_claimed"
        assert sorted(os.listdir(tmp_path)) == ["a.sock", "data", "fifo"]


@sqlite_only("the backup copies the SQLite file (on PostgreSQL the route refuses every "
             "backup: test_online_backup_and_actor_restart)")
@pytest.mark.parametrize("error", [errno.ENOSPC, errno.EROFS, errno.EACCES])
async def test_a_backup_that_cannot_be_written_is_a_400_that_says_why(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: int) -> None:
    from anon_ticket import backup

    def fail(*args: object) -> None:
        raise OSError(error, os.strerror(error))

    async with running_server(tmp_path) as srv:
        before = _restarts(srv)
        dest = tmp_path / "b.tar"
        monkeypatch.setattr(backup, "_copy_database", fail)
        resp = await srv.internal.post("/admin/backup", json={"path": str(dest)})
        assert_json_error(resp, 400, f"backup failed: cannot write {dest}: "
                                     f"{os.strerror(error)}")

        def full(*args: object) -> None:
            raise apsw.FullError("database or disk is full")

        monkeypatch.setattr(backup, "_copy_database", full)
        resp = await srv.internal.post("/admin/backup", json={"path": str(dest)})
        assert_json_error(resp, 400, f"backup failed: cannot copy the database to {tmp_path}: "
                                     "database or disk is full")
        assert os.listdir(tmp_path) == ["data"]  # nothing left behind
        assert _restarts(srv) == before


async def test_ctl_shows_the_servers_refusal_plainly(tmp_path: Path) -> None:
    async with running_server(tmp_path) as srv:
        sock = str(srv.settings.internal_socket_path)
        ctl = [sys.executable, "-m", "anon_ticket", "--data-dir", str(tmp_path / "ctl"), "ctl",
               "--socket", sock]
        done = await trio.run_process([*ctl, "backup", "/proc/self/mem"], check=False,
                                      capture_stdout=True, capture_stderr=True)
        lines = done.stderr.decode().splitlines()
        assert done.returncode == 2, lines
        assert len(lines) == 1 and lines[0].startswith("anon-ticket: 400 cannot write a "
                                                       "backup to /proc/"), lines
        assert lines[0].endswith("is on a special file system; choose a directory on a disk")
        done = await trio.run_process([*ctl, "poller", "rescan", "--from", str(10**30)],
                                      check=False, capture_stdout=True, capture_stderr=True)
        assert done.returncode == 2
        assert done.stderr.decode() == ("anon-ticket: 400 invalid request: `from_height` must "
                                        "be a non-negative integer (a block height)\n")
