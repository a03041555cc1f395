"""The web console (`/ui`) and the API docs (`/docs`) in a real headless browser (Debian's
`chromium`, driven by selenium through `chromium-driver`; .ci/run installs both) against a real
server with keys: the console refuses a wrong key with a visible message, shows a deployed
function's invocations rising as they are made (waiting on the page, never on a clock), shows a
read key everything it may read and makes none of its write controls work; the docs load only from
this server and send the key given to *Authorize*.

One browser and one server for the module (`xdist_group`). `WASMINFER_CONSOLE_SCREENSHOT=PATH`
saves the console as the test left it (docs/console.png was made so)."""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import httpx
import numpy as np
import pytest
from selenium import webdriver
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.ui import WebDriverWait

from live_server import live_server
from wasminfer.models import encode_tensors

pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("ui_browser")]

T = TypeVar("T")


@dataclass
class Served:
    url: str
    admin: str
    read: str
    api: httpx.Client  # with the admin key

    def stats(self, name: str) -> dict[str, Any]:
        found: dict[str, Any] = self.api.get("/v1/stats").raise_for_status().json()["functions"].get(name, {})
        return found


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, add_model: bytes, hostile_wasm: bytes
) -> Iterator[Served]:
    root = tmp_path_factory.mktemp("ui-browser")
    admin, read = (f"{role}-{secrets.token_hex(16)}" for role in ("adm", "rd"))
    keys = ("--key", f"{admin}:admin", "--key", f"{read}:read")
    with live_server(root / "data", root / "serve.log", *keys) as (url, _):
        with httpx.Client(base_url=url, headers={"authorization": f"Bearer {admin}"}, timeout=60) as api:
            onnx = {"content-type": "application/octet-stream"}
            api.put("/v1/models/add?max_batch_size=8", content=add_model, headers=onnx).raise_for_status()
            wasm = {"content-type": "application/wasm"}
            # two versions, so that the console offers to roll back to the first
            for memory in (4, 8):
                r = api.put(
                    f"/v1/functions/echo?models=add&memory_mb={memory}", content=hostile_wasm, headers=wasm
                )
                r.raise_for_status()
            yield Served(url, admin, read, api)


@pytest.fixture(scope="module")
def browser() -> Iterator[WebDriver]:
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    assert chromium and driver, "apt-get install chromium chromium-driver (.ci/run installs them)"
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    # --no-sandbox: CI runs as root, where Chromium's own sandbox refuses to start
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1900"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    chrome = webdriver.Chrome(options=options, service=Service(driver))
    try:
        yield chrome
    finally:
        chrome.quit()


def wait(browser: WebDriver, until: Callable[[WebDriver], T], what: str, timeout_s: float = 20) -> T:
    """What `until` returns once it is truthy, polled on the page (no fixed sleeps)."""
    try:
        result: T = WebDriverWait(browser, timeout_s, poll_frequency=0.05).until(until)
    except TimeoutException:
        raise AssertionError(f"the page never showed {what}") from None
    return result


def text(browser: WebDriver, css: str) -> str:
    """The text of the first element `css` selects ("" if none), read in one step: the console
    redraws its tables every second, so an element found in one call may be gone by the next."""
    found: str = browser.execute_script(
        "const e = document.querySelector(arguments[0]); return e ? e.innerText : ''", css
    )
    return found.strip()


def click(browser: WebDriver, css: str) -> None:
    """Clicks the element `css` selects now (found and clicked in one step, as `text` reads)."""
    assert browser.execute_script(
        "const e = document.querySelector(arguments[0]); e?.click(); return !!e", css
    ), css


def open_console(browser: WebDriver, server: Served, key: str) -> None:
    browser.get(f"{server.url}/ui")
    browser.execute_script("sessionStorage.clear()")
    browser.refresh()
    field = wait(
        browser,
        lambda b: b.find_element(By.ID, "key").is_displayed() and b.find_element(By.ID, "key"),
        "the key form",
    )
    assert isinstance(field, WebElement)
    field.send_keys(key)
    browser.find_element(By.CSS_SELECTOR, "#key-form button").click()


def signed_in(browser: WebDriver, server: Served, key: str) -> None:
    open_console(browser, server, key)
    wait(browser, lambda b: b.find_element(By.ID, "app").is_displayed(), "the console")
    wait(
        browser, lambda b: text(b, "tr[data-function=echo] td[data-col=version]") == "v2", "the echo function"
    )


def invoke(server: Served, body: bytes, times: int = 1) -> None:
    for _ in range(times):
        server.api.post("/v1/functions/echo/invoke", content=body)


def test_a_wrong_key_is_refused_with_a_visible_message(browser: WebDriver, server: Served) -> None:
    open_console(browser, server, "wik_not_a_key_" + secrets.token_hex(8))
    message = wait(browser, lambda b: text(b, "#key-error"), "the refusal")
    assert message == "The server refused this key: invalid or revoked API key."
    assert not browser.find_element(By.ID, "app").is_displayed()
    assert browser.execute_script("return sessionStorage.getItem('wasminfer.key')") is None  # forgotten


def test_the_console_shows_a_functions_invocations_rising(browser: WebDriver, server: Served) -> None:
    signed_in(browser, server, server.read)
    shown = lambda b: int(text(b, "tr[data-function=echo] td[data-col=invocations]").replace(",", ""))  # noqa: E731
    start = wait(browser, lambda b: str(shown(b)), "the invocation count")
    assert int(start) == sum(server.stats("echo").get("invocations", {}).values())
    invoke(server, b"ghello", 5)
    wait(browser, lambda b: shown(b) == int(start) + 5, f"{int(start) + 5} invocations")
    tensors = b"i" + encode_tensors({"a": np.ones((1, 3), np.float32), "b": np.ones((1, 3), np.float32)})
    invoke(server, tensors, 6)
    invoke(server, b"t")  # a trap: an error
    wait(browser, lambda b: shown(b) == int(start) + 12, f"{int(start) + 12} invocations")
    row = "tr[data-function=echo]"
    wait(browser, lambda b: float(text(b, f"{row} td[data-col=rate]") or 0) > 0, "a rate above zero")
    assert (
        int(text(browser, f"{row} td[data-col=errors]"))
        == server.stats("echo")["invocations"]["guest_trap"]
        >= 1
    )
    assert text(browser, f"{row} td[data-col=p99]").endswith(" ms")
    wait(
        browser, lambda b: int(text(b, "tr[data-model=add] td[data-col=runs]") or 0) >= 6, "the model's runs"
    )
    assert text(browser, "tr[data-model=add] td[data-col=session]") == "loaded"
    # the log tail of the function, live
    click(browser, row)
    wait(browser, lambda b: "hello from the guest" in text(b, "#logs"), "the guest's log line")
    invoke(server, b"ghello")
    wait(browser, lambda b: text(b, "#logs").count("hello from the guest") >= 6, "a new log line")
    assert "guest_trap" in text(browser, "#logs")
    charts = browser.find_elements(By.CSS_SELECTOR, "#overview figure.chart svg polyline")
    assert charts, "no line drawn in the overview charts"
    target = os.environ.get("WASMINFER_CONSOLE_SCREENSHOT")
    if target:
        browser.execute_script("window.scrollTo(0, 0)")
        assert browser.save_screenshot(str(Path(target).resolve()))


def test_a_read_key_sees_data_but_no_write_control_works(browser: WebDriver, server: Served) -> None:
    signed_in(browser, server, server.read)
    assert text(browser, "#who") == "tenant default · read"
    click(browser, "tr[data-function=echo]")
    state = "const b = document.querySelector(arguments[0]); return b && [b.disabled, b.title]"
    rollback = "tr[data-version='1'] button"
    assert wait(browser, lambda b: b.execute_script(state, rollback), "version 1's button") == [
        True,
        "needs a key with the admin scope",
    ]
    assert browser.execute_script(state, "#invoke") == [True, "needs a key with the invoke scope"]
    assert (
        text(browser, "#jobs-note")
        == "Jobs hold invocation outputs: only a key with the invoke scope sees them."
    )
    # Forced (as anyone can with the browser's tools), the API still refuses, and the page says so.
    before = sum(server.stats("echo")["invocations"].values())
    force = (
        "for (const css of arguments) { "
        "const b = document.querySelector(css); b.disabled = false; b.click() }"
    )
    browser.execute_script(force, rollback, "#invoke")
    notice = wait(browser, lambda b: text(b, "#notice"), "the refused rollback")
    assert notice.startswith(
        "Rolling echo back to v1 failed: 403 forbidden: this API key lacks the 'admin' scope"
    )
    result = wait(
        browser, lambda b: "403" in text(b, "#invoke-result") and text(b, "#invoke-result"), "the refusal"
    )
    assert "403 forbidden: this API key lacks the 'invoke' scope" in result
    assert server.api.get("/v1/functions/echo").json()["version"] == 2
    assert sum(server.stats("echo")["invocations"].values()) == before
    # the same controls work for a key that has the scope
    signed_in(browser, server, server.admin)
    click(browser, "tr[data-function=echo]")
    body = wait(browser, lambda b: b.find_element(By.ID, "invoke-body"), "the invoke form")
    body.clear()
    body.send_keys("eabc")
    browser.find_element(By.ID, "invoke").click()
    wait(browser, lambda b: text(b, "#invoke-result").startswith("200 "), "the function's answer")
    assert text(browser, "#invoke-result").endswith("\neabc")
    assert text(browser, "#jobs-note").startswith("No jobs")


def test_the_docs_come_from_this_server_and_send_the_authorized_key(
    browser: WebDriver, server: Served
) -> None:
    browser.get(f"{server.url}/docs")
    op = "#operations-functions-list_functions"
    wait(browser, lambda b: b.find_elements(By.CSS_SELECTOR, op), "the list_functions operation")
    loaded = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert (
        f"{server.url}/static/swagger-ui/swagger-ui-bundle.js" in loaded
        and f"{server.url}/openapi.json" in loaded
    )
    assert {urlsplit(u).netloc for u in loaded} == {urlsplit(server.url).netloc}, loaded
    # Markdown rendered: the overview's error table and code spans
    assert "function_not_found" in text(browser, ".information-container table")
    assert "Authorization: Bearer KEY" in [
        c.text for c in browser.find_elements(By.CSS_SELECTOR, ".info code")
    ]
    # Authorize with the read key, then send GET /v1/functions from the page
    browser.find_element(By.CSS_SELECTOR, ".auth-wrapper .authorize").click()
    field = wait(browser, lambda b: b.find_element(By.CSS_SELECTOR, ".auth-container input"), "the key field")
    field.send_keys(server.read)
    browser.find_element(By.CSS_SELECTOR, ".auth-btn-wrapper .modal-btn.authorize").click()
    browser.find_element(By.CSS_SELECTOR, ".auth-btn-wrapper .btn-done").click()
    browser.find_element(By.CSS_SELECTOR, f"{op} .opblock-summary-control").click()
    wait(browser, lambda b: b.find_element(By.CSS_SELECTOR, f"{op} .try-out__btn"), "Try it out").click()
    wait(browser, lambda b: b.find_element(By.CSS_SELECTOR, f"{op} .execute"), "Execute").click()
    status = f"{op} .live-responses-table .response .response-col_status"
    wait(browser, lambda b: text(b, status), "the response")
    assert text(browser, status) == "200"
    answer = text(browser, f"{op} .live-responses-table .response .response-col_description")
    assert '"name": "echo"' in answer
    assert f"Authorization: Bearer {server.read}" in text(browser, f"{op} .curl-command")
    problems = [e for e in browser.get_log("browser") if "Content Security Policy" in e["message"]]
    assert not problems, problems
