"""Makes docs/console.png: a real server on 127.0.0.1 with two functions and a batching model,
a minute and a half of uneven traffic (bursts, a few errors), and the console in headless
Chromium. Not a test (pytest does not collect it); run it from the repository's root:

    PYTHONPATH=host python tests/console_screenshot.py [docs/console.png]
"""

from __future__ import annotations

import math
import secrets
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import wasmtime
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from conftest import GUESTS, make_add_model
from live_server import ROOT, live_server
from wasminfer.models import encode_tensors

SECONDS = 90


def traffic(api: httpx.Client, stop: threading.Event) -> None:
    ones = np.ones((1, 3), np.float32)
    tensors = b"i" + encode_tensors({"a": ones, "b": ones})
    started = time.monotonic()
    n = 0
    while not stop.is_set():
        t = time.monotonic() - started
        burst = 1 + math.sin(t / 9) ** 2 * 6  # waves of load
        api.post("/v1/functions/echo/invoke", content=b"ghello")
        if n % 2 == 0:
            api.post("/v1/functions/tensor-add/invoke", content=tensors)
        if n % 97 == 0:
            api.post("/v1/functions/tensor-add/invoke", content=b"t")  # a trap now and then
        n += 1
        time.sleep(0.05 / burst)


def main(target: Path) -> None:
    root = Path(tempfile.mkdtemp(prefix="console-shot-"))
    admin = f"adm-{secrets.token_hex(16)}"
    with live_server(root / "data", root / "serve.log", "--key", f"{admin}:admin") as (url, _):
        api = httpx.Client(base_url=url, headers={"authorization": f"Bearer {admin}"}, timeout=60)
        onnx, wasm = {"content-type": "application/octet-stream"}, {"content-type": "application/wasm"}
        api.put("/v1/models/add?max_batch_size=8", content=make_add_model(), headers=onnx).raise_for_status()
        module = bytes(wasmtime.wat2wasm((GUESTS / "hostile.wat").read_text()))
        for name in ("echo", "tensor-add"):
            api.put(
                f"/v1/functions/{name}?models=add&memory_mb=4", content=module, headers=wasm
            ).raise_for_status()
        options = webdriver.ChromeOptions()
        for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1500"):
            options.add_argument(arg)
        browser = webdriver.Chrome(options=options, service=Service("/usr/bin/chromedriver"))
        stop = threading.Event()
        worker = threading.Thread(target=traffic, args=(api, stop))
        try:
            browser.get(f"{url}/ui")
            browser.find_element(By.ID, "key").send_keys(admin)
            browser.find_element(By.CSS_SELECTOR, "#key-form button").click()
            WebDriverWait(browser, 20).until(
                lambda b: b.find_elements(By.CSS_SELECTOR, "tr[data-function=echo]")
            )
            worker.start()
            time.sleep(SECONDS)  # a picture of a minute and a half of traffic: the wait is the point
            browser.execute_script("document.querySelector('tr[data-function=\"tensor-add\"]').click()")
            time.sleep(3)
            browser.save_screenshot(str(target))
        finally:
            stop.set()
            if worker.is_alive():
                worker.join()
            browser.quit()
            api.close()
    print(f"wrote {target}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "docs" / "console.png")
