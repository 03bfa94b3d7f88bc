"""Headless Chromium for the checkout page's tests (README, "Checkout page").

Debian's `chromium` and `chromium-driver` (installed by `scripts/setup.sh --test`); selenium
is pointed at both and never looks for, or downloads, a browser or a driver of its own.
Selenium blocks: a trio test that serves the page from its own loop calls it through
`in_thread`, so the loop goes on serving while the browser waits for it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import pytest
import trio
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.chrome.webdriver import WebDriver

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage")
T = TypeVar("T")


def new_driver(width: int = 1000, height: int = 1400, javascript: bool = True) -> WebDriver:
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.fail("chromium and chromium-driver are missing: run scripts/setup.sh --test")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--window-size={width},{height}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    if not javascript:  # as Tor Browser's "safer" mode does on a site that is not HTTPS
        options.add_experimental_option(
            "prefs", {"profile.managed_default_content_settings.javascript": 2})
    # A driver path given to Service keeps Selenium Manager (which would go looking for a
    # driver online) out of it.
    return webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)


@contextmanager
def chromium(width: int = 1000, height: int = 1400, javascript: bool = True
             ) -> Iterator[WebDriver]:
    driver = new_driver(width, height, javascript)
    try:
        yield driver
    finally:
        driver.quit()


async def in_thread(fn: Callable[..., T], *args: Any) -> T:
    return await trio.to_thread.run_sync(fn, *args)


def wait_until(predicate: Callable[[], T], timeout: float = 30.0, what: str = "") -> T:
    """Poll `predicate` (in the calling thread) until it returns something truthy."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what or predicate}")
        time.sleep(0.05)


def console(driver: WebDriver) -> list[dict[str, Any]]:
    """What the page logged to the console since the last call (errors, warnings, CSP)."""
    entries: list[dict[str, Any]] = driver.get_log("browser")
    return entries


def csp_violations(entries: list[dict[str, Any]]) -> list[str]:
    return [e["message"] for e in entries if "Content Security Policy" in e["message"]
            or "Refused to" in e["message"]]
