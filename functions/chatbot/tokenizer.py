"""A byte-level tokenizer over printable ASCII: ids 0-94 are the characters ' ' (32) to '~' (126),
id 95 ends the text (EOS). Any other byte of a prompt becomes '?'. 96 ids: tiny-gpt's vocabulary."""

from __future__ import annotations

FIRST, LAST = 32, 126
EOS = LAST - FIRST + 1
VOCAB = EOS + 1
_UNKNOWN = ord("?") - FIRST


def encode(text: str) -> list[int]:
    return [b - FIRST if FIRST <= b <= LAST else _UNKNOWN for b in text.encode("utf-8")]


def decode(token: int) -> str:
    """The text of one token ("" for EOS)."""
    return chr(token + FIRST) if 0 <= token < EOS else ""  # EOS (when not stopping at it): nothing
