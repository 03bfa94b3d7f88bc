"""The checkout page end to end on the session's regtest chain, in headless Chromium (README,
"Checkout page"): the page draws a payment id and builds its integrated address, the dev
wallet pays the address read from the page, blocks are mined, and the page shows the
payment seen in the pool, k of N confirmations, claimable, then redeems it and shows the
token; the token is live on the API, a reload shows it again, and forget starts over. The
console holds no Content-Security-Policy violation (nor any other error) all along.

With ANON_TICKET_SCREENSHOT=1 it also saves the page with its token to docs/checkout.png.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import httpx
import pytest
from selenium.webdriver.chrome.webdriver import WebDriver
from selenium.webdriver.common.by import By

from anon_ticket.devchain import DevChainInfo
from anon_ticket.domain.address import integrated_address
from anon_ticket.domain.ids import PaymentId
from tests.browser import chromium, console, csp_violations, in_thread, wait_until
from tests.chain import mine_sync, pay_sync
from tests.e2e.test_chain import CONFS, XMR, server_for, wait_scanned

pytestmark = pytest.mark.chain

SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "checkout.png"
AMOUNT = XMR // 5


def text(driver: WebDriver, element_id: str) -> str:
    return driver.find_element(By.ID, element_id).text


def phase(driver: WebDriver) -> str | None:
    return driver.find_element(By.ID, "status").get_attribute("data-phase")


def status_is(driver: WebDriver, wanted: str) -> bool:
    return wanted in text(driver, "status")


def token_shown(driver: WebDriver) -> str:
    box = driver.find_element(By.ID, "token-box")
    return text(driver, "token") if box.is_displayed() else ""


def screenshot(driver: WebDriver) -> None:
    """The whole page: the window is made as tall as the page (plus its own frame)."""
    height, frame = driver.execute_script(
        "return [document.documentElement.scrollHeight,"
        " window.outerHeight - window.innerHeight];")
    driver.set_window_size(900, int(height) + int(frame))
    driver.save_screenshot(str(SCREENSHOT))


def pay_with_the_page(url: str, info: DevChainInfo) -> dict[str, Any]:
    """The payer's side, in a thread (the server runs on the test's trio loop)."""
    out: dict[str, Any] = {}
    with chromium(900, 1400) as driver:
        driver.get(url + "/")
        wait_until(lambda: phase(driver) == "waiting", 30, "the watch state")
        pid = text(driver, "pid")
        address = text(driver, "address")
        assert address == integrated_address(info.primary_address, PaymentId.parse(pid))
        out["pid"] = pid
        amount = driver.find_element(By.ID, "amount")
        amount.clear()
        amount.send_keys("0.2")
        assert text(driver, "uri-text") == f"monero:{address}?tx_amount=0.2"

        pay_sync(info, address, AMOUNT)
        wait_until(lambda: status_is(driver, "seen in the pool"), 60, "the pool sighting")
        assert phase(driver) == "seen"
        for k in range(1, CONFS):
            mine_sync(info, 1)
            wait_until(lambda k=k: status_is(driver, f"{k} of {CONFS} confirmations"), 60,
                       f"{k} of {CONFS}")
            assert phase(driver) == "confirming"
        mine_sync(info, 1)  # the N-th: credited, claimable, redeemed by the page
        token = wait_until(lambda: token_shown(driver), 60, "the token")
        out["token"] = token
        assert phase(driver) == "redeemed"
        assert text(driver, "status") == "Redeemed: your token is below."
        assert text(driver, "balance") == "Credited to this payment id: 0.2 XMR."
        out["log"] = text(driver, "log").splitlines()
        out["token_info"] = httpx.get(f"{url}/api/v1/token/{token}", trust_env=False).json()
        if os.environ.get("ANON_TICKET_SCREENSHOT") == "1":
            screenshot(driver)

        driver.refresh()  # the payment id was kept: the page redeems again, same token
        assert wait_until(lambda: token_shown(driver), 30, "the token again") == token
        assert text(driver, "pid") == pid
        assert text(driver, "status") == "Redeemed earlier: your token is below."

        forget = driver.find_element(By.ID, "forget")
        forget.click()
        forget.click()
        wait_until(lambda: text(driver, "pid") != pid, 10, "a new payment id")
        wait_until(lambda: phase(driver) == "waiting", 30, "the new id's state")
        assert not driver.find_element(By.ID, "token-box").is_displayed()
        assert driver.execute_script(
            "return JSON.parse(localStorage.getItem('anon-ticket.checkout')).pid;") == text(
            driver, "pid")
        entries = console(driver)
        out["violations"] = csp_violations(entries)
        out["severe"] = [e["message"] for e in entries if e["level"] == "SEVERE"]
    return out


async def test_a_payer_pays_from_the_page_and_gets_a_token(
        tmp_path: Path, regtest_chain: DevChainInfo) -> None:
    info = regtest_chain
    async with server_for(tmp_path, info.watch_wallet_url) as srv:
        await wait_scanned(srv, info)
        out = await in_thread(pay_with_the_page, srv.url, info)
    assert out["violations"] == [] and out["severe"] == []
    assert out["token_info"]["status"] == "active"
    assert out["token_info"]["amount"] == AMOUNT
    log = out["log"]

    def first(words: str) -> int:
        found = [i for i, line in enumerate(log) if words in line]
        assert found, (words, log)
        return found[0]

    steps = ["seen in the pool", "1 of 3 confirmations", "2 of 3 confirmations",
             "claimable", "Redeemed: your token"]
    assert CONFS == 3
    at = [first(step) for step in steps]
    assert at == sorted(at), log
