"""Python guests: the SDK (guest-sdk/python), the WIT world (guest-sdk/wit), the component ABI
(runtime/component.py) and the text-classify example.

The guests are built from source with componentize-py (tests/guests/py_guest, functions/text-classify)
and deployed on an in-process `Host`, then through the HTTP API. Building and compiling a component
takes 10-30 s each (it embeds CPython), so both are cached across sessions: the builds in
`toolchain.default_cache_dir()`, the compiled components in the engine cache next to it (both under
`$WASMINFER_CACHE`), built once per machine under a file lock that xdist workers share.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import wasmtime

from wasminfer import toolchain
from wasminfer.errors import (
    GuestError,
    GuestRejected,
    InferLimitExceeded,
    InvalidModule,
    InvalidTensor,
    LogLimitExceeded,
    MemoryLimitExceeded,
    ModelNotAllowed,
    OutputLimitExceeded,
    Timeout,
)
from wasminfer.examples import EXAMPLES, text_classifier, text_classifier_model, text_tokenizer
from wasminfer.models import decode_tensors, encode_tensors
from wasminfer.runtime import Host

pytestmark = pytest.mark.slow  # the first run on a machine builds and compiles two components

ROOT = Path(__file__).resolve().parents[1]
SDK = ROOT / "guest-sdk" / "python"
GUEST = Path(__file__).resolve().parent / "guests" / "py_guest"
TEXT = next(ex for ex in EXAMPLES if ex.name == "text-classify")
ENGINE_CACHE = toolchain.default_cache_dir().parent / "engine"
GUEST_MANIFEST = {"models": ["add"], "memory_mb": 48, "timeout_ms": 5000, "max_output_bytes": 100_000,
                  "max_log_bytes": 5000, "max_infer_calls": 5}

if str(SDK) not in sys.path:
    sys.path.insert(0, str(SDK))  # the SDK runs in plain Python too (wasminfer_guest.local)


@contextmanager
def exclusive(lock: Path) -> Iterator[None]:
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@pytest.fixture(scope="session")
def components() -> dict[str, bytes]:
    """Both components, built and compiled once per machine (concurrently: two cores)."""
    folders = {"guest": GUEST, "text-classify": TEXT.folder}
    with exclusive(ENGINE_CACHE / ".test_python_guest.lock"), ThreadPoolExecutor(2) as pool:
        built = dict(zip(folders, pool.map(lambda f: toolchain.build(f).read_bytes(), folders.values()),
                         strict=True))
        with Host(cache_dir=ENGINE_CACHE) as h:
            list(pool.map(h.inspect, built.values()))
    return built


@pytest.fixture(scope="module")
def host(components: dict[str, bytes], add_model: bytes, tmp_path_factory: pytest.TempPathFactory,
         ) -> Iterator[Host]:
    with Host(cache_dir=ENGINE_CACHE) as h:
        h.deploy_model("add", add_model)
        h.deploy_model("text-classifier", text_classifier_model(tmp_path_factory.mktemp("models")))
        h.deploy_function("py", components["guest"], GUEST_MANIFEST)
        h.deploy_function("text-classify", components["text-classify"], TEXT.manifest())
        yield h


def run(host: Host, text: str, function: str = "py") -> bytes:
    return host.invoke(function, text.encode(), "text/plain").body


def fresh_instance_next(host: Host, function: str = "py") -> bool:
    """Whether the next invocation gets a new instance (the last one was discarded)."""
    return host.invoke(function, b"echo ping", "text/plain").cold


# --- the SDK in plain Python ----------------------------------------------------------------------
def test_tensor_round_trips_every_dtype() -> None:
    from wasminfer_guest import Tensor

    for dtype in ("uint8", "int8", "uint16", "int16", "uint32", "int32", "uint64", "int64",
                  "float16", "float32", "float64"):
        t = Tensor.of([[1, 2, 3], [4, 5, 6]], dtype)
        assert t.shape == (2, 3) and t.tolist() == [[1, 2, 3], [4, 5, 6]]
        assert t.data == np.array([[1, 2, 3], [4, 5, 6]], dtype=np.dtype(dtype).newbyteorder("<")).tobytes()
    assert Tensor.of([True, False], "bool").values() == [True, False]
    assert Tensor.text(["a", "b"]).tolist() == ["a", "b"]
    assert Tensor.of(7, "int64").item() == 7
    assert Tensor.of([[1, 2], [3, 4]], "int32").item(1, 0) == 3
    with pytest.raises(ValueError, match="ragged"):
        Tensor.of([[1, 2], [3]])
    with pytest.raises(ValueError, match="fill shape"):
        Tensor.of([1, 2, 3], shape=(2, 2))
    with pytest.raises(TypeError):
        Tensor.of([1.5], "int32")


def test_tensor_of_rows_packs_what_the_array_module_packs() -> None:
    """Rows of numbers are packed with `struct` (fast in the runtime); what it refuses goes the
    `array` module's way, whose results and errors stay what they were."""
    from wasminfer_guest import Tensor

    rows = [[0.5, -1, 3.25e38], [float("inf"), True, 2]]
    assert Tensor.of(rows, "float32").data == np.array(rows, dtype="<f4").tobytes()
    assert Tensor.of([[1e39]], "float32").values().tolist() == [float("inf")]  # as array.array('f')
    assert Tensor.of([[255, 0]], "uint8").data == b"\xff\x00"
    assert Tensor.of([[1, 2], (3, 4)], "int64").tolist() == [[1, 2], [3, 4]]  # a tuple row: the general way
    with pytest.raises(OverflowError):
        Tensor.of([[256]], "uint8")
    with pytest.raises(TypeError):
        Tensor.of([[1.5, 2]], "int32")
    with pytest.raises(ValueError, match="ragged"):
        Tensor.of([[1, 2], [3, 4, 5]], "int32")


def test_item_and_tolist_read_every_dtype() -> None:
    from wasminfer_guest import Tensor

    for dtype in ("uint8", "int8", "uint16", "int16", "uint32", "int32", "uint64", "int64",
                  "float16", "float32", "float64"):
        t = Tensor.of([[1, 2, 3], [4, 5, 6]], dtype)
        assert (t.item(1, 2), t.item(0, 0), t.tolist()) == (6, 1, [[1, 2, 3], [4, 5, 6]]), dtype
        assert type(t.item(1, 2)) is (float if dtype.startswith("float") else int), dtype
    flags = Tensor.of([[True, False]], "bool")
    assert (flags.item(0, 0), flags.item(0, 1), flags.tolist()) == (True, False, [[True, False]])
    assert Tensor.text(["a", "b"], (1, 2)).item(0, 1) == "b"
    assert Tensor.of([2.5], "float32").item() == 2.5
    with pytest.raises(IndexError):
        Tensor.of([[1, 2]], "int32").item(0, 2)
    with pytest.raises(ValueError, match="needs an index"):
        Tensor.of([1, 2], "int32").item()
    # A 1-D tensor's item and a one-row matrix's tolist take short ways: the same answers and errors.
    row = Tensor.of([7, 8, 9], "int64")
    assert [row.item(i) for i in range(3)] == [7, 8, 9]
    for bad in (3, -1):
        with pytest.raises(IndexError, match=rf"^index \({bad},\) out of shape \[3\]$"):
            row.item(bad)
    with pytest.raises(IndexError, match=r"^index \(0, 0\) for shape \[3\]$"):
        row.item(0, 0)
    one = Tensor.of([[0.5, 0.25]], "float32")
    listed = one.tolist()
    assert listed == [[0.5, 0.25]] and listed is not one.tolist() and listed[0] is not one.tolist()[0]
    assert Tensor.of([[1], [2]], "int32").tolist() == [[1], [2]]
    assert Tensor.of([[[1, 2]]], "int32").tolist() == [[[1, 2]]]


def test_request_media_type_is_the_content_type_without_parameters() -> None:
    from wasminfer_guest import Request
    from wasminfer_guest.http import _MEDIA_TYPES

    assert Request(b"", "Application/JSON; charset=utf-8").media_type == "application/json"
    assert Request(b"", "Application/JSON; charset=utf-8").media_type == "application/json"  # kept
    assert Request(b"", " text/plain ").media_type == "text/plain"
    assert Request(b"", "").media_type == ""
    for i in range(100):  # kept up to a bound, right past it
        assert Request(b"", f"x/y{i}; q=1").media_type == f"x/y{i}"
    assert len(_MEDIA_TYPES) == 64


def test_sdk_cbor_is_the_hosts_tensor_encoding() -> None:
    from wasminfer_guest import Tensor, cbor

    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    mask = np.array([True, False])
    words = np.array(["a", "bc"], dtype=object)
    encoded = cbor.dumps({"x": Tensor.of(x.tolist()), "mask": Tensor.of([True, False], "bool"),
                          "words": Tensor.text(["a", "bc"])})
    decoded = decode_tensors(encoded)
    np.testing.assert_array_equal(decoded["x"], x)
    np.testing.assert_array_equal(decoded["mask"], mask.astype(np.uint8))
    assert list(decoded["words"]) == list(words)
    back = cbor.loads(encode_tensors({"x": x, "words": words}))
    assert back["x"] == Tensor.of(x.tolist()) and back["words"].tolist() == ["a", "bc"]
    assert cbor.loads(cbor.dumps({"n": -3, "f": 1.5, "s": "é", "l": [None, True, b"\x00"]})) == {
        "n": -3, "f": 1.5, "s": "é", "l": [None, True, b"\x00"]}
    with pytest.raises(ValueError):
        cbor.loads(b"\xa1\x61")  # truncated


def test_request_parsing_failures_reject_with_400() -> None:
    from wasminfer_guest import Reject, Request

    with pytest.raises(Reject) as info:
        Request(b"{nope", "application/json").json()
    assert info.value.status == 400 and "not JSON" in info.value.message
    with pytest.raises(Reject):
        Request(b"\xff", "text/plain").text()
    with pytest.raises(ValueError):
        Reject(500, "a rejection is a client error")


# --- the build --------------------------------------------------------------------------------------
def test_build_is_cached_and_keyed_by_every_file_of_the_function(tmp_path: Path,
                                                                 components: dict[str, bytes]) -> None:
    messages: list[str] = []
    toolchain.build(TEXT.folder, progress=messages.append)
    assert any("up to date" in m for m in messages), messages
    # The key covers the function's data files (its vocabulary), not its manifest or README.
    fn = tmp_path / "fn"
    fn.mkdir()
    for name in ("app.py", "tokenizer.py", "vocab.txt", "labels.txt", "manifest.json"):
        (fn / name).write_bytes((TEXT.folder / name).read_bytes())
    src = toolchain._find_sources(fn)
    sdk = toolchain.guest_sdk_dir()
    flags = toolchain._Flags("-O2", None, 64 << 10)
    key = toolchain._cache_key(src, sdk, flags)
    (fn / "manifest.json").write_text("{}")
    (fn / "README.md").write_text("notes")
    assert toolchain._cache_key(toolchain._find_sources(fn), sdk, flags) == key
    (fn / "vocab.txt").write_text("changed\n")
    assert toolchain._cache_key(toolchain._find_sources(fn), sdk, flags) != key


def test_build_error_shows_the_python_traceback(tmp_path: Path) -> None:
    (tmp_path / "app.py").write_text("import wasminfer_guest\nraise RuntimeError('broken at import')\n")
    with pytest.raises(toolchain.BuildError, match="broken at import"):
        toolchain.build(tmp_path / "app.py", cache_dir=tmp_path / "cache")


# --- upload ---------------------------------------------------------------------------------------
def test_inspect_detects_the_component_abi(host: Host, components: dict[str, bytes]) -> None:
    info, compiled = host.inspect(components["guest"])
    assert info.abi == "component"
    assert "wasminfer:function/inference@0.1.0" in info.imports
    assert "wasminfer:function/handler@0.1.0" in info.exports
    assert compiled.from_cache
    described = host.function("py").describe()
    assert described["abi"] == "component" and described["module"]["sha256"] == info.sha256


_LIFTED_U32 = """(component
  (core module $m (func (export "f") (param i32) (result i32) local.get 0))
  (core instance $i (instantiate $m))
  (func $f (param "x" u32) (result u32) (canon lift (core func $i "f")))
  (instance $h (export "handle" (func $f)))
  (export "{name}" (instance $h)))"""


@pytest.mark.parametrize("wat,match", [
    ("(component)", "does not export wasminfer:function/handler@0.1.0"),
    ('(component (import "evil:net/sockets@1.0.0" (instance)))', "evil:net/sockets@1.0.0"),
    (_LIFTED_U32.replace("{name}", "wasminfer:function/handler@0.1.0"), "has type func\\(x: u32\\)"),
    (_LIFTED_U32.replace("{name}", "wasminfer:function/handler@0.2.0"), "does not serve"),
])
def test_components_off_the_world_are_rejected(host: Host, wat: str, match: str) -> None:
    with pytest.raises(InvalidModule, match=match):
        host.deploy_function("bad", bytes(wasmtime.wat2wasm(wat)))
    assert "bad" not in {f.name for f in host.functions()}


def test_a_memory_limit_below_the_interpreters_is_refused_at_deploy(host: Host,
                                                                    components: dict[str, bytes]) -> None:
    with pytest.raises(InvalidModule, match="memory_mb"):
        host.deploy_function("tiny", components["guest"], {**GUEST_MANIFEST, "memory_mb": 8})


# --- invocations ----------------------------------------------------------------------------------
def test_echo_on_a_warm_instance_that_keeps_its_state(host: Host) -> None:
    r = host.invoke("py", b"echo hello", "text/x-test")
    assert (r.body, r.content_type) == (b"echo hello", "text/x-test")
    first = int(run(host, "state"))
    r = host.invoke("py", b"state", "text/plain")
    assert not r.cold and int(r.body) == first + 1  # the same warm instance, its globals kept


def test_infer_matches_numpy(host: Host) -> None:
    r = host.invoke("py", b"add 1.5,-2,40", "text/plain")
    assert r.content_type == "application/json" and r.infer_us > 0
    assert json.loads(r.body) == {"y": (np.array([[1.5, -2, 40]]) + [1, 2, 3]).tolist()}


def test_cbor_tensors_in_and_out(host: Host) -> None:
    x = np.array([[1, -2], [3, 4]], dtype=np.int32)
    r = host.invoke("py", encode_tensors({"x": x}), "application/cbor")
    assert r.content_type == "application/cbor"
    out = decode_tensors(r.body)
    np.testing.assert_array_equal(out["x"], x)
    np.testing.assert_array_equal(out["doubled"], 2 * x)


def test_infer_errors_reach_the_caller_with_their_own_status(host: Host) -> None:
    with pytest.raises(InvalidTensor, match=r"shape \[1,2\], the model expects \[N,3\]") as bad:
        run(host, "infer-bad-shape")
    assert bad.value.status == 422
    with pytest.raises(ModelNotAllowed, match="manifest key 'models'") as denied:
        run(host, "infer-model secret")
    assert denied.value.status == 403
    assert json.loads(run(host, "infer-recover")) == {"recovered": "invalid-tensor"}


def test_guest_exception_is_a_500_with_its_message_and_its_traceback_in_the_logs(host: Host) -> None:
    since = time.time()
    with pytest.raises(GuestError) as info:
        run(host, "raise kaboom")
    assert (info.value.status, info.value.code) == (500, "guest_error")
    # the exception and where it was raised, for the caller (not only in the logs)
    where = '(app.py, line 40, in handle: raise ValueError(arg or "boom"))'
    assert info.value.message == f"ValueError: kaboom {where}"
    lines = host.logs("py", 50, since)
    traceback = [ln for ln in lines if ln.stream == "log" and "Traceback" in ln.message]
    assert traceback and traceback[0].level == "error"
    text = traceback[0].message
    assert 'raise ValueError(arg or "boom")' in text  # the source line, kept from the build
    assert "app.py" in text and text.rstrip().endswith("ValueError: kaboom")
    assert "wasminfer_guest" not in text  # the SDK's own frames are left out
    assert any(ln.stream == "host" and "guest_error" in ln.message for ln in lines)
    assert not fresh_instance_next(host)  # an exception does not cost the instance


def test_sys_exit_is_a_guest_error_too(host: Host) -> None:
    with pytest.raises(GuestError, match="SystemExit: 3"):
        run(host, "exit")


def test_print_and_log_go_to_the_functions_logs(host: Host) -> None:
    since = time.time()
    assert run(host, "print hello there") == b"printed"
    assert run(host, "log 2") == b"logged"
    lines = [(ln.stream, ln.level, ln.message) for ln in host.logs("py", 20, since)]
    assert ("stdout", "info", "hello there") in lines
    assert ("stderr", "warn", "to stderr") in lines
    assert ("log", "info", "line 1 " + "x" * 100) in lines


def test_guest_rejection_is_a_4xx(host: Host) -> None:
    with pytest.raises(GuestRejected) as info:
        host.invoke("text-classify", b"<xml/>", "application/xml")
    assert info.value.status == 415 and "text/plain or application/json" in info.value.message


# --- limits, obeyed and violated ------------------------------------------------------------------
def test_memory_limit_obeyed(host: Host) -> None:
    assert run(host, "alloc 10") == b"holding 10 MiB"
    assert run(host, "alloc 10") == b"holding 20 MiB"  # the same instance holds both
    assert run(host, "free") == b"freed"


def test_memory_limit_violated(host: Host) -> None:
    with pytest.raises(MemoryLimitExceeded, match="limit of 48 MiB") as info:
        run(host, "alloc 40")
    assert info.value.status == 500
    assert fresh_instance_next(host)  # the instance was discarded; the host keeps serving


@pytest.mark.serial  # measures time: runs alone, before the parallel suite
def test_timeout_obeyed_and_violated(host: Host, components: dict[str, bytes]) -> None:
    host.deploy_function("py-quick", components["guest"], {**GUEST_MANIFEST, "timeout_ms": 300})
    assert run(host, "echo quick", "py-quick") == b"echo quick"
    start = time.monotonic()
    with pytest.raises(Timeout, match="timeout of 300 ms") as info:
        run(host, "loop", "py-quick")
    assert info.value.status == 504 and time.monotonic() - start < 2.0
    assert fresh_instance_next(host, "py-quick")


def test_output_limit_obeyed_and_violated(host: Host) -> None:
    assert len(run(host, "big 100000")) == 100_000
    with pytest.raises(OutputLimitExceeded, match="max_output_bytes"):
        run(host, "big 100001")
    assert fresh_instance_next(host)


def test_a_response_beyond_what_wasmtime_copies_is_an_output_limit(host: Host,
                                                                   components: dict[str, bytes]) -> None:
    host.deploy_function("py-wide", components["guest"], {**GUEST_MANIFEST, "max_output_bytes": 64 << 20,
                                                         "memory_mb": 128})
    with pytest.raises(OutputLimitExceeded, match="about 2 MiB"):
        run(host, "big 4000000", "py-wide")
    assert run(host, "echo still serving", "py-wide") == b"echo still serving"


def test_log_limit_obeyed_and_violated(host: Host) -> None:
    assert run(host, "log 40") == b"logged"  # 40 lines of 107 bytes: under 5000
    with pytest.raises(LogLimitExceeded, match="max_log_bytes"):
        run(host, "log 100")


def test_infer_call_limit_obeyed_and_violated(host: Host) -> None:
    assert run(host, "infer-loop 5") == b"done"
    with pytest.raises(InferLimitExceeded, match="max_infer_calls"):
        run(host, "infer-loop 6")  # even though the function swallows every InferError


# --- text-classify --------------------------------------------------------------------------------
SENTENCES = [
    "Heavy rain and strong winds are expected along the coast tonight",
    "The striker scored a late goal and the crowd went wild",
    "Simmer the onions with garlic and add fresh basil before serving",
    "The new laptop ships with a faster chip and a brighter display",
    "a cold front brings snow to the mountains on monday",
    "our soup was creamy and the bread was even better",
    "the search giant fixed a login bug in its browser",
    "nothing here matches anything",
]


@pytest.fixture(scope="module")
def reference() -> list[dict[str, Any]]:
    """The same pipeline in plain Python: the function's tokenizer, then scikit-learn."""
    tok = text_tokenizer()
    vocabulary = tok.load_vocabulary(TEXT.folder / "vocab.txt")
    labels = (TEXT.folder / "labels.txt").read_text().split()
    rows = np.array([tok.counts(s, vocabulary) for s in SENTENCES], dtype=np.float32)
    probabilities = text_classifier().predict_proba(rows)
    return [{"label": labels[int(p.argmax())], "scores": dict(zip(labels, p, strict=True)),
             "known_ngrams": int(r.sum())} for r, p in zip(rows, probabilities, strict=True)]


def test_text_classify_agrees_with_scikit_learn(host: Host, reference: list[dict[str, Any]]) -> None:
    for sentence, expected in zip(SENTENCES, reference, strict=True):
        got = json.loads(host.invoke("text-classify", sentence.encode(), "text/plain").body)
        assert got["label"] == expected["label"], sentence
        assert got["known_ngrams"] == expected["known_ngrams"]
        for label, score in expected["scores"].items():
            assert got["scores"][label] == pytest.approx(score, abs=1e-5)
    assert [r["label"] for r in reference[:7]] == ["weather", "sports", "food", "tech", "weather", "food",
                                                   "tech"]


def test_text_classify_agrees_with_itself_run_in_plain_python(host: Host) -> None:
    from wasminfer_guest import local

    local.use(host.models.infer, models=TEXT.manifest()["models"])
    try:
        local.load(TEXT.folder)
        body = json.dumps({"texts": SENTENCES}).encode()
        in_wasm = host.invoke("text-classify", body, "application/json")
        in_python = local.invoke(body, "application/json")
    finally:
        local.use(None)
    assert in_wasm.content_type == in_python.content_type == "application/json"
    assert json.loads(in_wasm.body) == json.loads(in_python.body)  # the same floats, to the last bit
    assert len(json.loads(in_wasm.body)["results"]) == len(SENTENCES)


@pytest.mark.parametrize("body,ctype,status", [
    (b"{not json", "application/json", 400),
    (b'{"texts": [1, 2]}', "application/json", 422),
    (json.dumps({"texts": ["a"] * 65}).encode(), "application/json", 413),
    (b"x" * 10_001, "text/plain", 413),
])
def test_text_classify_rejects_bad_input(host: Host, body: bytes, ctype: str, status: int) -> None:
    with pytest.raises(GuestRejected) as info:
        host.invoke("text-classify", body, ctype)
    assert info.value.status == status


def test_concurrent_invocations_use_several_instances(host: Host, reference: list[dict[str, Any]]) -> None:
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            for _ in range(10):
                s = SENTENCES[i % 4]
                got = json.loads(host.invoke("text-classify", s.encode(), "text/plain").body)
                assert got["label"] == reference[i % 4]["label"]
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert host.function("text-classify").pool.stats()["live"] >= 2


# --- through the HTTP API -------------------------------------------------------------------------
def test_deploy_invoke_and_read_logs_over_http(tmp_path: Path, components: dict[str, bytes],
                                               add_model: bytes, reference: list[dict[str, Any]]) -> None:
    from starlette.testclient import TestClient

    from wasminfer.gateway import create_app
    from wasminfer.service import Platform

    platform = Platform(tmp_path / "data")
    # Seed the platform's compile cache with the compiled components: compiling again would take
    # 10-30 s each and prove nothing new.
    for wasm in components.values():
        for src in (ENGINE_CACHE / "components").glob(f"{hashlib.sha256(wasm).hexdigest()}-*.cwasm"):
            dst = platform.cache_dir / "components" / src.name
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_bytes(src.read_bytes())
    try:
        with TestClient(create_app(platform), raise_server_exceptions=False) as client:
            for _ in range(200):
                if client.get("/readyz").status_code == 200:
                    break
                time.sleep(0.01)
            octets = {"content-type": "application/octet-stream"}
            wasm_type = {"content-type": "application/wasm"}
            assert client.put("/v1/models/add", content=add_model, headers=octets).status_code == 201
            model = text_classifier_model(tmp_path / "models")
            assert client.put("/v1/models/text-classifier", content=model, headers=octets).status_code == 201
            r = client.put("/v1/functions/text-classify?models=text-classifier&memory_mb=64",
                           content=components["text-classify"], headers=wasm_type)
            assert r.status_code == 201, r.text
            assert r.json()["abi"] == "component"
            r = client.post("/v1/functions/text-classify/invoke", content=SENTENCES[0].encode(),
                            headers={"content-type": "text/plain"})
            assert r.status_code == 200, r.text
            assert r.json()["label"] == reference[0]["label"]
            assert r.json()["scores"]["weather"] == pytest.approx(reference[0]["scores"]["weather"], abs=1e-5)

            r = client.put("/v1/functions/py?models=add&memory_mb=48", content=components["guest"],
                           headers=wasm_type)
            assert r.status_code == 201, r.text
            r = client.post("/v1/functions/py/invoke", content=b"raise over http",
                            headers={"content-type": "text/plain"})
            assert r.status_code == 500
            where = '(app.py, line 40, in handle: raise ValueError(arg or "boom"))'
            assert r.json()["error"] == {"code": "guest_error", "message": f"ValueError: over http {where}"}
            r = client.get("/v1/functions/py/logs")
            assert r.status_code == 200
            assert "Traceback" in r.text and "ValueError: over http" in r.text
    finally:
        platform.close()


# --- dynamic batching across the ABIs ---------------------------------------------------------------
def test_one_batched_run_serves_a_component_a_handler_and_a_wasi_nn_program(
    components: dict[str, bytes],
    hostile_wasm: bytes,
    add_model: bytes,
    build_guest: Any,
    tmp_path: Path,
) -> None:
    """Batching sits behind the model registry, so concurrent `infer` calls of the three guest ABIs
    (this Python component, the hand-written handler module, a wasi-nn command) stack into one run.
    `max_concurrent_batches=0` makes a batch wait for `max_batch_size` rows or the delay, so three
    calls made together end up in one batch of three."""
    from wasminfer.manifest import Manifest
    from wasminfer.models import BatchingConfig

    probe = build_guest("nn_probe.c", exec_model="command")
    with Host(cache_dir=ENGINE_CACHE) as h:
        h.deploy_model("add", add_model, batching=BatchingConfig(3, 1_000_000, max_concurrent_batches=0))
        h.deploy_function("py", components["guest"], GUEST_MANIFEST)
        h.deploy_function("hostile", hostile_wasm, Manifest(models=("add",), memory_mb=4))
        h.deploy_function("probe", probe, Manifest(models=("add",)))
        row = np.array([[1.0, 2.0, 3.0]], dtype=np.float32)
        script = (
            "byname add\ninit 0\n"
            f"input 0 0 1 1,3 {row.tobytes().hex()}\ninput 0 1 1 1,3 {row.tobytes().hex()}\n"
            "compute 0\noutput 0 0 64\n"
        )
        calls = {
            "component": lambda: json.loads(h.invoke("py", b"add 1,2,3", "text/plain").body)["y"],
            "handler": lambda: decode_tensors(
                h.invoke("hostile", b"i" + encode_tensors({"a": row, "b": row})).body
            )["y"].tolist(),
            "wasi-nn": lambda: np.frombuffer(
                bytes.fromhex(h.invoke("probe", script.encode()).body.decode().splitlines()[-1].split()[3]),
                "<f4",
            ).reshape(1, 3).tolist(),
        }
        before = h.models.stats("add").batching
        assert before is not None and before.batches == 0
        got: dict[str, Any] = {}
        start = threading.Barrier(len(calls))

        def call(name: str) -> None:
            start.wait()
            got[name] = calls[name]()

        threads = [threading.Thread(target=call, args=(name,)) for name in calls]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert got == {name: [[2.0, 4.0, 6.0]] for name in calls}
        stats = h.models.stats("add")
        assert stats.runs == 1 and stats.inferences == 3
        batching = stats.batching
        assert batching is not None and (batching.batches, batching.batched_requests) == (1, 3)
