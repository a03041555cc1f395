"""The reference sampler: greedy and sampled decoding as the chatbot guest did it in Wasm before the
host chose its tokens (`wasminfer.models.sampling`), kept apart from the host's code so the tests
hold the two to the same tokens for the same seed.

The random numbers come from splitmix64 in plain Python, so a seed gives the same tokens on every
numpy and every machine; logits are reduced in float64.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

MASK = (1 << 64) - 1


class Rng:
    """splitmix64: `random()` is a float in [0, 1) with 53 random bits."""

    def __init__(self, seed: int) -> None:
        self.state = seed & MASK

    def random(self) -> float:
        self.state = (self.state + 0x9E3779B97F4A7C15) & MASK
        z = self.state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
        return ((z ^ (z >> 31)) >> 11) / float(1 << 53)


@dataclass(frozen=True)
class Sampling:
    """temperature 0 is greedy (argmax); else softmax(logits / temperature) cut to the `top_k` most
    likely (0: all) and then to the smallest set whose probability reaches `top_p`."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    @classmethod
    def from_dict(cls, d: dict) -> Sampling:  # type: ignore[type-arg]
        s = cls(float(d.get("temperature", 0.0)), int(d.get("top_k", 0)), float(d.get("top_p", 1.0)),
                int(d.get("seed", 0)))
        if s.temperature < 0 or s.top_k < 0 or not 0 < s.top_p <= 1:
            raise ValueError("temperature >= 0, top_k >= 0 and 0 < top_p <= 1")
        return s


def choose(logits: np.ndarray, s: Sampling, rng: Rng) -> int:
    """The next token from one row of logits."""
    if s.temperature == 0:
        return int(np.argmax(logits))
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


def generate(step: Callable[[np.ndarray], np.ndarray], prompt: list[int], max_new_tokens: int,
             s: Sampling, eos: int) -> Iterator[int]:
    """The tokens after `prompt`, one at a time. `step(ids int64 [1, n]) -> logits [1, n, vocab]` runs
    the decoder on the next ids (its past is the caller's to keep); stops at `eos` or the count."""
    rng = Rng(s.seed)
    logits = step(np.asarray([prompt], dtype=np.int64))
    for i in range(max_new_tokens):
        token = choose(logits[0, -1], s, rng)
        if token == eos:
            return
        yield token
        if i + 1 < max_new_tokens:
            logits = step(np.asarray([[token]], dtype=np.int64))
