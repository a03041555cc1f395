"""Identical code is compiled and held once (`_engine.SharedCode`): the same bytes deployed by two
tenants (two hosts on one engine, as the platform runs them) share one compiled module, and nothing
else: instances, memories, logs and manifests stay their own; the code goes with its last user."""

from __future__ import annotations

import gc
import struct
from pathlib import Path

import wasmtime

from wasminfer.runtime import Host, Manifest

GUESTS = Path(__file__).resolve().parent / "guests"


def request(op: str, n: int = 0, payload: bytes = b"") -> bytes:
    return op.encode() + struct.pack("<I", n) + payload


def test_two_tenants_deploying_the_same_bytes_share_one_compiled_module_and_nothing_else(
        tmp_path: Path) -> None:
    wasm = bytes(wasmtime.wat2wasm((GUESTS / "limits.wat").read_text()))
    engine = Host.new_engine(tmp_path)
    try:
        with Host(engine=engine) as acme, Host(engine=engine) as globex:
            acme.deploy_function("f", wasm, Manifest(memory_mb=8, max_log_bytes=4096))
            globex.deploy_function("g", wasm, Manifest(memory_mb=16))
            globex.deploy_function("g-v2", wasm, Manifest(memory_mb=16))
            assert engine.shared.count("module") == 1
            a, g = acme.function("f"), globex.function("g")
            assert a.compiled.code is g.compiled.code is globex.function("g-v2").compiled.code
            assert a.compiled.code.wait(120)  # optimised and cached (the redeploy below loads it)
            assert (a.compiled.from_cache, g.compiled.from_cache) == (False, True)  # compiled once

            acme.invoke("f", request("p", 1, b"acme's secret"))
            assert globex.invoke("g", request("e", 0, b"globex")).body == b"globex"
            a_inst, g_inst = a.pool._idle[0][0].wasm, g.pool._idle[0][0].wasm
            assert a_inst.store is not g_inst.store
            assert (a_inst.memory_limit, g_inst.memory_limit) == (8 << 20, 16 << 20)
            assert b"acme's secret" not in g_inst.memory().read(0, g_inst.memory_size())
            assert [line.message for line in acme.logs("f") if line.stream == "log"] == ["acme's secret"]
            assert not [line for line in globex.logs("g") if line.stream == "log"]

            del a, g, a_inst, g_inst  # the test's own references
            acme.remove_function("f")
            gc.collect()
            assert engine.shared.count("module") == 1  # globex still uses it
            globex.remove_function("g")
            globex.remove_function("g-v2")
            gc.collect()
            assert engine.shared.count("module") == 0  # dropped with its last user

            globex.deploy_function("g", wasm, Manifest(memory_mb=16))
            assert engine.shared.count("module") == 1 and globex.function("g").compiled.from_cache
    finally:
        engine.close()
