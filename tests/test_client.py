"""`wasminfer.Client` against the in-process app: results, and server errors rebuilt as their types."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from starlette.testclient import TestClient

import wasminfer
from wasminfer.client import Client, error_from_response
from wasminfer.errors import (
    Conflict,
    FunctionNotFound,
    GuestTrap,
    InvalidManifest,
    InvocationCancelled,
    ServerUnreachable,
    Timeout,
    TooManyRequests,
    Unauthorized,
    WasminferError,
)
from wasminfer.gateway import create_app
from wasminfer.manifest import Manifest
from wasminfer.service import Platform, parse_keys


@pytest.fixture
def client(tmp_path: Path) -> Iterator[Client]:
    p = Platform(tmp_path / "data", keys=parse_keys("k:admin"))
    p.start()
    with TestClient(create_app(p)) as http:
        yield Client("http://testserver", "k", http=http)
    p.close()


@pytest.mark.parametrize(
    ("manifest", "raw"),
    [
        ({}, True),
        ({"models": ["add"], "memory_mb": 8, "env": {"K": "a=b"}, "args": ["x", "y"]}, True),
        ({"args": ["a,b"], "env": {"K": "1,2"}}, False),  # commas: the query would split them
        ({"idempotent": True}, False),  # a boolean
    ],
)
def test_an_upload_carries_its_manifest_in_the_query_when_it_can(
    client: Client, add_model: bytes, hostile_wasm: bytes, manifest: dict, raw: bool
) -> None:
    """The bytes alone as the body with the manifest in the query, else multipart: the same version
    stored either way."""
    sent: list[str] = []
    http = client._http
    send = http.send
    http.send = lambda request, **kw: (sent.append(request.headers["content-type"]), send(request, **kw))[1]
    client.put_model("add", add_model)
    stored = client.put_function("f", hostile_wasm, manifest)["manifest"]
    assert sent[-1] == "application/wasm" if raw else sent[-1].startswith("multipart/form-data")
    assert stored == Manifest.from_dict(manifest).to_dict()
    del http.send


def test_lazy_export() -> None:
    assert wasminfer.Client is Client


def test_round_trip(client: Client, add_model: bytes, hostile_wasm: bytes) -> None:
    assert client.health() == {"status": "ok"}
    assert client.ready()["status"] == "ready"
    assert client.put_model("add", add_model)["created"] is True
    v = client.put_function("hostile", hostile_wasm, {"models": ["add"], "memory_mb": 4})
    assert (v["version"], v["created"], v["abi"]) == (1, True, "handler")
    result = client.invoke("hostile", b"ghello", "text/plain")
    assert (result.body, result.content_type) == (b"ghello", "text/plain")
    assert set(result.server_timing) == {"queue", "start", "run", "infer", "total"}
    assert any(line["invocation"] == result.invocation_id for line in client.logs("hostile"))
    assert [f["name"] for f in client.functions()] == ["hostile"]
    assert client.function("hostile")["counters"]["invocations"] == 1
    assert [m["name"] for m in client.models()] == ["add"]
    assert client.model("add")["users"] == ["hostile"]
    client.put_function("hostile", hostile_wasm, {"models": ["add"], "memory_mb": 8})
    assert [v["version"] for v in client.versions("hostile")] == [1, 2]
    assert client.rollback("hostile")["version"] == 1
    assert client.rollback("hostile", 2)["version"] == 2
    with pytest.raises(Conflict):
        client.delete_model("add")
    client.delete_function("hostile")
    client.delete_model("add")
    assert client.functions() == [] and client.models() == []


def test_errors_come_back_as_their_types(client: Client, hostile_wasm: bytes) -> None:
    with pytest.raises(FunctionNotFound) as info:
        client.invoke("nope")
    assert (info.value.status, info.value.code) == (404, "function_not_found")
    assert info.value.message == "function 'nope' does not exist"
    with pytest.raises(InvalidManifest):
        client.put_function("f", hostile_wasm, {"memory_mb": 0})
    client.put_function("f", hostile_wasm, {"memory_mb": 4, "timeout_ms": 200})
    with pytest.raises(GuestTrap):
        client.invoke("f", b"t")
    with pytest.raises(Timeout):
        client.invoke("f", b"l")
    with pytest.raises(Unauthorized):
        Client(client.url, "wrong", http=client._http).functions()


def test_too_many_requests_carries_retry_after(client: Client, hostile_wasm: bytes) -> None:
    # The loop holds the one instance until the function is deleted (which cancels it), so the second
    # request meets a busy instance however slow the machine: no window to hit in time.
    client.put_function(
        "one", hostile_wasm, {"memory_mb": 4, "timeout_ms": 60_000, "max_instances": 1, "max_queue": 0}
    )
    looped: list[Exception] = []

    def loop() -> None:
        try:
            client.invoke("one", b"l")
        except WasminferError as exc:
            looped.append(exc)

    t = threading.Thread(target=loop)
    t.start()
    deadline = time.monotonic() + 30
    while client.function("one")["instances"]["busy"] == 0:
        assert time.monotonic() < deadline, "the loop never took the instance"
        time.sleep(0.005)
    with pytest.raises(TooManyRequests, match="max_instances") as info:
        client.invoke("one", b"e")
    assert info.value.retry_after_s >= 1
    client.delete_function("one")
    t.join(30)
    assert [(type(e), e.status) for e in looped] == [(InvocationCancelled, 503)], looped


def test_unknown_code_falls_back_to_the_status() -> None:
    r = httpx.Response(409, json={"error": {"code": "brand_new", "message": "m"}})
    err = error_from_response(r)
    assert isinstance(err, Conflict) and err.code == "brand_new" and err.message == "m"
    plain = error_from_response(httpx.Response(502, text="bad gateway"))
    assert type(plain) is WasminferError and plain.status == 502 and "bad gateway" in plain.message


def test_unreachable_server() -> None:
    with Client("http://127.0.0.1:9", timeout=2) as c, pytest.raises(ServerUnreachable, match="cannot reach"):
        c.health()
