"""The C SDK as a module of its own (docs/sdk-module.md): a function built with `sdk="module"` (the
toolchain's default for handler modules) imports its SDK calls, and its memory, from
"wasminfer_sdk_v1", which the host ships and links into each of its instances.

What is checked here: the shipped SDK module is what the sources build; a split build answers as
the static build of the same function does; the host refuses SDK imports it cannot meet; traps,
deadlines and memory limits hold inside the SDK's code as inside the function's; each instance has
its own SDK state."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import wasmtime

from wasminfer import toolchain
from wasminfer.errors import (
    GuestTrap,
    InvalidManifest,
    InvalidModule,
    MemoryLimitExceeded,
    Timeout,
    WasminferError,
)
from wasminfer.runtime import Host, Manifest
from wasminfer.service import Platform

pytestmark = pytest.mark.slow  # zig builds

ROOT = Path(__file__).resolve().parent.parent
SDK_IMPORT = "wasminfer_sdk_v1"

# A handler that exercises the SDK's code paths the tests below need: its own malloc beside the
# SDK's, a trap inside an SDK call, a loop inside an SDK call (formatting a huge width), growth.
PROBE = r"""
#include <stdlib.h>
#include <string.h>
#include "wasminfer.h"

static int calls;

static int handle(const wasminfer_request *req) {
    char cmd = req->body_len ? (char)req->body[0] : '?';
    calls++;
    if (cmd == 't') /* an out-of-bounds read inside the SDK's code */
        return wasminfer_media_type_is((const char *)0xFFFFFFF0u, "x/y");
    if (cmd == 'l') { /* time spent inside the SDK's code: 10 x 1e8 bytes of padding (seconds) */
        char b[8];
        for (int i = 0; i < 10; i++)
            if (wasminfer_snprintf(b, sizeof b, "%*d", 100000000, 1) <= 0) return 1;
        return wasminfer_output_str("done", "text/plain");
    }
    if (cmd == 'g') { /* `n` MiB in blocks of 60,000 bytes from the SDK's allocator, as many from ours */
        static void *sdk[512], *own[512];
        int n = atoi((const char *)req->body + 1) * 17, got = 0, ok = 1;
        for (; got < n && got < 512 && ok; got++) {
            sdk[got] = wasminfer_alloc_request(60000);
            own[got] = malloc(60000);
            ok = sdk[got] && own[got];
            if (ok) memset(own[got], 1, 60000);
        }
        for (int i = 0; i < got; i++) { wasminfer_free_request(sdk[i]); free(own[i]); }
        if (!ok) return wasminfer_fail(WASMINFER_E_NOMEM, "out of memory after %d blocks", got);
        return wasminfer_output_str("grown", "text/plain");
    }
    wasminfer_buf b = {0};
    wasminfer_buf_printf(&b, "{\"calls\": %d, \"echo\": ", calls);
    wasminfer_json_str(&b, (const char *)req->content_type);
    wasminfer_buf_puts(&b, "}");
    int rc = wasminfer_output_buf(&b, "application/json");
    wasminfer_buf_free(&b);
    return rc;
}
WASMINFER_HANDLER(handle)
"""


@pytest.fixture(scope="module")
def builds(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    tmp = tmp_path_factory.mktemp("sdk-module")
    probe = tmp / "probe"
    probe.mkdir()
    (probe / "main.c").write_text(PROBE)
    cache = tmp / "cache"
    digits = ROOT / "functions" / "digits"
    return {
        "digits-split": toolchain.build(digits, cache_dir=cache).read_bytes(),
        "digits-static": toolchain.build(digits, cache_dir=cache, sdk="static").read_bytes(),
        "probe": toolchain.build(probe, cache_dir=cache).read_bytes(),
    }


@pytest.fixture
def host(tmp_path: Path, builds: dict[str, bytes], digits_model: bytes) -> Iterator[Host]:
    h = Host(cache_dir=tmp_path)
    h.deploy_model("digits", digits_model)
    for name in ("digits-split", "digits-static"):
        h.deploy_function(name, builds[name], Manifest(models=("digits",), memory_mb=4))
    h.deploy_function("probe", builds["probe"], Manifest(memory_mb=8, timeout_ms=300, max_instances=2))
    yield h
    h.close()


@pytest.fixture(scope="module")
def digits_model() -> bytes:
    from wasminfer import examples

    return examples.digits_model()


def _code_bytes(wasm: bytes) -> int:
    from wasminfer.runtime._snapshot import sections

    return sum(size for sid, _start, size in sections(wasm) if sid == 10)


def _imports(wasm: bytes) -> list[str]:
    return [f"{i.module}.{i.name}" for i in wasmtime.Module(wasmtime.Engine(), wasm).imports]


def test_the_shipped_sdk_module_is_what_its_sources_build(tmp_path: Path) -> None:
    built = toolchain.build_sdk_module(cache_dir=tmp_path)
    assert built.read_bytes() == toolchain.SDK_MODULE_WASM.read_bytes(), (
        "guest-sdk/c changed: rebuild the shipped SDK module with "
        "python -c 'from wasminfer import toolchain; toolchain.build_sdk_module(toolchain.SDK_MODULE_WASM)'")


def test_a_split_build_imports_the_sdk_and_holds_only_its_own_code(builds: dict[str, bytes]) -> None:
    split, static = builds["digits-split"], builds["digits-static"]
    imports = _imports(split)
    assert "env.memory" in imports and f"{SDK_IMPORT}.wasminfer_infer" in imports
    assert all(i == "env.memory" or i.startswith(f"{SDK_IMPORT}.") for i in imports)
    assert not any(i.startswith(SDK_IMPORT) for i in _imports(static))
    assert _code_bytes(split) * 5 < _code_bytes(static)  # ~2 KB against ~19 KB


DIGIT = [0, 0, 5, 13, 9, 1, 0, 0, 0, 0, 13, 15, 10, 15, 5, 0, 0, 3, 15, 2, 0, 11, 8, 0, 0, 4, 12, 0, 0,
         8, 8, 0, 0, 5, 8, 0, 0, 9, 8, 0, 0, 4, 11, 0, 1, 12, 7, 0, 0, 2, 14, 5, 10, 12, 0, 0, 0, 0, 6, 13,
         10, 0, 0, 0]  # load_digits()[0]: a 0


@pytest.mark.parametrize("body, ctype, status", [
    (json.dumps({"pixels": DIGIT}).encode(), "application/json", 200),
    (json.dumps(DIGIT).encode(), "application/json", 200),
    (bytes(DIGIT), "application/octet-stream", 200),
    (b"{\"pixels\": [1, 2]}", "application/json", 400),
    (bytes([17] * 64), "application/octet-stream", 400),
    (b"x", "text/plain", 415),
    (b"[1, 2,", "application/json", 400),
], ids=["json-member", "json-array", "bytes", "too-few", "out-of-range", "media-type", "bad-json"])
def test_split_and_static_builds_answer_alike(host: Host, body: bytes, ctype: str, status: int) -> None:
    answers = []
    for name in ("digits-split", "digits-static"):
        try:
            r = host.invoke(name, body, ctype)
            answers.append((200, r.content_type, r.body))
        except WasminferError as exc:  # the refusals: same error, same status, same message
            answers.append((exc.status, type(exc).__name__, str(exc).replace(name, "F")))
    assert answers[0] == answers[1]
    assert answers[0][0] == status
    if status == 200:
        assert json.loads(answers[0][2])["label"] == 0


def test_a_trap_inside_the_sdk_is_the_guests_and_the_next_request_is_served(host: Host) -> None:
    with pytest.raises(GuestTrap, match="memory"):
        host.invoke("probe", b"t")
    assert json.loads(host.invoke("probe", b"?", "a/b").body)["echo"] == "a/b"


def test_the_deadline_holds_inside_the_sdk(host: Host) -> None:
    with pytest.raises(Timeout, match="timeout of 300 ms"):
        host.invoke("probe", b"l")
    assert json.loads(host.invoke("probe", b"?", "c/d").body)["echo"] == "c/d"


def test_memory_limit_inside_the_sdk_obeyed_and_violated(host: Host) -> None:
    # 3 MiB in each allocator (a 64 KiB page per block) fit the 8 MiB limit; 5 MiB in each do not.
    assert host.invoke("probe", b"g3").body == b"grown"
    with pytest.raises(MemoryLimitExceeded):
        host.invoke("probe", b"g5")
    assert host.invoke("probe", b"g3").body == b"grown"


def test_each_instance_has_its_own_sdk_and_memory(host: Host, builds: dict[str, bytes]) -> None:
    # The function's static counter lives in the memory the SDK module owns: one per instance.
    first = json.loads(host.invoke("probe", b"?").body)["calls"]
    assert json.loads(host.invoke("probe", b"?").body)["calls"] == first + 1
    host.deploy_function("probe-2", builds["probe"], Manifest(memory_mb=8))
    assert json.loads(host.invoke("probe-2", b"?").body)["calls"] == 1


WAT_CALLS = """(module
  (import "env" "memory" (memory 3))
  (import "wasminfer_sdk_v1" "{name}" (func {sig}))
  (func (export "wasminfer_alloc") (param i32) (result i32) (i32.const 0))
  (func (export "wasminfer_handle") (param i32 i32 i32 i32) (result i32) (i32.const 0))
  (export "memory" (memory 0)))"""


@pytest.mark.parametrize("name, sig", [
    ("wasminfer_nope", "(param i32) (result i32)"),  # no such call
    ("wasminfer_infer", "(param i32) (result i32)"),  # another type
    ("_initialize", ""),  # the host's to call, not the function's
])
def test_sdk_imports_the_host_cannot_meet_are_refused_at_deploy(host: Host, name: str, sig: str) -> None:
    wasm = wasmtime.wat2wasm(WAT_CALLS.format(name=name, sig=sig))
    with pytest.raises(InvalidModule, match=f"{SDK_IMPORT}.{name}"):
        host.deploy_function("bad", bytes(wasm), Manifest())
    assert json.loads(host.invoke("probe", b"?").body)["calls"] >= 1  # nothing else lost


def test_a_memory_import_without_the_sdk_is_refused(host: Host) -> None:
    wasm = wasmtime.wat2wasm("""(module (import "env" "memory" (memory 1))
      (func (export "wasminfer_alloc") (param i32) (result i32) (i32.const 0))
      (func (export "wasminfer_handle") (param i32 i32 i32 i32) (result i32) (i32.const 0)))""")
    with pytest.raises(InvalidModule, match="env.memory"):
        host.deploy_function("bad", bytes(wasm), Manifest())


def test_toolchain_sdk_options(tmp_path: Path) -> None:
    folder = tmp_path / "fn"
    folder.mkdir()
    (folder / "main.c").write_text(PROBE)
    cache = tmp_path / "cache"
    # A stack past what lies below the SDK's data builds static by default, and refuses "module".
    big = toolchain.build(folder, cache_dir=cache, stack_size=128 << 10).read_bytes()
    assert not any(i.startswith(SDK_IMPORT) for i in _imports(big))
    with pytest.raises(ValueError, match="stack"):
        toolchain.build(folder, cache_dir=cache, stack_size=128 << 10, sdk="module")
    with pytest.raises(ValueError, match="command"):
        toolchain.build(folder, cache_dir=cache, exec_model="command", sdk="module")
    with pytest.raises(ValueError, match="'module' or 'static'"):
        toolchain.build(folder, cache_dir=cache, sdk="shared")


def test_a_function_whose_memory_starts_past_the_sdks_gets_it_grown(tmp_path: Path) -> None:
    # The SDK module's initial memory holds a small function's data; a function declaring more
    # (here 2 MiB) has the shared memory grown to it before its instance is made.
    folder = tmp_path / "big"
    folder.mkdir()
    (folder / "main.c").write_text(PROBE)
    wasm = toolchain.build(folder, cache_dir=tmp_path / "cache", initial_memory=2 << 20).read_bytes()
    assert f"{SDK_IMPORT}.wasminfer_output_buf" in _imports(wasm)
    with Host(cache_dir=tmp_path / "host") as h:
        h.deploy_function("big", wasm, Manifest(memory_mb=8))
        assert json.loads(h.invoke("big", b"?", "e/f").body) == {"calls": 1, "echo": "e/f"}
        assert h.invoke("big", b"g1").body == b"grown"
        # the same module under a limit below its initial memory: refused at upload, as ever
        with pytest.raises(InvalidManifest, match="2.00 MiB of initial memory"):
            h.deploy_function("small", wasm, Manifest(memory_mb=1))


def test_a_server_compiles_the_sdk_module_before_the_first_upload(tmp_path: Path, builds: dict[str, bytes],
                                                                  digits_model: bytes) -> None:
    """`Platform.warm_up` (what `wasminfer serve` does once its store is loaded): the SDK module is
    compiled with no function deployed, and the first split function's upload finds it there."""
    with Platform(tmp_path / "data") as platform:
        platform.start()
        engine = platform._engine
        assert engine._sdk is None  # nothing stored needed it
        platform.warm_up().join(120)
        sdk = engine._sdk
        assert sdk is not None
        platform.put_model("digits", digits_model)
        platform.put_function("digits", builds["digits-split"], {"models": ["digits"]})
        assert engine._sdk is sdk
        answer = platform.invoke("digits", json.dumps({"pixels": [0.0] * 64}).encode(), "application/json")
        assert json.loads(answer.body)["label"] in range(10)
