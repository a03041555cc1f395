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
