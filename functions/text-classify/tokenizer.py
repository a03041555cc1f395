"""The tokenizer of text-classify: lower-cased words, their unigrams and bigrams, counted over a
vocabulary file. Pure Python: the function runs it inside its component, and the model's training
(`wasminfer.examples.text_classifier`) runs the very same file."""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def ngrams(text: str) -> list[str]:
    """Unigrams and bigrams, in order: "Heavy rain tonight" -> heavy, rain, tonight, "heavy rain", ..."""
    w = words(text)
    return w + [f"{a} {b}" for a, b in zip(w, w[1:], strict=False)]


def load_vocabulary(path: str | Path) -> dict[str, int]:
    """n-gram -> column, from a file of one n-gram per line (line i is column i)."""
    with open(path, encoding="utf-8") as f:
        return {line.rstrip("\n"): i for i, line in enumerate(f) if line.strip()}


def build_vocabulary(texts: Iterable[str], min_count: int = 2) -> list[str]:
    """The n-grams found in at least `min_count` texts, sorted (how vocab.txt was made)."""
    seen: dict[str, int] = {}
    for text in texts:
        for gram in set(ngrams(text)):
            seen[gram] = seen.get(gram, 0) + 1
    return sorted(gram for gram, n in seen.items() if n >= min_count)


def counts(text: str, vocabulary: dict[str, int]) -> list[float]:
    """How often each vocabulary n-gram occurs in `text` (unknown n-grams are dropped)."""
    row = [0.0] * len(vocabulary)
    for gram in ngrams(text):
        column = vocabulary.get(gram)
        if column is not None:
            row[column] += 1.0
    return row
