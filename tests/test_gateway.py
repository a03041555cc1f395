"""The HTTP gateway in-process (Starlette's TestClient) against real guests: every route, and every
error status the API names (400 401 403 404 409 413 415 422 429 500 503 504)."""

from __future__ import annotations

import ast
import gc
import json
import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import wasmtime
from starlette.routing import Route
from starlette.testclient import TestClient

from wasminfer.errors import BadRequest, InvalidName
from wasminfer.gateway import Settings, create_app
from wasminfer.models import decode_tensors, encode_tensors
from wasminfer.service import Platform, parse_keys

HOSTILE_QUERY = "models=add&memory_mb=4&timeout_ms=300&max_instances=2"
WASM = {"content-type": "application/wasm"}
ONNX = {"content-type": "application/octet-stream"}
ROOT = Path(__file__).resolve().parents[1]
GUESTS = ROOT / "tests" / "guests"


def wait_ready(client: TestClient) -> None:
    for _ in range(200):
        if client.get("/readyz").status_code == 200:
            return
        time.sleep(0.01)
    raise AssertionError("the app never became ready")


@pytest.fixture
def platform(tmp_path: Path) -> Iterator[Platform]:
    p = Platform(tmp_path / "data")
    yield p
    p.close()


@pytest.fixture
def client(platform: Platform) -> Iterator[TestClient]:
    with TestClient(create_app(platform), raise_server_exceptions=False) as c:
        wait_ready(c)
        yield c


@pytest.fixture
def deployed(client: TestClient, add_model: bytes, hostile_wasm: bytes) -> TestClient:
    assert client.put("/v1/models/add", content=add_model, headers=ONNX).status_code == 201
    r = client.put(f"/v1/functions/hostile?{HOSTILE_QUERY}", content=hostile_wasm, headers=WASM)
    assert r.status_code == 201, r.text
    return client


def error(r: httpx.Response, status: int, code: str | None = None) -> str:
    """Asserts the response is the JSON error `status`/`code`; returns its message."""
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}
    if code is not None:
        assert body["error"]["code"] == code, body
    message: str = body["error"]["message"]
    return message


def invoke(client: TestClient, body: bytes, name: str = "hostile", **headers: str) -> httpx.Response:
    return client.post(f"/v1/functions/{name}/invoke", content=body, headers=headers)


# --- models ---------------------------------------------------------------------------------------
def test_put_model_loads_and_describes_it(client: TestClient, add_model: bytes) -> None:
    r = client.put("/v1/models/add", content=add_model, headers=ONNX)
    assert r.status_code == 201
    body = r.json()
    assert (body["name"], body["version"], body["created"], body["loaded"]) == ("add", 1, True, True)
    assert len(body["sha256"]) == 64
    assert body["inputs"] == [
        {"name": "a", "dtype": "float32", "shape": ["N", 3]},
        {"name": "b", "dtype": "float32", "shape": ["N", 3]},
    ]
    assert body["outputs"] == [{"name": "y", "dtype": "float32", "shape": ["N", 3]}]
    again = client.put("/v1/models/add", content=add_model, headers={"content-type": "application/onnx"})
    assert again.status_code == 200 and again.json()["created"] is False and again.json()["version"] == 1


def test_get_list_and_delete_model(client: TestClient, add_model: bytes) -> None:
    client.put("/v1/models/add", content=add_model, headers=ONNX)
    assert [m["name"] for m in client.get("/v1/models").json()["models"]] == ["add"]
    one = client.get("/v1/models/add").json()
    assert one["versions"][0]["version"] == 1 and one["resident_bytes"] >= 0 and one["users"] == []
    assert client.delete("/v1/models/add").status_code == 204
    error(client.get("/v1/models/add"), 404, "model_not_found")
    error(client.delete("/v1/models/add"), 404, "model_not_found")
    assert client.get("/v1/models").json() == {"models": []}


def test_invalid_model_is_400_and_stores_nothing(client: TestClient) -> None:
    error(client.put("/v1/models/bad", content=b"not onnx at all", headers=ONNX), 400, "invalid_model")
    error(client.get("/v1/models/bad"), 404)


def test_model_upload_needs_a_binary_content_type(client: TestClient, add_model: bytes) -> None:
    msg = error(
        client.put("/v1/models/add", content=add_model, headers={"content-type": "text/plain"}),
        415,
        "unsupported_media_type",
    )
    assert "application/octet-stream" in msg


def test_invalid_model_name_is_400(client: TestClient, add_model: bytes) -> None:
    error(client.put("/v1/models/Bad!", content=add_model, headers=ONNX), 400, "invalid_name")


def test_delete_model_in_use_is_409_and_keeps_it(deployed: TestClient) -> None:
    msg = error(deployed.delete("/v1/models/add"), 409, "conflict")
    assert "hostile" in msg
    assert deployed.get("/v1/models/add").json()["users"] == ["hostile"]
    assert invoke(deployed, b"e").status_code == 200


# --- functions: upload ----------------------------------------------------------------------------
def test_put_function_with_query_manifest(deployed: TestClient) -> None:
    body = deployed.get("/v1/functions/hostile").json()
    assert body["abi"] == "handler" and body["version"] == 1 and body["loaded"] is True
    m = body["manifest"]
    assert (m["models"], m["memory_mb"], m["timeout_ms"], m["max_instances"]) == (["add"], 4, 300, 2)
    assert body["instances"]["live"] == 1  # prewarmed at deploy: the first invocation is warm
    assert body["info"]["exports"] == ["memory", "wasminfer_abi_v1", "wasminfer_alloc", "wasminfer_handle"]


def test_put_same_function_twice_is_200_unchanged(deployed: TestClient, hostile_wasm: bytes) -> None:
    r = deployed.put(f"/v1/functions/hostile?{HOSTILE_QUERY}", content=hostile_wasm, headers=WASM)
    assert r.status_code == 200 and r.json()["created"] is False and r.json()["version"] == 1


def test_put_function_multipart(deployed: TestClient, hostile_wasm: bytes) -> None:
    manifest = {"models": ["add"], "memory_mb": 8, "env": {"A": "1"}}
    r = deployed.put(
        "/v1/functions/multi",
        files={
            "wasm": ("fn.wasm", hostile_wasm, "application/wasm"),
            "manifest": (None, json.dumps(manifest)),
        },
    )
    assert r.status_code == 201, r.text
    assert r.json()["manifest"]["memory_mb"] == 8 and r.json()["manifest"]["env"] == {"A": "1"}
    assert r.json()["created"] is True and r.json()["abi"] == "handler"
    assert invoke(deployed, b"ehi", "multi").content == b"ehi"


@pytest.mark.parametrize(
    ("files", "query", "code"),
    [
        ({"manifest": (None, "{}")}, "", "bad_request"),  # no wasm part
        ({"wasm": (None, "AGFzbQ=="), "manifest": (None, "{}")}, "", "bad_request"),  # wasm not a file part
        ({"wasm": ("f.wasm", b"\0asm"), "manifest": (None, "{not json")}, "", "invalid_manifest"),
        ({"wasm": ("f.wasm", b"\0asm"), "extra": (None, "x")}, "", "bad_request"),
        ({"wasm": ("f.wasm", b"\0asm")}, "?memory_mb=4", "bad_request"),  # manifest in two places
    ],
)
def test_bad_multipart_uploads_are_400(
    client: TestClient, files: dict[str, object], query: str, code: str
) -> None:
    error(client.put(f"/v1/functions/f{query}", files=files), 400, code)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("query", "fragment"),
    [("memory_mb=0", "memory_mb"), ("timeout_ms=abc", "timeout_ms"), ("colour=red", "unknown manifest key")],
)
def test_bad_manifest_query_is_400(
    client: TestClient, hostile_wasm: bytes, query: str, fragment: str
) -> None:
    msg = error(
        client.put(f"/v1/functions/f?{query}", content=hostile_wasm, headers=WASM), 400, "invalid_manifest"
    )
    assert fragment in msg


def test_invalid_wasm_is_400_and_previous_version_keeps_serving(deployed: TestClient) -> None:
    error(deployed.put("/v1/functions/hostile", content=b"\0asm garbage", headers=WASM), 400, "invalid_wasm")
    error(deployed.put("/v1/functions/hostile", content=b"hello", headers=WASM), 400, "invalid_wasm")
    assert invoke(deployed, b"eok").content == b"eok"
    assert [v["version"] for v in deployed.get("/v1/functions/hostile/versions").json()["versions"]] == [1]


def test_function_naming_a_missing_model_is_404(client: TestClient, hostile_wasm: bytes) -> None:
    msg = error(
        client.put("/v1/functions/f?models=nope", content=hostile_wasm, headers=WASM), 404, "model_not_found"
    )
    assert "nope" in msg
    error(client.get("/v1/functions/f"), 404, "function_not_found")


def test_function_upload_needs_wasm_or_multipart(client: TestClient, hostile_wasm: bytes) -> None:
    r = client.put(
        "/v1/functions/f", content=hostile_wasm, headers={"content-type": "application/octet-stream"}
    )
    assert "application/wasm" in error(r, 415, "unsupported_media_type")
    # without a Content-Type the bytes decide (tests/test_e2e_uploads.py): a text that is no function's
    msg = error(client.put("/v1/functions/f", content=b"plain text"), 415, "unsupported_media_type")
    assert msg.endswith("send it with -H 'Content-Type: application/wasm' (a module or component), "
                        "'text/x-python' (one .py) or 'application/zip' (a Python function's folder)")
    error(client.get("/v1/functions/f"), 404, "function_not_found")


def test_invalid_function_name_is_400(client: TestClient, hostile_wasm: bytes) -> None:
    error(client.put("/v1/functions/UPPER", content=hostile_wasm, headers=WASM), 400, "invalid_name")


# --- functions: read, versions, rollback, delete --------------------------------------------------
def test_list_and_get_functions(deployed: TestClient) -> None:
    invoke(deployed, b"e")
    listed = deployed.get("/v1/functions").json()["functions"]
    assert [(f["name"], f["version"]) for f in listed] == [("hostile", 1)]
    assert listed[0]["counters"]["invocations"] == 1
    one = deployed.get("/v1/functions/hostile").json()
    assert [v["version"] for v in one["versions"]] == [1] and one["versions"][0]["is_current"]
    error(deployed.get("/v1/functions/nope"), 404, "function_not_found")


def test_versions_and_rollback(deployed: TestClient, hostile_wasm: bytes) -> None:
    error(deployed.post("/v1/functions/hostile/rollback"), 409, "conflict")  # nothing before v1
    r = deployed.put("/v1/functions/hostile?models=add&memory_mb=8", content=hostile_wasm, headers=WASM)
    assert r.status_code == 201 and r.json()["version"] == 2
    versions = deployed.get("/v1/functions/hostile/versions").json()["versions"]
    assert [(v["version"], v["is_current"]) for v in versions] == [(1, False), (2, True)]

    back = deployed.post("/v1/functions/hostile/rollback")
    assert (
        back.status_code == 200 and back.json()["version"] == 1 and back.json()["manifest"]["memory_mb"] == 4
    )
    assert deployed.get("/v1/functions/hostile").json()["manifest"]["memory_mb"] == 4
    forward = deployed.post("/v1/functions/hostile/rollback?version=2")
    assert forward.json()["version"] == 2 and forward.json()["is_current"]
    assert invoke(deployed, b"eok").content == b"eok"
    error(deployed.post("/v1/functions/hostile/rollback?version=9"), 404, "function_not_found")
    error(deployed.post("/v1/functions/hostile/rollback?version=abc"), 400, "bad_request")
    error(deployed.post("/v1/functions/nope/rollback"), 404, "function_not_found")


def test_delete_function(deployed: TestClient) -> None:
    assert deployed.delete("/v1/functions/hostile").status_code == 204
    error(invoke(deployed, b"e"), 404, "function_not_found")
    error(deployed.get("/v1/functions/hostile"), 404)
    error(deployed.delete("/v1/functions/hostile"), 404)
    assert deployed.delete("/v1/models/add").status_code == 204  # no longer in use


# --- invoke ---------------------------------------------------------------------------------------
def test_invoke_returns_output_content_type_and_timing(deployed: TestClient) -> None:
    r = invoke(deployed, b"echo me", **{"content-type": "text/plain"})
    assert r.status_code == 200
    assert r.content == b"echo me" and r.headers["content-type"] == "text/plain"
    timing = r.headers["server-timing"]
    names = [part.split(";")[0].strip() for part in timing.split(",")]
    assert names == ["queue", "start", "run", "infer", "total"]
    assert "start;dur=0.000" in timing  # prewarmed: warm from the first call
    assert r.headers["x-invocation-id"]


def test_invoke_runs_the_model_through_the_guest(deployed: TestClient) -> None:
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    r = invoke(deployed, b"i" + encode_tensors({"a": a, "b": a}))
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/octet-stream"
    np.testing.assert_array_equal(decode_tensors(r.content)["y"], a + a)


def test_wrong_tensor_shape_is_422(deployed: TestClient) -> None:
    bad = np.ones((1, 4), dtype=np.float32)
    msg = error(invoke(deployed, b"i" + encode_tensors({"a": bad, "b": bad})), 422, "invalid_tensor")
    assert "[N,3]" in msg


def test_model_not_in_manifest_is_403(deployed: TestClient) -> None:
    assert "models" in error(invoke(deployed, b"n"), 403, "model_not_allowed")


@pytest.mark.parametrize(
    ("op", "code"),
    [
        (b"t", "guest_trap"),
        (b"r", "guest_trap"),
        (b"b", "guest_trap"),
        (b"s", "guest_error"),
        (b"o", "output_limit_exceeded"),
        (b"m", "memory_limit_exceeded"),
    ],
)
def test_guest_failures_are_500_and_the_host_keeps_serving(
    deployed: TestClient, op: bytes, code: str
) -> None:
    error(invoke(deployed, op), 500, code)
    assert invoke(deployed, b"eok").content == b"eok"


def test_guest_error_message_reaches_the_caller(deployed: TestClient) -> None:
    assert error(invoke(deployed, b"s"), 500, "guest_error") == "bad things happened"


def test_timeout_is_504(deployed: TestClient) -> None:
    assert "timeout_ms" in error(invoke(deployed, b"l"), 504, "timeout")
    assert invoke(deployed, b"eok").status_code == 200


def test_unknown_function_is_404(client: TestClient) -> None:
    error(invoke(client, b"x", "nope"), 404, "function_not_found")


def test_all_instances_busy_is_429_with_retry_after(
    client: TestClient, platform: Platform, hostile_wasm: bytes
) -> None:
    # The loop holds the one instance until the function is deleted (which cancels it): however slow
    # the machine, the second request meets a busy instance.
    q = "memory_mb=4&timeout_ms=60000&max_instances=1&max_queue=0"
    assert client.put(f"/v1/functions/one?{q}", content=hostile_wasm, headers=WASM).status_code == 201
    slow: list[httpx.Response] = []
    looping = threading.Thread(target=lambda: slow.append(invoke(client, b"l", "one")))
    looping.start()
    deadline = time.monotonic() + 30
    while platform.host().function("one").pool.stats()["busy"] == 0:
        assert time.monotonic() < deadline, "the loop never took the instance"
        time.sleep(0.005)
    r = invoke(client, b"e", "one")
    assert "max_instances" in error(r, 429, "too_many_requests")
    assert int(r.headers["retry-after"]) >= 1
    assert client.delete("/v1/functions/one").status_code == 204
    looping.join(30)
    assert len(slow) == 1 and "deleted" in error(slow[0], 503, "invocation_cancelled")


def test_guest_content_type_cannot_inject_headers(client: TestClient) -> None:
    wasm = bytes(wasmtime.wat2wasm((GUESTS / "header_inject.wat").read_text()))
    assert client.put("/v1/functions/inject?memory_mb=1", content=wasm, headers=WASM).status_code == 201
    r = invoke(client, b"", "inject")
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/octet-stream"
    assert "set-cookie" not in r.headers


# --- body limits ----------------------------------------------------------------------------------
@pytest.fixture
def small_limits(platform: Platform) -> Iterator[TestClient]:
    settings = Settings(max_wasm_bytes=512, max_model_bytes=64, max_invoke_bytes=16)
    with TestClient(create_app(platform, settings), raise_server_exceptions=False) as c:
        wait_ready(c)
        yield c


def test_bodies_over_the_limits_are_413(
    small_limits: TestClient, add_model: bytes, hostile_wasm: bytes
) -> None:
    c = small_limits
    assert len(hostile_wasm) > 512 and len(add_model) > 64
    error(c.put("/v1/functions/big", content=hostile_wasm, headers=WASM), 413, "payload_too_large")
    error(c.put("/v1/functions/big", files={"wasm": ("f.wasm", hostile_wasm)}), 413, "payload_too_large")
    error(c.put("/v1/models/big", content=add_model, headers=ONNX), 413, "payload_too_large")
    error(c.post("/v1/functions/any/invoke", content=b"x" * 17), 413, "payload_too_large")
    error(c.get("/v1/functions/big"), 404)  # nothing was stored


def test_streamed_body_without_length_stops_at_the_limit(small_limits: TestClient) -> None:
    def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it streams
        for _ in range(100):
            yield b"x" * 8

    r = small_limits.post("/v1/functions/any/invoke", content=chunks())
    assert "16 bytes" in error(r, 413, "payload_too_large")


def test_lying_content_length_is_400(client: TestClient) -> None:
    error(client.post("/v1/functions/any/invoke", content=b"x", headers={"content-length": "abc"}), 400)


# --- logs -----------------------------------------------------------------------------------------
def test_logs_carry_guest_lines_and_invocation_ids(deployed: TestClient) -> None:
    before = time.time()
    r = invoke(deployed, b"g")
    inv = r.headers["x-invocation-id"]
    lines = deployed.get("/v1/functions/hostile/logs").json()["lines"]
    mine = [ln for ln in lines if ln["invocation"] == inv]
    assert [(ln["stream"], ln["level"], ln["message"]) for ln in mine] == [
        ("log", "warn", "hello from the guest")
    ]
    assert deployed.get("/v1/functions/hostile/logs?n=0").json() == {"lines": []}
    recent = deployed.get(f"/v1/functions/hostile/logs?since={before}").json()["lines"]
    assert all(ln["ts"] > before for ln in recent) and mine[0] in recent
    assert len(deployed.get("/v1/functions/hostile/logs?n=1").json()["lines"]) == 1


def test_logs_errors(deployed: TestClient) -> None:
    error(deployed.get("/v1/functions/nope/logs"), 404, "function_not_found")
    error(deployed.get("/v1/functions/hostile/logs?n=abc"), 400, "bad_request")
    error(deployed.get("/v1/functions/hostile/logs?n=-1"), 400, "bad_request")
    error(deployed.get("/v1/functions/hostile/logs?since=nan"), 400, "bad_request")


# --- auth -----------------------------------------------------------------------------------------
@pytest.fixture
def keyed(tmp_path: Path) -> Iterator[tuple[TestClient, Platform]]:
    keys = parse_keys("adm:admin,inv:invoke,rd:read,acme-adm:admin:acme")
    p = Platform(tmp_path / "keyed", keys=keys)
    try:
        with TestClient(create_app(p), raise_server_exceptions=False) as c:
            wait_ready(c)
            yield c, p
    finally:
        p.close()


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def test_keys_and_scopes(keyed: tuple[TestClient, Platform], add_model: bytes, hostile_wasm: bytes) -> None:
    c, _ = keyed
    r = c.get("/v1/functions")
    error(r, 401, "unauthorized")
    assert r.headers["www-authenticate"].startswith("Bearer")
    error(c.get("/v1/functions", headers=bearer("wrong")), 401)
    error(c.get("/v1/functions", headers={"authorization": "Basic YWRtOmFkbQ=="}), 401)
    error(c.get("/v1/functions", headers={"authorization": "Bearer "}), 401)

    put = {"content": hostile_wasm, "headers": {**WASM, **bearer("inv")}}
    assert "'admin'" in error(c.put("/v1/functions/f", **put), 403, "forbidden")  # type: ignore[arg-type]
    error(c.put("/v1/models/add", content=add_model, headers={**ONNX, **bearer("rd")}), 403)
    assert (
        c.put(
            "/v1/functions/f?memory_mb=4", content=hostile_wasm, headers={**WASM, **bearer("adm")}
        ).status_code
        == 201
    )

    assert c.post("/v1/functions/f/invoke", content=b"ehi", headers=bearer("inv")).content == b"ehi"
    error(c.post("/v1/functions/f/invoke", content=b"ehi", headers=bearer("rd")), 403)
    assert c.get("/v1/functions/f", headers=bearer("rd")).status_code == 200
    error(c.get("/v1/functions/f", headers=bearer("inv")), 403)
    error(c.delete("/v1/functions/f", headers=bearer("rd")), 403)
    error(c.get("/metrics"), 401)
    assert c.get("/metrics", headers=bearer("rd")).status_code == 200
    for public in ("/healthz", "/readyz", "/openapi.json", "/docs"):
        assert c.get(public).status_code == 200


def test_tenants_never_see_each_other(
    keyed: tuple[TestClient, Platform], add_model: bytes, hostile_wasm: bytes
) -> None:
    c, p = keyed
    default, acme = bearer("adm"), bearer("acme-adm")
    c.put("/v1/models/add", content=add_model, headers={**ONNX, **default})
    assert (
        c.put(
            f"/v1/functions/hostile?{HOSTILE_QUERY}", content=hostile_wasm, headers={**WASM, **default}
        ).status_code
        == 201
    )
    error(c.get("/v1/functions/hostile", headers=acme), 404)
    error(c.post("/v1/functions/hostile/invoke", content=b"e", headers=acme), 404)
    # acme's function may not use the default tenant's model: it has none of its own yet
    error(
        c.put(f"/v1/functions/hostile?{HOSTILE_QUERY}", content=hostile_wasm, headers={**WASM, **acme}),
        404,
        "model_not_found",
    )
    # its own "add" (a different model under the same name) serves only acme's functions
    c.put("/v1/models/add", content=_mul_model(), headers={**ONNX, **acme})
    assert (
        c.put(
            f"/v1/functions/hostile?{HOSTILE_QUERY}", content=hostile_wasm, headers={**WASM, **acme}
        ).status_code
        == 201
    )
    a = np.full((1, 3), 3, dtype=np.float32)
    req = b"i" + encode_tensors({"a": a, "b": a})
    ours = c.post("/v1/functions/hostile/invoke", content=req, headers=default)
    theirs = c.post("/v1/functions/hostile/invoke", content=req, headers=acme)
    np.testing.assert_array_equal(decode_tensors(ours.content)["y"], a + a)
    np.testing.assert_array_equal(decode_tensors(theirs.content)["y"], a * a)
    assert [f["name"] for f in c.get("/v1/functions", headers=acme).json()["functions"]] == ["hostile"]
    assert c.delete("/v1/functions/hostile", headers=acme).status_code == 204
    assert c.post("/v1/functions/hostile/invoke", content=b"eok", headers=default).content == b"eok"


def _mul_model() -> bytes:
    from onnx import TensorProto, helper

    a = helper.make_tensor_value_info("a", TensorProto.FLOAT, ["N", 3])
    b = helper.make_tensor_value_info("b", TensorProto.FLOAT, ["N", 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])
    graph = helper.make_graph([helper.make_node("Mul", ["a", "b"], ["y"])], "mul", [a, b], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def test_stored_keys_work_and_end_open_access(client: TestClient, platform: Platform) -> None:
    assert client.get("/v1/functions").status_code == 200  # open access: no key configured anywhere
    key = platform.add_key(["read"])
    error(client.get("/v1/functions"), 401)
    assert client.get("/v1/functions", headers=bearer(key)).status_code == 200
    error(client.delete("/v1/functions/x", headers=bearer(key)), 403)
    platform.store.revoke_key(key.split("_")[1])
    error(client.get("/v1/functions", headers=bearer(key)), 401)


def test_parse_keys_rejects_bad_entries() -> None:
    assert [(k.key, sorted(k.scopes), k.tenant) for k in parse_keys("a:admin+read, b:invoke:t1")] == [
        ("a", ["admin", "read"], "default"),
        ("b", ["invoke"], "t1"),
    ]
    for bad in ("nokey", "k:root", ":admin", "k:admin:t:x"):
        with pytest.raises(BadRequest, match="API key entry 1"):
            parse_keys(bad)
    with pytest.raises(InvalidName):
        parse_keys("k:admin:Bad Tenant")
    with pytest.raises(BadRequest) as info:
        parse_keys("s3cret:root")
    assert "s3cret" not in str(info.value)
    assert "s3cret" not in repr(parse_keys("s3cret:admin"))


# --- system routes --------------------------------------------------------------------------------
def test_health_and_ready(deployed: TestClient) -> None:
    assert deployed.get("/healthz").json() == {"status": "ok"}
    assert deployed.get("/readyz").json()["status"] == "ready"


def test_not_ready_is_503_until_the_store_is_loaded(
    platform: Platform, monkeypatch: pytest.MonkeyPatch
) -> None:
    release = threading.Event()
    real_start = platform.start

    def slow_start(progress: object = None) -> object:
        release.wait(5)
        return real_start()

    monkeypatch.setattr(platform, "start", slow_start)
    with TestClient(create_app(platform), raise_server_exceptions=False) as c:
        assert c.get("/healthz").status_code == 200
        r = c.get("/readyz")
        error(r, 503, "unavailable")
        assert r.headers["retry-after"] == "1"
        error(c.get("/v1/functions"), 503, "unavailable")
        error(c.post("/v1/functions/x/invoke", content=b""), 503, "unavailable")
        release.set()
        wait_ready(c)
        assert c.get("/v1/functions").status_code == 200


def test_metrics(deployed: TestClient) -> None:
    invoke(deployed, b"e")
    invoke(deployed, b"t")
    invoke(deployed, b"e")  # the trap discarded the only instance: a cold start
    invoke(deployed, b"x", "no-such-function")
    text = deployed.get("/metrics").text
    assert 'wasminfer_invocations_total{function="hostile",outcome="ok",tenant="default"} 2.0' in text
    assert 'wasminfer_invocations_total{function="hostile",outcome="guest_trap",tenant="default"} 1.0' in text
    assert 'wasminfer_cold_starts_total{function="hostile",tenant="default"} 1.0' in text
    assert 'wasminfer_invocation_seconds_count{function="hostile",tenant="default"} 3.0' in text
    assert 'wasminfer_guest_run_seconds_count{function="hostile",tenant="default"} 2.0' in text
    assert 'wasminfer_instances{function="hostile",state="live",tenant="default"} 1.0' in text
    assert 'wasminfer_model_load_seconds{model="add",tenant="default"}' in text
    assert 'wasminfer_model_resident_bytes{model="add",tenant="default"}' in text
    assert "wasminfer_ready 1.0" in text
    assert "no-such-function" not in text  # unknown names never become labels


def test_openapi_documents_exactly_the_routes(client: TestClient) -> None:
    doc = client.get("/openapi.json").json()
    assert doc["openapi"].startswith("3.1")
    documented = {(path, method.upper()) for path, ops in doc["paths"].items() for method in ops}
    served = {
        (r.path, m)
        for r in client.app.routes
        if isinstance(r, Route)
        for m in (r.methods or ())
        if m != "HEAD"
    }
    assert documented == served
    for ops in doc["paths"].values():
        for op in ops.values():
            for ref in json.dumps(op).split('"$ref": "')[1:]:
                assert ref.split('"')[0].removeprefix("#/components/schemas/") in doc["components"]["schemas"]
    page = client.get("/docs")
    assert page.headers["content-type"].startswith("text/html") and "/static/docs.js" in page.text


def test_unknown_route_and_method_are_json_errors(client: TestClient) -> None:
    error(client.get("/nope"), 404, "not_found")
    error(client.patch("/v1/functions/x"), 405, "method_not_allowed")


def test_unexpected_error_is_500_internal_without_details(
    client: TestClient, platform: Platform, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(**_: object) -> None:
        raise RuntimeError("secret detail /etc/passwd")

    monkeypatch.setattr(platform, "list_functions", broken)
    r = client.get("/v1/functions")
    assert error(r, 500, "internal") == "internal server error"
    assert "secret" not in r.text and "Traceback" not in r.text


def test_gateway_never_imports_wasmtime_or_onnxruntime() -> None:
    forbidden = ("wasmtime", "onnxruntime", "wasminfer.runtime", "wasminfer.models")
    for path in sorted((ROOT / "host" / "wasminfer" / "gateway").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            for name in names:
                assert not name.startswith(forbidden), f"{path.name} imports {name}"
    service = ast.parse((ROOT / "host" / "wasminfer" / "service.py").read_text())
    assert not any(
        isinstance(n, ast.ImportFrom) and (n.module or "").startswith("starlette") for n in ast.walk(service)
    )


# --- the collector: a server's app freezes what is alive once the store is loaded ------------------
@pytest.mark.parametrize("freeze", [True, False])
def test_a_server_app_freezes_what_is_alive_once_the_store_is_loaded(tmp_path: Path, freeze: bool) -> None:
    gc.unfreeze()
    p = Platform(tmp_path / "data")
    try:
        with TestClient(create_app(p, freeze_gc=freeze)) as c:
            wait_ready(c)
            assert c.get("/healthz").status_code == 200
        # (the lifespan has ended: its load, and the freeze after it, are done)
        frozen = gc.get_freeze_count()
        assert (frozen > 10_000) if freeze else frozen == 0, frozen
    finally:
        gc.unfreeze()  # (the rest of this test process collects as usual)
        p.close()


# --- the invoke route reads its headers in one pass: the first of each, as Starlette's `Headers` ---
def test_the_guest_gets_the_first_content_type_or_octet_stream_without_one(
    client: TestClient, add_model: bytes, build_guest: Callable[..., bytes]
) -> None:
    assert client.put("/v1/models/add", content=add_model, headers=ONNX).status_code == 201
    r = client.put("/v1/functions/echo?models=add", content=build_guest("sdk_echo.c"), headers=WASM)
    assert r.status_code == 201, r.text
    body = encode_tensors({"a": np.ones((1, 3), np.float32), "b": np.ones((1, 3), np.float32)})
    url = "/v1/functions/echo/invoke"
    first_is_right = [("content-type", "application/cbor; model=add"), ("content-type", "text/plain")]
    r = client.post(url, content=body, headers=first_is_right)
    assert r.status_code == 200, r.text
    assert decode_tensors(r.content)["y"].tolist() == [[2.0, 2.0, 2.0]]
    assert r.headers["content-type"] == "application/cbor"
    assert re.fullmatch(
        r"queue;dur=[0-9.]+, start;dur=[0-9.]+, run;dur=[0-9.]+, infer;dur=[0-9.]+, total;dur=[0-9.]+",
        r.headers["server-timing"],
    ), r.headers["server-timing"]
    r = client.post(url, content=body, headers=first_is_right[::-1])
    assert "not 'text/plain'" in error(r, 500, "guest_error")
    r = client.post(url, content=body, headers={"content-type": ""})
    assert "not 'application/octet-stream'" in error(r, 500, "guest_error")
