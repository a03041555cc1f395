"""Body limits and header injection through a real uvicorn on 127.0.0.1 (gateway/bodies.py, the
routes' content types), not only through starlette's test client: the app runs in a uvicorn server
of this process, with limits small enough to send (the default invocation limit, 16 MiB, as it
is). Each limit: a body of exactly the limit is taken, one byte more is a 413 that names it, with
and without a Content-Length."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cbor2
import httpx
import pytest
import uvicorn
import wasmtime

from live_server import free_port
from wasminfer.gateway import Settings, create_app
from wasminfer.jobs import JobSettings
from wasminfer.service import Platform

pytestmark = pytest.mark.integration

GUESTS = Path(__file__).resolve().parent / "guests"
WASM = {"content-type": "application/wasm"}
ONNX = {"content-type": "application/octet-stream"}
CBOR = {"content-type": "application/cbor"}
INVOKE_LIMIT = 16 << 20  # Settings.max_invoke_bytes, the default
BATCH_LIMIT = 4096


@pytest.fixture(scope="module")
def hostile() -> bytes:
    return bytes(wasmtime.wat2wasm((GUESTS / "hostile.wat").read_text()))


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, add_model: bytes, hostile: bytes
) -> Iterator[tuple[str, Settings]]:
    """The gateway under uvicorn; function and model uploads are limited to the sizes of the test's
    own guest and model, so that each fits exactly."""
    settings = Settings(
        max_wasm_bytes=len(hostile), max_model_bytes=len(add_model), max_batch_bytes=BATCH_LIMIT
    )
    assert settings.max_invoke_bytes == INVOKE_LIMIT
    platform = Platform(tmp_path_factory.mktemp("bodies") / "data")
    app = create_app(platform, settings, job_settings=JobSettings(workers=2, poll_s=0.05))
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    uv = uvicorn.Server(config)
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/readyz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert thread.is_alive() and time.monotonic() < deadline, "uvicorn never became ready"
            time.sleep(0.02)
        # Exactly at their limits: taken.
        r = httpx.put(f"{url}/v1/models/add", content=add_model, headers=ONNX)
        assert r.status_code == 201, r.text
        r = httpx.put(f"{url}/v1/functions/hostile?models=add&memory_mb=64", content=hostile, headers=WASM)
        assert r.status_code == 201, r.text
        yield url, settings
    finally:
        uv.should_exit = True
        thread.join(30)
        platform.close()


def error(r: httpx.Response, status: int, code: str) -> str:
    assert r.status_code == status, (r.status_code, r.text[:300])
    body: dict[str, Any] = r.json()["error"]
    assert body["code"] == code, body
    return str(body["message"])


def chunked(data: bytes, size: int = 1 << 16) -> Iterator[bytes]:
    """The body without a Content-Length (chunked transfer encoding)."""
    for start in range(0, len(data), size):
        yield data[start : start + size]


def test_uploads_at_their_limits_are_taken_and_one_byte_more_is_413(
    server: tuple[str, Settings], add_model: bytes, hostile: bytes
) -> None:
    url, settings = server  # the fixture uploaded both at exactly their limits
    assert httpx.get(f"{url}/v1/models/add").json()["version"] == 1
    assert httpx.get(f"{url}/v1/functions/hostile").json()["version"] == 1
    for body in (add_model + b"\0", chunked(add_model + b"\0")):
        message = error(
            httpx.put(f"{url}/v1/models/big", content=body, headers=ONNX), 413, "payload_too_large"
        )
        assert f"{settings.max_model_bytes} bytes" in message
    for body in (hostile + b"\0", chunked(hostile + b"\0")):
        message = error(
            httpx.put(f"{url}/v1/functions/big", content=body, headers=WASM), 413, "payload_too_large"
        )
        assert f"{settings.max_wasm_bytes} bytes" in message
    assert httpx.get(f"{url}/v1/functions/big").status_code == 404  # nothing was stored
    assert httpx.get(f"{url}/v1/models/big").status_code == 404


def test_an_invocation_body_of_16_mib_is_taken_and_one_byte_more_is_413(server: tuple[str, Settings]) -> None:
    url, _ = server
    body = b"e" + bytes(range(256)) * ((INVOKE_LIMIT - 1) // 256) + b"\1" * ((INVOKE_LIMIT - 1) % 256)
    assert len(body) == INVOKE_LIMIT
    r = httpx.post(f"{url}/v1/functions/hostile/invoke", content=body, timeout=60)
    assert r.status_code == 200 and r.content == body  # echoed whole
    for over in (body + b"x", chunked(body + b"x")):
        r = httpx.post(f"{url}/v1/functions/hostile/invoke", content=over, timeout=60)
        assert f"{INVOKE_LIMIT} bytes" in error(r, 413, "payload_too_large")
    r = httpx.post(f"{url}/v1/functions/hostile/invoke", content=b"estill serving")
    assert (r.status_code, r.content) == (200, b"estill serving")


def test_a_batch_body_at_its_limit_is_taken_and_one_byte_more_is_413(server: tuple[str, Settings]) -> None:
    url, _ = server
    body, over = batch_of(BATCH_LIMIT), batch_of(BATCH_LIMIT + 1)
    r = httpx.post(f"{url}/v1/functions/hostile/batch", content=body, headers=CBOR)
    assert r.status_code == 202 and r.json()["items"]["total"] == 4, r.text
    for content in (over, chunked(over, 1000)):
        r = httpx.post(f"{url}/v1/functions/hostile/batch", content=content, headers=CBOR)
        assert f"{BATCH_LIMIT} bytes" in error(r, 413, "payload_too_large")


def batch_of(size: int) -> bytes:
    """A CBOR batch of four echo items, exactly `size` bytes long."""
    item = b"e" * 1000
    n = size - len(cbor2.dumps([item] * 4)) + 1000
    while len(body := cbor2.dumps([item] * 3 + [b"e" * n])) > size:
        n -= 1
    assert len(body) == size
    return body


def raw_response(url: str, request: bytes) -> bytes:
    """The bytes uvicorn sends for `request` (one request, then the server closes)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(request)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return data


def test_a_guest_content_type_with_cr_lf_sets_no_header(server: tuple[str, Settings]) -> None:
    url, _ = server
    inject = bytes(wasmtime.wat2wasm((GUESTS / "header_inject.wat").read_text()))
    r = httpx.put(f"{url}/v1/functions/inject?memory_mb=1", content=inject, headers=WASM)
    assert r.status_code == 201, r.text
    sync = raw_response(
        url,
        b"POST /v1/functions/inject/invoke HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\n"
        b"connection: close\r\n\r\n",
    )
    head, _, body = sync.partition(b"\r\n\r\n")
    lines = head.lower().split(b"\r\n")
    assert lines[0] == b"http/1.1 200 ok" and body == b"te"
    assert b"content-type: application/octet-stream" in lines
    assert not any(line.startswith(b"set-cookie") or b"pwned" in line for line in lines), lines

    job = httpx.post(f"{url}/v1/functions/inject/invoke?async=1", content=b"").json()  # the job's result
    deadline = time.monotonic() + 20
    while httpx.get(f"{url}/v1/jobs/{job['id']}").json()["status"] != "succeeded":
        assert time.monotonic() < deadline, "the job never finished"
        time.sleep(0.02)
    stored = raw_response(
        url, f"GET /v1/jobs/{job['id']}/result HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n".encode()
    )
    head, _, body = stored.partition(b"\r\n\r\n")
    lines = head.lower().split(b"\r\n")
    assert lines[0] == b"http/1.1 200 ok" and body == b"te"
    assert b"content-type: application/octet-stream" in lines
    assert not any(line.startswith(b"set-cookie") or b"pwned" in line for line in lines), lines


def test_a_manifest_content_type_with_cr_lf_is_refused(server: tuple[str, Settings], hostile: bytes) -> None:
    url, _ = server
    for value in ("text/plain\r\n; set-cookie: pwned=1", "text/plain\n", "text/plain;\ra=b"):
        r = httpx.put(f"{url}/v1/functions/ct", params={"content_type": value}, content=hostile, headers=WASM)
        message = error(r, 400, "invalid_manifest")
        assert message == "manifest key 'content_type' must be a media type, e.g. text/plain"
    assert httpx.get(f"{url}/v1/functions/ct").status_code == 404
    r = httpx.put(f"{url}/v1/functions/ct", params={"content_type": "text/plain; charset=utf-8"},
                  content=hostile, headers=WASM)  # fmt: skip
    assert r.status_code == 201, r.text
