"""Decoders run step by step: which inputs of a model carry its past and which outputs its present.

A decoder model (GPT-style, as ONNX exporters write it) takes its key/value cache as inputs named
`past…` and returns the grown cache as outputs named `present…`: `past_key_0` pairs with
`present_key_0`, and Hugging Face's `past_key_values.0.key` with `present.0.key`. Step one runs on
an empty past: each past input with its last free dimension 0 (the sequence) and its other free
dimensions 1 (the batch), e.g. [1, heads, 0, head_dim]; each later step on the present of the one
before. Whoever keeps the state between steps (`runtime.decoders`) asks `DecoderSpec` what to feed
and what to keep, and, to choose the next token itself (`models.sampling`), where the logits are
(the output `logits`, else the one output that is no present) and where a chosen token goes back
in (the one input that is no past, as a [1, 1] tensor).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from wasminfer.errors import InvalidTensor
from wasminfer.models.inputs import TensorSpec
from wasminfer.models.registry import ModelInfo


def _present_names(past: str) -> tuple[str, ...]:
    if past.startswith("past_key_values"):
        return ("present" + past[len("past_key_values"):],)
    return ("present" + past[len("past"):],)


def _empty(spec: TensorSpec, model: str) -> np.ndarray:
    if spec.shape is None:
        raise InvalidTensor(f"model {model!r}: input {spec.name!r} does not declare its rank, so its empty "
                            "past cannot be made")
    free = [i for i, d in enumerate(spec.shape) if not isinstance(d, int) or d < 0]
    if not free:
        raise InvalidTensor(f"model {model!r}: input {spec.name!r} has no free dimension to grow along")
    dims = [d if isinstance(d, int) and d >= 0 else 1 for d in spec.shape]
    dims[free[-1]] = 0
    return np.zeros(dims, dtype=np.dtype(spec.dtype))


@dataclass(frozen=True)
class DecoderSpec:
    """How one model runs as a decoder: its (past input, present output) pairs and its first past."""

    model: str
    pairs: tuple[tuple[str, str], ...]
    first: Mapping[str, np.ndarray]
    ids: tuple[str, np.dtype] | None = None  # the one input that is no past, and its dtype
    logits: str | None = None

    @classmethod
    def of(cls, info: ModelInfo) -> DecoderSpec:
        """Raises `InvalidTensor` when the model has no input named past…, or one without its
        present… output, or one whose empty past cannot be made (no declared rank, no free dim)."""
        outputs = {o.name for o in info.outputs}
        pairs: list[tuple[str, str]] = []
        first: dict[str, np.ndarray] = {}
        for spec in info.inputs:
            if not spec.name.startswith("past"):
                continue
            present = next((n for n in _present_names(spec.name) if n in outputs), None)
            if present is None:
                raise InvalidTensor(f"model {info.name!r}: input {spec.name!r} has no output "
                                    f"{_present_names(spec.name)[0]!r} to take the next step's past from")
            pairs.append((spec.name, present))
            first[spec.name] = _empty(spec, info.name)
        if not pairs:
            raise InvalidTensor(f"model {info.name!r} is no decoder: none of its inputs is named past… "
                                "(e.g. past_key_0 with an output present_key_0)")
        own = [spec for spec in info.inputs if not spec.name.startswith("past")]
        ids = (own[0].name, np.dtype(own[0].dtype)) if len(own) == 1 and own[0].dtype != "string" else None
        presents = {present for _, present in pairs}
        rest = [o.name for o in info.outputs if o.name not in presents]
        logits = "logits" if "logits" in rest else rest[0] if len(rest) == 1 else None
        return cls(info.name, tuple(pairs), first, ids, logits)

    def token_ids(self, token: int) -> dict[str, np.ndarray]:
        """The inputs of a step on one chosen token. Raises `InvalidTensor` if the model has not
        exactly one input besides its past."""
        if self.ids is None:
            raise InvalidTensor(f"decoder of model {self.model!r}: a token cannot be fed back by itself, "
                                "the model has not exactly one input besides its past; give the inputs")
        name, dtype = self.ids
        return {name: np.array([[token]], dtype)}

    def last_logits(self, outputs: Mapping[str, np.ndarray]) -> np.ndarray:
        """The row of logits the next token is chosen from: the last position of the one sequence.
        Raises `InvalidTensor` without an output `logits` (or one single output besides the
        presents) of shape [1, positions, vocabulary]."""
        if self.logits is None:
            raise InvalidTensor(f"decoder of model {self.model!r}: no output named 'logits' to choose the "
                                "next token from")
        logits = outputs[self.logits]
        if logits.ndim != 3 or logits.shape[0] != 1 or logits.shape[1] < 1 or logits.shape[2] < 1:
            raise InvalidTensor(f"decoder of model {self.model!r}: output {self.logits!r} has shape "
                                f"{list(logits.shape)}, not [1, positions, vocabulary]")
        row: np.ndarray = logits[0, -1]
        return row

    # Asked at every step: made once (a frozen dataclass still has a __dict__ for them).
    @cached_property
    def past_names(self) -> frozenset[str]:
        return frozenset(p for p, _ in self.pairs)

    @cached_property
    def present_names(self) -> frozenset[str]:
        return frozenset(p for _, p in self.pairs)

    def feed(self, inputs: Mapping[str, np.ndarray],
             past: Mapping[str, np.ndarray] | None) -> dict[str, np.ndarray]:
        """The inputs of one step: the guest's and the past (the first one's before any step).
        Raises `InvalidTensor` if the guest gave a past input itself."""
        given = self.past_names.intersection(inputs)
        if given:
            raise InvalidTensor(f"decoder of model {self.model!r}: input {sorted(given)[0]!r} is the state "
                                "the host keeps; give only the step's own inputs")
        return {**inputs, **(past if past is not None else self.first)}

    def split(self, outputs: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """(the outputs the guest gets, the next step's past)."""
        present = self.present_names
        mine = {name: arr for name, arr in outputs.items() if name not in present}
        return mine, {past: outputs[pres] for past, pres in self.pairs}


def nbytes(past: Mapping[str, np.ndarray]) -> int:
    return sum(int(a.nbytes) for a in past.values())


__all__ = ["DecoderSpec", "nbytes"]
