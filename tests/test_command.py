"""WASI command functions (runtime/command.py): stdin → stdout, args and env from the manifest, the
body mounted read-only, exit statuses, limits in obeyed/violated pairs, and `_start` builds."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import wasmtime

from wasminfer import toolchain
from wasminfer.errors import (
    GuestError,
    GuestTrap,
    InvalidManifest,
    InvalidModule,
    LogLimitExceeded,
    MemoryLimitExceeded,
    OutputLimitExceeded,
    Timeout,
)
from wasminfer.examples import digits_model, digits_split
from wasminfer.runtime import Host, Manifest


@pytest.fixture(scope="module")
def tool(build_guest: Callable[..., bytes]) -> bytes:
    return build_guest("cmd_tool.c", exec_model="command")


@pytest.fixture(scope="module")
def host(
    tmp_path_factory: pytest.TempPathFactory, tool: bytes, build_guest: Callable[..., bytes]
) -> Iterator[Host]:
    with Host(cache_dir=tmp_path_factory.mktemp("host")) as h:
        h.deploy_model("digits", digits_model())
        h.deploy_function("echo", tool, Manifest(args=("echo",)))
        h.deploy_function("digits-stdin", build_guest("nn_digits.c", exec_model="command"),
                          Manifest(models=("digits",), content_type="application/json"))
        h.deploy_function("digits-file", build_guest("nn_digits.c", exec_model="command"),
                          Manifest(models=("digits",), mount_body="/input/digit.pgm",
                                   args=("/input/digit.pgm",)))
        yield h


def deploy(host: Host, name: str, wasm: bytes, **manifest: object) -> None:
    host.deploy_function(name, wasm, Manifest.from_dict(manifest))


# --- the request and the response ----------------------------------------------------------------------
def test_body_on_stdin_is_the_response_on_stdout(host: Host) -> None:
    body = bytes(range(256)) * 1000
    r = host.invoke("echo", body, "text/whatever")
    assert r.body == body
    assert r.content_type == "application/octet-stream"  # no content_type in the manifest


def test_empty_body(host: Host) -> None:
    assert host.invoke("echo", b"").body == b""


@pytest.mark.parametrize("function", ["digits-stdin", "digits-file"])
def test_wasi_nn_program_classifies_an_image_like_onnxruntime(host: Host, function: str) -> None:
    _, x_test, _, _ = digits_split()
    session = ort.InferenceSession(digits_model())
    for image in x_test[:5].astype(np.uint8):
        label, proba = session.run(None, {"input": image[None].astype(np.float32)})
        r = host.invoke(function, b"P5 8 8 16\n" + image.tobytes(), "image/x-portable-graymap")
        answer = json.loads(r.body)
        assert answer["label"] == int(label[0])
        np.testing.assert_array_equal(np.array(answer["probabilities"], np.float32), proba[0])
    assert host.function(function).describe()["module"]["uses_wasi_nn"]


def test_content_type_comes_from_the_manifest(host: Host) -> None:
    image = b"P5 8 8 16\n" + bytes(64)
    assert host.invoke("digits-stdin", image).content_type == "application/json"


def test_args_and_env_from_the_manifest(host: Host, tool: bytes) -> None:
    deploy(host, "args", tool, args=["args", "two words"], env={"GREETING": "hello", "EMPTY": ""})
    assert host.invoke("args", b"").body.decode().splitlines() == [
        "args",  # argv[0] is the function's name: `args` excludes the program name
        "args", "two words", "GREETING=hello", "EMPTY=",
    ]


def test_args_and_env_from_query_parameters(host: Host, tool: bytes) -> None:
    # what the gateway passes on for `PUT /v1/functions/x?args=args,a&args=b&env=K=V,L=W`
    m = Manifest.from_query({"args": ["args,a", "b"], "env": ["K=V,L=W"]})
    host.deploy_function("query", tool, m)
    assert host.invoke("query", b"").body.decode().splitlines() == ["query", "args", "a", "b", "K=V", "L=W"]


def test_mounted_body_is_a_read_only_file(host: Host, tool: bytes) -> None:
    deploy(host, "cat", tool, args=["cat", "/data/in.bin"], mount_body="/data/in.bin")
    body = b"\x00binary\xffbody" * 100
    assert host.invoke("cat", body).body == body
    assert any(ln.message == "open for writing: refused" for ln in host.logs("cat"))


def test_mount_at_the_root(host: Host, tool: bytes) -> None:
    deploy(host, "cat-root", tool, args=["cat", "/body"], mount_body="/body")
    assert host.invoke("cat-root", b"at the root").body == b"at the root"


def test_no_mount_no_files(host: Host, tool: bytes) -> None:
    deploy(host, "cat-none", tool, args=["cat", "/data/in.bin"])
    with pytest.raises(GuestError, match="cannot open /data/in.bin"):
        host.invoke("cat-none", b"x")


def test_every_invocation_gets_a_fresh_instance(host: Host, tool: bytes) -> None:
    deploy(host, "count", tool, args=["count"])
    assert [host.invoke("count", b"").body for _ in range(3)] == [b"1\n"] * 3


# --- exit status and failures ----------------------------------------------------------------------------
def test_nonzero_exit_is_a_500_with_the_tail_of_stderr(host: Host, tool: bytes) -> None:
    deploy(host, "fail", tool, args=["exit", "3"])
    with pytest.raises(GuestError, match=r"(?s)exited with status 3; stderr: ….*failing with 3$") as info:
        host.invoke("fail", b"")
    assert type(info.value) is GuestError and info.value.status == 500
    assert len(info.value.message) < 2300  # a tail, not all 3 KB of it
    assert any(ln.stream == "stderr" and ln.message == "failing with 3" for ln in host.logs("fail"))


def test_exit_zero_through_proc_exit_is_success(host: Host, tool: bytes) -> None:
    deploy(host, "exit0", tool, args=["exit0"])
    assert host.invoke("exit0", b"").body == b"done\n"


def test_failed_wasi_nn_call_is_named_in_the_error(host: Host, build_guest: Callable[..., bytes]) -> None:
    deploy(host, "digits-denied", build_guest("nn_digits.c", exec_model="command"))
    with pytest.raises(GuestError, match=r"status 1; last failed call: wasi-nn load_by_name: not_found .*"
                                         r"manifest key 'models'.*stderr: nn_digits: load_by_name failed"):
        host.invoke("digits-denied", b"P5 8 8 16\n" + bytes(64))


def test_trap(host: Host, tool: bytes) -> None:
    deploy(host, "trap", tool, args=["trap"])
    with pytest.raises(GuestTrap, match="unreachable"):
        host.invoke("trap", b"")
    assert host.invoke("echo", b"still serving").body == b"still serving"


# --- limits, obeyed and violated ----------------------------------------------------------------------------
def test_timeout_obeyed_and_violated(host: Host, tool: bytes) -> None:
    deploy(host, "loop", tool, args=["loop"], timeout_ms=100)
    deploy(host, "quick", tool, args=["echo"], timeout_ms=100)
    assert host.invoke("quick", b"q").body == b"q"
    with pytest.raises(Timeout, match="timeout_ms"):
        host.invoke("loop", b"")


def test_output_limit_obeyed_and_violated(host: Host, tool: bytes) -> None:
    deploy(host, "spam-ok", tool, args=["spam", "10000"], max_output_bytes=10000)
    assert host.invoke("spam-ok", b"").body == b"x" * 10000
    deploy(host, "spam", tool, args=["spam", "10001"], max_output_bytes=10000)
    with pytest.raises(OutputLimitExceeded, match="max_output_bytes"):
        host.invoke("spam", b"")
    assert any("write failed after 8192 bytes: errno" in ln.message for ln in host.logs("spam"))  # EFBIG


def test_log_limit_obeyed_and_violated(host: Host, tool: bytes) -> None:
    deploy(host, "noise-ok", tool, args=["noise", "1000"], max_log_bytes=1000)
    r = host.invoke("noise-ok", b"")
    assert r.body == b""  # stdout untouched; the 1000 bytes of stderr are all in the log
    assert "".join(line.message for line in host.logs("noise-ok") if line.stream == "stderr") == "e" * 1000
    deploy(host, "noise", tool, args=["noise", "1001"], max_log_bytes=1000)
    with pytest.raises(LogLimitExceeded, match="max_log_bytes"):
        host.invoke("noise", b"")


def test_memory_limit_obeyed_and_violated(host: Host, tool: bytes) -> None:
    deploy(host, "big-echo", tool, args=["echo"], memory_mb=4)
    assert len(host.invoke("big-echo", b"y" * (2 << 20)).body) == 2 << 20
    deploy(host, "grow", tool, args=["grow"], memory_mb=4)
    with pytest.raises(MemoryLimitExceeded, match="memory_mb"):
        host.invoke("grow", b"")


# --- detection, manifests, builds ------------------------------------------------------------------------
def test_abi_detected_at_upload(host: Host, tool: bytes) -> None:
    info, _ = host.inspect(tool)
    assert info.abi == "command" and not info.uses_wasi_nn and "_start" in info.exports
    assert host.function("digits-stdin").describe()["abi"] == "command"
    with pytest.raises(InvalidManifest, match="'abi' says 'handler'"):
        deploy(host, "wrong-abi", tool, abi="handler")
    deploy(host, "right-abi", tool, abi="command")


def test_start_with_a_wrong_signature_is_refused(host: Host) -> None:
    wasm = bytes(wasmtime.wat2wasm('(module (func (export "_start") (param i32)))'))
    with pytest.raises(InvalidModule, match="not a valid command module: export '_start' has type"):
        host.deploy_function("bad-start", wasm, Manifest())


@pytest.mark.parametrize("manifest", [{"mount_body": "/data/"}, {"mount_body": "/a/../b"},
                                      {"mount_body": "relative"}, {"content_type": "json"}])
def test_bad_command_manifest_keys(manifest: dict[str, str]) -> None:
    with pytest.raises(InvalidManifest, match=next(iter(manifest))):
        Manifest.from_dict(manifest)


def test_command_build_exports_start_and_reactor_builds_do_not(tmp_path: Path, tool: bytes) -> None:
    module = wasmtime.Module(wasmtime.Engine(), tool)
    exports = {e.name for e in module.exports}
    assert "_start" in exports and "_initialize" not in exports
    with pytest.raises(ValueError, match="exec_model"):
        toolchain.build(tmp_path, exec_model="library")
    (tmp_path / "main.py").write_text("print('hi')\n")
    with pytest.raises(toolchain.BuildError, match="only C sources"):
        toolchain.build(tmp_path, exec_model="command")


EXIT_PROBE = '''
import wasmtime
from wasminfer.runtime._engine import CallState
from wasminfer.runtime._wasm import WasiOptions, WasmEngine
WAT = """(module
  (import "wasi_snapshot_preview1" "fd_write" (func $w (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 16) "hi")
  (func (export "_start")
    (i32.store (i32.const 0) (i32.const 16)) (i32.store (i32.const 4) (i32.const 2))
    (drop (call $w (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))
    (drop (call $w (i32.const 2) (i32.const 0) (i32.const 1) (i32.const 8)))))"""
engine = WasmEngine([])  # never closed: a process that exits without shutting its host down
compiled = engine.compile(bytes(wasmtime.wat2wasm(WAT)))
seen = []
for _ in range(200):
    inst = compiled.instantiate(memory_bytes=1 << 20, timeout_ms=1000, calls=(("_start", 0),),
                                output=lambda stream, data: seen.append(data), wasi=WasiOptions())
    inst.call("_start", (), CallState(), nresults=0)
    inst.close()
assert seen == [b"hi"] * 400
'''


def test_process_exits_cleanly_after_guests_wrote_output() -> None:
    # With wasmtime-py's `stdout_custom`, wasmtime's tokio threads ran a Python finalizer while the
    # interpreter exited and aborted the process (SIGABRT) in 9 exits out of 10 of this script.
    for _ in range(3):
        done = subprocess.run([sys.executable, "-c", EXIT_PROBE], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr[-2000:]
