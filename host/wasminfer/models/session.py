"""ONNX Runtime sessions made the one way the registry runs them (and why each option)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import onnxruntime as ort

from wasminfer.errors import InvalidModel

__all__ = ["Run", "make_session", "runner"]

#: A session's run: `(output_names, feed, run_options or None) -> outputs in that order`.
Run = Callable[[list[str], Mapping[str, Any], "ort.RunOptions | None"], list[Any]]


def make_session(model: bytes, intra: int, inter: int, arena: bool = False) -> ort.InferenceSession:
    """A session of validated ONNX bytes with `intra`/`inter` threads, with ORT's CPU arena when
    `arena`. Raises `InvalidModel` if ORT cannot load the model."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = intra
    options.inter_op_num_threads = inter
    # Parallelism comes from concurrent calls, not from running independent nodes of one call at
    # once; sequential is also what makes the intra-op knob the only one that matters.
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # ORT's CPU arena keeps what a run grew it by for the session's life (a run that needed 1 GiB
    # left 2 GiB resident); without it tensors go back to malloc and the memory to the kernel. Off
    # unless the model asks (`memory_arena`): what it saves a run is small next to what it can
    # hold (bench/arena.py, bench/arena_models.py, docs/models.md). ORT 1.32's Python API has no
    # per-session extend strategy (only a process-wide shared allocator), so it grows by doubling.
    options.enable_cpu_mem_arena = arena
    options.log_severity_level = 3  # errors only: ORT's warnings are not the caller's business
    # Bytes are ONNX, validated by `validate_upload`; never let ORT sniff them as its own flatbuffer format.
    options.add_session_config_entry("session.load_model_format", "ONNX")
    if intra != 1:
        # A pool's threads spin between ops by default, burning the cores other calls need.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        session = ort.InferenceSession(model, sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT's exception types share no base but Exception
        raise InvalidModel(f"ONNX Runtime cannot load the model: {exc}") from None
    # ORT's wrapper would answer a provider's failure by re-creating the session's providers and
    # running again, under runs of other threads in flight; with the CPU provider alone there is
    # nothing to fall back to, and a failed run is the caller's error to see.
    session.disable_fallback()
    return session


def runner(session: ort.InferenceSession) -> Run:
    """How the registry runs `session`: the binding's own `run` under ORT's Python wrapper when the
    session has one (`InferenceSession._sess`), else `session.run`.

    The wrapper checks again, on every run, what the registry's `check_inputs` has just checked
    (no input missing, no OrtValue of another session) and whether WebGPU graph capture is on
    (never: these sessions run on the CPU provider, which has no fallback to retry on); those
    checks were ~4 µs of a digits invocation's ~175 in the Python runtime (`Session.run`'s own
    frames, py-spy), more than half of the model's own run. Its one other duty, naming every output
    when none are asked for, the registry never needs: it always passes `output_names`.
    """
    binding = getattr(session, "_sess", None)
    run = getattr(binding, "run", None)
    if callable(run) and not getattr(session, "_enable_fallback", False):
        return run  # type: ignore[no-any-return]
    return session.run  # type: ignore[no-any-return]
