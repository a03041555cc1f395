"""The load options of a model (threads, concurrent runs, dynamic batching) as the HTTP API, the CLI
and the store name them. Pure: the gateway parses them here without importing the models layer (ONNX Runtime);
`ModelRegistry.load` checks their ranges."""

from __future__ import annotations

from collections.abc import Mapping

from wasminfer.errors import BadRequest

__all__ = ["MODEL_OPTIONS", "parse_model_options"]

#: The options `ModelRegistry.load` takes by keyword, as the HTTP API and the store name them.
MODEL_OPTIONS = (
    "intra_op_threads", "inter_op_threads", "max_concurrent_runs", "max_batch_size", "max_queue_delay_us",
    "max_concurrent_batches",
)  # fmt: skip


def parse_model_options(data: Mapping[str, object], *, strings: bool = False) -> dict[str, int | None]:
    """Model load options from a JSON object (or, with `strings`, query parameters, whose values
    are decimal strings). A None value stands for the option's default. Ranges are checked by
    `ModelRegistry.load`. Raises `BadRequest` naming an unknown option or a value that is not an
    integer."""
    unknown = sorted(set(data) - set(MODEL_OPTIONS))
    if unknown:
        raise BadRequest(
            f"unknown model option(s): {', '.join(unknown)}; known: {', '.join(MODEL_OPTIONS)}"
        )
    options: dict[str, int | None] = {}
    for name, value in data.items():
        if strings and isinstance(value, str):
            text = value.strip()
            if not (text.isascii() and text.lstrip("-").isdigit() and len(text) <= 12):
                raise BadRequest(f"model option {name} must be an integer, not {value!r}")
            value = int(text)
        if value is not None and type(value) is not int:  # bool is an int, and not a count
            raise BadRequest(f"model option {name} must be an integer or null, not {value!r}")
        options[name] = value
    return options
