"""`Decoder`: run a decoder model step by step while its past key/values stay on the host.

    with Decoder("tiny-gpt", Sampling(temperature=0.8, top_k=20, seed=7)) as d:
        token = d.next_token({"input_ids": Tensor.of([prompt_ids], "int64")})
        while token != EOS:
            ...                    # use the token
            token = d.next_token()  # the host feeds the token it chose last

    with Decoder("tiny-gpt") as d:  # or take the logits and choose in the guest
        logits = d.step({"input_ids": Tensor.of([prompt_ids], "int64")})["logits"]

The model's inputs named `past…` and outputs named `present…` are the host's (guest-sdk/ABI.md,
*Decoder states*): a step sends the step's own inputs and gets the other outputs back, whatever the
length of the sequence so far. `next_token` goes further: the host also chooses the next token from
the last row of the `logits` output with the decoder's `Sampling` (seeded, so a seed gives the same
tokens every time), so a step crosses no logits and runs no numpy in the guest. The state is freed
by `close` (or the `with` block), and at the end of the invocation in any case. Only on the Python
runtime.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from wasminfer_guest import _bindings as b
from wasminfer_guest import inference
from wasminfer_guest.inference import InferError, answer, runtime_call
from wasminfer_guest.tensor import Tensor

#: The bounds of `Sampling` (the host holds the same: wasminfer/models/sampling.py).
MAX_TEMPERATURE = 100.0
MAX_TOP_K = 1 << 20
_SAMPLING = struct.Struct("<dIdQ")


@dataclass(frozen=True)
class Sampling:
    """How `Decoder.next_token` chooses: `temperature` 0 is greedy (the most likely token); else
    softmax(logits / temperature) cut to the `top_k` most likely (0: all), then to the smallest set
    whose probability reaches `top_p`, drawn with splitmix64 seeded with `seed`.

    Raises `ValueError` unless 0 <= temperature <= 100 (finite), 0 <= top_k <= 2**20,
    0 < top_p <= 1 and 0 <= seed < 2**64.
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.temperature) and 0 <= self.temperature <= MAX_TEMPERATURE):
            raise ValueError(f"temperature is 0 (greedy) to {MAX_TEMPERATURE:g}, not {self.temperature}")
        if not 0 <= self.top_k <= MAX_TOP_K:
            raise ValueError(f"top_k is 0 (all tokens) to {MAX_TOP_K}, not {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p is over 0 and at most 1, not {self.top_p}")
        if not 0 <= self.seed < 1 << 64:
            raise ValueError(f"seed is 0 to 2**64 - 1, not {self.seed}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Sampling:
        """From a request's `temperature`, `top_k`, `top_p` and `seed` (each optional). Raises
        `ValueError` or `TypeError` for a value out of bounds or of the wrong type."""
        return cls(float(d.get("temperature", 0.0)), _int(d.get("top_k", 0)), float(d.get("top_p", 1.0)),
                   _int(d.get("seed", 0)))

    def frame(self) -> bytes:
        return _SAMPLING.pack(self.temperature, self.top_k, self.top_p, self.seed)


def _int(value: Any) -> int:
    if isinstance(value, float) and not value.is_integer():
        raise ValueError(f"{value} is not a whole number")
    return int(value)


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
    """A decoder state of `model` on the host, choosing tokens with `sampling` (greedy if None).
    Raises `InferError` (the model is not in the manifest's `models`, not deployed, or no decoder;
    sampling out of the host's bounds)."""

    def __init__(self, model: str, sampling: Sampling | None = None) -> None:
        self.model = model
        self.sampling = sampling or Sampling()
        frame = b"o" + self.sampling.frame() + model.encode("utf-8")
        self.handle = int.from_bytes(_call(frame)[1:5], "little")
        self._handle_bytes = self.handle.to_bytes(4, "little")
        self.steps = 0

    def step(self, inputs: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Runs the model on `inputs` and the state's past; keeps the present. Raises `InferError`."""
        self._check_open()
        out = runtime_call(b"ds" + self._handle_bytes, self.model, inputs)
        self.steps += 1
        return out

    def next_token(self, inputs: Mapping[str, Tensor] | None = None, *, send: Any = None) -> int:
        """Runs a step on `inputs` (the prompt's ids, say) or, without them, on the token the host
        chose last (fed as a [1, 1] tensor to the model's one input that is not a past), and returns
        the next token id, chosen on the host from the last row of the model's `logits` output with
        the decoder's `Sampling`. `send` (unless None): a part of the answer sent before the step,
        as a streaming handler's yield sends it (the text of the token before, say); without
        `inputs` the part and the step cross in one frame. Raises `InferError` (also when there are
        no inputs and no token was chosen yet, or the model has no single ids input or logits
        output), and what sending the part raises (`TypeError` for a part of another type)."""
        self._check_open()
        if send is not None:
            rt = inference._rt or inference._runtime()
            if inputs is None:
                found = answer(_door(b"p" + self._handle_bytes + rt.part_frame(send)))
                self.steps += 1
                return int.from_bytes(found[1:5], "little")
            rt.door(b"w", rt.part_frame(send))
        if inputs is None:
            found = answer(_door(b"n" + self._handle_bytes))
        else:
            found = runtime_call(b"dn" + self._handle_bytes, self.model, inputs, raw=True)
        self.steps += 1
        return int.from_bytes(found[1:5], "little")

    def _check_open(self) -> None:
        if self.handle == 0:
            raise InferError("invalid-argument", "the decoder is closed")

    def close(self) -> None:
        """Frees the state on the host (idempotent)."""
        if self.handle:
            handle, self.handle = self.handle, 0
            _call(b"c" + handle.to_bytes(4, "little"))

    def __enter__(self) -> Decoder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
