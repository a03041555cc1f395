"""A probe of issue 18's design change, not the platform's code: what a new function's compile
would cost if the C SDK were a module compiled once per host and each function's module held only
its own code.

    python bench/sdk_split_probe.py [-n 15]

The digits example is built twice from the same `functions/digits/main.c`:
- `whole`: as the platform builds it today (`toolchain.build`), the SDK inlined into the module;
- `split`: against `bench/guests/sdk_split/fn/wasminfer.h`, whose SDK calls are imports from a
  module "wasminfer_sdk" (`bench/guests/sdk_split/sdk_lib.c`, built here too). The two modules share
  one memory, the SDK's (the function imports it and exports it again, so the host finds it where
  it looks now; it is grown to the function's minimum before the function is instantiated): the
  function's stack at [0, 64 KiB), the SDK's data from 64 KiB, the function's data from 128 KiB;
  the SDK runs on a stack of its own (`sdk_init`).

For each it measures, interleaved, each on a module no cache has seen (`unique_module`):
- `code_bytes`: the module's code section;
- `fast_ms`: Cranelift's fast tier (`engine_config("fast")`) in this process, wall-clock median,
  and `fast_seq_ms` with one compile thread (the CPU it costs);
- `worker_ms`: the fast tier through a compile worker (pipe in, compile, artefact back, loaded),
  as a deploy does;
- `instantiate_us`: a new instance (for `split`: the SDK's and the function's, linked in one
  store; wasmtime-py's plain `Instance`, not the runtime's pooled path, for both), and
  `instantiate_pre_us` from an `InstancePre` as the runtime does (for `split`: the SDK's, then the
  function linked per store, since an `InstancePre` cannot hold a store's exports);
- `invoke_us`: one request through the same plain harness (host imports in Python: the real codec
  and ONNX Runtime session), both alike.
It checks that both answer every request of a small set (a digit as JSON and as bytes, and three
refusals) with the same status and bytes. Prints a table; writes bench/results/sdk_split_probe.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import onnxruntime as ort
import wasmtime

from suite import workloads
from suite.common import RESULTS
from suite.systems import unique_module
from wasminfer import examples, toolchain
from wasminfer.models.codec import decode_tensors, encode_tensors
from wasminfer.runtime._compiler import Compiler, engine_config
from wasminfer.runtime._snapshot import sections
from wasminfer.runtime.handler import HOST_FUNCS

ROOT = Path(__file__).resolve().parents[1]
SPLIT = ROOT / "bench" / "guests" / "sdk_split"
HEADER = ROOT / "guest-sdk" / "c" / "wasminfer.h"
#: The layout both modules are linked for (see the docstring).
SDK_BASE, FN_BASE, FN_STACK = 64 << 10, 128 << 10, 64 << 10
REQUESTS = [
    ("application/json", None),  # the workload's own body
    ("application/octet-stream", bytes([3] * 64)),
    ("text/plain", b"xx"),
    ("application/json", b'{"pixels": [1, 2, 3]}'),
    ("application/octet-stream", bytes([30] * 64)),
]
#: The handler ABI's imports: (params, results), all i32, as the runtime defines them.
IMPORT_ARITY = {hf.name: (len(hf.params), len(hf.results)) for hf in HOST_FUNCS}


def import_type(name: str) -> wasmtime.FuncType:
    """A fresh type each time: wasmtime ties a function type to the first engine it is used with."""
    params, results = IMPORT_ARITY[name]
    i32 = wasmtime.ValType.i32()
    return wasmtime.FuncType([i32] * params, [i32] * results)


def _zig(args: list[str], out: Path) -> bytes:
    cmd = [sys.executable, "-m", "ziglang", "cc", "-target", "wasm32-wasi", "-mexec-model=reactor", "-O2",
           "-s", *args, "-o", str(out)]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return out.read_bytes()


def build_split(tmp: Path) -> tuple[bytes, bytes]:
    """(SDK module, digits' own module)."""
    text = HEADER.read_text()
    cut = text.index("/* ---- formatting")
    types = tmp / "types"
    types.mkdir()
    (types / "wasminfer_types.h").write_text(text[:cut] + "\n#endif\n")
    sdk = _zig(["-I", str(HEADER.parent), "-Wl,--export-memory", f"-Wl,--global-base={SDK_BASE}",
                "-Wl,-z,stack-size=16", str(SPLIT / "sdk_lib.c")], tmp / "sdk.wasm")
    fn = _zig(["-I", str(SPLIT / "fn"), "-I", str(types), "-I", str(HEADER.parent), "-Wl,--import-memory",
               "-Wl,--export-memory", f"-Wl,--global-base={FN_BASE}", f"-Wl,-z,stack-size={FN_STACK}",
               str(ROOT / "functions" / "digits" / "main.c")], tmp / "digits.wasm")
    return sdk, fn


def code_bytes(wasm: bytes) -> int:
    return next((size for sid, _start, size in sections(wasm) if sid == 10), 0)


def memory_pages(module: wasmtime.Module) -> int:
    """The minimum size (pages) of the memory a split function imports."""
    return next(i.type.limits.min for i in module.imports if i.name == "memory")


def link_sdk(store: wasmtime.Store, sdk: wasmtime.Instance, pages: int) -> dict[str, Any]:
    """Starts a split build's SDK instance: its memory grown to `pages`, its data set up, its
    own stack in place. Returns its exports."""
    sx = dict(sdk.exports(store))
    memory = sx["memory"]
    if memory.size(store) < pages:
        memory.grow(store, pages - memory.size(store))
    sx["_initialize"](store)
    sx["sdk_init"](store)
    return sx


class Harness:
    """A module (or the SDK and a module) instantiated with the handler ABI's host imports done in
    Python: enough to compare the two builds' answers and instantiation, nothing of the runtime."""

    def __init__(self, engine: wasmtime.Engine, fn: wasmtime.Module, sdk: wasmtime.Module | None,
                 session: ort.InferenceSession) -> None:
        self.engine, self.fn, self.sdk, self.session = engine, fn, sdk, session
        self.names = [o.name for o in session.get_outputs()]
        self.pages = memory_pages(fn) if sdk is not None else 0

    def instantiate(self) -> Callable[[bytes, bytes], tuple[int, bytes | None, bytes | None]]:
        store = wasmtime.Store(self.engine)
        store.set_epoch_deadline(1 << 40)
        out: dict[str, Any] = {}
        mem: list[wasmtime.Memory] = []

        def read(p: int, n: int) -> bytes:
            return bytes(mem[0].read(store, p, p + n))

        def infer(_mp: int, _ml: int, ip: int, il: int, op: int, oc: int) -> int:
            inputs = decode_tensors(read(ip, il))
            enc = encode_tensors(dict(zip(self.names, self.session.run(None, dict(inputs)), strict=True)))
            if len(enc) > oc:
                out["pending"] = enc
            else:
                mem[0].write(store, enc, op)
            return len(enc)

        def infer_result(op: int, _oc: int) -> int:
            enc = out.pop("pending")
            mem[0].write(store, enc, op)
            return len(enc)

        def output(bp: int, bl: int, _cp: int, _cl: int) -> int:
            out["body"] = read(bp, bl)
            return 0

        def error(p: int, n: int) -> None:
            out["error"] = read(p, n)

        impls: dict[str, Callable[..., Any]] = {
            "infer": infer, "infer_result": infer_result, "output": output, "error": error,
            "last_error": lambda _b, _c: 0,
        }
        host = {name: wasmtime.Func(store, import_type(name), f) for name, f in impls.items()}
        if self.sdk is None:
            inst = wasmtime.Instance(store, self.fn, [host[i.name] for i in self.fn.imports])
        else:
            sdk = wasmtime.Instance(store, self.sdk, [host[i.name] for i in self.sdk.imports])
            sx = link_sdk(store, sdk, self.pages)
            mem.append(sx["memory"])
            inst = wasmtime.Instance(store, self.fn, [sx[i.name] for i in self.fn.imports])
        ex = inst.exports(store)
        if not mem:
            mem.append(ex["memory"])
        ex["_initialize"](store)
        inbox, handle = ex["wasminfer_inbox"](store), ex["wasminfer_handle"]

        def invoke(body: bytes, ctype: bytes) -> tuple[int, bytes | None, bytes | None]:
            out.clear()
            mem[0].write(store, body + ctype, inbox)
            status = handle(store, inbox, len(body), inbox + len(body), len(ctype))
            return status, out.get("body"), out.get("error")

        return invoke


def measure(builds: dict[str, tuple[bytes, bytes | None]], n: int) -> dict[str, dict[str, float]]:
    engines = {"fast": wasmtime.Engine(engine_config("fast"))}
    seq = engine_config("fast")
    seq.parallel_compilation = False
    engines["fast_seq"] = wasmtime.Engine(seq)
    host_engine = wasmtime.Engine(engine_config())
    samples: dict[str, dict[str, list[float]]] = {
        b: {"fast": [], "fast_seq": [], "worker": []} for b in builds
    }
    compiler = Compiler()
    compiler.prestart()
    try:
        compiler.compile_fast("module", unique_module(builds["whole"][0]), 120)  # the worker is warm
        for _ in range(n):
            for build, (wasm, _sdk) in builds.items():
                for tier, engine in engines.items():
                    t = time.perf_counter()
                    wasmtime.Module(engine, unique_module(wasm))
                    samples[build][tier].append(time.perf_counter() - t)
                t = time.perf_counter()
                artefact = compiler.compile_fast("module", unique_module(wasm), 120)
                wasmtime.Module.deserialize(host_engine, artefact)
                samples[build]["worker"].append(time.perf_counter() - t)
    finally:
        compiler.close()
    return {b: {f"{k}_ms": statistics.median(v) * 1e3 for k, v in s.items()} for b, s in samples.items()}


def run_checks(builds: dict[str, tuple[bytes, bytes | None]], n: int) -> dict[str, dict[str, float]]:
    engine = wasmtime.Engine(engine_config())
    session = ort.InferenceSession(examples.digits_model())
    body = workloads.WORKLOADS["digits"].body()
    harnesses = {b: Harness(engine, wasmtime.Module(engine, wasm),
                            wasmtime.Module(engine, sdk) if sdk else None, session)
                 for b, (wasm, sdk) in builds.items()}
    answers: dict[str, list[Any]] = {}
    times: dict[str, dict[str, list[float]]] = {b: {"instantiate": [], "invoke": []} for b in builds}
    for build, h in harnesses.items():
        invoke = h.instantiate()
        answers[build] = [invoke(req or body, ctype.encode()) for ctype, req in REQUESTS]
    for _ in range(n):
        for build, h in harnesses.items():
            t = time.perf_counter()
            invoke = h.instantiate()
            times[build]["instantiate"].append(time.perf_counter() - t)
            for _ in range(20):
                t = time.perf_counter()
                invoke(body, b"application/json")
                times[build]["invoke"].append(time.perf_counter() - t)
    if answers["whole"] != answers["split"]:
        raise SystemExit(f"the builds answered differently:\n{answers['whole']}\n{answers['split']}")
    print(f"same answers to {len(REQUESTS)} requests, e.g. {answers['split'][0][1][:40]!r}... "
          f"and {answers['split'][2][2]!r}")
    return {b: {f"{k}_us": statistics.median(v) * 1e6 for k, v in t.items()} for b, t in times.items()}


def instantiate_pre(builds: dict[str, tuple[bytes, bytes | None]], n: int) -> dict[str, dict[str, float]]:
    """A new instance as the runtime makes one today, from an `InstancePre` (host imports that do
    nothing; wasmtime-py's wrappers, not the runtime's ctypes). A split build takes the SDK's
    instance from its `InstancePre`, then links the function per store: an `InstancePre` cannot hold
    another store's exports."""
    engine = wasmtime.Engine(engine_config())
    linker = wasmtime.Linker(engine)
    for name in IMPORT_ARITY:
        linker.define_func("wasminfer", name, import_type(name), lambda *_a: 0)

    def maker(wasm: bytes, sdk: bytes | None) -> Callable[[], None]:
        module = wasmtime.Module(engine, wasm)
        if sdk is None:
            pre = linker.instantiate_pre(module)

            def whole() -> None:
                store = wasmtime.Store(engine)
                store.set_epoch_deadline(1 << 40)
                pre.instantiate(store).exports(store)["_initialize"](store)
            return whole
        sdk_pre = linker.instantiate_pre(wasmtime.Module(engine, sdk))
        pages = memory_pages(module)

        def split() -> None:
            store = wasmtime.Store(engine)
            store.set_epoch_deadline(1 << 40)
            si = sdk_pre.instantiate(store)
            sx = link_sdk(store, si, pages)
            per_store = wasmtime.Linker(engine)
            per_store.define_instance(store, "wasminfer_sdk", si)
            per_store.define(store, "env", "memory", sx["memory"])
            per_store.instantiate(store, module).exports(store)["_initialize"](store)
        return split

    makers = {b: maker(wasm, sdk) for b, (wasm, sdk) in builds.items()}
    times: dict[str, list[float]] = {b: [] for b in builds}
    for _ in range(20 * n):
        for build, make in makers.items():
            t = time.perf_counter()
            make()
            times[build].append(time.perf_counter() - t)
    return {b: {"instantiate_pre_us": statistics.median(v) * 1e6} for b, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=15, help="repetitions (medians of them)")
    args = parser.parse_args()
    whole = toolchain.build(ROOT / "functions" / "digits").read_bytes()
    with tempfile.TemporaryDirectory(prefix="sdk-split-") as tmp:
        sdk, split = build_split(Path(tmp))
    builds: dict[str, tuple[bytes, bytes | None]] = {"whole": (whole, None), "split": (split, sdk)}
    rows: dict[str, dict[str, float]] = {b: {"module_bytes": len(w), "code_bytes": code_bytes(w)}
                                         for b, (w, _) in builds.items()}
    rows["sdk (once per host)"] = {"module_bytes": len(sdk), "code_bytes": code_bytes(sdk)}
    for b, r in measure(builds, args.n).items():
        rows[b].update(r)
    for b, r in run_checks(builds, args.n).items():
        rows[b].update(r)
    for b, r in instantiate_pre(builds, args.n).items():
        rows[b].update(r)
    cols = ("module_bytes", "code_bytes", "fast_ms", "fast_seq_ms", "worker_ms", "instantiate_us",
            "instantiate_pre_us", "invoke_us")
    print(f"{'build':<20}" + "".join(f"{c:>19}" for c in cols))
    for b, r in rows.items():
        print(f"{b:<20}" + "".join(f"{r[c]:>19.2f}" if c in r else f"{'':>19}" for c in cols))
    ratios = {k: rows["whole"][k] / rows["split"][k]
              for k in ("code_bytes", "fast_ms", "fast_seq_ms", "worker_ms")}
    print("whole / split: " + ", ".join(f"{k} {v:.1f}x" for k, v in ratios.items()))
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "sdk_split_probe.json"
    path.write_text(json.dumps({"rows": rows, "whole_over_split": ratios, "repetitions": args.n},
                               indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
