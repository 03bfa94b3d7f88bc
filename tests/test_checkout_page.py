"""The checkout page as the public listener serves it (README, "Checkout page"): its files,
headers and Content-Security-Policy; the page itself in headless Chromium under that policy
(the address it builds, the QR code it draws, reload, forget, a dropped watch socket); and the
HTML redeem form for browsers without JavaScript, over plain HTTP.

No chain here (the payment side is tests/e2e/test_checkout_browser.py): the server is told its
primary address, and payments are recorded straight into storage.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import httpx
import pytest
import segno
import trio
from monero.seed import Seed
from selenium.webdriver.chrome.webdriver import WebDriver
from selenium.webdriver.common.by import By

from anon_ticket import checkout
from anon_ticket.domain.address import integrated_address
from anon_ticket.domain.ids import PaymentId
from tests.browser import chromium, console, csp_violations, in_thread, wait_until
from tests.harness import Server, running_server

PRIMARY = str(Seed("11" * 32).public_address())
FORM = {"content-type": "application/x-www-form-urlencoded"}
SECURITY = {
    "content-security-policy": checkout.CSP,
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "x-frame-options": "DENY",
}


def assert_secured(resp: httpx.Response) -> None:
    for name, value in SECURITY.items():
        assert resp.headers.get(name) == value, (resp.request.url, name)


# --- what is served -----------------------------------------------------------------------


async def test_the_page_and_its_files_are_served_with_their_types_and_policy(
        tmp_path: Path) -> None:
    async with running_server(tmp_path, primary_address=PRIMARY,
                              min_confirmations=7) as srv:
        page = await srv.client.get("/")
        assert page.status_code == 200
        assert page.headers["content-type"] == "text/html; charset=utf-8"
        assert_secured(page)
        csp = page.headers["content-security-policy"]
        assert "script-src 'self';" in csp and "default-src 'none'" in csp
        assert "unsafe-inline" not in csp and "unsafe-eval" not in csp and "http" not in csp
        html = page.text
        # every script is a file of ours, and nothing in the page runs inline
        scripts = re.findall(r"<script\b([^>]*)>(.*?)</script>", html, re.S)
        assert [re.search(r'src="([^"]+)"', attrs)[1] for attrs, _ in scripts] == [  # type: ignore[index]
            "/checkout/address.js", "/checkout/qr.js", "/checkout/checkout.js"]
        assert all(body.strip() == "" for _, body in scripts)
        assert not re.search(r"\son\w+\s*=|\sstyle\s*=|javascript:", html, re.I)
        assert not re.search(r"(src|href)=\"(https?:)?//", html)  # nothing from elsewhere
        assert "{{" not in html
        # the server-rendered part for browsers without JavaScript
        nojs = html[html.index("<noscript>"):html.index("</noscript>")]
        assert PRIMARY in nojs and "0.01 XMR" in nojs and "7 confirmations" in nojs
        assert 'action="/redeem"' in html and 'name="pid"' in html
        head = await srv.client.head("/")
        assert head.status_code == 200 and head.content == b""

        sources = []
        for name, content_type in checkout.ASSETS.items():
            resp = await srv.client.get(f"/checkout/{name}")
            assert resp.status_code == 200, name
            assert resp.headers["content-type"] == content_type
            assert_secured(resp)
            again = await srv.client.get(f"/checkout/{name}",
                                         headers={"If-None-Match": resp.headers["etag"]})
            assert again.status_code == 304 and again.content == b""
            if name.endswith(".js"):
                sources.append(resp.text)
        for source in sources:  # what CSP would refuse anyway: no eval, no string timers
            assert not re.search(r"\beval\s*\(|new Function|set(Timeout|Interval)\(\s*['\"]",
                                 source)
            assert "innerHTML" not in source and "document.write" not in source
        for path in ("/checkout/", "/checkout/index.html", "/checkout/../checkout.py",
                     "/static/checkout.js", "/index.html"):
            resp = await srv.client.get(path)
            assert resp.status_code == 404, path
            assert resp.headers["content-type"] == "application/json"
        for method, path in (("POST", "/"), ("GET", "/redeem"), ("PUT", "/checkout/qr.js")):
            resp = await srv.client.request(method, path)
            assert resp.status_code == 405, (method, path)
            assert resp.json() == {"error": "method not allowed"}


async def test_without_a_known_primary_address_the_page_says_so(tmp_path: Path) -> None:
    async with running_server(tmp_path) as srv:  # its wallet never answers
        page = await srv.client.get("/")
        assert page.status_code == 200
        assert "not known yet" in page.text


# --- the page in a browser ----------------------------------------------------------------

BITS = bytes.maketrans(b"\x00\x01", b"01")


def drawn_modules(driver: WebDriver) -> set[tuple[int, int]]:
    path = driver.find_element(By.CSS_SELECTOR, "#qr svg path").get_attribute("d") or ""
    return {(int(x) - 4, int(y) - 4) for x, y in re.findall(r"M(\d+) (\d+)h1v1h-1z", path)}


def segno_modules(uri: str, version: int, mask: int, monkeypatch: pytest.MonkeyPatch
                  ) -> set[tuple[int, int]]:
    # segno with its padding set to the codeword boundary (see tests/test_checkout_js.py)
    monkeypatch.setattr(segno.encoder, "write_padding_bits",
                        lambda buff, version, length: buff.extend([0] * ((8 - length % 8) % 8)))
    qr = segno.make(uri.encode(), version=version, error="m", mask=mask, mode="byte",
                    boost_error=False, micro=False)
    monkeypatch.undo()
    return {(x, y) for y, row in enumerate(qr.matrix) for x, bit in enumerate(row) if bit}


def text(driver: WebDriver, element_id: str) -> str:
    return driver.find_element(By.ID, element_id).text


def attr(driver: WebDriver, element_id: str, name: str) -> str | None:
    return driver.find_element(By.ID, element_id).get_attribute(name)


def stored_pid(driver: WebDriver) -> str | None:
    value: str | None = driver.execute_script(
        "var s = JSON.parse(localStorage.getItem('anon-ticket.checkout') || 'null');"
        " return s && s.pid;")
    return value


def phase(driver: WebDriver) -> str | None:
    return attr(driver, "status", "data-phase")


def browse(srv: Server, monkeypatch: pytest.MonkeyPatch, seen: dict[str, Any]) -> None:
    """The browser side of the page test (a thread: the server runs on the test's loop);
    `seen` is shared with it."""
    with chromium() as driver:
        driver.get(srv.url + "/")
        wait_until(lambda: phase(driver) == "waiting", 20, "the watch state")
        assert driver.find_element(By.ID, "checkout").is_displayed()
        pid = text(driver, "pid")
        assert stored_pid(driver) == pid
        address = text(driver, "address")
        assert address == integrated_address(PRIMARY, PaymentId.parse(pid))
        assert text(driver, "status") == "Waiting for your payment: nothing seen yet."

        # A state may carry `pending` (transfers seen, not credited yet): the deepest is shown.
        def state(**extra: Any) -> None:
            driver.execute_script("AnonTicket.checkout.receive(arguments[0]);", {
                "type": "state", "pid": pid, "seq": 0, "epoch": 1, "status": "waiting",
                "balance": 0, **extra})

        state(pending=[
            {"amount": 5 * 10**11, "in_pool": True, "confirmations": 0, "required": 10},
            {"amount": 10**12, "in_pool": False, "confirmations": 2, "required": 10}])
        assert text(driver, "status") == "2 of 10 confirmations for 1 XMR."
        state()  # without `pending` (it is not required): what was seen stands
        assert text(driver, "status") == "2 of 10 confirmations for 1 XMR."
        state(pending=[{"amount": 5 * 10**11, "in_pool": True, "confirmations": 0,
                        "required": 10}])
        assert text(driver, "status") == (
            "Payment of 0.5 XMR seen in the pool: waiting for it to be mined.")
        state(pending=[])  # nothing pending
        assert text(driver, "status") == "Waiting for your payment: nothing seen yet."
        assert text(driver, "network") == "mainnet"
        assert text(driver, "min-amount") == "0.01"
        uri = f"monero:{address}?tx_amount=0.01"
        assert text(driver, "uri-text") == uri and attr(driver, "uri", "href") == uri
        qr = driver.find_element(By.ID, "qr")
        version, mask = int(qr.get_attribute("data-version") or 0), int(
            qr.get_attribute("data-mask") or 0)
        assert drawn_modules(driver) == segno_modules(uri, version, mask, monkeypatch)

        amount = driver.find_element(By.ID, "amount")
        amount.clear()
        amount.send_keys("1.25")
        assert text(driver, "uri-text") == f"monero:{address}?tx_amount=1.25"
        assert not driver.find_element(By.ID, "amount-error").is_displayed()
        amount.clear()
        amount.send_keys("0.001")
        assert "Below the minimum" in text(driver, "amount-error")
        assert text(driver, "uri-text") == f"monero:{address}"
        amount.clear()
        amount.send_keys("0.5")

        # a reload resumes the same payment id (and the amount)
        driver.refresh()
        wait_until(lambda: phase(driver) == "waiting", 20, "the state after a reload")
        assert (text(driver, "pid"), text(driver, "address")) == (pid, address)
        assert driver.find_element(By.ID, "amount").get_attribute("value") == "0.5"
        assert f"Resumed payment id {pid}." in text(driver, "log")

        # the watch socket drops (the public listener restarts): the page says so, backs
        # off and comes back by itself
        seen["restart"] = True
        wait_until(lambda: seen.get("restarted"), 20, "the listener's restart")
        seen["dropped"] = wait_until(
            lambda: attr(driver, "connection", "data-state") == "retrying"
            and text(driver, "connection"), 20, "the page to notice the drop")
        wait_until(lambda: attr(driver, "connection", "data-state") == "open", 30,
                   "the page to reconnect")
        wait_until(lambda: phase(driver) == "waiting", 20, "a fresh state")
        assert not driver.find_element(By.ID, "connection").is_displayed()

        # forget: two clicks (the first one warns), then a new payment id and address
        forget = driver.find_element(By.ID, "forget")
        forget.click()
        assert "Click again" in forget.text
        assert stored_pid(driver) == pid
        forget.click()
        wait_until(lambda: text(driver, "pid") != pid, 10, "a new payment id")
        assert stored_pid(driver) == text(driver, "pid") != pid
        assert text(driver, "address") == integrated_address(
            PRIMARY, PaymentId.parse(text(driver, "pid")))
        wait_until(lambda: phase(driver) == "waiting", 20, "the new id's state")

        entries = console(driver)
        seen["violations"] = csp_violations(entries)
        seen["severe"] = [e["message"] for e in entries if e["level"] == "SEVERE"]
        # The check can fail: an inline script is refused, and the console says so.
        ran = driver.execute_script(
            "var s = document.createElement('script'); s.textContent = 'window.inline = 1';"
            " document.head.appendChild(s); return window.inline === 1;")
        seen["inline_ran"] = ran
        seen["injected"] = csp_violations(console(driver))


async def test_the_page_in_a_browser_under_its_policy(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    result: dict[str, Any] = {}
    async with running_server(tmp_path, primary_address=PRIMARY) as srv:

        async def restart_when_asked() -> None:
            while not result.get("restart"):
                await trio.sleep(0.05)
            resp = await srv.internal.post("/admin/actors/public/restart")
            assert resp.status_code == 200, resp.text
            result["restarted"] = True

        async with trio.open_nursery() as nursery:
            nursery.start_soon(restart_when_asked)
            try:
                await in_thread(browse, srv, monkeypatch, result)
            finally:
                nursery.cancel_scope.cancel()
    assert result["violations"] == []
    # the only errors a restart may log are the refused reconnects while it was down
    assert all("WebSocket" in m or "ERR_CONNECTION_REFUSED" in m for m in result["severe"]), \
        result["severe"]
    assert "server is restarting" in result["dropped"] and "Reconnecting in" in result["dropped"]
    assert result["inline_ran"] is False
    assert any("inline script" in m for m in result["injected"]), result["injected"]


# --- the form, without JavaScript ---------------------------------------------------------


def redeem_without_javascript(url: str, pid: str) -> dict[str, Any]:
    with chromium(javascript=False) as driver:
        driver.get(url + "/")
        out: dict[str, Any] = {
            "app_shown": driver.find_element(By.ID, "app").is_displayed(),
            "nojs": driver.find_element(By.ID, "nojs").text,
        }
        field = driver.find_element(By.ID, "redeem-pid")
        field.send_keys(pid)
        field.submit()
        wait_until(lambda: driver.find_elements(By.TAG_NAME, "h1")
                   and driver.current_url.endswith("/redeem"), 10, "the form's answer")
        out["title"] = driver.find_element(By.TAG_NAME, "h1").text
        out["token"] = driver.find_element(By.ID, "token").text
        out["violations"] = csp_violations(console(driver))
    return out


async def test_a_browser_without_javascript_pays_by_hand_and_redeems_with_the_form(
        tmp_path: Path) -> None:
    async with running_server(tmp_path, primary_address=PRIMARY) as srv:
        pid = PaymentId.generate()
        await srv.pay(pid, 10**12)
        out = await in_thread(redeem_without_javascript, srv.url, pid.hex())
        token = (await srv.redeem(pid.hex())).json()["service_token"]
    assert out["app_shown"] is False  # the scripted part stays hidden
    assert "Paying without JavaScript" in out["nojs"] and PRIMARY in out["nojs"]
    assert out["title"] == "Your service token" and out["token"] == token
    assert out["violations"] == []


async def form(srv: Server, body: bytes | dict[str, str], headers: dict[str, str] | None = None
               ) -> httpx.Response:
    content = body if isinstance(body, bytes) else "&".join(
        f"{k}={v}" for k, v in body.items()).encode()
    resp = await srv.client.post("/redeem", content=content, headers=headers or FORM)
    assert resp.headers["content-type"] == "text/html; charset=utf-8", resp.text
    assert resp.headers["cache-control"] == "no-store"
    assert_secured(resp)
    assert "Traceback" not in resp.text and "<script" not in resp.text
    return resp


def shown_token(resp: httpx.Response) -> str:
    found = re.search(r'<code id="token" class="secret">([0-9a-f]{64})</code>', resp.text)
    assert found is not None, resp.text
    return found[1]


async def redeemed(srv: Server) -> dict[str, float]:
    metrics = (await srv.internal.get("/metrics")).text
    return {m[1]: float(m[2]) for m in re.finditer(
        r'^api_redeem_requests_total\{status="(\w+)"\} (\S+)$', metrics, re.M)}


async def test_the_form_redeems_through_the_api(tmp_path: Path) -> None:
    async with running_server(tmp_path, primary_address=PRIMARY) as srv:
        pid = PaymentId.generate()
        await srv.pay(pid, 3 * 10**12)
        before = await redeemed(srv)
        first = await form(srv, {"pid": f"%20{pid.hex().upper()}%0A"})  # pasted, padded
        assert first.status_code == 200
        token = shown_token(first)
        assert "Credited: 3 XMR." in first.text and "redeemed before" not in first.text
        # the same redeem logic: the API now says already claimed, with the same token, and
        # the API's counters counted the form's redeem
        api = (await srv.redeem(pid.hex())).json()
        assert (api["status"], api["service_token"]) == ("already_claimed", token)
        after = await redeemed(srv)
        assert after.get("success", 0) == before.get("success", 0) + 1
        again = await form(srv, {"pid": pid.hex()})
        assert again.status_code == 200 and shown_token(again) == token
        assert "redeemed before" in again.text
        assert (await srv.client.get(f"/api/v1/token/{token}")).json()["status"] == "active"

        unknown = await form(srv, {"pid": PaymentId.generate().hex()})
        assert unknown.status_code == 404 and "No payment to this payment id" in unknown.text
        assert (await redeemed(srv)).get("not_found", 0) == after.get("not_found", 0) + 1


REFUSALS: list[tuple[bytes | dict[str, str], dict[str, str] | None, int, str]] = [
    ({"pid": "0123"}, None, 400, "payment id must be exactly 16 hex characters"),
    ({"pid": "0" * 16}, None, 400, "must not be all zeros"),
    ({"pid": "%3Cscript%3Ealert(1)%3C%2Fscript%3E"}, None, 400, "invalid payment id"),
    ({"pid": "0123456789abcdeg"}, None, 400, "non-hex characters"),
    ({"other": "x"}, None, 400, "send exactly one field `pid`"),
    (b"pid=0123456789abcdef&pid=0123456789abcdef", None, 400, "exactly one field"),
    (b"pid=%ff%fe", None, 400, "the form could not be read"),
    (b"pid=\xff\xfe", None, 400, "the form could not be read"),
    (b"&".join(b"f%d=1" % i for i in range(20)), None, 400, "the form could not be read"),
    (b'{"pid":"0123456789abcdef"}', {"content-type": "application/json"}, 400,
     "content type must be application/x-www-form-urlencoded"),
    (b"pid=" + b"a" * 2000, None, 413, "too large"),
]


async def test_the_form_refuses_clearly(tmp_path: Path) -> None:
    async with running_server(tmp_path, primary_address=PRIMARY) as srv:
        for body, headers, status, says in REFUSALS:
            resp = await form(srv, body, headers)
            assert (resp.status_code, says in resp.text) == (status, True), (body, resp.text)
            assert "alert(1)" not in resp.text


async def test_a_chunked_form_over_the_limit_and_a_draining_server(tmp_path: Path) -> None:
    async with running_server(tmp_path, primary_address=PRIMARY, max_body_bytes=256) as srv:
        async def chunks() -> Any:
            for _ in range(8):
                yield b"pid=" + b"a" * 100

        resp = await srv.client.post("/redeem", content=chunks(), headers=FORM)
        assert resp.status_code == 413 and "too large" in resp.text
        assert resp.headers["content-type"] == "text/html; charset=utf-8"
        assert (await srv.internal.post("/admin/drain")).status_code == 200
        resp = await form(srv, {"pid": PaymentId.generate().hex()})
        assert resp.status_code == 503
        assert resp.headers["retry-after"] == "5"
        assert "temporarily unavailable" in resp.text and "Try again in 5 s" in resp.text


async def test_what_the_pages_show_is_escaped() -> None:
    # Nothing a client sends is echoed today (the API's errors name no input); escaping is
    # the rule all the same, for the form's answers and the page's server-rendered part.
    page = checkout._result_page("<i>t</i>", ["<script>alert(1)</script>"], 400,
                                 token="<b>tok</b>")
    text = await page.get_data(as_text=True)
    assert "<script>" not in text and "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert "<b>tok</b>" not in text and "<i>t</i>" not in text
    rendered = checkout._render("<p>{{primary_address}}</p>", {"primary_address": "<x>&"})
    assert rendered == "<p>&lt;x&gt;&amp;</p>"
