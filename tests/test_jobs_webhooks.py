"""Completion webhooks (jobs/webhooks.py) against a real HTTP receiver on 127.0.0.1: retries with
doubling waits until a 2xx, `failed` after `webhook_attempts` (5), redirects never followed, and a
webhook left pending by a shutdown delivered by the next start. The waits are
`JobSettings.webhook_backoff_s` (1 s by default), shortened here."""

from __future__ import annotations

import http.server
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from test_jobs import app_client, wait_job
from wasminfer.gateway import create_app
from wasminfer.jobs import JobSettings
from wasminfer.service import Platform


@pytest.fixture
def platform(tmp_path: Path) -> Iterator[Platform]:
    p = Platform(tmp_path / "data")
    yield p
    p.close()


@dataclass
class Received:
    path: str
    job: str
    body: dict[str, Any]
    at: float


@dataclass
class Receiver:
    """Answers each POST with the next status of `script` (the last one repeats); a 3xx carries
    `Location: /elsewhere`."""

    url: str
    script: list[int]
    posts: list[Received] = field(default_factory=list)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    state = Receiver("", [204])

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 -- the http.server API
            body = json.loads(self.rfile.read(int(self.headers["content-length"])))
            state.posts.append(Received(self.path, self.headers["x-wasminfer-job"], body, time.monotonic()))
            status = state.script[min(len(state.posts), len(state.script)) - 1]
            self.send_response(status)
            if 300 <= status < 400:
                self.send_header("location", "/elsewhere")
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.url = f"http://127.0.0.1:{server.server_address[1]}/hook"
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()


def settings(backoff_s: float) -> JobSettings:
    return JobSettings(workers=2, poll_s=0.05, webhook_hosts=("127.0.0.1",), webhook_backoff_s=backoff_s)


def submit(client: TestClient, hook: str) -> dict[str, Any]:
    r = client.post("/v1/functions/hostile/invoke", params={"async": "1", "webhook": hook}, content=b"ehi")
    assert r.status_code == 202, r.text
    job: dict[str, Any] = r.json()
    assert job["webhook"] == {"url": hook, "state": None}  # nothing to deliver before it finishes
    return job


def webhook_state(client: TestClient, job: dict[str, Any], until: str, timeout: float = 20.0) -> str:
    deadline = time.monotonic() + timeout
    while (state := client.get(job["location"]).json()["webhook"]["state"]) != until:
        assert time.monotonic() < deadline, f"webhook state {state!r}, never {until!r}"
        time.sleep(0.01)
    return str(state)


def test_a_failing_receiver_is_retried_until_it_answers_2xx(
    platform: Platform, add_model: bytes, hostile_wasm: bytes, receiver: Receiver
) -> None:
    receiver.script = [500, 503, 404, 204]
    for c in app_client(platform, add_model, hostile_wasm, settings(0.01)):
        job = submit(c, receiver.url)
        webhook_state(c, job, "delivered")
        assert [(p.path, p.job) for p in receiver.posts] == [("/hook", job["id"])] * 4
        assert all(p.body["status"] == "succeeded" and p.body["id"] == job["id"] for p in receiver.posts)
        jobs = c.app.state.wasminfer.jobs  # type: ignore[attr-defined]
        assert (jobs.webhooks.delivered, jobs.webhooks.failed) == (1, 0)


@pytest.mark.serial  # asserts the waits between attempts (lower bounds only)
def test_after_five_failed_attempts_with_doubling_waits_the_webhook_is_failed(
    platform: Platform, add_model: bytes, hostile_wasm: bytes, receiver: Receiver
) -> None:
    receiver.script = [500]
    for c in app_client(platform, add_model, hostile_wasm, settings(0.05)):
        job = submit(c, receiver.url)
        assert webhook_state(c, job, "failed") == "failed"
        assert len(receiver.posts) == 5  # JobSettings.webhook_attempts, and not one more
        gaps = [b.at - a.at for a, b in zip(receiver.posts, receiver.posts[1:], strict=False)]
        assert all(gap >= 0.9 * 0.05 * 2**n for n, gap in enumerate(gaps)), gaps  # 0.05, 0.1, 0.2, 0.4 s
        jobs = c.app.state.wasminfer.jobs  # type: ignore[attr-defined]
        assert (jobs.webhooks.delivered, jobs.webhooks.failed) == (0, 1)
        assert c.get(job["location"]).json()["status"] == "succeeded"  # the job itself is unaffected


def test_redirects_are_not_followed(
    platform: Platform, add_model: bytes, hostile_wasm: bytes, receiver: Receiver
) -> None:
    receiver.script = [302]  # to /elsewhere on the same (allowed) host: still not followed
    for c in app_client(platform, add_model, hostile_wasm, settings(0.01)):
        job = submit(c, receiver.url)
        webhook_state(c, job, "failed")
        assert [p.path for p in receiver.posts] == ["/hook"] * 5  # a 3xx is a failed attempt


def test_a_webhook_pending_at_shutdown_is_delivered_by_the_next_start(
    tmp_path: Path, add_model: bytes, hostile_wasm: bytes, receiver: Receiver
) -> None:
    receiver.script = [500, 204]
    first = Platform(tmp_path / "data")
    try:
        # A long wait after the first failure: the server stops while the webhook is pending.
        for c in app_client(first, add_model, hostile_wasm, settings(600.0)):
            job = submit(c, receiver.url)
            assert wait_job(c, job["location"])["status"] == "succeeded"
            deadline = time.monotonic() + 20
            while not receiver.posts:
                assert time.monotonic() < deadline, "the first attempt never came"
                time.sleep(0.01)
            assert c.get(job["location"]).json()["webhook"]["state"] == "pending"
    finally:
        first.close()
    assert len(receiver.posts) == 1
    second = Platform(tmp_path / "data")  # the restart: nothing but the stored row says to deliver
    try:
        with TestClient(create_app(second, job_settings=settings(0.01))) as c:
            webhook_state(c, job, "delivered")
    finally:
        second.close()
    assert [(p.job, p.body["status"]) for p in receiver.posts] == [(job["id"], "succeeded")] * 2
