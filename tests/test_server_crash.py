"""Crash safety of the whole server: `wasminfer serve` is SIGKILLed at random moments while clients
upload and deploy functions and models over HTTP, then restarted on the same data folder.

After every kill: the store passes its checks (SQLite integrity, every referenced blob present and
hashing to its name); after every restart: nothing failed to load, every acknowledged upload is
there with its version and digest, and every function serves exactly its current version (each
upload carries a tag that the function answers with). tests/test_store_crash.py does the same at
the store level, with many more writes per second.

The test suite runs a few rounds; `just crash` runs WASMINFER_CRASH_ROUNDS=50 and, with
WASMINFER_CRASH_REPORT=FILE, writes the rounds, acknowledged writes and losses there.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import wasmtime

from live_server import live_server
from wasminfer.store import Store

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROUNDS = int(os.environ.get("WASMINFER_CRASH_ROUNDS", "8"))

TAG = b"TAG-000000000000"  # replaced in the module's bytes: one distinct module per upload
TAGGED_WAT = f"""(module
  (import "wasminfer" "output" (func $output (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 16) "{TAG.decode()}")
  (func (export "wasminfer_abi_v1"))
  (func (export "wasminfer_alloc") (param i32) (result i32) (i32.const 1024))
  (func (export "wasminfer_handle") (param i32 i32 i32 i32) (result i32)
    (call $output (i32.const 16) (i32.const {len(TAG)}) (i32.const 0) (i32.const 0))))"""
FUNCTIONS = ("f0", "f1", "f2")
MODELS = ("m0", "m1")


def add_model(tag: str) -> bytes:
    """y = a + b, with `tag` in its doc string: distinct bytes per upload."""
    import onnx

    from conftest import make_add_model

    model = onnx.load_from_string(make_add_model())
    model.doc_string = tag
    return model.SerializeToString()


@contextmanager
def server(data: Path, log: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    with live_server(data, log, "--log-level", "warning", ready_timeout_s=90, stop=signal.SIGKILL) as running:
        yield running


class Workload:
    """Clients uploading until the server dies; what the server acknowledged, and every tag sent."""

    def __init__(self, url: str, rng: random.Random, module: bytes, seq: int) -> None:
        self.url, self.rng, self.module = url, rng, module
        self.acked: list[dict[str, Any]] = []
        self.tags: dict[str, str] = {}  # sha256 of every module sent (acknowledged or not) -> its tag
        self.seq = seq
        self._lock = threading.Lock()
        self.stop = threading.Event()

    def _next(self) -> int:
        with self._lock:
            self.seq += 1
            return self.seq

    def client(self, kind: str) -> None:
        import hashlib

        with httpx.Client(base_url=self.url, timeout=30) as http:
            while not self.stop.is_set():
                n = self._next()
                try:
                    if kind == "function":
                        name = self.rng.choice(FUNCTIONS)
                        tag = f"TAG-{n:012d}"
                        wasm = self.module.replace(TAG, tag.encode())
                        self.tags[hashlib.sha256(wasm).hexdigest()] = tag
                        r = http.put(f"/v1/functions/{name}?memory_mb=1", content=wasm,
                                     headers={"content-type": "application/wasm"})
                    else:
                        name = self.rng.choice(MODELS)
                        r = http.put(f"/v1/models/{name}", content=add_model(f"model {n}"),
                                     headers={"content-type": "application/octet-stream"})
                except httpx.TransportError:
                    return  # the server died
                assert r.status_code in (200, 201), r.text
                body = r.json()
                with self._lock:
                    self.acked.append({"kind": kind, "name": name, "version": body["version"],
                                       "sha256": body["sha256"]})


def verify_store(data: Path, acked: list[dict[str, Any]]) -> int:
    """Checks the store of a dead server; returns how many acknowledged writes it lost."""
    with Store(data) as store:
        assert store.check(verify_hashes=True) == []
        lost = 0
        for rec in acked:
            try:
                got = (store.get_function(rec["name"], rec["version"]) if rec["kind"] == "function"
                       else store.get_model(rec["name"], rec["version"]))
                lost += got.sha256 != rec["sha256"]
            except Exception:  # noqa: BLE001 - counted, then asserted by the caller
                lost += 1
        return lost


def verify_serving(url: str, acked: list[dict[str, Any]], tags: dict[str, str]) -> None:
    ready = httpx.get(f"{url}/readyz").json()["loaded"]
    assert ready["failures"] == [], ready
    latest: dict[tuple[str, str], int] = {}
    for rec in acked:
        key = (rec["kind"], rec["name"])
        latest[key] = max(latest.get(key, 0), rec["version"])
    for fn in httpx.get(f"{url}/v1/functions").json()["functions"]:
        assert fn["version"] >= latest.get(("function", fn["name"]), 0), fn  # nothing went back
        r = httpx.post(f"{url}/v1/functions/{fn['name']}/invoke", content=b"")
        assert r.status_code == 200, r.text
        assert r.content.decode() == tags[fn["sha256"]], (fn, r.content)  # exactly its current version
    for (kind, name), version in latest.items():
        if kind == "model":
            assert httpx.get(f"{url}/v1/models/{name}").json()["version"] >= version


@pytest.fixture(scope="module")
def tagged_module() -> bytes:
    wasm = bytes(wasmtime.wat2wasm(TAGGED_WAT))
    assert wasm.count(TAG) == 1
    return wasm


def test_sigkill_during_uploads_and_deploys_loses_nothing(tmp_path: Path, tagged_module: bytes) -> None:
    data, log = tmp_path / "data", tmp_path / "server.log"
    rng = random.Random(int(os.environ.get("WASMINFER_CRASH_SEED", "20240917")))
    acked: list[dict[str, Any]] = []
    tags: dict[str, str] = {}
    losses, seq, killed_busy = 0, 0, 0
    started = time.monotonic()
    for _ in range(ROUNDS):
        with server(data, log) as (url, proc):
            verify_serving(url, acked, tags)
            work = Workload(url, rng, tagged_module, seq)
            clients = [threading.Thread(target=work.client, args=(kind,))
                       for kind in ("function", "function", "model")]
            for c in clients:
                c.start()
            # Kill while uploads go on: after the first acknowledgement of the round, at a random
            # moment (a loaded machine may take seconds for one upload; the kill waits for it).
            deadline = time.monotonic() + 60
            while not work.acked and time.monotonic() < deadline and proc.poll() is None:
                time.sleep(0.01)
            time.sleep(rng.uniform(0.0, 0.5))
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            work.stop.set()
            for c in clients:
                c.join()
            killed_busy += bool(work.acked)
        seq, acked, tags = work.seq, acked + work.acked, {**tags, **work.tags}
        losses += verify_store(data, acked)
    with server(data, log) as (url, _):
        verify_serving(url, acked, tags)
    elapsed = time.monotonic() - started
    report = {"rounds": ROUNDS, "acknowledged_writes": len(acked), "losses": losses,
              "seconds": round(elapsed, 1)}
    if os.environ.get("WASMINFER_CRASH_REPORT"):
        Path(os.environ["WASMINFER_CRASH_REPORT"]).write_text(json.dumps(report, indent=1))
    print(report)
    assert losses == 0
    assert killed_busy == ROUNDS, "every kill should land while uploads were going on"
