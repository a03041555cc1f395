"""`wasminfer.Client` against a real server (uvicorn on loopback, in this process): results, server errors
rebuilt as their types, its connections."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import urllib3

import wasminfer
from live_server import app_server
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
from wasminfer.manifest import Manifest
from wasminfer.service import Platform, parse_keys


@pytest.fixture
def client(tmp_path: Path) -> Iterator[Client]:
    p = Platform(tmp_path / "data", keys=parse_keys("k:admin"))
    p.start()
    try:
        with app_server(p) as url, Client(url, "k") as c:
            yield c
    finally:
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
    pool = client._pool
    urlopen = pool.urlopen
    pool.urlopen = lambda method, url, **kw: (  # type: ignore[method-assign]
        sent.append(kw["headers"].get("content-type", "")), urlopen(method, url, **kw))[1]
    client.put_model("add", add_model)
    stored = client.put_function("f", hostile_wasm, manifest)["manifest"]
    assert sent[-1] == "application/wasm" if raw else sent[-1].startswith("multipart/form-data")
    assert stored == Manifest.from_dict(manifest).to_dict()
    del pool.urlopen


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
        Client(client.url, "wrong").functions()


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
    r = urllib3.HTTPResponse(b'{"error": {"code": "brand_new", "message": "m"}}', status=409,
                             headers={"content-type": "application/json"})
    err = error_from_response(r)
    assert isinstance(err, Conflict) and err.code == "brand_new" and err.message == "m"
    plain = error_from_response(urllib3.HTTPResponse(b"bad gateway", status=502))
    assert type(plain) is WasminferError and plain.status == 502 and "bad gateway" in plain.message


def test_unreachable_server() -> None:
    with Client("http://127.0.0.1:9", timeout=2) as c, pytest.raises(ServerUnreachable, match="cannot reach"):
        c.health()


def test_calls_share_kept_alive_connections_across_threads(
    tmp_path: Path, add_model: bytes, hostile_wasm: bytes
) -> None:
    """One Client used by 8 threads at once: every answer right, and the pool keeps no more
    connections than threads called at the same time."""
    p = Platform(tmp_path / "data", keys=parse_keys("k:admin"))
    p.start()
    try:
        with app_server(p) as url, Client(url, "k") as client:
            client.put_model("add", add_model)
            client.put_function("h", hostile_wasm, {"models": ["add"], "memory_mb": 4})
            wrong: list[bytes] = []

            def calls(i: int) -> None:
                for j in range(20):
                    body = f"g{i}-{j}".encode()
                    got = client.invoke("h", body, "text/plain").body
                    if got != body:
                        wrong.append(got)

            threads = [threading.Thread(target=calls, args=(i,)) for i in range(8)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
            assert wrong == []
            assert 1 <= client._pool.num_connections <= 8
    finally:
        p.close()


def test_a_connection_the_server_closed_while_idle_is_not_reused(tmp_path: Path, hostile_wasm: bytes) -> None:
    """uvicorn closes a kept-alive connection idle past its keep-alive timeout: the next call notices
    it before sending (no request lost on a dead socket, no error) and opens a new one."""
    p = Platform(tmp_path / "data", keys=parse_keys("k:admin"))
    p.start()
    try:
        with app_server(p, timeout_keep_alive=1) as url, Client(url, "k") as client:
            client.put_function("h", hostile_wasm, {"memory_mb": 4})
            assert client.invoke("h", b"gone", "text/plain").body == b"gone"
            first = local_ports(client)
            assert client.invoke("h", b"gtwo", "text/plain").body == b"gtwo"
            assert local_ports(client) == first  # kept alive between calls
            time.sleep(1.6)  # past the server's keep-alive timeout: it has closed the connection
            assert client.invoke("h", b"gagain", "text/plain").body == b"gagain"
            second = local_ports(client)
            assert len(second) == 1 and second != first
    finally:
        p.close()


def local_ports(client: Client) -> list[int]:
    """The local ports of the client's idle connections (each a TCP connection of its own)."""
    idle = [c for c in list(client._pool.pool.queue) if c is not None and c.sock is not None]  # type: ignore[union-attr]
    return sorted(c.sock.getsockname()[1] for c in idle)


def test_the_environment_s_proxy_carries_the_calls_and_no_proxy_bypasses_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """$http_proxy names the proxy every call goes through (the request's target in absolute form),
    as httpx took it; $no_proxy lists the hosts reached directly. The "proxy" here is the server
    itself (uvicorn routes an absolute-form target by its path), reached for a host that does not
    resolve, so an answer proves the call went through the proxy."""
    p = Platform(tmp_path / "data", keys=parse_keys("k:admin"))
    p.start()
    try:
        with app_server(p) as url:
            monkeypatch.setenv("http_proxy", url)
            monkeypatch.delenv("no_proxy", raising=False)
            monkeypatch.delenv("NO_PROXY", raising=False)
            with Client("http://wasminfer.invalid:8000", "k", timeout=5) as c:
                assert c.health() == {"status": "ok"} and c.functions() == []
            monkeypatch.setenv("no_proxy", "wasminfer.invalid")
            with Client("http://wasminfer.invalid:8000", "k", timeout=5) as c, \
                    pytest.raises(ServerUnreachable, match="cannot reach"):
                c.health()  # direct: the name does not resolve
    finally:
        p.close()


def test_the_readme_s_python_example_runs_as_it_is(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """README.md's Python block, run as written (its URL made this server's), next to the files its
    commands make: digits.onnx and digits.wasm."""
    from wasminfer import examples, toolchain

    root = Path(__file__).resolve().parents[1]
    text = (root / "README.md").read_text()
    block = text.split("```python\n", 1)[1].split("```", 1)[0]
    (tmp_path / "digits.onnx").write_bytes(examples.digits_model())
    (tmp_path / "digits.wasm").write_bytes(toolchain.build(root / "functions" / "digits").read_bytes())
    monkeypatch.chdir(tmp_path)
    p = Platform(tmp_path / "data")
    p.start()
    try:
        with app_server(p) as url:
            printed: list[object] = []
            code = block.replace('"http://127.0.0.1:8000"', repr(url))
            assert code != block, "the README's block no longer names the default URL"
            exec(compile(code, "README.md", "exec"), {"print": printed.append})
    finally:
        p.close()
    assert len(printed) == 1 and json.loads(printed[0])["label"] in range(10)  # type: ignore[arg-type]
