"""wasi_ephemeral_nn (runtime/wasi_nn.py) against C guests built with zig: every function, every
nn_errno, guest-loaded models, per-instance handles, and many instances on one shared session.

`nn_probe.c` runs a script of wasi-nn calls and prints each call's errno, so most tests here are
a script and the lines it printed. Answers are checked against ONNX Runtime run in plain Python.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import wasmtime
from onnx import TensorProto, helper

from conftest import make_add_model
from wasminfer.errors import (
    GuestTrap,
    InferLimitExceeded,
    ModelNotAllowed,
    ModelNotFound,
)
from wasminfer.examples import digits_model, digits_split
from wasminfer.runtime import Host, Manifest
from wasminfer.runtime.wasi_nn import MAX_GRAPHS, MAX_GUEST_MODELS

TYPES = ("float16", "float32", "float64", "uint8", "int32", "int64")  # wasi-nn tensor types 0..5


def make_types_model() -> bytes:
    """x{i} → Identity → y{i} for each wasi-nn tensor type i, shape [2]."""
    elem = [TensorProto.FLOAT16, TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.UINT8, TensorProto.INT32,
            TensorProto.INT64]
    inputs = [helper.make_tensor_value_info(f"x{i}", t, [2]) for i, t in enumerate(elem)]
    outputs = [helper.make_tensor_value_info(f"y{i}", t, [2]) for i, t in enumerate(elem)]
    nodes = [helper.make_node("Identity", [f"x{i}"], [f"y{i}"]) for i in range(len(elem))]
    model = helper.make_model(helper.make_graph(nodes, "types", inputs, outputs),
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def make_strings_model() -> bytes:
    """No inputs; one string output `s` (a constant): what wasi-nn cannot return."""
    value = helper.make_tensor("v", TensorProto.STRING, [1], [b"text"])
    node = helper.make_node("Constant", [], ["s"], value=value)
    out = helper.make_tensor_value_info("s", TensorProto.STRING, [1])
    model = helper.make_model(helper.make_graph([node], "strings", [], [out]),
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def hx(a: np.ndarray) -> str:
    return a.tobytes().hex() or "-"


@pytest.fixture(scope="module")
def host(tmp_path_factory: pytest.TempPathFactory, build_guest: Callable[..., bytes]) -> Iterator[Host]:
    probe = build_guest("nn_probe.c", exec_model="command")
    with Host(cache_dir=tmp_path_factory.mktemp("host")) as h:
        h.deploy_model("add", make_add_model())
        h.deploy_model("types", make_types_model())
        h.deploy_model("strings", make_strings_model())
        h.deploy_model("digits", digits_model())
        h.deploy_function("probe", probe, Manifest(models=("add", "types", "strings"),
                                                   allow_guest_models=True,
                                                   max_tensor_bytes=64))
        h.deploy_function("strict", probe, Manifest(models=("add",), max_infer_calls=2))
        yield h


def run(host: Host, script: str, payload: bytes = b"", function: str = "probe") -> list[list[str]]:
    body = script.strip().encode("utf-8", "surrogateescape") + b"\n" + (b"--\n" + payload if payload else b"")
    return [line.split() for line in host.invoke(function, body).body.decode().splitlines()]


def errnos(lines: list[list[str]]) -> list[int]:
    return [int(line[1]) for line in lines]


A = np.arange(6, dtype="<f4").reshape(2, 3)
B = np.full((2, 3), 0.5, dtype="<f4")
ADD_SETUP = f"""
byname add
init 0
input 0 0 1 2,3 {hx(A)}
input 0 1 1 2,3 {hx(B)}
"""


def add_reference(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    (y,) = ort.InferenceSession(make_add_model()).run(None, {"a": a, "b": b})
    return np.asarray(y)


# --- the functions, successful ---------------------------------------------------------------------
def test_load_by_name_compute_get_output_matches_onnxruntime(host: Host) -> None:
    lines = run(host, ADD_SETUP + "compute 0\noutput 0 0 1024")
    assert lines[0] == ["byname", "0", "0"] and lines[1] == ["init", "0", "0"]
    assert errnos(lines) == [0] * 6
    _, _, written, data = lines[-1]
    assert int(written) == 24
    y = np.frombuffer(bytes.fromhex(data), "<f4").reshape(2, 3)
    np.testing.assert_array_equal(y, add_reference(A, B))


def test_every_tensor_type_by_its_wasi_nn_number(host: Host) -> None:
    values = [np.array([1.5, -2], t) if t[0] == "f" else np.array([7, 200], t) for t in TYPES]
    script = "byname types\ninit 0\n"
    script += "".join(f"input 0 {i} {i} 2 {hx(v)}\n" for i, v in enumerate(values))
    script += "compute 0\n" + "".join(f"output 0 {i} 64\n" for i in range(len(TYPES)))
    lines = run(host, script)
    assert errnos(lines) == [0] * len(lines)
    for line, value in zip(lines[-len(TYPES):], values, strict=True):
        assert bytes.fromhex(line[3]) == value.astype(value.dtype.newbyteorder("<")).tobytes()


def test_padding_bytes_of_the_tensor_struct_are_ignored(host: Host) -> None:
    lines = run(host, f"byname add\ninit 0\ninput 0 0 1 2,3 {hx(A)} pad\ninput 0 1 1 2,3 {hx(B)} pad\n"
                      "compute 0\noutput 0 0 1024")
    assert errnos(lines) == [0] * 6
    np.testing.assert_array_equal(np.frombuffer(bytes.fromhex(lines[-1][3]), "<f4").reshape(2, 3), A + B)


def test_wasmedge_single_calls_and_lifetimes(host: Host) -> None:
    lines = run(host, ADD_SETUP + "compute1 0\noutput1 0 0 1024\nfini 0\nfinal 0\ncompute 0\n"
                                  "init 0\nunload 0\ninit 0\ncompute 1")
    assert errnos(lines) == [0, 0, 0, 0, 0, 0, 0,  # set up, compute_single, get_output_single, fini_single
                             0, 1,  # finalize_execution_context, then its handle is gone
                             0, 0, 1,  # a new context; unload; the graph is gone
                             1]  # and so is the context made from it
    np.testing.assert_array_equal(np.frombuffer(bytes.fromhex(lines[5][3]), "<f4").reshape(2, 3), A + B)
    assert lines[9] == ["init", "0", "1"]  # handles are not reused


def test_load_by_name_with_config_ignores_the_config(host: Host) -> None:
    lines = run(host, 'bycfg add {"n_gpu_layers":0}\nbycfg digits {}')
    assert lines == [["bycfg", "0", "0"], ["bycfg", "8", "4294967295"]]


def test_guest_loaded_model_is_private_and_answers(host: Host) -> None:
    before = list(host.models)
    script = ADD_SETUP.replace("byname add", "load 1 0") + "compute 0\noutput 0 0 1024\nload 5 3"
    lines = run(host, script, make_add_model())
    assert errnos(lines) == [0] * 7  # onnx on the cpu, then autodetect with WasmEdge's AUTO target
    np.testing.assert_array_equal(np.frombuffer(bytes.fromhex(lines[5][3]), "<f4").reshape(2, 3), A + B)
    assert list(host.models) == before  # nothing registered where other functions could see it


def test_guest_loaded_models_are_bounded_and_freed_by_unload(host: Host) -> None:
    n = MAX_GUEST_MODELS
    lines = run(host, f"repeat {n} load 1 0\nload 1 0\nunload 0\nload 1 0", make_add_model())
    assert lines == [["load", "0", str(n - 1)], ["load", "4", "4294967295"], ["unload", "0"],
                     ["load", "0", str(n)]]


# --- every nn_errno, where it applies ----------------------------------------------------------------
def test_invalid_argument(host: Host) -> None:
    script = ADD_SETUP + f"""
init 99
compute 99
input 0 5 1 2,3 {hx(A)}
input 0 0 9 2,3 {hx(A)}
input 0 0 1 2,3 {hx(A)} len=20
input 0 0 3 2,3 {hx(A.astype(np.uint8))}
input 0 0 1 2,4 {hx(np.zeros((2, 4), "<f4"))}
output 0 0 1024
unload 99
final 99
fini 99
"""
    lines = run(host, script)
    assert errnos(lines) == [0, 0, 0, 0] + [1] * 11


def test_invalid_argument_for_loads_and_missing_inputs(host: Host) -> None:
    lines = run(host, "load 1 0 2\nbyname add\ninit 0\ncompute 0\noutput 0 0 9", make_add_model())
    assert errnos(lines) == [1, 0, 0, 1, 1]  # two builders; compute without inputs; no outputs yet
    lines = run(host, "load 1 0\nload 1 7", b"\x08\x07not an onnx model at all")
    assert errnos(lines) == [1, 1]  # bytes that are no ONNX model; an unknown target
    lines = run(host, "byname \udcff")  # the byte 0xff
    assert errnos(lines) == [1]  # a name that is not UTF-8


def test_invalid_encoding(host: Host) -> None:
    lines = run(host, "load 0 0\nload 2 0\nload 3 0\nload 4 0\nload 6 0\nload 42 0", make_add_model())
    assert errnos(lines) == [2] * 6
    tflite = b"\x1c\x00\x00\x00TFL3" + bytes(64)
    assert errnos(run(host, "load 5 0", tflite)) == [2]  # autodetect recognises what it cannot run


def test_missing_memory(host: Host) -> None:
    # No memory, hence no WASI either (wasmtime's WASI needs one): the program traps unless
    # init_execution_context (which needs memory) says missing_memory=3 and compute (which does
    # not) says invalid_argument=1 for a handle that does not exist.
    wat = """(module
      (import "wasi_ephemeral_nn" "init_execution_context" (func $init (param i32 i32) (result i32)))
      (import "wasi_ephemeral_nn" "compute" (func $compute (param i32) (result i32)))
      (func (export "_start")
        (if (i32.ne (call $init (i32.const 0) (i32.const 0)) (i32.const 3)) (then unreachable))
        (if (i32.ne (call $compute (i32.const 0)) (i32.const 1)) (then unreachable))))"""
    host.deploy_function("no-memory", bytes(wasmtime.wat2wasm(wat)), Manifest(models=("add",)))
    assert host.invoke("no-memory", b"").body == b""


def test_busy(host: Host) -> None:
    lines = run(host, f"repeat {MAX_GRAPHS} byname add\nbyname add\ninit 0")
    assert lines == [["byname", "0", str(MAX_GRAPHS - 1)], ["byname", "4", "4294967295"], ["init", "0", "0"]]


def test_busy_past_max_infer_calls_fails_the_invocation(host: Host) -> None:
    with pytest.raises(InferLimitExceeded, match="max_infer_calls"):
        run(host, ADD_SETUP + "compute 0\ncompute 0\ncompute 0", function="strict")
    logs = [ln.message for ln in host.logs("strict")]
    assert any("compute: busy (4)" in m for m in logs)


def test_runtime_error(host: Host) -> None:
    b = np.ones((4, 3), "<f4")  # each shape fits [N,3]; together they do not broadcast: ORT fails
    lines = run(host, f"byname add\ninit 0\ninput 0 0 1 2,3 {hx(A)}\ninput 0 1 1 4,3 {hx(b)}\ncompute 0")
    assert errnos(lines) == [0, 0, 0, 0, 5]


def test_unsupported_operation(host: Host) -> None:
    script = "load 1 1\nload 1 2\nbyname strings\ninit 0\ncompute 0\noutput 0 0 64"
    lines = run(host, script, make_add_model())
    assert errnos(lines) == [6, 6, 0, 0, 0, 6]  # gpu, tpu; a string output
    assert errnos(run(host, "load 1 0", make_add_model(), function="strict")) == [6]  # allow_guest_models
    assert any("allow_guest_models" in ln.message for ln in host.logs("strict"))


def test_too_large(host: Host) -> None:
    big = np.zeros((7, 3), "<f4")  # 84 bytes > max_tensor_bytes=64
    lines = run(host, ADD_SETUP + f"compute 0\noutput 0 0 23\noutput 0 0 24\ninput 0 0 1 7,3 {hx(big)}")
    assert lines[5][:3] == ["output", "7", "24"]  # too small a buffer; the size it needs is written
    assert lines[6][:3] == ["output", "0", "24"]
    assert lines[7] == ["input", "7"]


def test_not_found_for_unknown_and_denied_names(host: Host) -> None:
    # deny by default, as the handler ABI: a name outside the allowlist is refused before it is
    # looked up, so a deployed model ("digits") and an unknown one get the same answer
    assert errnos(run(host, "byname no-such-model\nbyname digits")) == [8, 8]
    logs = [ln.message for ln in host.logs("probe")]
    assert any("not_found (8): function 'probe' may not use model 'digits'" in m and "'models'" in m
               for m in logs)


# --- pointers and handles -----------------------------------------------------------------------------
@pytest.mark.parametrize("command", ["badtensor 0", "badout 0", "badname"])
def test_pointers_outside_memory_trap_the_guest(host: Host, command: str) -> None:
    with pytest.raises(GuestTrap, match="outside guest memory"):
        run(host, ADD_SETUP + "compute 0\n" + command)
    assert errnos(run(host, "byname add")) == [0]


def test_handles_belong_to_their_instance(host: Host) -> None:
    assert errnos(run(host, "byname add")) == [0]
    assert errnos(run(host, "init 0")) == [1]  # a fresh instance: graph 0 of the last one is not here


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Test images (uint8 0..16) and ONNX Runtime's labels and probabilities for them."""
    _, x_test, _, _ = digits_split()
    images = x_test.astype(np.uint8)
    session = ort.InferenceSession(digits_model())
    # one image per run, as the guests send them (a batch of many may round differently)
    runs = [session.run(None, {"input": image[None].astype(np.float32)}) for image in images]
    return images, np.array([r[0][0] for r in runs]), np.array([r[1][0] for r in runs])


def test_handler_module_keeps_its_graph_across_requests(
    tmp_path: Path, build_guest: Callable[..., bytes], digits: tuple[np.ndarray, np.ndarray, np.ndarray]
) -> None:
    images, labels, proba = digits
    with Host(cache_dir=tmp_path) as h:
        h.deploy_model("digits", digits_model())
        info = h.deploy_function("dh", build_guest("nn_handler.c"),
                                 Manifest(models=("digits",), max_instances=1))
        assert info["abi"] == "handler" and info["module"]["uses_wasi_nn"]
        for i in range(3):
            body = h.invoke("dh", images[i].tobytes()).body
            assert np.frombuffer(body[:8], "<i8")[0] == labels[i]
            np.testing.assert_allclose(np.frombuffer(body[8:48], "<f4"), proba[i], rtol=1e-6, atol=1e-12)
            assert np.frombuffer(body[48:], "<u4").tolist() == [0, i + 1]  # graph 0, loaded once
        # the model goes away under the warm instance's graph: compute is `not_found`, and the
        # handler's failure reports the registry's error with its own status
        h.models.unload("digits")
        with pytest.raises(ModelNotFound):
            h.invoke("dh", images[0].tobytes())


def test_handler_module_failing_on_a_denied_model_reports_the_manifest_key(
    tmp_path: Path, build_guest: Callable[..., bytes]
) -> None:
    with Host(cache_dir=tmp_path) as h:
        h.deploy_model("digits", digits_model())
        h.deploy_function("dh", build_guest("nn_handler.c"), Manifest())
        with pytest.raises(ModelNotAllowed, match="manifest key 'models'") as info:
            h.invoke("dh", bytes(64))
        assert info.value.status == 403


# --- many instances, one session ----------------------------------------------------------------------
def test_many_instances_share_one_session_with_unmixed_answers(
    tmp_path: Path, build_guest: Callable[..., bytes], digits: tuple[np.ndarray, np.ndarray, np.ndarray]
) -> None:
    images, labels, proba = digits
    threads, per_thread = 8, 30
    with Host(cache_dir=tmp_path) as h:
        h.deploy_model("digits", digits_model())
        h.deploy_function("warm", build_guest("nn_handler.c"),
                          Manifest(models=("digits",), max_instances=threads))
        h.deploy_function("cold", build_guest("nn_digits.c", exec_model="command"),
                          Manifest(models=("digits",), max_instances=threads))
        start = threading.Barrier(threads)
        failures: list[str] = []

        def client(t: int) -> None:
            start.wait()
            for k in range(per_thread):
                i = (t * per_thread + k) % len(images)
                try:
                    if k % 5 == 4:  # every fifth through a command: a fresh instance each time
                        pgm = b"P5 8 8 16\n" + images[i].tobytes()
                        text = h.invoke("cold", pgm).body.decode()
                        got_label = int(text.split('"label": ')[1].split(",")[0])
                        got = np.array([float(v) for v in text.split("[")[1].split("]")[0].split(",")])
                    else:
                        body = h.invoke("warm", images[i].tobytes()).body
                        got_label = int(np.frombuffer(body[:8], "<i8")[0])
                        got = np.frombuffer(body[8:48], "<f4")
                    if got_label != labels[i] or not np.allclose(got, proba[i], rtol=1e-6, atol=1e-12):
                        failures.append(f"image {i}: got {got_label} {got}, expected {labels[i]} {proba[i]}")
                except Exception as exc:  # noqa: BLE001 - collected, asserted below
                    failures.append(f"image {i}: {exc!r}")

        workers = [threading.Thread(target=client, args=(t,)) for t in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        assert failures == []
        assert h.function("warm").pool.stats()["created_total"] > 1  # many instances ...
        assert list(h.models) == ["digits"]  # ... one model, one session
        assert h.models.stats("digits").runs == threads * per_thread
