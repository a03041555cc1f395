"""Shared fixtures: real models made in code, real guests built from source."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

ROOT = Path(__file__).resolve().parents[1]
GUESTS = Path(__file__).resolve().parent / "guests"


def make_add_model() -> bytes:
    """y = a + b over float32 [N, 3]: a tiny real ONNX model with a symbolic batch dimension."""
    a = helper.make_tensor_value_info("a", TensorProto.FLOAT, ["N", 3])
    b = helper.make_tensor_value_info("b", TensorProto.FLOAT, ["N", 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])
    graph = helper.make_graph([helper.make_node("Add", ["a", "b"], ["y"])], "add", [a, b], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def make_until_model() -> bytes:
    """y = x [N,1] float32, reached by counting: a `Loop` adds 1 to every row until each has reached
    its x. An x past 2**24 is never reached (float32 stops counting there): that run never ends by
    itself. Rows are independent, so batched runs give each its own x."""
    scalar = helper.make_tensor_value_info
    body = helper.make_graph(
        [
            helper.make_node("Add", ["acc_in", "one"], ["acc_out"]),
            helper.make_node("Sub", ["x", "acc_out"], ["gap"]),
            helper.make_node("ReduceMax", ["gap"], ["widest"], keepdims=0),
            helper.make_node("Greater", ["widest", "zero"], ["cond_out"]),
        ],
        "count",
        [scalar("i", TensorProto.INT64, []), scalar("cond_in", TensorProto.BOOL, []),
         scalar("acc_in", TensorProto.FLOAT, ["N", 1])],
        [scalar("cond_out", TensorProto.BOOL, []), scalar("acc_out", TensorProto.FLOAT, ["N", 1])],
        [helper.make_tensor("one", TensorProto.FLOAT, [], [1.0]),
         helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0])],
    )
    graph = helper.make_graph(
        [
            helper.make_node("Constant", [], ["go"],
                             value=helper.make_tensor("go", TensorProto.BOOL, [], [True])),
            helper.make_node("Constant", [], ["none"],
                             value=helper.make_tensor("none", TensorProto.FLOAT, [], [0.0])),
            helper.make_node("Mul", ["x", "none"], ["start"]),
            helper.make_node("Loop", ["", "go", "start"], ["counted"], body=body),
            helper.make_node("Min", ["counted", "x"], ["y"]),
        ],
        "until",
        [scalar("x", TensorProto.FLOAT, ["N", 1])],
        [scalar("y", TensorProto.FLOAT, ["N", 1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


#: An x `make_until_model` never reaches (its float32 counter stops at 2**24): a run without end.
NEVER = 1e12


@pytest.fixture(scope="session")
def add_model() -> bytes:
    return make_add_model()


@pytest.fixture(scope="session")
def hostile_wasm() -> bytes:
    import wasmtime

    return bytes(wasmtime.wat2wasm((GUESTS / "hostile.wat").read_text()))


@pytest.fixture(scope="session")
def wasm_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("wasm-cache")


def tensors(**arrays: np.ndarray) -> dict[str, np.ndarray]:
    return dict(arrays)


@pytest.fixture(scope="session")
def build_guest(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., bytes]:
    """`build_guest("nn_probe.c", exec_model="command")`: a C guest of tests/guests/ built with the
    toolchain from source, once per session (a session cache folder: every session compiles)."""
    from wasminfer import toolchain

    cache = tmp_path_factory.mktemp("guest-builds")
    built: dict[tuple[str, str], bytes] = {}

    def build(name: str, exec_model: str = "reactor") -> bytes:
        if (name, exec_model) not in built:
            path = toolchain.build(GUESTS / name, cache_dir=cache, exec_model=exec_model)
            built[name, exec_model] = path.read_bytes()
        return built[name, exec_model]

    return build
