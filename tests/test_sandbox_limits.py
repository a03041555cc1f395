"""Sandbox limits as obeyed/violated pairs, against a hand-written guest (tests/guests/limits.wat).

Each limit is driven just under and just past its bound, and after every violation the host keeps
serving. Pairs that live elsewhere: linear memory, output size and the timeout of handler modules in
test_runtime_host.py; the same limits for command modules in test_command.py and for Python
components in test_python_guest.py.
"""

from __future__ import annotations

import statistics
import struct
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import wasmtime

from wasminfer.errors import (
    GuestTrap,
    InferLimitExceeded,
    InvalidModule,
    LogLimitExceeded,
    TensorTooLarge,
    Timeout,
)
from wasminfer.models import decode_tensors, encode_tensors
from wasminfer.runtime import Host, Manifest
from wasminfer.runtime._wasm import MAX_TABLE_ELEMENTS

GUESTS = Path(__file__).resolve().parent / "guests"
LIMITS = dict(models=("add",), memory_mb=8, timeout_ms=2000, max_instances=2)


@pytest.fixture(scope="module")
def limits_wasm() -> bytes:
    return bytes(wasmtime.wat2wasm((GUESTS / "limits.wat").read_text()))


@pytest.fixture
def host(tmp_path: Path, add_model: bytes, limits_wasm: bytes) -> Host:
    h = Host(cache_dir=tmp_path)
    h.deploy_model("add", add_model)
    h.deploy_function("limits", limits_wasm, Manifest(**LIMITS))  # type: ignore[arg-type]
    yield h
    h.close()


def request(op: str, n: int = 0, payload: bytes = b"") -> bytes:
    return op.encode() + struct.pack("<I", n) + payload


def still_serving(host: Host, name: str = "limits") -> None:
    assert host.invoke(name, request("e", 0, b"alive")).body == b"alive"


# --- stack ------------------------------------------------------------------------------------------
def test_stack_depth_obeyed(host: Host) -> None:
    assert host.invoke("limits", request("r", 1000)).body == b"ok"


def test_stack_depth_violated(host: Host) -> None:
    with pytest.raises(GuestTrap, match="stack overflow"):
        host.invoke("limits", request("r", 10_000_000))
    still_serving(host)


# --- table growth -----------------------------------------------------------------------------------
def table_grow(host: Host, n: int) -> int:
    return int(struct.unpack("<i", host.invoke("limits", request("t", n)).body)[0])


def test_table_growth_obeyed(host: Host) -> None:
    assert table_grow(host, 50_000) == 1  # the old size: granted


def test_table_growth_violated(host: Host) -> None:
    limit = MAX_TABLE_ELEMENTS
    assert table_grow(host, limit) == -1  # 1 + limit entries: refused, the guest sees -1
    assert table_grow(host, limit - 1) == 1  # up to the limit exactly: granted
    still_serving(host)


def test_declared_table_over_the_limit_is_refused_at_upload(host: Host) -> None:
    wat = (GUESTS / "limits.wat").read_text().replace("(table $t 1 funcref)", "(table $t 5000000 funcref)")
    with pytest.raises(InvalidModule, match="failed to (start|instantiate)"):
        host.deploy_function("huge-table", bytes(wasmtime.wat2wasm(wat)), Manifest(**LIMITS))  # type: ignore[arg-type]
    assert "huge-table" not in {f.name for f in host.functions()}


def test_declared_memory_over_the_limit_is_refused_at_upload(host: Host) -> None:
    wat = (
        (GUESTS / "limits.wat")
        .read_text()
        .replace('(memory (export "memory") 2)', '(memory (export "memory") 65536)')
    )
    from wasminfer.errors import InvalidManifest

    with pytest.raises(InvalidManifest, match="memory_mb"):
        host.deploy_function("huge-memory", bytes(wasmtime.wat2wasm(wat)), Manifest(**LIMITS))  # type: ignore[arg-type]


# --- log volume -------------------------------------------------------------------------------------
def test_log_volume_obeyed(host: Host, limits_wasm: bytes) -> None:
    host.deploy_function("logs", limits_wasm, Manifest(**{**LIMITS, "max_log_bytes": 1000}))  # type: ignore[arg-type]
    assert host.invoke("logs", request("l", 10)).body == b"ok"  # exactly 1000 bytes
    assert sum(1 for line in host.logs("logs") if line.stream == "log") == 10


def test_log_volume_violated(host: Host, limits_wasm: bytes) -> None:
    host.deploy_function("logs", limits_wasm, Manifest(**{**LIMITS, "max_log_bytes": 1000}))  # type: ignore[arg-type]
    with pytest.raises(LogLimitExceeded, match="max_log_bytes"):
        host.invoke("logs", request("l", 11))
    assert sum(1 for line in host.logs("logs") if line.stream == "log") == 10  # the 11th never landed
    still_serving(host, "logs")


def test_log_volume_is_per_invocation(host: Host, limits_wasm: bytes) -> None:
    host.deploy_function("logs", limits_wasm, Manifest(**{**LIMITS, "max_log_bytes": 1000}))  # type: ignore[arg-type]
    for _ in range(3):
        assert host.invoke("logs", request("l", 10)).body == b"ok"


# --- the log ring and the size of one line -----------------------------------------------------------
def log_lines(host: Host, name: str, stream: str | None = None) -> list[str]:
    return [line.message for line in host.logs(name, n=10_000) if stream in (None, line.stream)]


def test_log_ring_keeps_2000_lines_then_drops_the_oldest(host: Host) -> None:
    (deployed,) = log_lines(host, "limits")  # the host's line about the deploy
    assert deployed.startswith("deployed version")
    assert host.invoke("limits", request("p", 1999, b"old")).body == b"ok"
    assert log_lines(host, "limits") == [deployed] + ["old"] * 1999  # the ring's capacity: all kept
    assert host.invoke("limits", request("p", 1, b"new")).body == b"ok"
    assert log_lines(host, "limits") == ["old"] * 1999 + ["new"]  # one more: the oldest went


LONG_LINES = [  # (payload, the line kept): at most 4 KiB of UTF-8, a cut line ends in "…"
    (b"x" * 4096, "x" * 4096),
    (b"x" * 4097, "x" * 4093 + "…"),
    ("é".encode() * 2048, "é" * 2048),  # 4096 bytes
    ("é".encode() * 2049, "é" * 2046 + "…"),  # cut within a character: the partial one goes too
]


@pytest.mark.parametrize(("payload", "kept"), LONG_LINES, ids=["4096", "4097", "2048xé", "2049xé"])
def test_a_logged_line_is_at_most_4_kib(host: Host, payload: bytes, kept: str) -> None:
    assert host.invoke("limits", request("p", 1, payload)).body == b"ok"
    assert log_lines(host, "limits", "log") == [kept]
    assert len(kept.encode()) <= 4096


@pytest.mark.parametrize(("payload", "kept"), LONG_LINES, ids=["4096", "4097", "2048xé", "2049xé"])
def test_a_line_written_to_stdout_is_at_most_4_kib(host: Host, payload: bytes, kept: str) -> None:
    assert host.invoke("limits", request("o", 1, payload + b"\n")).body == b"ok"
    assert log_lines(host, "limits", "stdout") == [kept]


def test_a_long_stdout_line_without_its_end_is_cut_as_it_streams(host: Host) -> None:
    assert host.invoke("limits", request("o", 3, b"z" * 2000)).body == b"ok"  # 6000 bytes, no newline
    assert log_lines(host, "limits", "stdout") == ["z" * 4093 + "…"]


# --- per-store counts of memories and tables (a core module is one instance) -------------------------
HANDLER_EXPORTS = """(func (export "wasminfer_abi_v1"))
  (func (export "wasminfer_alloc") (param i32) (result i32) (i32.const 1024))
  (func (export "wasminfer_handle") (param i32 i32 i32 i32) (result i32) (i32.const 0))"""


def module_with(memories: int, tables: int) -> bytes:
    extra = "(memory 1)" * (memories - 1) + "(table 1 funcref)" * tables
    return bytes(wasmtime.wat2wasm(f'(module (memory (export "memory") 1) {extra} {HANDLER_EXPORTS})'))


def test_one_memory_and_four_tables_obeyed(host: Host) -> None:
    host.deploy_function("four-tables", module_with(1, 4), Manifest(memory_mb=1))
    assert host.invoke("four-tables", b"").body == b""


@pytest.mark.parametrize(
    ("memories", "tables", "what"),
    [(2, 0, "memory count too high at 2"), (1, 5, "table count too high at 5")],
)
def test_a_second_memory_or_a_fifth_table_is_refused_at_upload(
    host: Host, memories: int, tables: int, what: str
) -> None:
    with pytest.raises(
        InvalidModule, match=f"failed to instantiate: resource limit exceeded: {what}"
    ) as info:
        host.deploy_function("many", module_with(memories, tables), Manifest(memory_mb=1))
    assert (info.value.status, info.value.code) == (400, "invalid_wasm")
    assert "many" not in {f.name for f in host.functions()}
    still_serving(host)


# --- infer calls and tensor sizes -------------------------------------------------------------------
def add_request(calls: int, rows: int = 1) -> bytes:
    a = np.ones((rows, 3), dtype=np.float32)
    return request("i", calls, encode_tensors({"a": a, "b": a}))


def test_infer_calls_obeyed(host: Host, limits_wasm: bytes) -> None:
    host.deploy_function("calls", limits_wasm, Manifest(**{**LIMITS, "max_infer_calls": 5}))  # type: ignore[arg-type]
    out = decode_tensors(host.invoke("calls", add_request(5)).body)
    np.testing.assert_array_equal(out["y"], np.full((1, 3), 2, np.float32))


def test_infer_calls_violated(host: Host, limits_wasm: bytes) -> None:
    host.deploy_function("calls", limits_wasm, Manifest(**{**LIMITS, "max_infer_calls": 5}))  # type: ignore[arg-type]
    calls = []
    real = host.models.infer
    host.models.infer = (  # type: ignore[method-assign]
        lambda name, inputs, **options: calls.append(name) or real(name, inputs, **options)
    )
    with pytest.raises(InferLimitExceeded, match="max_infer_calls"):
        host.invoke("calls", add_request(6))
    assert len(calls) == 5  # the 6th never reached the model
    still_serving(host, "calls")


def test_tensor_size_obeyed(host: Host, limits_wasm: bytes) -> None:
    # 8 rows x 3 float32 = 96 bytes per tensor
    host.deploy_function("tensors", limits_wasm, Manifest(**{**LIMITS, "max_tensor_bytes": 96}))  # type: ignore[arg-type]
    assert decode_tensors(host.invoke("tensors", add_request(1, rows=8)).body)["y"].shape == (8, 3)


def test_tensor_size_violated(host: Host, limits_wasm: bytes) -> None:
    host.deploy_function("tensors", limits_wasm, Manifest(**{**LIMITS, "max_tensor_bytes": 96}))  # type: ignore[arg-type]
    with pytest.raises(TensorTooLarge, match="limit is 96"):
        host.invoke("tensors", add_request(1, rows=9))
    still_serving(host, "tensors")


# --- wall clock: an infinite loop stops near its deadline, and others keep being served -------------
@pytest.mark.serial  # measures time: runs alone, before the parallel suite
# 50: near from the start (the epoch ticks every ms); 130 and 400: far at first, while the epoch
# moves once a slice (`_engine.NEAR_MS`), near only at a later look at the call.
@pytest.mark.parametrize("timeout_ms", [50, 130, 400])
def test_infinite_loop_stops_within_a_few_ms_of_its_deadline(
    tmp_path: Path, hostile_wasm: bytes, timeout_ms: int
) -> None:
    with Host(cache_dir=tmp_path) as h:
        h.deploy_function("loop", hostile_wasm, Manifest(memory_mb=4, timeout_ms=timeout_ms, max_instances=2))
        overshoots = []
        for _ in range(5):
            t = time.perf_counter()
            with pytest.raises(Timeout):
                h.invoke("loop", b"l")
            overshoots.append((time.perf_counter() - t) * 1000 - timeout_ms)
        # Near a deadline the epoch ticks every ms; the median is robust to a scheduler hiccup on a
        # loaded machine.
        assert statistics.median(overshoots) < 25, overshoots
        assert min(overshoots) > -1, overshoots  # never early


@pytest.mark.serial  # measures time: runs alone, before the parallel suite
def test_other_invocations_are_served_while_one_loops(tmp_path: Path, hostile_wasm: bytes) -> None:
    with Host(cache_dir=tmp_path) as h:
        h.deploy_function("f", hostile_wasm, Manifest(memory_mb=4, timeout_ms=1500, max_instances=2))
        errors: list[BaseException] = []

        def loop() -> None:
            try:
                h.invoke("f", b"l")
            except Timeout:
                pass
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)

        looping = threading.Thread(target=loop)
        looping.start()
        deadline = time.monotonic() + 10
        while h.function("f").pool.stats()["busy"] < 1:  # the loop holds its instance
            assert time.monotonic() < deadline
            time.sleep(0.001)
        latencies = []
        for _ in range(20):
            t = time.perf_counter()
            assert h.invoke("f", b"eok").body == b"eok"
            latencies.append(time.perf_counter() - t)
        assert looping.is_alive()  # the echoes ran while the loop was still running
        looping.join()
        assert not errors
        assert statistics.median(latencies) < 0.05, latencies
