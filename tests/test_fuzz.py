"""Fuzzing what guests and clients control: the HTTP API (schemathesis, from the server's own
/openapi.json), request parsing (manifests, API key specs, headers, multipart bodies), every parser of
untrusted bytes on a real server (batch bodies as JSON Lines and CBOR, job options and idempotency
headers, multipart manifests, model options, invoke query and headers) and the wasi-nn tensor struct.
The CBOR tensor codec has its own fuzz tests in test_models_codec.py.

The property everywhere: every input is either accepted or refused with its own error type (over
HTTP, a 4xx with a code the route documents, or a guest's own failure), never a 500 `internal`, never
a host crash. Against the real server each case also has a wall-clock bound (`CASE_BOUND_S`, the
HTTP client's timeout: a hang or a GIL held for that long fails the case) and the server must answer
`/healthz` after every target.

Short in the test suite; `just fuzz` runs the same tests with WASMINFER_FUZZ_EXAMPLES=2000 and
WASMINFER_FUZZ_REPORT=FILE, which collects the number of cases run per target and the slowest case
of each real-server target (bench/hardening.py reads it).
"""

from __future__ import annotations

import json
import os
import struct
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import cbor2
import httpx
import numpy as np
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from starlette.testclient import TestClient

from live_server import live_server
from wasminfer.errors import BadRequest, GuestError, InvalidManifest, WasminferError
from wasminfer.gateway import create_app
from wasminfer.jobs import JSONL_TYPES, JobSettings
from wasminfer.manifest import Manifest
from wasminfer.model_options import MODEL_OPTIONS
from wasminfer.models import ModelRegistry
from wasminfer.parsing import CBOR2_INTERPRETED_TAGS
from wasminfer.runtime import wasi_nn
from wasminfer.runtime._traps import GuestFault
from wasminfer.runtime.handler import InvocationState
from wasminfer.runtime.logs import LogBuffer
from wasminfer.service import Platform, parse_keys

EXAMPLES = int(os.environ.get("WASMINFER_FUZZ_EXAMPLES", "25"))
# Seconds a case may take against the real server before it counts as a hang (cases take
# milliseconds; this only catches a server that stops answering).
CASE_BOUND_S = float(os.environ.get("WASMINFER_FUZZ_CASE_BOUND_S", "20"))
CASES: Counter[str] = Counter()
SLOWEST: dict[str, float] = {}
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None,
                suppress_health_check=list(HealthCheck))
WASM = {"content-type": "application/wasm"}
ONNX = {"content-type": "application/octet-stream"}


def _codes(root: type[WasminferError]) -> set[str]:
    codes, todo = set(), [root]
    while todo:
        cls = todo.pop()
        codes.add(cls.code)
        todo += cls.__subclasses__()
    return codes


# 5xx a client can cause only through a guest's own failure, a timeout or overload; never `internal`.
GUEST_ERROR_CODES = _codes(GuestError)
# Every code the API documents (errors.py); `internal` is the one no request may ever cause.
API_CODES = _codes(WasminferError) - {"internal", "unreachable"}


@pytest.fixture(scope="module", autouse=True)
def report_cases() -> Iterator[None]:
    yield
    path = os.environ.get("WASMINFER_FUZZ_REPORT")
    if path:
        report = {"cases": dict(CASES), "total": sum(CASES.values()),
                  "slowest_s": {k: round(v, 3) for k, v in SLOWEST.items()}}
        Path(path).write_text(json.dumps(report, indent=1))


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
    # Jobs are accepted and never run: thousands of fuzzed submissions must not become work.
    app = create_app(platform, job_settings=JobSettings(workers=0))
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
    except InvalidManifest as exc:
        assert names_a_key(exc.message, data), exc.message
        return
    assert Manifest.from_dict(m.to_dict()) == m


@FUZZ
@given(params=st.dictionaries(_keys, st.lists(_text, min_size=1, max_size=3), max_size=6))
def test_manifest_from_query_accepts_or_names_the_bad_key(params: dict[str, list[str]]) -> None:
    CASES["manifest_query"] += 1
    try:
        m = Manifest.from_query(params)
    except InvalidManifest as exc:
        assert names_a_key(exc.message, params), exc.message
        return
    assert Manifest.from_dict(m.to_dict()) == m
    for key in params.keys() & {"memory_mb", "timeout_ms", "max_instances"}:
        assert getattr(m, key) == int(params[key][-1])


def names_a_key(message: str, keys: Iterable[str]) -> bool:
    """Whether an `InvalidManifest` message names the key it refuses, one of `keys`."""
    keys = set(keys)
    if message.startswith("unknown manifest key(s): "):
        named = message.removeprefix("unknown manifest key(s): ").split("; known: ")[0]
        return named == ", ".join(sorted(k for k in keys if k not in Manifest.__dataclass_fields__))
    return any(f"manifest key {k!r}" in message for k in keys)


@FUZZ
@given(spec=st.text(st.characters(codec="utf-8"), max_size=80))
def test_api_key_specs_parse_or_are_refused_without_the_secret(spec: str) -> None:
    CASES["key_spec"] += 1
    try:
        keys = parse_keys(spec)
    except BadRequest as exc:
        first = spec.split(",")[0].split(":")[0].strip()
        assert len(first) < 4 or first not in exc.message
        return
    # Accepted: one key per non-empty entry, in order, each with its secret, a scope and a tenant.
    entries = [e.strip().split(":") for e in spec.split(",") if e.strip()]
    assert [(k.key, k.tenant) for k in keys] == [(e[0], e[2] if len(e) == 3 else "default") for e in entries]
    assert all(k.scopes for k in keys)


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


# --- every parser of untrusted bytes, on a real server ------------------------------------------------
@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory, add_model: bytes,
         hostile_wasm: bytes) -> Iterator[httpx.Client]:
    """`wasminfer serve` on 127.0.0.1 (jobs accepted, none run), model `add` and function `canary`
    (tests/guests/hostile.wat) deployed; a client whose timeout is the per-case bound."""
    tmp = tmp_path_factory.mktemp("fuzz-live")
    with live_server(tmp / "data", tmp / "server.log", env={"WASMINFER_ASYNC_WORKERS": "0"}) as (url, _):
        with httpx.Client(base_url=url, timeout=CASE_BOUND_S) as http:
            assert http.put("/v1/models/add", content=add_model, headers=ONNX).status_code == 201
            q = "models=add&memory_mb=4&timeout_ms=100&max_instances=2"
            r = http.put(f"/v1/functions/canary?{q}", content=hostile_wasm, headers=WASM)
            assert r.status_code == 201, r.text
            yield http
            assert http.get("/healthz").status_code == 200
            assert http.post("/v1/functions/canary/invoke", content=b"eok").content == b"eok"


def sent(http: httpx.Client, target: str, method: str, url: str, **kwargs: Any) -> httpx.Response:
    """One case: the request, within `CASE_BOUND_S` (the client's timeout: a hang fails the case)."""
    CASES[target] += 1
    started = time.perf_counter()
    r = http.request(method, url, **kwargs)
    SLOWEST[target] = max(SLOWEST.get(target, 0.0), time.perf_counter() - started)
    return r


def documented(r: httpx.Response, allowed: dict[int, set[str]]) -> str | None:
    """Asserts the answer is a success of `allowed` or one of its errors with a code it documents
    (a 5xx only a guest's own failure, a timeout or overload); returns the error code."""
    if r.status_code < 300:
        assert r.status_code in allowed, (r.status_code, r.text[:300])
        return None
    assert r.headers["content-type"] == "application/json", (r.status_code, r.text[:300])
    code: str = r.json()["error"]["code"]
    if r.status_code >= 500:
        assert code in GUEST_ERROR_CODES or r.status_code in (503, 504), (r.status_code, r.text[:300])
    else:
        assert code in allowed.get(r.status_code, set()), (r.status_code, r.text[:300])
    return code


RFC_8746 = sorted({40, 41, 1040, *range(64, 88)})
_json_leaf = (st.none() | st.booleans() | st.integers(-(2 ** 70), 2 ** 70)
              | st.floats(allow_nan=False, allow_infinity=False) | _text)
_json = st.recursive(_json_leaf, lambda inner: st.lists(inner, max_size=4)
                     | st.dictionaries(_text, inner, max_size=4), max_leaves=16)
# Nesting around the limit of 64 (and far past it), balanced or not.
_nested = st.builds(lambda depth, close, inner: "[" * depth + inner + "]" * close,
                    st.integers(0, 200), st.integers(0, 200), st.sampled_from(["1", "", "NaN", '"x"', "{}"]))
_line = st.one_of(_json.map(json.dumps), _nested, _text,
                  st.sampled_from(["NaN", "-Infinity", "[1,]", '{"a":}', "\ufeff1", "1 2"]))
BATCH_CODES = {202: set(), 400: {"bad_request"}, 413: {"payload_too_large"},
               415: {"unsupported_media_type"}, 422: {"idempotency_key_reused"}}


@pytest.mark.integration
@FUZZ
@given(lines=st.lists(_line, max_size=8), ctype=st.sampled_from(JSONL_TYPES), crlf=st.booleans())
def test_fuzz_batch_json_lines(live: httpx.Client, lines: list[str], ctype: str, crlf: bool) -> None:
    body = ("\r\n" if crlf else "\n").join(lines).encode("utf-8", "surrogatepass")
    r = sent(live, "batch_jsonl", "POST", "/v1/functions/canary/batch", content=body,
             headers={"content-type": ctype})
    documented(r, BATCH_CODES)
    if r.status_code == 202:
        assert r.json()["items"]["total"] == sum(1 for line in body.split(b"\n") if line.strip())


_tags = st.one_of(st.sampled_from(RFC_8746), st.sampled_from(CBOR2_INTERPRETED_TAGS),
                  st.integers(0, 2 ** 64 - 1))
_cbor = st.recursive(
    st.none() | st.booleans() | st.integers(-(2 ** 64), 2 ** 64 - 1) | st.floats() | _text
    | st.binary(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_text, inner, max_size=4)
    | st.builds(cbor2.CBORTag, _tags, inner),
    max_leaves=16,
)
_cbor_body = st.one_of(
    st.lists(_cbor, max_size=6).map(cbor2.dumps),
    _cbor.map(cbor2.dumps),
    # a valid batch with one byte changed, or cut short
    st.tuples(st.lists(_cbor, min_size=1, max_size=4).map(cbor2.dumps), st.integers(0, 1 << 16),
              st.integers(0, 255), st.booleans()).map(
        lambda t: t[0][: t[1] % len(t[0])] if t[3] else
        t[0][: t[1] % len(t[0])] + bytes([t[2]]) + t[0][t[1] % len(t[0]) + 1:]),
    # nested one-element arrays around the depth limit, inside the batch array
    st.integers(0, 200).map(lambda depth: b"\x81" + b"\x81" * depth + b"\x00"),
    st.binary(max_size=64),
)


@pytest.mark.integration
@FUZZ
@given(body=_cbor_body, item_type=st.sampled_from([None, "image/png", "bad\ttype", ""]))
def test_fuzz_batch_cbor(live: httpx.Client, body: bytes, item_type: str | None) -> None:
    params = {} if item_type is None else {"item_content_type": item_type}
    r = sent(live, "batch_cbor", "POST", "/v1/functions/canary/batch", content=body, params=params,
             headers={"content-type": "application/cbor"})
    documented(r, BATCH_CODES)
    if r.status_code == 202:
        assert r.json()["items"]["total"] == len(cbor2.loads(body, semantic_decoders={
            tag: (lambda value, _immutable: value) for tag in CBOR2_INTERPRETED_TAGS}))


_printable = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40)
# What a client can send as a header value at all (h11 refuses leading and trailing blanks).
_header_text = _printable.map(str.strip)


@pytest.mark.integration
@FUZZ
@given(
    batch=st.booleans(),
    query=st.dictionaries(st.sampled_from(["ttl_s", "webhook", "async", "item_content_type", "x"]),
                          st.one_of(_printable, st.sampled_from(["1", "0", "inf", "nan", "1e308", "86400",
                                                                 "http://127.0.0.1/h"])), max_size=4),
    key=st.one_of(st.none(), _header_text, st.sampled_from(["order-1", "order-2"]),
                  st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=250, max_size=300)),
    prefer=st.sampled_from([None, "respond-async", "respond-async, wait=1", "handling=lenient", ""]),
    body=st.sampled_from([b"e1", b"e2", b'"e"\n', b""]),
)
def test_fuzz_job_options_and_idempotency_headers(live: httpx.Client, batch: bool, query: dict[str, str],
                                                  key: str | None, prefer: str | None, body: bytes) -> None:
    headers = {"content-type": "application/jsonl" if batch else "application/octet-stream"}
    if key is not None:
        headers["idempotency-key"] = key
    if prefer is not None:
        headers["prefer"] = prefer
    path = "/v1/functions/canary/batch" if batch else "/v1/functions/canary/invoke"
    if not batch:
        query = {**query, "async": query.get("async", "1")}
    r = sent(live, "job_options", "POST", path, params=query, content=body, headers=headers)
    documented(r, {**BATCH_CODES, 200: set(), 429: {"too_many_requests"}} if not batch else BATCH_CODES)


_manifest = st.dictionaries(
    st.sampled_from([*Manifest.__dataclass_fields__, "colour"]),
    st.one_of(_json, st.sampled_from(["add", "add\n", ["add"], ["add\n"], {"A": "1"}, {"A\n": "1"},
                                      "text/plain\n", 4, 0, -1, 10 ** 9])), max_size=5)


@pytest.mark.integration
@FUZZ
@given(
    manifest=st.one_of(_manifest.map(json.dumps), _nested, _text),
    wasm=st.sampled_from(["hostile", "garbage", "empty"]),
)
def test_fuzz_multipart_manifests(live: httpx.Client, hostile_wasm: bytes, manifest: str, wasm: str) -> None:
    module = {"hostile": hostile_wasm, "garbage": b"\0asm\1\0\0\0garbage", "empty": b""}[wasm]
    r = sent(live, "multipart_manifest", "PUT", "/v1/functions/multi",
             files={"wasm": ("f.wasm", module, "application/wasm"), "manifest": (None, manifest)})
    code = documented(r, {200: set(), 201: set(), 400: {"bad_request", "invalid_manifest", "invalid_wasm"},
                          404: {"model_not_found"}, 413: {"payload_too_large"}})
    if code is None:
        assert r.json()["name"] == "multi" and "\n" not in "".join(r.json()["manifest"]["models"])


_options = st.dictionaries(st.sampled_from([*MODEL_OPTIONS, "threads"]),
                           st.one_of(st.none(), st.integers(-2, 70), _json), max_size=4)


@pytest.mark.integration
@FUZZ
@given(
    body=st.one_of(_options.map(json.dumps), _json.map(json.dumps), _nested, _text),
    ctype=st.sampled_from(["application/json", "application/merge-patch+json", "text/plain"]),
)
def test_fuzz_model_options(live: httpx.Client, body: str, ctype: str) -> None:
    r = sent(live, "model_options", "PATCH", "/v1/models/add",
             content=body.encode("utf-8", "surrogatepass"), headers={"content-type": ctype})
    documented(r, {200: set(), 400: {"bad_request"}, 413: {"payload_too_large"},
                   415: {"unsupported_media_type"}})


@pytest.mark.integration
@FUZZ
@given(
    first=st.sampled_from(list(b"egstcinjxrlbom") + [0, 255]),
    rest=st.binary(max_size=64),
    query=st.dictionaries(st.sampled_from(["async", "ttl_s", "x", "version"]),
                          st.one_of(_printable, st.sampled_from(["", "1", "0", "true", "no", "maybe"])),
                          max_size=3),
    headers=st.dictionaries(st.sampled_from(["content-type", "prefer", "idempotency-key", "accept"]),
                            _header_text, max_size=3),
)
def test_fuzz_invoke_query_and_headers(live: httpx.Client, first: int, rest: bytes, query: dict[str, str],
                                       headers: dict[str, str]) -> None:
    r = sent(live, "invoke", "POST", "/v1/functions/canary/invoke", content=bytes([first]) + rest,
             params=query, headers=headers)
    documented(r, {200: set(), 202: set(), **{status: API_CODES for status in range(400, 500)}})


# --- the wasi-nn tensor struct ----------------------------------------------------------------------
# Guest memory and per-instance state of a real instance (one page, as the wasi-nn guests have at
# least): the host imports read and write it through the same bounds-checked `GuestMemory` as in a
# guest's call, so the fuzzing reaches the real checks, not a copy of them.
PAGE_WAT = """(module (memory (export "memory") 1) (func (export "wasminfer_abi_v1"))
  (func (export "wasminfer_alloc") (param i32) (result i32) (i32.const 1024))
  (func (export "wasminfer_handle") (param i32 i32 i32 i32) (result i32) (i32.const 0)))"""


@pytest.fixture(scope="module")
def guest(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    import wasmtime

    from wasminfer.runtime import Host

    with Host(cache_dir=tmp_path_factory.mktemp("nn-fuzz")) as host:
        host.deploy_function("page", bytes(wasmtime.wat2wasm(PAGE_WAT)), Manifest(memory_mb=1))
        pool = host.function("page").pool
        inst, _ = pool.acquire(10)
        try:
            yield inst.wasm
        finally:
            pool.release(inst, healthy=False)


def fresh(guest: Any) -> Any:
    """The instance's memory, zeroed, with no wasi-nn state left from an earlier case."""
    guest.host_state.clear()
    memory = guest.memory()
    assert memory.size() == MEM
    memory.write(0, bytes(MEM))
    return memory


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
def test_wasi_nn_tensor_struct(registry: ModelRegistry, guest: Any, fields: tuple[int, ...], padding: bytes,
                               dims: list[int], payload: bytes, index: int, out_max: int) -> None:
    CASES["wasi_nn"] += 1
    mem = fresh(guest)
    state = InvocationState("fuzz", Manifest(models=("add",), max_tensor_bytes=4096), registry.infer,
                            LogBuffer(100), "1", registry)
    state.instance = guest
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


def test_wasi_nn_accepts_a_valid_tensor(registry: ModelRegistry, guest: Any) -> None:
    """The fuzz test's harness reaches `compute` (so its cases are not all refused early)."""
    mem = fresh(guest)
    state = InvocationState("fuzz", Manifest(models=("add",)), registry.infer, LogBuffer(10), "1", registry)
    state.instance = guest
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
