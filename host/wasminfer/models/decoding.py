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

Inputs named `attention_mask` ([batch, past + seq], 0 for a padding position) and `position_ids`
([batch, seq]), as Hugging Face's exports have them, are the host's too: it makes them from the
state's length, so that steps of states of different lengths can share a run (`DecoderSpec.steps`,
for a model loaded with batching): each past left-padded to the longest, the padding masked. A
state then keeps its row of the batch's present, padding included (and counted), until a step
that copies it trims the padding again; a batch of exactly the rows of the one before (in any
order) runs on that batch's present as it is, with no copy. Without a mask, only steps of states of equal
lengths share a run. A padded run gives the same tokens as a solo one, not the same bits: the
logits of tiny-gpt differ by ~5e-6 (the sums run over more terms, the padding's being zeros).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from wasminfer.errors import InvalidTensor
from wasminfer.models.batching import Stack
from wasminfer.models.inputs import TensorSpec, present_names
from wasminfer.models.registry import ModelInfo

#: Inputs the host makes for each step when a decoder model has them.
MASK, POSITIONS = "attention_mask", "position_ids"
_INT64 = np.dtype(np.int64)


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
    mask: bool = False  # the model has an attention_mask (and the host makes it)
    positions: bool = False  # the model has position_ids (and the host makes them)

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
            present = next((n for n in present_names(spec.name) if n in outputs), None)
            if present is None:
                raise InvalidTensor(f"model {info.name!r}: input {spec.name!r} has no output "
                                    f"{present_names(spec.name)[0]!r} to take the next step's past from")
            pairs.append((spec.name, present))
            first[spec.name] = _empty(spec, info.name)
        if not pairs:
            raise InvalidTensor(f"model {info.name!r} is no decoder: none of its inputs is named past… "
                                "(e.g. past_key_0 with an output present_key_0)")
        names = {spec.name for spec in info.inputs}
        own = [spec for spec in info.inputs if not spec.name.startswith("past") and spec.name not in (MASK,
                                                                                                     POSITIONS)]
        ids = (own[0].name, np.dtype(own[0].dtype)) if len(own) == 1 and own[0].dtype != "string" else None
        presents = {present for _, present in pairs}
        rest = [o.name for o in info.outputs if o.name not in presents]
        logits = "logits" if "logits" in rest else rest[0] if len(rest) == 1 else None
        return cls(info.name, tuple(pairs), first, ids, logits, MASK in names, POSITIONS in names)

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
    def host_names(self) -> frozenset[str]:
        """The inputs the host gives: the past, and the mask and positions if the model has them."""
        return self.past_names | {n for n, has in ((MASK, self.mask), (POSITIONS, self.positions)) if has}

    @cached_property
    def steps(self) -> _Steps:
        """How this model's steps share a batched run (`ModelRegistry.infer`'s `stack`)."""
        return _Steps(self)

    @cached_property
    def first_steps(self) -> Stack:
        """How a state's first step (its prompt) shares a run: as `steps`, but without waiting for
        a share of the streams, as it is no stream coming back and other prompts' lengths cannot
        join it."""
        return _Steps(self)

    def count_stream(self, delta: int) -> None:
        """A state of this spec was opened (+1) or freed (-1); the caller serialises these. With a
        mask, every state's steps may share a run, so each counts among the streams a batch takes
        its share of (`Stack.streams`); without, only states of equal lengths share one, and none
        are counted (a batch would wait for rows that cannot join it)."""
        if self.mask:
            self.steps.streams += delta

    @cached_property
    def present_names(self) -> frozenset[str]:
        return frozenset(p for _, p in self.pairs)

    def feed(self, inputs: Mapping[str, np.ndarray], past: Mapping[str, np.ndarray] | None,
             length: int = 0, pad: int = 0) -> dict[str, np.ndarray]:
        """The inputs of one step: the guest's and the past (the first one's before any step) of
        `length` positions after `pad` of padding, with the mask and positions the model takes.
        Raises `InvalidTensor` if the guest gave one of the host's inputs itself, or, for a model
        with a mask or positions, a step whose ids are not [1, seq]."""
        given = self.host_names.intersection(inputs)
        if given:
            raise InvalidTensor(f"decoder of model {self.model!r}: input {sorted(given)[0]!r} is the state "
                                "the host keeps; give only the step's own inputs")
        feed = {**inputs, **(past if past is not None else self.first)}
        if self.mask or self.positions:
            seq = self.seq(inputs)
            if self.mask:
                mask = np.ones((1, pad + length + seq), _INT64)
                mask[0, :pad] = 0
                feed[MASK] = mask
            if self.positions:
                feed[POSITIONS] = np.arange(length, length + seq, dtype=_INT64).reshape(1, seq)
        return feed

    def seq(self, inputs: Mapping[str, np.ndarray]) -> int:
        """The positions a step's inputs add. Raises `InvalidTensor` unless its ids are [1, seq]."""
        ids = inputs.get(self.ids[0]) if self.ids is not None else None
        if ids is None or ids.ndim != 2 or ids.shape[0] != 1:
            raise InvalidTensor(f"decoder of model {self.model!r}: a step's inputs are one [1, seq] tensor "
                                "of token ids (the host makes the mask and positions)")
        return int(ids.shape[1])

    def split(self, outputs: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """(the outputs the guest gets, the next step's past)."""
        present = self.present_names
        mine = {name: arr for name, arr in outputs.items() if name not in present}
        return mine, {past: outputs[pres] for past, pres in self.pairs}


# The helpers a step runs through are written as plain loops: a generator expression costs a frame
# of its own per step, and every stream's every token runs them under the GIL.
def nbytes(past: Mapping[str, np.ndarray]) -> int:
    total = 0
    for a in past.values():
        total += a.nbytes
    return total


class _Steps:
    """Steps of one decoder model sharing a run (`batching.Stack`): one row each; with a mask, pasts
    of different lengths left-padded to the longest; without, equal lengths only. `streams`: the
    open states of the spec (with a mask; `DecoderSpec.count_stream`), each of which comes back
    for its next step after a batch."""

    def __init__(self, spec: DecoderSpec) -> None:
        self.spec = spec
        self.pasts = tuple(p for p, _ in spec.pairs)
        self.streams = 0

    def rows(self, feed: Mapping[str, np.ndarray]) -> int:
        for a in feed.values():
            if not a.ndim or a.shape[0] != 1:
                return 0
        if self.spec.mask:  # padding goes along the past's third dimension: [batch, heads, positions, size]
            for p in self.pasts:
                if feed[p].ndim != 4:
                    return 0
        return 1

    def signature(self, feed: Mapping[str, np.ndarray]) -> Hashable:
        spec = self.spec
        host = spec.host_names
        mine = []
        for n, a in feed.items():
            if n not in host:
                mine.append((n, a.dtype.str, a.shape[1:]))
        if len(mine) > 1:
            mine.sort()
        # with a mask, pasts of any length share a run; without, only those of equal shapes
        pasts = () if spec.mask else tuple([feed[p].shape for p in self.pasts])
        return ("decoder", spec.model, self.pasts, tuple(mine), pasts)

    def cohort(self, feed: Mapping[str, np.ndarray]) -> tuple[Hashable, int] | None:
        """The batch whose present this step's past is a row of (every past of a state comes from
        the same run: its first one says), and its rows; None for a state's own past."""
        base = feed[self.pasts[0]].base
        if isinstance(base, np.ndarray) and base.ndim == 4 and base.shape[0] > 1:
            return id(base), base.shape[0]  # (alive while this step waits: its past is a view of it)
        return None

    def join(self, feeds: Sequence[Mapping[str, np.ndarray]]) -> tuple[dict[str, np.ndarray], list[int]]:
        rows = _cohort(feeds, self.pasts)
        if rows is not None:  # exactly the rows of one batch's present: run on it as it is
            order = sorted(range(len(feeds)), key=rows.__getitem__)
            joined = {p: _base(feeds[0][p]) for p in self.pasts}
        else:
            order = list(range(len(feeds)))
            joined = _padded(feeds, self.pasts) if self.spec.mask else {
                p: np.concatenate([f[p] for f in feeds]) for p in self.pasts}
        for name in feeds[0]:  # the step's own inputs, and the mask and positions unless padded
            if name not in joined:
                joined[name] = np.concatenate([feeds[i][name] for i in order])
        starts = [0] * len(feeds)
        for row, i in enumerate(order):
            starts[i] = row
        return joined, starts


def _base(a: np.ndarray) -> np.ndarray:
    base = a.base
    assert isinstance(base, np.ndarray)
    return base


def _cohort(feeds: Sequence[Mapping[str, np.ndarray]], pasts: tuple[str, ...]) -> list[int] | None:
    """The row of each feed in the arrays whose rows its pasts are, if every past of every feed is a
    row of one array per past name and the feeds are all of their rows; else None. A state's pasts
    are rows of one run's presents, sliced at one row (`DecoderTable`), so the first past's row is
    each feed's row (an address is ~2 µs to ask numpy for: once per feed, not once per past)."""
    for p in pasts:
        base = feeds[0][p].base
        if not isinstance(base, np.ndarray) or base.ndim != 4 or base.shape[0] != len(feeds):
            return None
        row_shape = (1, *base.shape[1:])
        for f in feeds:
            a = f[p]
            if a.base is not base or a.shape != row_shape:
                return None
    first = _base(feeds[0][pasts[0]])
    start, stride = first.ctypes.data, first.strides[0]
    rows = [(f[pasts[0]].ctypes.data - start) // stride for f in feeds]
    return rows if sorted(rows) == list(range(len(feeds))) else None


def _padded(feeds: Sequence[Mapping[str, np.ndarray]], pasts: tuple[str, ...]) -> dict[str, np.ndarray]:
    """The pasts of `feeds` trimmed of their padding and left-padded to the longest, and the mask that
    says so (a copy of every past: the cost of a batch whose rows come from several)."""
    masks = [f[MASK] for f in feeds]
    seq = masks[0].shape[1] - feeds[0][pasts[0]].shape[2]  # the step's positions (equal: signature)
    own = [int(m.sum()) - seq for m in masks]  # each row's past without its padding
    longest = max(own)
    joined: dict[str, np.ndarray] = {}
    if min(own) == longest:  # no row needs padding: one concatenation per past, not a copy per row
        for p in pasts:
            joined[p] = np.concatenate([f[p][:, :, f[p].shape[2] - longest:] for f in feeds])
        joined[MASK] = np.ones((len(feeds), longest + seq), _INT64)
        return joined
    for p in pasts:
        first = feeds[0][p]
        out = np.zeros((len(feeds), first.shape[1], longest, first.shape[3]), first.dtype)
        for row, (f, n) in enumerate(zip(feeds, own, strict=True)):
            if n:
                out[row, :, longest - n:] = f[p][0, :, f[p].shape[2] - n:]
        joined[p] = out
    mask = np.zeros((len(feeds), longest + seq), _INT64)
    for row, n in enumerate(own):
        mask[row, longest - n:] = 1
    joined[MASK] = mask
    return joined


__all__ = ["MASK", "POSITIONS", "DecoderSpec", "nbytes"]
