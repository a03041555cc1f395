"""Fuzzing what guests and clients control: the HTTP API (schemathesis, from the server's own
/openapi.json), request parsing (manifests, API key specs, headers, multipart bodies) and the wasi-nn
tensor struct. The CBOR tensor codec has its own fuzz tests in test_models_codec.py.

The property everywhere: every input is either accepted or refused with its own error type (over
HTTP, a 4xx or a guest's own failure), never a 500 `internal`, never a host crash.

Short in the test suite; `just fuzz` runs the same tests with WASMINFER_FUZZ_EXAMPLES=2000 and
WASMINFER_FUZZ_REPORT=FILE, which collects the number of cases run (bench/hardening.py reads it).
"""

from __future__ import annotations

import json
import os
import struct
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cbor2
import numpy as np
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from starlette.testclient import TestClient

from wasminfer.errors import BadRequest, GuestError, WasminferError
from wasminfer.gateway import create_app
from wasminfer.manifest import Manifest
from wasminfer.models import ModelRegistry
from wasminfer.runtime import wasi_nn
from wasminfer.runtime._wasm import GuestFault
from wasminfer.runtime.handler import InvocationState
from wasminfer.runtime.logs import LogBuffer
from wasminfer.service import Platform, parse_keys

EXAMPLES = int(os.environ.get("WASMINFER_FUZZ_EXAMPLES", "25"))
CASES: Counter[str] = Counter()
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None,
                suppress_health_check=list(HealthCheck))
WASM = {"content-type": "application/wasm"}


def _guest_codes() -> set[str]:
    codes, todo = set(), [GuestError]
    while todo:
        cls = todo.pop()
        codes.add(cls.code)
        todo += cls.__subclasses__()
    return codes


# 5xx a client can cause only through a guest's own failure, a timeout or overload; never `internal`.
GUEST_ERROR_CODES = _guest_codes()


@pytest.fixture(scope="module", autouse=True)
def report_cases() -> Iterator[None]:
    yield
    path = os.environ.get("WASMINFER_FUZZ_REPORT")
    if path:
        Path(path).write_text(json.dumps({"cases": dict(CASES), "total": sum(CASES.values())}, indent=1))


def not_a_server_failure(status: int, text: str) -> None:
    if status < 500:
        return
    code = json.loads(text)["error"]["code"] if text.startswith("{") else "?"
    assert code in GUEST_ERROR_CODES or status in (503, 504), (status, text[:300])


# --- schemathesis against the real app --------------------------------------------------------------
@schemathesis.serializer("application/cbor")
def _cbor(ctx: Any, value: Any) -> bytes:
    return cbor2.dumps(value)


@schemathesis.serializer("application/jsonl")
def _jsonl(ctx: Any, value: Any) -> bytes:
    items = value if isinstance(value, list) else [value]
    return b"".join(json.dumps(item).encode() + b"\n" for item in items)


@pytest.fixture(scope="module")
def app_client(tmp_path_factory: pytest.TempPathFactory, add_model: bytes,
               hostile_wasm: bytes) -> Iterator[TestClient]:
    platform = Platform(tmp_path_factory.mktemp("fuzz") / "data")
    app = create_app(platform)
    try:
        with TestClient(app, raise_server_exceptions=False) as client:
            for _ in range(500):
                if client.get("/readyz").status_code == 200:
                    break
                time.sleep(0.01)
            assert client.put("/v1/models/add", content=add_model,
                              headers={"content-type": "application/octet-stream"}).status_code == 201
            q = "models=add&memory_mb=4&timeout_ms=100&max_instances=2"
            r = client.put(f"/v1/functions/canary?{q}", content=hostile_wasm, headers=WASM)
            assert r.status_code == 201, r.text
            yield client
    finally:
        platform.close()


def _send(client: TestClient, case: schemathesis.Case) -> Any | None:
    kwargs = case.as_transport_kwargs(base_url="http://testserver")
    data = kwargs.pop("data", None)
    if isinstance(data, str | bytes):
        kwargs["content"] = data
    elif data is not None:
        kwargs["data"] = data
    for unused in ("allow_redirects", "verify", "timeout"):
        kwargs.pop(unused, None)
    cookies = kwargs.pop("cookies", None)
    if cookies:  # httpx wants them as a header (per-request cookies are deprecated)
        cookie = "; ".join(f"{k}={v}" for k, v in cookies.items())
        kwargs["headers"] = {**(kwargs.get("headers") or {}), "cookie": cookie}
    request = client.build_request(**kwargs)
    try:
        request.read()  # render the body here: a body httpx cannot encode is no request to send
    except (TypeError, AttributeError, ValueError):
        return None
    return client.send(request)


def _operations(client: TestClient) -> list[Any]:
    schema = schemathesis.openapi.from_dict(client.get("/openapi.json").json())
    return [result.ok() for result in schema.get_all_operations()]


def test_api_never_answers_500_internal_to_any_request(app_client: TestClient) -> None:
    operations = _operations(app_client)
    assert len(operations) >= 17
    for op in operations:
        strategies = [op.as_strategy(mode) for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)]
        if "{name}" in op.path and op.method.upper() != "DELETE":
            # Half the cases name what exists, so they reach past the 404.
            strategies += [op.as_strategy(mode, path_parameters={"name": known})
                           for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
                           for known in ("canary", "add")]

        @FUZZ
        @given(case=st.one_of(strategies))
        def run(case: schemathesis.Case) -> None:
            CASES["schemathesis"] += 1
            r = _send(app_client, case)
            if r is None:
                return
            not_a_server_failure(r.status_code, r.text)

        run()
    # the server is unharmed
    assert app_client.get("/readyz").status_code == 200
    assert app_client.post("/v1/functions/canary/invoke", content=b"eok").content == b"eok"


# --- request parsing --------------------------------------------------------------------------------
_text = st.text(st.characters(codec="utf-8"), max_size=40)
_values = st.one_of(st.none(), st.booleans(), st.integers(-(2 ** 70), 2 ** 70), st.floats(), _text,
                    st.lists(_text, max_size=4), st.dictionaries(_text, _text, max_size=3))
_keys = st.sampled_from([*Manifest.__dataclass_fields__, "colour", "", "models "])


@FUZZ
@given(data=st.dictionaries(_keys, _values, max_size=6))
def test_manifest_from_json_accepts_or_names_the_bad_key(data: dict[str, Any]) -> None:
    CASES["manifest"] += 1
    try:
        m = Manifest.from_dict(data)
    except BadRequest:
        return
    assert Manifest.from_dict(m.to_dict()) == m


@FUZZ
@given(params=st.dictionaries(_keys, st.lists(_text, min_size=1, max_size=3), max_size=6))
def test_manifest_from_query_accepts_or_names_the_bad_key(params: dict[str, list[str]]) -> None:
    CASES["manifest_query"] += 1
    try:
        Manifest.from_query(params)
    except BadRequest:
        pass


@FUZZ
@given(spec=st.text(st.characters(codec="utf-8"), max_size=80))
def test_api_key_specs_parse_or_are_refused_without_the_secret(spec: str) -> None:
    CASES["key_spec"] += 1
    try:
        parse_keys(spec)
    except BadRequest as exc:
        first = spec.split(",")[0].split(":")[0].strip()
        assert len(first) < 4 or first not in exc.message


_header_value = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=60)


@FUZZ
@given(
    method=st.sampled_from(["GET", "PUT", "POST", "DELETE", "PATCH", "OPTIONS"]),
    path=st.sampled_from(["/v1/functions/canary", "/v1/functions/canary/invoke", "/v1/models/add",
                          "/v1/functions/canary/logs", "/v1/functions/canary/rollback", "/v1/functions"]),
    query=st.dictionaries(_keys, _header_value, max_size=3),
    headers=st.dictionaries(st.sampled_from(["content-type", "content-length", "authorization", "accept",
                                             "transfer-encoding", "x-tenant"]), _header_value, max_size=3),
    body=st.binary(max_size=300),
)
def test_requests_with_hostile_headers_and_bodies(app_client: TestClient, method: str, path: str,
                                                  query: dict[str, str], headers: dict[str, str],
                                                  body: bytes) -> None:
    CASES["http"] += 1
    if method == "DELETE":
        path = path.replace("canary", "nobody").replace("/add", "/nobody")
    try:
        r = app_client.request(method, path, params=query, headers=headers, content=body)
    except (ValueError, UnicodeError):  # the client refused to send it (e.g. a bad content-length)
        return
    not_a_server_failure(r.status_code, r.text)


@FUZZ
@given(
    boundary=st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=20),
    parts=st.lists(st.tuples(st.sampled_from(["wasm", "manifest", "x", ""]), st.binary(max_size=64),
                             st.booleans()), max_size=4),
    garbage=st.binary(max_size=40),
)
def test_multipart_uploads(app_client: TestClient, boundary: str, parts: list[tuple[str, bytes, bool]],
                           garbage: bytes) -> None:
    CASES["multipart"] += 1
    chunks = []
    for name, data, is_file in parts:
        disposition = f'form-data; name="{name}"' + ('; filename="f.wasm"' if is_file else "")
        chunks.append(f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + data + b"\r\n")
    body = b"".join(chunks) + f"--{boundary}--\r\n".encode() + garbage
    r = app_client.put("/v1/functions/multi", content=body,
                       headers={"content-type": f"multipart/form-data; boundary={boundary}"})
    not_a_server_failure(r.status_code, r.text)
    assert r.status_code != 201 or parts  # nothing is deployed from nothing


# --- the wasi-nn tensor struct ----------------------------------------------------------------------
class FakeMemory:
    """Guest memory as `GuestMemory` presents it to host imports: bounds-checked, in a bytearray."""

    def __init__(self, size: int) -> None:
        self.data = bytearray(size)

    def _check(self, ptr: int, length: int) -> None:
        if ptr < 0 or length < 0 or ptr + length > len(self.data):
            raise GuestFault(f"range [{ptr}, {ptr + length}) is outside guest memory")

    def read(self, ptr: int, length: int) -> bytes:
        self._check(ptr, length)
        return bytes(self.data[ptr:ptr + length])

    def write(self, ptr: int, data: bytes) -> None:
        self._check(ptr, len(data))
        self.data[ptr:ptr + len(data)] = data

    def write_u32(self, ptr: int, value: int) -> None:
        self.write(ptr, (value & 0xFFFFFFFF).to_bytes(4, "little"))

    def size(self) -> int:
        return len(self.data)

    def exported(self) -> bool:
        return True


class FakeInstance:
    def __init__(self) -> None:
        self.host_state: dict[str, Any] = {}


@pytest.fixture(scope="module")
def registry(add_model: bytes) -> Iterator[ModelRegistry]:
    r = ModelRegistry()
    r.load("add", add_model)
    yield r
    r.close()


_NN = {hf.name: hf.impl for hf in wasi_nn.HOST_FUNCS}
MEM = 1 << 16


@FUZZ
@given(
    fields=st.tuples(*[st.one_of(st.integers(0, MEM + 64), st.integers(0, 2 ** 32 - 1)) for _ in range(2)],
                     st.integers(0, 255), *[st.one_of(st.integers(0, MEM + 64), st.integers(0, 2 ** 32 - 1))
                                            for _ in range(2)]),
    padding=st.binary(min_size=3, max_size=3),
    dims=st.lists(st.sampled_from([0, 1, 2, 3, 4, 2 ** 31, 2 ** 32 - 1]), max_size=6),
    payload=st.binary(max_size=128),
    index=st.integers(0, 3),
    out_max=st.integers(0, 2 ** 32 - 1),
)
def test_wasi_nn_tensor_struct(registry: ModelRegistry, fields: tuple[int, ...], padding: bytes,
                               dims: list[int], payload: bytes, index: int, out_max: int) -> None:
    CASES["wasi_nn"] += 1
    mem = FakeMemory(MEM)
    state = InvocationState("fuzz", Manifest(models=("add",), max_tensor_bytes=4096), registry.infer,
                            LogBuffer(100), "1", registry)
    state.instance = FakeInstance()  # type: ignore[assignment]
    mem.write(0, b"add")
    assert _NN["load_by_name"](state, mem, 0, 3, 16) == 0
    graph = int.from_bytes(mem.read(16, 4), "little")
    assert _NN["init_execution_context"](state, mem, graph, 20) == 0
    ctx = int.from_bytes(mem.read(20, 4), "little")
    dims_ptr, dims_len, ttype, data_ptr, data_len = fields
    # Sometimes point the struct at real dims and data, so cases get past the bounds checks.
    mem.write(1024, struct.pack(f"<{len(dims)}I", *dims))
    mem.write(2048, payload)
    if ttype % 3 == 0:
        dims_ptr, dims_len, data_ptr, data_len = 1024, len(dims), 2048, len(payload)
    raw = struct.pack("<II", dims_ptr, dims_len) + bytes([ttype]) + padding + struct.pack("<II", data_ptr,
                                                                                          data_len)
    mem.write(64, raw)
    for call, args in (("set_input", (ctx, index, 64)), ("set_input", (ctx, 1 - index % 2, 64)),
                       ("compute", (ctx,)), ("get_output", (ctx, 0, 4096, out_max, 32))):
        try:
            errno = _NN[call](state, mem, *args)
        except GuestFault:
            return  # traps the guest, as a bad pointer must
        assert 0 <= errno < len(wasi_nn.ERRNO_NAMES)
        if errno:
            assert state.nn_error
            assert state.infer_error is None or isinstance(state.infer_error, WasminferError)


def test_wasi_nn_accepts_a_valid_tensor(registry: ModelRegistry) -> None:
    """The fuzz test's harness reaches `compute` (so its cases are not all refused early)."""
    mem = FakeMemory(MEM)
    state = InvocationState("fuzz", Manifest(models=("add",)), registry.infer, LogBuffer(10), "1", registry)
    state.instance = FakeInstance()  # type: ignore[assignment]
    mem.write(0, b"add")
    assert _NN["load_by_name"](state, mem, 0, 3, 16) == 0
    assert _NN["init_execution_context"](state, mem, 0, 20) == 0
    ctx = int.from_bytes(mem.read(20, 4), "little")
    mem.write(1024, struct.pack("<2I", 1, 3))
    mem.write(2048, np.ones((1, 3), np.float32).tobytes())
    mem.write(64, struct.pack("<IIB3xII", 1024, 2, 1, 2048, 12))
    assert _NN["set_input"](state, mem, ctx, 0, 64) == 0
    assert _NN["set_input"](state, mem, ctx, 1, 64) == 0
    assert _NN["compute"](state, mem, ctx) == 0
    assert _NN["get_output"](state, mem, ctx, 0, 4096, 12, 32) == 0
    assert np.frombuffer(mem.read(4096, 12), np.float32).tolist() == [2.0, 2.0, 2.0]
