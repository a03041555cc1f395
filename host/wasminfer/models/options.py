"""A model's load options resolved: ranges and types checked, defaults filled in, batching's knobs
made into a `BatchingConfig`. (Their names, and the parsing of HTTP values, live in
`wasminfer.model_options`, a leaf the gateway imports without this layer and its ONNX Runtime.)"""

from __future__ import annotations

from wasminfer.errors import BadRequest
from wasminfer.models.batching import (
    MAX_BATCH_SIZE_LIMIT,
    MAX_CONCURRENT_BATCHES_LIMIT,
    MAX_QUEUE_DELAY_US_LIMIT,
    BatchingConfig,
)

__all__ = [
    "ADDED_LATER",
    "DEFAULT_INTER_OP_THREADS",
    "DEFAULT_INTRA_OP_THREADS",
    "MAX_CONCURRENT_RUNS_LIMIT",
    "MAX_THREADS",
    "batching_config",
    "bool_option",
    "int_option",
]

DEFAULT_INTRA_OP_THREADS = 1
# Only used by ORT's parallel execution mode, which the registry does not enable (see its _session).
DEFAULT_INTER_OP_THREADS = 1
#: Options added after versions were first stored, with the value a version stored before has: the
#: store leaves them out while at that value (an upload's info must still equal an older version's
#: for the same bytes), and deployment digests count that value as the default.
ADDED_LATER: dict[str, bool] = {"memory_arena": False}
#: The most intra-/inter-op threads a model may ask for.
MAX_THREADS = 64
#: The most concurrent runs (`max_concurrent_runs`) a model may ask for.
MAX_CONCURRENT_RUNS_LIMIT = 256


def int_option(name: str, value: object, default: int, low: int, high: int) -> int:
    """`value`, or `default` for None. Raises `BadRequest` for anything but an int in low..high."""
    if value is None:
        return default
    if type(value) is not int or not low <= value <= high:  # bool is an int, and not a count
        raise BadRequest(f"{name} must be an integer from {low} to {high}, not {value!r}")
    return value


def bool_option(name: str, value: object, default: bool) -> bool:
    """`value`, or `default` for None. Raises `BadRequest` for anything but a bool (1 and "yes" are
    the HTTP layer's to read as true, before they get here)."""
    if value is None:
        return default
    if type(value) is not bool:
        raise BadRequest(f"{name} must be true or false, not {value!r}")
    return value


def batching_config(
    batching: BatchingConfig | None,
    max_batch_size: int | None,
    max_queue_delay_us: int | None,
    max_concurrent_batches: int | None,
) -> BatchingConfig | None:
    """The batching a load asks for, given as a `BatchingConfig` or as its knobs; None: off.
    Raises `BadRequest` for both forms at once, a knob out of range, or a knob without
    `max_batch_size` >= 2."""
    knobs = {"max_queue_delay_us": max_queue_delay_us, "max_concurrent_batches": max_concurrent_batches}
    if batching is not None:
        if max_batch_size is not None or any(v is not None for v in knobs.values()):
            raise BadRequest(f"give batching= or {', '.join(['max_batch_size', *knobs])}, not both")
        if not isinstance(batching, BatchingConfig):
            raise TypeError(f"batching must be a BatchingConfig, not {type(batching).__name__}")
        return batching
    defaults = BatchingConfig()
    size = int_option("max_batch_size", max_batch_size, 0, 0, MAX_BATCH_SIZE_LIMIT)
    delay = int_option(
        "max_queue_delay_us", max_queue_delay_us, defaults.max_queue_delay_us, 0, MAX_QUEUE_DELAY_US_LIMIT
    )
    slots = None
    if max_concurrent_batches is not None:
        slots = int_option(
            "max_concurrent_batches", max_concurrent_batches, 0, 0, MAX_CONCURRENT_BATCHES_LIMIT
        )
    if size < 2:
        given = [name for name, value in knobs.items() if value is not None]
        if given:
            raise BadRequest(f"{given[0]} needs max_batch_size (2 or more) to turn batching on")
        return None  # 0 or 1: one request per run
    return BatchingConfig(size, delay, slots)
