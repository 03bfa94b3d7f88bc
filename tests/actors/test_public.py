"""The public API over real HTTP on loopback, byte for byte: README "Public HTTP API" and
docs/architecture.md §6."""

from __future__ import annotations

import os
import re
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import trio

from anon_ticket.domain.ids import PaymentId
from anon_ticket.domain.tokens import derive_hmac
from tests.actors.core import faulty_disk
from tests.harness import running_server, sqlite_only

HEX64 = re.compile(r"^[0-9a-f]{64}$")


def assert_json_error(resp: httpx.Response, status: int, text: str | None = None) -> None:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/json")
    body = resp.json()
    assert set(body) == {"error"}
    if text is not None:
        assert body["error"] == text
    assert "Traceback" not in resp.text and "sqlite" not in resp.text.lower()


async def test_redeem_success_then_already_claimed_in_any_case(tmp_path: Path) -> None:
    async with running_server(tmp_path) as srv:
        pid = PaymentId.generate()
        txid = os.urandom(32)
        await srv.pay(pid, 123_000_000_000, txid=txid)
        first = await srv.redeem(pid.hex().upper())
        assert first.status_code == 200
        body = first.json()
        assert body["status"] == "success"
        assert body["balance"] == 123_000_000_000
        assert HEX64.match(body["service_token"])
        secret = (srv.settings.data_dir / "token.secret").read_bytes()
        assert body["service_token"] == derive_hmac(secret, pid, txid.hex()).hex()
        second = await srv.redeem(pid.hex())
        assert second.json() == {"status": "already_claimed",
                                 "service_token": body["service_token"],
                                 "balance": 123_000_000_000}
        # a top-up after the claim shows in already_claimed
        await srv.pay(pid, 7)
        third = await srv.redeem(pid.hex())
        assert third.json()["balance"] == 123_000_000_007


async def test_redeem_errors_use_the_original_strings(tmp_path: Path) -> None:
    async with running_server(tmp_path) as srv:
        assert_json_error(await srv.redeem("0123456789abcdef"), 404, "payment not found")
        assert_json_error(await srv.redeem("0123"), 400,
                          "invalid payment id: payment id must be exactly 16 hex characters")
        assert_json_error(await srv.redeem("0123456789abcdeg"), 400,
                          "invalid payment id: payment id contains non-hex characters")
        assert_json_error(await srv.redeem("ü123456789abcdef"), 400,
                          "invalid payment id: payment id contains non-hex characters")
        assert_json_error(await srv.redeem("0" * 16), 400,
                          "invalid payment id: payment id must not be all zeros")


async def test_bad_bodies_are_4xx_json(tmp_path: Path) -> None:
    async with running_server(tmp_path) as srv:
        c = srv.client
        post = "/api/v1/redeem"
        json_ct = {"content-type": "application/json"}
        cases = [
            await c.post(post, content=b"{not json", headers=json_ct),
            await c.post(post, content=b'{"pid": 1' + b"1" * 5000 + b"}", headers=json_ct),
            await c.post(post, content=b"[" * 3000 + b"]" * 3000, headers=json_ct),
            await c.post(post, content=b'{"pid": 12345678901234567890}', headers=json_ct),
            await c.post(post, content=b'{"pid": null}', headers=json_ct),
            await c.post(post, content=b'["0123456789abcdef"]', headers=json_ct),
            await c.post(post, content=b"{}", headers=json_ct),
            await c.post(post, content=b"\xff\xfe\x00", headers=json_ct),
            await c.post(post, content=b'{"pid": "0123456789abcdef"}',
                         headers={"content-type": "text/plain"}),
            await c.post(post, content=b'{"pid": "0123456789abcdef"}'),
        ]
        for resp in cases:
            assert resp.status_code in (400, 413), (resp.status_code, resp.text)
            assert_json_error(resp, resp.status_code)
        big = await c.post(post, content=b'{"pid": "' + b"a" * 10_000 + b'"}', headers=json_ct)
        assert_json_error(big, 413, "request body too large")

        async def chunked() -> AsyncIterator[bytes]:  # no Content-Length: still limited
            yield b'{"pid": "'
            for _ in range(10):
                yield b"a" * 1000
            yield b'"}'

        streamed = await c.post(post, content=chunked(), headers=json_ct)
        assert_json_error(streamed, 413, "request body too large")


async def test_framework_errors_are_json(tmp_path: Path) -> None:
    async with running_server(tmp_path) as srv:
        c = srv.client
        assert_json_error(await c.get("/nope"), 404, "not found")
        assert_json_error(await c.get("/api/v1/redeem"), 405, "method not allowed")
        assert_json_error(await c.delete("/api/v1/token/" + "a" * 64), 405)
        assert_json_error(await c.get("/api/v1/token/"), 404)
        assert_json_error(await c.get("/api/v1/token/" + "a" * 64 + "/x"), 404)
        for trick in ("..%2F..%2Fhealthz", "%2e%2e", "%00" + "a" * 63, "a" * 64 + "%2Frevoke",
                      "a" * 10_000):
            resp = await c.get("/api/v1/token/" + trick)
            assert 400 <= resp.status_code < 500, (trick, resp.status_code)
            assert_json_error(resp, resp.status_code)


async def test_token_introspection(tmp_path: Path) -> None:
    async with running_server(tmp_path) as srv:
        pid = PaymentId.generate()
        await srv.pay(pid, 42)
        token = (await srv.redeem(pid.hex())).json()["service_token"]
        resp = await srv.client.get(f"/api/v1/token/{token.upper()}")
        assert resp.status_code == 200
        body = resp.json()
        assert set(body) == {"status", "amount", "issued_at", "revoked_at", "abuse_score"}
        assert (body["status"], body["amount"], body["revoked_at"], body["abuse_score"]) == (
            "active", 42, None, 0)
        assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$", body["issued_at"])
        assert_json_error(await srv.client.get("/api/v1/token/" + "ab" * 32), 404,
                          "payment not found")
        assert_json_error(await srv.client.get("/api/v1/token/abc"), 400,
                          "invalid token: service token must be exactly 64 hex characters")
        assert_json_error(await srv.client.get("/api/v1/token/" + "g" * 64), 400,
                          "invalid token: service token contains non-hex characters")


async def test_info_and_health(tmp_path: Path) -> None:
    primary = ("49XASeahoRpUSX2YtQx9qV1TVA3ozWTuF1361PZBTCuT1F6XhbkmbPdcmKjo"
               "rkm4UFh8HpXArx25SVnzxAXjSPCAVqajDFX")
    async with running_server(tmp_path, primary_address=primary,
                              min_confirmations=3) as srv:
        info = (await srv.client.get("/api/v1/info")).json()
        assert info == {"network": "mainnet", "primary_address": primary,
                        "min_confirmations": 3, "min_payment_amount": 10_000_000_000,
                        "version": info["version"]}
        # no wallet behind MONERO_RPC_URL: degraded, yet redemption works (200)
        health = await srv.client.get("/healthz")
        assert health.status_code == 200 and health.json()["status"] == "degraded"
        assert health.json()["actors"] == {"storage": True, "filter": True}
        assert health.json()["storage"] == {"writable": True, "error": None}


@sqlite_only("the full disk is injected through SQLite's VFS (PostgreSQL's lost database: "
             "tests/actors/test_storage_pg.py)")
async def test_healthz_is_503_naming_storage_while_no_write_commits(tmp_path: Path) -> None:
    # A full disk: every claim answered 503, yet /healthz said 200 "degraded" (blaming the
    # wallet). It must say storage cannot write, and why; and recover by itself once the
    # disk has room, before any claim arrives.
    with faulty_disk() as disk:
        async with running_server(tmp_path) as srv:
            pid = PaymentId.generate()
            await srv.pay(pid)
            assert (await srv.client.get("/healthz")).status_code == 200
            disk.full = True
            assert_json_error(await srv.redeem(pid.hex()), 503)
            health = await srv.client.get("/healthz")
            assert health.status_code == 503, health.text
            assert health.headers["Retry-After"]
            body = health.json()
            assert body["status"] == "unavailable"
            assert body["storage"] == {"writable": False, "error": "database or disk is full"}
            assert body["actors"] == {"storage": True, "filter": True}
            assert "chain" in body
            disk.full = False
            with trio.fail_after(10):  # no claim, no payment: health probes by itself
                while (health := await srv.client.get("/healthz")).status_code != 200:
                    await trio.sleep(0.05)
            assert health.json()["storage"] == {"writable": True, "error": None}
            assert (await srv.redeem(pid.hex())).json()["status"] == "success"


async def test_200_concurrent_redeems_of_one_pid_give_exactly_one_success(
        tmp_path: Path) -> None:
    async with running_server(tmp_path) as srv:
        pid = PaymentId.generate()
        await srv.pay(pid, 10**12)
        responses: list[httpx.Response] = []

        async def redeem() -> None:
            responses.append(await srv.redeem(pid.hex()))

        async with trio.open_nursery() as n:
            for _ in range(200):
                n.start_soon(redeem)
        assert all(r.status_code == 200 for r in responses), {r.status_code for r in responses}
        statuses = [r.json()["status"] for r in responses]
        assert statuses.count("success") == 1
        assert statuses.count("already_claimed") == 199
        assert len({r.json()["service_token"] for r in responses}) == 1


async def test_a_bloom_negative_does_no_storage_work(tmp_path: Path) -> None:
    async with running_server(tmp_path) as srv:
        claims = srv.tree.metrics.storage_requests.labels("claim")
        before = claims._value.get()
        for _ in range(20):
            assert (await srv.redeem(PaymentId.generate().hex())).status_code == 404
        assert claims._value.get() == before
        hints = srv.tree.metrics.redeem_cache_hints.labels("bloom_negative")._value.get()
        assert hints >= 20


async def test_public_listener_on_a_unix_socket(tmp_path: Path) -> None:
    sock = tmp_path / "pub.sock"
    async with running_server(tmp_path, unix_socket=sock) as srv:
        pid = PaymentId.generate()
        await srv.pay(pid)
        resp = await srv.redeem(pid.hex())
        assert resp.json()["status"] == "success"
    assert not sock.exists()  # removed on a graceful stop


async def test_legacy_derivation_matches_the_originals_vector_form(tmp_path: Path) -> None:
    from anon_ticket.domain.tokens import derive_legacy

    async with running_server(tmp_path, token_derivation="legacy") as srv:
        pid = PaymentId.generate()
        txid = os.urandom(32)
        await srv.pay(pid, txid=txid)
        body = (await srv.redeem(pid.hex())).json()
        assert body["service_token"] == derive_legacy(pid, txid.hex()).hex()


async def test_logs_never_hold_a_full_pid_or_token(tmp_path: Path,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    import logging

    caplog.set_level(logging.DEBUG)
    async with running_server(tmp_path) as srv:
        pid = PaymentId.generate()
        await srv.pay(pid)
        token = (await srv.redeem(pid.hex())).json()["service_token"]
        await srv.client.get(f"/api/v1/token/{token}")
        await srv.internal.post(f"/api/v1/token/{token}/revoke", json={"reason": "x"})
        await srv.pay(pid, 5)  # a top-up logs the pid (redacted)
        await srv.redeem("0123456789abcdef")
    ours = [r for r in caplog.records if not r.name.startswith(("httpx", "httpcore"))]
    text = "\n".join(f"{r.getMessage()} {getattr(r, 'fields', '')}" for r in ours)
    assert "topped up" in text and "revoked" in text  # the events were logged...
    for secret in (pid.hex(), token, "0123456789abcdef"):
        assert secret not in text  # ...but never in full
