"""`Decoder`: run a decoder model step by step while its past key/values stay on the host.

    with Decoder("tiny-gpt") as d:
        logits = d.step({"input_ids": Tensor.of(prompt_ids, "int64")})["logits"]
        ...  # each later step: only the new token's ids

The model's inputs named `past…` and outputs named `present…` are the host's (guest-sdk/ABI.md,
*Decoder states*): a step sends the step's own inputs and gets the other outputs back, whatever the
length of the sequence so far. The state is freed by `close` (or the `with` block), and at the end
of the invocation in any case. Only on the Python runtime.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

from wasminfer_guest import _bindings as b
from wasminfer_guest.inference import InferError, runtime_call
from wasminfer_guest.tensor import Tensor


def _door(frame: bytes) -> bytes:
    if not b.IN_RUNTIME:
        raise RuntimeError("Decoder runs on wasminfer's Python runtime only (not in components nor in "
                           "plain Python)")
    return bytes(b._host.call(b"d" + frame))


def _call(frame: bytes) -> bytes:
    answer = _door(frame)
    if answer[:1] != b"\x00":
        err = json.loads(answer[1:])
        raise InferError(err["kind"], err["message"])
    return answer


class Decoder:
    """A decoder state of `model` on the host. Raises `InferError` (the model is not in the
    manifest's `models`, not deployed, or no decoder)."""

    def __init__(self, model: str) -> None:
        self.model = model
        self.handle = int.from_bytes(_call(b"o" + model.encode("utf-8"))[1:5], "little")
        self.steps = 0

    def step(self, inputs: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Runs the model on `inputs` and the state's past; keeps the present. Raises `InferError`."""
        if self.handle == 0:
            raise InferError("invalid-argument", "the decoder is closed")
        out = runtime_call(b"ds" + self.handle.to_bytes(4, "little"), self.model, inputs)
        self.steps += 1
        return out

    def close(self) -> None:
        """Frees the state on the host (idempotent)."""
        if self.handle:
            handle, self.handle = self.handle, 0
            _call(b"c" + handle.to_bytes(4, "little"))

    def __enter__(self) -> Decoder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
