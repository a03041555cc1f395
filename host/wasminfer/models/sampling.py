"""Choosing a decoder's next token from a row of logits on the host: greedy or sampled
(temperature, top-k, top-p) with a seeded generator, so a seed gives the same tokens every time.

The random numbers come from splitmix64 in plain Python, so they are the same on every numpy and
every machine; logits are reduced in float64. The guest SDK's `wasminfer_guest.Sampling` checks the
same bounds before its frame crosses (`MAX_TEMPERATURE`, `MAX_TOP_K`: tests hold them equal).
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass

import numpy as np

from wasminfer.errors import InvalidSampling

MAX_TEMPERATURE = 100.0
MAX_TOP_K = 1 << 20
_MASK = (1 << 64) - 1
#: temperature f64, top_k u32, top_p f64, seed u64 (the Python runtime's decoder open frame)
FRAME = struct.Struct("<dIdQ")


@dataclass(frozen=True)
class Sampling:
    """temperature 0 is greedy (argmax); else softmax(logits / temperature) cut to the `top_k` most
    likely (0: all) and then to the smallest set whose probability reaches `top_p`."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        """Raises `InvalidSampling` naming the parameter out of bounds."""
        if not (math.isfinite(self.temperature) and 0 <= self.temperature <= MAX_TEMPERATURE):
            raise InvalidSampling(f"sampling: temperature is 0 (greedy) to {MAX_TEMPERATURE:g}, not "
                                  f"{self.temperature}")
        if not 0 <= self.top_k <= MAX_TOP_K:
            raise InvalidSampling(f"sampling: top_k is 0 (all tokens) to {MAX_TOP_K}, not {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise InvalidSampling(f"sampling: top_p is over 0 and at most 1, not {self.top_p}")
        if not 0 <= self.seed <= _MASK:
            raise InvalidSampling(f"sampling: seed is 0 to 2**64 - 1, not {self.seed}")

    @classmethod
    def unpack(cls, frame: bytes) -> Sampling:
        """From `FRAME`'s bytes. Raises `InvalidSampling` (also for a frame of the wrong size)."""
        if len(frame) != FRAME.size:
            raise InvalidSampling(f"sampling: a frame of {FRAME.size} bytes, not {len(frame)}")
        return cls(*FRAME.unpack(frame))


class Rng:
    """splitmix64: `random()` is a float in [0, 1) with 53 random bits."""

    __slots__ = ("state",)

    def __init__(self, seed: int) -> None:
        self.state = seed & _MASK

    def random(self) -> float:
        self.state = (self.state + 0x9E3779B97F4A7C15) & _MASK
        z = self.state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
        return ((z ^ (z >> 31)) >> 11) / float(1 << 53)


def choose(logits: np.ndarray, s: Sampling, rng: Rng) -> int:
    """The next token from one row of logits (greedy draws no random number)."""
    if s.temperature == 0:
        return int(logits.argmax())  # the method: numpy's function wrapper costs more than the work
    x = logits.astype(np.float64) / s.temperature
    order = np.argsort(-x, kind="stable")
    if s.top_k:
        order = order[: s.top_k]
    p = np.exp(x[order] - x[order[0]])
    p /= p.sum()
    if s.top_p < 1.0:
        keep = int(np.searchsorted(np.cumsum(p), s.top_p)) + 1
        order, p = order[:keep], p[:keep] / p[:keep].sum()
    cum = np.cumsum(p)
    i = int(np.searchsorted(cum, rng.random() * cum[-1], side="right"))
    return int(order[min(i, len(order) - 1)])


class Sampler:
    """`Sampling` with its generator: one per decoder state, so each stream draws its own numbers."""

    __slots__ = ("sampling", "rng")

    def __init__(self, sampling: Sampling) -> None:
        self.sampling = sampling
        self.rng = Rng(sampling.seed)

    def next(self, logits: np.ndarray) -> int:
        return choose(logits, self.sampling, self.rng)


__all__ = ["FRAME", "MAX_TEMPERATURE", "MAX_TOP_K", "Rng", "Sampler", "Sampling", "choose"]
