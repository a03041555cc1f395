"""The load options of a model (threads, concurrent runs, dynamic batching, memory arena), described
once (`MODEL_OPTION_PARAMS`: type, range, default, help) for the HTTP API, the CLI and the store.
Pure: the gateway parses them here without importing the models layer (ONNX Runtime);
`ModelRegistry.load` checks the same ranges for Python callers (tests/test_model_options.py holds
the two to one another)."""

from __future__ import annotations

from collections.abc import Mapping

from wasminfer.errors import BadRequest
from wasminfer.params import Param, ParamError

__all__ = ["MODEL_OPTIONS", "MODEL_OPTION_PARAMS", "parse_model_options"]

_PARAMS = (
    Param("intra_op_threads", "integer", "ONNX Runtime threads inside one run (default: chosen at load "
          "by measuring the model; 0: one per core)",
          minimum=0, maximum=64, nullable=True),
    Param("inter_op_threads", "integer", "ONNX Runtime threads across independent nodes",
          default=1, minimum=0, maximum=64, nullable=True),
    Param("max_concurrent_runs", "integer", "runs of the model at once, the rest wait in its queue "
          "(default: chosen at load with the threads; 0: no bound)",
          minimum=0, maximum=256, nullable=True),
    Param("max_batch_size", "integer", "dynamic batching: the most rows one batched run takes (0 or 1: "
          "off; needs a dynamic first dimension on every input and output)",
          default=0, minimum=0, maximum=1024, nullable=True),
    Param("max_queue_delay_us", "integer",
          "dynamic batching: the longest a request waits for others while a run slot is free, µs",
          default=2000, minimum=0, maximum=1_000_000, nullable=True),
    Param("max_concurrent_batches", "integer", "dynamic batching: batched runs in flight before a new one "
          "waits to grow (default: the model's concurrent runs; 0: always wait for a full batch or the "
          "delay)",
          minimum=0, maximum=256, nullable=True),
    Param("memory_arena", "boolean", "ONNX Runtime's CPU memory arena: runs reuse memory instead of "
          "asking malloc, and the session keeps the most a run needed (grown by doubling) for its "
          "life",
          default=False, nullable=True),
)  # fmt: skip

#: Every option `ModelRegistry.load` takes by keyword, as the HTTP API and the store name them.
MODEL_OPTION_PARAMS: Mapping[str, Param] = {p.name: p for p in _PARAMS}
MODEL_OPTIONS = tuple(MODEL_OPTION_PARAMS)


def parse_model_options(data: Mapping[str, object], *, strings: bool = False) -> dict[str, int | bool | None]:
    """Model load options from a JSON object (or, with `strings`, query parameters, whose values
    are decimal strings, or true/false/1/0 for `memory_arena`). A None value stands for the
    option's default. Raises `BadRequest` naming an unknown option, a value not of its type, or one
    out of its range."""
    unknown = sorted(set(data) - set(MODEL_OPTIONS))
    if unknown:
        raise BadRequest(
            f"unknown model option(s): {', '.join(unknown)}; known: {', '.join(MODEL_OPTIONS)}"
        )
    options: dict[str, int | bool | None] = {}
    for name, value in data.items():
        param = MODEL_OPTION_PARAMS[name]
        try:
            if strings and isinstance(value, str):
                options[name] = param.parse_text(value)
            else:
                options[name] = param.parse(value)
        except ParamError as exc:
            if exc.kind == "range":  # worded as `ModelRegistry.load` words it
                raise BadRequest(
                    f"{name} must be an integer from {param.minimum} to {param.maximum}, not {exc.value!r}"
                ) from None
            raise BadRequest(f"model option {name} {exc.problem}") from None
    return options
