"""Compiling in worker processes (runtime/_compiler.py): bounded in time and memory, reused, replaced."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import wasmtime

from test_hostile_uploads import functions, many_functions, many_locals
from wasminfer.runtime import Host
from wasminfer.runtime._compiler import CompileError, Compiler, engine_config


def test_a_compile_writes_an_artefact_the_engine_loads(tmp_path: Path) -> None:
    c = Compiler()
    try:
        out = tmp_path / "m.cwasm"
        c.compile("module", functions(3), out, timeout_s=60)
        module = wasmtime.Module.deserialize_file(wasmtime.Engine(engine_config()), str(out))
        assert len(module.exports) == 0
        c.compile("module", functions(4), tmp_path / "n.cwasm", timeout_s=60)
        assert c.started == 1  # the worker was reused
        assert not list(tmp_path.glob(".tmp-*"))
    finally:
        c.close()


def test_invalid_bytes_are_a_compile_error_and_the_worker_lives_on(tmp_path: Path) -> None:
    c = Compiler()
    try:
        with pytest.raises(CompileError, match="failed to parse|invalid|unexpected"):
            c.compile("module", b"\0asm\x01\0\0\0\x01\xff", tmp_path / "bad.cwasm", timeout_s=60)
        c.compile("module", functions(1), tmp_path / "ok.cwasm", timeout_s=60)
        assert c.started == 1
        assert not (tmp_path / "bad.cwasm").exists()
    finally:
        c.close()


@pytest.mark.serial  # measures time: runs alone, before the parallel suite
def test_compile_time_obeyed_and_violated(tmp_path: Path) -> None:
    c = Compiler()
    try:
        c.compile("module", functions(100), tmp_path / "small.cwasm", timeout_s=30)  # well within
        t = time.monotonic()
        with pytest.raises(CompileError, match="longer than the host's limit of 1 s"):
            c.compile("module", many_functions(), tmp_path / "bomb.cwasm", timeout_s=1)
        assert time.monotonic() - t < 3  # killed at the limit, not when Cranelift is done
        assert not (tmp_path / "bomb.cwasm").exists() and not list(tmp_path.glob(".tmp-*"))
        c.compile("module", functions(2), tmp_path / "after.cwasm", timeout_s=30)  # a fresh worker
        assert c.started == 2
    finally:
        c.close()


def test_compile_memory_violated(tmp_path: Path) -> None:
    c = Compiler(memory_bytes=64 << 20)  # less than Cranelift needs for 1 000 functions of 50 000 locals
    try:
        with pytest.raises(CompileError, match="ran out of memory or crashed"):
            c.compile("module", many_locals(), tmp_path / "m.cwasm", timeout_s=60)
    finally:
        c.close()


def test_host_upload_over_the_compile_time_limit_is_an_invalid_module(tmp_path: Path) -> None:
    from wasminfer.errors import InvalidModule

    with Host(cache_dir=tmp_path) as host:
        host.engine.compile_timeout_s = 1
        with pytest.raises(InvalidModule, match="longer than the host's limit"):
            host.deploy_function("bomb", many_functions())
        assert not list((tmp_path / "modules").iterdir())  # nothing cached
