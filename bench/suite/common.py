"""What every scenario gets from the runner: the options, a scratch folder, the models and the
built functions (made once per run), progress on stderr, and the machine's description."""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from suite import workloads

BENCH = Path(__file__).resolve().parents[1]
RESULTS = BENCH / "results"


def progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


@dataclass
class Context:
    quick: bool
    work: Path  # scratch, deleted after the run
    workloads: list[str]
    ray: bool = True
    generator: str | None = None
    results: Path = RESULTS
    skipped: dict[str, str] = field(default_factory=dict)  # workload -> why it cannot run here
    started: dict[str, object] = field(default_factory=dict)  # the running scenario's start: date, load
    _models: dict[str, Path] = field(default_factory=dict)
    _functions: dict[str, bytes] = field(default_factory=dict)

    def model_path(self, name: str) -> Path:
        if name not in self._models:
            progress(f"model {name}: preparing")
            self._models.update(workloads.prepare([name], self.work / "models"))
        return self._models[name]

    def function(self, name: str) -> bytes:
        """What `wasminfer deploy function FOLDER` sends for workload `name`, made once per run: a
        Python function's files (`pysource.bundle_folder`: its source and data files, run by the
        server's Python runtime), a C function built (`wasminfer.toolchain`, cached on disk)."""
        if name not in self._functions:
            from wasminfer import pysource, toolchain

            source = workloads.WORKLOADS[name].build_source(self.work / "staged")
            if workloads.WORKLOADS[name].language == "python":
                self._functions[name] = pysource.bundle_folder(source)
            else:
                build = toolchain.build(source, progress=lambda m: progress(f"build {m}"))
                self._functions[name] = build.read_bytes()
        return self._functions[name]

    def engine_cache(self) -> Path:
        """A compile cache kept across runs (a new module's optimised compile takes seconds)."""
        root = os.environ.get("WASMINFER_CACHE")
        return (Path(root) if root else Path.home() / ".cache" / "wasminfer") / "bench-engine"


def machine() -> dict[str, Any]:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import onnxruntime
    import wasmtime

    return {
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "onnxruntime": onnxruntime.__version__,
        "wasmtime": getattr(wasmtime, "__version__", "50.0.1"),
    }


def write_result(ctx: Context, scenario: str, data: dict[str, Any]) -> Path:
    ctx.results.mkdir(parents=True, exist_ok=True)
    data = {
        "scenario": scenario,
        "quick": ctx.quick,
        "machine": machine(),
        **data,
        "workloads_left_out": ctx.skipped,
    }
    data["machine"]["started"] = ctx.started.get("date")
    data["machine"]["load_average_at_start"] = ctx.started.get("load_average")
    data["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    path = ctx.results / f"{scenario}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)
    return path


def agree(a: Any, b: Any, tol: float = 1e-4) -> bool:
    """Two JSON answers are the same up to `tol` on numbers (the guests print floats with 9
    significant digits, numpy's json with 17)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(agree(a[k], b[k], tol) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(agree(x, y, tol) for x, y in zip(a, b, strict=True))
    if isinstance(a, bool) or isinstance(b, bool):
        return a == b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return abs(a - b) <= tol
    return bool(a == b)


def check_agreement(system: str, workload: str, answer: bytes, reference: bytes) -> None:
    """Raises `RuntimeError` unless `answer` (a system's) matches `reference` (numpy's)."""
    if not agree(json.loads(answer), json.loads(reference)):
        raise RuntimeError(
            f"{system} and numpy disagree on {workload}:\n{answer[:300]!r}\n{reference[:300]!r}"
        )
