"""The internal listener over its real unix socket (DESIGN §5, I9)."""

from __future__ import annotations

import os
import stat
import tarfile
from pathlib import Path

import apsw

from anon_ticket.domain.ids import PaymentId
from anon_ticket.domain.messages import RecordTransfers, SkippedTransfer
from tests.actors.test_public import assert_json_error
from tests.harness import running_server

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


async def test_status_bloom_and_skipped(tmp_path: Path) -> None:
    async with running_server(tmp_path) as srv:
        status = (await srv.internal.get("/admin/status")).json()
        names = [a["name"] for a in status["actors"]]
        assert names == ["core", "hub", "poller", "public", "internal"]
        assert status["poller"]["wallet_reachable"] is False  # the harness has no wallet
        core = status["actors"][0]
        assert [c["name"] for c in core["children"]] == ["storage", "filter"]
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
        resp = await srv.internal.post("/admin/backup", json={"path": str(dest)})
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
