"""Requests of different lengths in one batched run: a sequence model's inputs padded under its mask.

A transformer encoder as Hugging Face exports it takes `input_ids` (and `token_type_ids`, ...) as
[batch, sequence] and an `attention_mask` of the same shape, 0 at a padding position. Outputs that
do not keep the sequence (a pooled embedding, class probabilities: [batch, k]) do not depend on
padding the mask hides. For such a model loaded with batching, requests of different lengths share
a run: each input is padded on the right with zeros up to the batch's longest (the mask's zeros
hide them) and the outputs' rows are split back as for any batch (`batching.ROWS` otherwise stacks
only requests of one length, so texts of varied lengths would hardly ever batch).

Which models: every input [batch, sequence] with the one sequence dimension, one of them named
`attention_mask`, and no output carrying that dimension (a per-token output would need its padding
cut off again: such a model batches equal lengths only). Lengths share a run within a bucket (the
next power of two, at least `MIN_BUCKET`): a run costs about its rows times its longest row, so a
long request does not make short ones pay for its length, and no row is padded past twice its own.

The mask is taken at its word: a model that reads what its mask zeroes would answer differently in
a batch, one more reason batching is opt-in (`max_batch_size`). all-MiniLM-L6-v2 with its
classification head (the benchmark's minilm) answers bit for bit the same from 22 tokens padded to
40 as from the 22 alone.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import numpy as np

from wasminfer.models.batching import Feed
from wasminfer.models.inputs import TensorSpec

__all__ = ["MASK", "MIN_BUCKET", "PaddedRows", "padded_stack"]

MASK = "attention_mask"
MIN_BUCKET = 8


class PaddedRows:
    """A `batching.Stack`: [rows, length] inputs of lengths in one bucket, right-padded with zeros
    to the longest and concatenated along axis 0."""

    streams = 0

    def rows(self, feed: Feed) -> int:
        shape = None
        for array in feed.values():  # every input the same [rows, length]
            if array.ndim != 2 or (shape is not None and array.shape != shape):
                return 0
            shape = array.shape
        return shape[0] if shape is not None else 0

    def signature(self, feed: Feed) -> Hashable:
        length = next(iter(feed.values())).shape[1]
        bucket = max(MIN_BUCKET, 1 << max(0, length - 1).bit_length())
        return ("padded", bucket, tuple((name, array.dtype) for name, array in feed.items()))

    def cohort(self, feed: Feed) -> tuple[Hashable, int] | None:
        return None  # (no recurring requests)

    def join(self, feeds: Sequence[Feed]) -> tuple[Feed, list[int]]:
        first = feeds[0]
        longest = max(next(iter(f.values())).shape[1] for f in feeds)
        total = sum(next(iter(f.values())).shape[0] for f in feeds)
        joined = {name: np.zeros((total, longest), dtype=array.dtype) for name, array in first.items()}
        starts, start = [], 0
        for feed in feeds:
            starts.append(start)
            for name, array in feed.items():
                rows, length = array.shape  # the same for every input of the feed (`rows`)
                joined[name][start:start + rows, :length] = array
            start += rows
        return joined, starts


def padded_stack(inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec]) -> PaddedRows | None:
    """The padded stack for a model that qualifies (see the module docstring), else None."""
    if not any(spec.name == MASK for spec in inputs):
        return None
    sequence: set[int | str | None] = set()
    for spec in inputs:
        if spec.shape is None or len(spec.shape) != 2 or spec.dtype == "string":
            return None
        dim = spec.shape[1]
        if isinstance(dim, int) and dim >= 0:  # a fixed length: nothing to pad
            return None
        sequence.add(dim if isinstance(dim, str) else None)
    if len(sequence) != 1:  # differently named lengths may differ
        return None
    (name,) = sequence
    for spec in outputs:
        if spec.shape is None:
            return None
        for dim in spec.shape[1:]:
            # The sequence's own name, or any free dimension when the sequence's is unnamed, may
            # carry the padding back out.
            if dim == name and name is not None:
                return None
            if name is None and not (isinstance(dim, int) and dim >= 0):
                return None
    return PaddedRows()
