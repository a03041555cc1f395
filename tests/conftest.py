"""Shared fixtures: real models made in code, real guests built from source."""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

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


def comparable_headers(items: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """A response's headers (lower-case names) sorted, with what differs per request made equal: the
    date left out, Server-Timing's figures and a hexadecimal invocation id replaced."""
    headers = []
    for name, value in sorted(items):
        if name == "date":
            continue
        if name == "server-timing":
            value = re.sub(r"dur=[0-9.]+", "dur=N", value)
        if name == "x-invocation-id":
            value = "ID" if re.fullmatch(r"[0-9a-f]+", value) else value
        headers.append((name, value))
    return headers


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


# --- skips: printed always, and in CI only the ones allowed here by name fail nothing ----------------
#: Tests that may skip in CI, each with the reason: a missing package or tool must never skip a test
#: there silently (.ci/run installs everything the suite needs).
ALLOWED_SKIPS = {
    # The cluster tests run inside the loopback-only namespace that the outer test starts (and it
    # checks that every one of them passed there); outside it they skip by design.
    "tests/test_ray_backend.py::test_": "run inside test_in_a_loopback_only_network_namespace",
}
_OUTER_RAY_TEST = "tests/test_ray_backend.py::test_in_a_loopback_only_network_namespace"
_unexpected_skips: list[str] = []


def _skip_allowed(nodeid: str) -> bool:
    return nodeid != _OUTER_RAY_TEST and any(nodeid.startswith(prefix) for prefix in ALLOWED_SKIPS)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped and not _skip_allowed(report.nodeid):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        _unexpected_skips.append(f"{report.nodeid}: {reason}")


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    if _unexpected_skips and not hasattr(config, "workerinput"):
        strict = bool(os.environ.get("CI"))
        terminalreporter.section("skips not allowed in CI (tests/conftest.py: ALLOWED_SKIPS)")
        for line in _unexpected_skips:
            terminalreporter.line(line)
        if strict:
            terminalreporter.line("CI is set: these skips fail the run", red=True)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _unexpected_skips and os.environ.get("CI") and not hasattr(session.config, "workerinput"):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
