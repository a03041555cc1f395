"""The model registry: one ONNX Runtime session per model, shared by every instance and function.

`ModelRegistry.load` validates an upload before ONNX Runtime sees it (`validation.py`: no external
data, no custom operator domains) and creates the session from the validated bytes, never from a
path; its options are resolved by `options.py`.

`ModelRegistry.infer` checks names, dtypes and shapes before `run` (`inputs.py`), so a bad input
gets an error naming the tensor and the shape the model expects instead of an ORT message. There is
deliberately **no lock around `session.run`** (only a bound on how many run at once): ORT allows
concurrent `run` calls on one session, and the registry is a copy-on-write dict whose reference is
swapped under a small lock, so reads take no lock at all. A reload swaps in the new session; calls
in flight finish on the old one, which is freed when the last of them returns.

Dynamic batching is opt-in per model (`load(..., max_batch_size=32, max_queue_delay_us=2000)`,
see `batching.py`): `infer` validates each call first, so a bad input never enters a batch, then
hands the call to the model's batcher, which may stack it with concurrent calls into one run.
`stats(name)` gives the counters a metrics endpoint needs (`stats.py`).

Run slots and threads: a model runs at most `max_concurrent_runs` runs at once, and all models
together no more threads than the process has cores; the other calls wait in the model's queue
(`slots.py`). Unless given, the model's intra-op threads and runs are chosen at load by measuring it
(`tuning.py`); a model whose run takes under a millisecond keeps one thread and no bound. 0 threads
is ORT's pool of one thread per core, which the registry then keeps from spinning (`tuning.py` has
the measurements behind one thread per run as the starting point).
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
from typing import Any

import numpy as np
import onnxruntime as ort
import psutil

from wasminfer.errors import (
    BadRequest,
    InferenceFailed,
    InvalidTensor,
    ModelNotFound,
    Timeout,
    TooManyRequests,
    Unavailable,
)
from wasminfer.models.batching import ROWS, BatchCounters, Batcher, BatchingConfig, Stack, default_slots
from wasminfer.models.inputs import InputCheck, TensorSpec, check_inputs, compile_check, tensor_spec
from wasminfer.models.joined import JoinedRuns
from wasminfer.models.options import (
    DEFAULT_INTER_OP_THREADS,
    DEFAULT_INTRA_OP_THREADS,
    MAX_CONCURRENT_RUNS_LIMIT,
    MAX_THREADS,
    batching_config,
    bool_option,
    int_option,
)
from wasminfer.models.padding import padded_stack
from wasminfer.models.session import Run, make_session, runner
from wasminfer.models.slots import RUN_SLOTS, ModelSlots, RunSlots
from wasminfer.models.stats import Counters, ModelStats
from wasminfer.models.timer import RUN_TIMER
from wasminfer.models.tuning import RunPlan, given_plan, tuned
from wasminfer.models.validation import no_batch_dimension, validate_upload
from wasminfer.syntax import validate_name

__all__ = ["ModelInfo", "ModelRegistry"]


# --- public data types --------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class ModelInfo:
    """What the registry knows about a loaded model.

    `batching` is the model's dynamic batching, None when each call runs on its own. `run_plan`:
    the threads and concurrent runs it runs with and how they were chosen; `given`: the
    `intra_op_threads` and `max_concurrent_runs` the load was given (None: chosen).
    `memory_arena`: whether its session has ONNX Runtime's CPU arena.
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
    run_plan: RunPlan | None = None
    given: Mapping[str, int | None] = field(default_factory=dict)
    memory_arena: bool = False

    @property
    def max_concurrent_runs(self) -> int:
        """Runs of the model at once (0: no bound)."""
        return self.run_plan.max_concurrent_runs if self.run_plan else 0

    def options(self) -> dict[str, int | bool | None]:
        """The load options this model runs with: what `ModelRegistry.load(**options)` takes to
        load it again the same way, and what the store keeps with each model version. The threads
        and runs are as given (None: chosen at each load, by measuring on the host that loads it;
        `run_plan` has what was chosen); the rest resolved. `max_batch_size` 0 is batching off."""
        batching = self.batching
        return {
            "intra_op_threads": self.given.get("intra_op_threads"),
            "inter_op_threads": self.inter_op_threads,
            "max_concurrent_runs": self.given.get("max_concurrent_runs"),
            "max_batch_size": batching.max_batch_size if batching else 0,
            "max_queue_delay_us": batching.max_queue_delay_us if batching else None,
            "max_concurrent_batches": batching.max_concurrent_batches if batching else None,
            "memory_arena": self.memory_arena,
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
            "max_concurrent_runs": self.max_concurrent_runs,
            "run_plan": self.run_plan.to_dict() if self.run_plan else None,
            "max_batch_size": batching.max_batch_size if batching else None,
            "max_queue_delay_us": batching.max_queue_delay_us if batching else None,
            "max_concurrent_batches": batching.max_concurrent_batches if batching else None,
            "memory_arena": self.memory_arena,
        }


# --- internals ----------------------------------------------------------------------------------
@dataclass(slots=True)
class _Model:
    info: ModelInfo
    session: ort.InferenceSession
    checks: dict[str, InputCheck]
    output_names: list[str]
    slots: ModelSlots
    counters: Counters = field(default_factory=Counters)
    batcher: Batcher | None = None
    stack: Stack = ROWS  # how its batcher joins requests (`padding.py` for a masked sequence model)
    #: `session`'s run (`session.runner`): what `run` calls.
    run_session: Run = field(init=False)

    def __post_init__(self) -> None:
        self.run_session = runner(self.session)

    def run(self, feed: Mapping[str, np.ndarray], deadline_ns: int | None = None, *,
            inferences: int = 0) -> list[Any]:
        """`session.run` in one of the model's run slots, stopped at `deadline_ns`
        (`time.monotonic_ns()`) by the process' run timer; counted as a run when it succeeds (and
        as `inferences` inferences too: one lock for both).

        Raises `Timeout` if the deadline had passed already (nothing runs), passed while the call
        waited for a slot, or passed during the run; `TooManyRequests` if the model's queue is full;
        what ORT raises otherwise.
        """
        if deadline_ns is not None and time.monotonic_ns() >= deadline_ns:
            raise Timeout(f"model {self.info.name!r} was not run: the invocation's deadline had passed")
        slots = self.slots
        bounded = slots.slots != 0  # (an unbounded model's acquire and release do nothing)
        if bounded:
            slots.acquire(deadline_ns)
        try:
            run_session = self.run_session
            started = time.perf_counter_ns()
            if deadline_ns is None:
                results: list[Any] = run_session(self.output_names, feed, None)
            else:
                alarm = RUN_TIMER.arm(deadline_ns)
                try:
                    results = run_session(self.output_names, feed, alarm.options)
                except Exception:  # ORT's exception types share no base but Exception
                    if RUN_TIMER.disarm(alarm):
                        raise Timeout(
                            f"model {self.info.name!r} was stopped at the invocation's deadline"
                        ) from None
                    raise
                except BaseException:
                    RUN_TIMER.disarm(alarm)
                    raise
                RUN_TIMER.disarm(alarm)
            elapsed = time.perf_counter_ns() - started
        finally:
            if bounded:
                slots.release()
        # A racy average is fine: it only estimates a Retry-After.
        slots.mean_run_s += (elapsed / 1e9 - slots.mean_run_s) * 0.1
        counters = self.counters
        now = time.monotonic()
        with counters.lock:
            counters.runs += 1
            counters.run_ns += elapsed
            counters.run_rate.add(now)
            if inferences:
                counters.inferences += inferences
                counters.last_used = now
                counters.inference_rate.add(now, inferences)
        return results


# --- the registry -------------------------------------------------------------------------------
class ModelRegistry:
    """Named ONNX models, each with one ONNX Runtime session shared by every caller.

    Thread-safe: `load`, `unload` and `infer` may be called from any thread at any time. Use it as a
    context manager or call `close()` (idempotent) to drop every session.
    """

    def __init__(self, *, run_slots: RunSlots | None = None) -> None:
        """`run_slots`: the pool of run slots its models share (default: the process' one)."""
        self._slots = run_slots if run_slots is not None else RUN_SLOTS
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
        max_concurrent_runs: int | None = None,
        batching: BatchingConfig | None = None,
        max_batch_size: int | None = None,
        max_queue_delay_us: int | None = None,
        max_concurrent_batches: int | None = None,
        memory_arena: bool | None = None,
    ) -> ModelInfo:
        """Validate `model` (ONNX bytes, or a file to read them from) and serve it as `name`.

        Loading a name that is already loaded replaces its session atomically: calls in flight
        finish on the old session, later calls use the new one.

        `intra_op_threads` (threads in one run; 0: ORT's pool, one per core) and
        `max_concurrent_runs` (runs of the model at once, the rest queue; 0: no bound) are chosen by
        measuring the model when not given (see `wasminfer.models.tuning`); given threads without
        runs make runs the cores divided by the threads. The choice and its measurements are in
        `ModelInfo.run_plan`.

        Dynamic batching (see `wasminfer.models.batching`) is on with `batching=BatchingConfig(...)`
        or, the form for HTTP query parameters, `max_batch_size` >= 2 (0 or 1: off) and optionally
        `max_queue_delay_us` (default 2000) and `max_concurrent_batches` (default: the model's
        concurrent runs; 0: always wait for a full batch or the delay). It needs a dynamic first
        dimension on every input and output, and asserts that the model treats rows independently
        (row i of every output depends only on row i of the inputs), which the registry cannot check.

        `memory_arena=True` gives the session ONNX Runtime's CPU arena (default off: see
        `models.session`): runs reuse its memory, and it keeps the most a run needed until the model
        is unloaded or replaced.

        Raises `InvalidName` for a bad name, `InvalidModel` if the bytes are not an ONNX model ORT
        can load, keep tensor data outside the model (external data), use an operator domain other
        than `validation.ALLOWED_DOMAINS` (or a function defined in the model), or have inputs or
        outputs that are not plain tensors; `BadRequest` for an option out of range or batching
        asked of a model without a batch dimension (naming the input or output); `Unavailable` after
        `close()`.
        """
        validate_name("model", name)
        if isinstance(model, Path):
            data = model.read_bytes()
        elif isinstance(model, bytes | bytearray | memoryview):
            data = bytes(model)
        else:
            raise TypeError(f"model must be bytes or a Path, not {type(model).__name__}")
        intra = int_option("intra_op_threads", intra_op_threads, DEFAULT_INTRA_OP_THREADS, 0, MAX_THREADS)
        inter = int_option("inter_op_threads", inter_op_threads, DEFAULT_INTER_OP_THREADS, 0, MAX_THREADS)
        runs = int_option("max_concurrent_runs", max_concurrent_runs, 0, 0, MAX_CONCURRENT_RUNS_LIMIT)
        batching = batching_config(batching, max_batch_size, max_queue_delay_us, max_concurrent_batches)
        arena = bool_option("memory_arena", memory_arena, False)

        started = time.perf_counter()
        valid = validate_upload(data)
        rss_before = self._process.memory_info().rss
        session = make_session(valid.data, intra, inter, arena)
        resident = max(0, self._process.memory_info().rss - rss_before)
        session_s = time.perf_counter() - started
        declared_rank, metadata = valid.declared_rank, valid.metadata

        inputs = [tensor_spec(arg, declared_rank, "input") for arg in session.get_inputs()]
        outputs = [tensor_spec(arg, declared_rank, "output") for arg in session.get_outputs()]
        problem = no_batch_dimension(inputs, outputs)
        if batching is not None:
            if problem:
                raise BadRequest(
                    f"model {name!r} cannot batch: {problem}; batching needs a dynamic first (batch) "
                    "dimension on every input and output (load it without max_batch_size)"
                )
        output_names = [spec.name for spec in outputs]
        cores = self._slots.capacity
        if intra_op_threads is not None:
            plan = given_plan(session, intra, inputs, output_names, cores)
        else:
            session, plan = tuned(session, valid.data, inter, inputs, output_names, cores, session_s, arena,
                                  batchable=problem is None, batched=batching is not None)
        del valid
        if max_concurrent_runs is not None:
            plan = dataclasses.replace(
                plan, max_concurrent_runs=runs, chosen_by=f"{plan.chosen_by}; max_concurrent_runs given"
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
            intra_op_threads=plan.intra_op_threads,
            inter_op_threads=inter,
            batching=batching,
            run_plan=plan,
            given={"intra_op_threads": intra_op_threads, "max_concurrent_runs": max_concurrent_runs},
            memory_arena=arena,
        )
        loaded = _Model(
            info=info,
            session=session,
            checks={spec.name: compile_check(spec) for spec in inputs},
            output_names=output_names,
            slots=self._slots.model(name, plan.max_concurrent_runs, plan.intra_op_threads),
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
                if slots is None:  # the model's run slots: a batched run takes one
                    slots = plan.max_concurrent_runs or default_slots(plan.intra_op_threads)
                loaded.batcher = Batcher(batching, loaded.run, loaded.counters.batching, slots=slots)
                loaded.stack = padded_stack(inputs, outputs) or ROWS
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
    def infer(
        self, name: str, inputs: Mapping[str, np.ndarray], *, deadline_ns: int | None = None,
        stack: Stack | None = None,
    ) -> dict[str, np.ndarray]:
        """Run model `name` on named input arrays; returns every output by name.

        With `deadline_ns` (`time.monotonic_ns()`), a run still going then is stopped
        (`RunOptions.terminate`, set by one timer thread for the process) and the call raises
        `Timeout`; so does a call made after it.

        uint8 arrays are accepted (and cast) for bool inputs, the form bool takes on the wire.
        On a batching model the call may wait to share a run with others (`batching.py`: up to
        its `max_queue_delay_us` with a run slot free, until one frees otherwise); outputs are
        then views into the batch's outputs. `stack` says how this call shares a run (default:
        its rows stacked along axis 0; a decoder's step: `DecoderSpec.steps`).

        Raises `ModelNotFound`; `InvalidTensor` for a missing or unexpected input name, a dtype
        other than the model's, or a shape that does not fit the model's (with the expected shape in
        the message); `InferenceFailed` if ONNX Runtime fails; `Timeout` at the deadline.
        """
        model = self._models.get(name)
        if model is None:
            raise ModelNotFound(name)
        counters = model.counters
        try:
            feed = check_inputs(model.checks, inputs)
        except InvalidTensor:
            with counters.lock:
                counters.rejected += 1
                counters.last_used = time.monotonic()
            raise
        if model.batcher is not None:
            return self._infer_batched(name, model, model.batcher, feed, deadline_ns, stack or model.stack)
        try:
            results = model.run(feed, deadline_ns, inferences=1)
        except (Timeout, TooManyRequests):
            raise
        except Exception as exc:  # ORT's exception types share no base but Exception
            with counters.lock:
                counters.errors += 1
                counters.last_used = time.monotonic()
            raise InferenceFailed(f"model {name!r} failed: {exc}") from exc
        return dict(zip(model.output_names, results, strict=True))

    def joined_runs(self, name: str, info: ModelInfo | None = None) -> JoinedRuns | None:
        """How to run batches of model `name` that the caller joins itself (a decoder's step loops,
        `runtime.decoders`), for a model loaded with batching; None without, or if `name` is no
        longer the model of `info`. Raises `ModelNotFound`."""
        model = self._models.get(name)
        if model is None:
            raise ModelNotFound(name)
        if model.batcher is None or info is not None and model.info is not info:
            return None
        return JoinedRuns(model, model.batcher)

    def _infer_batched(
        self, name: str, model: _Model, batcher: Batcher, feed: dict[str, np.ndarray],
        deadline_ns: int | None, stack: Stack,
    ) -> dict[str, np.ndarray]:
        counters = model.counters
        try:
            results = batcher.infer(feed, deadline_ns, stack)
        except (Timeout, TooManyRequests):
            raise
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
        return model.counters.snapshot(model.batcher, model.slots)

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
