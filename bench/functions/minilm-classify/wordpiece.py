"""BERT's uncased WordPiece tokenizer (`BertTokenizer` with `do_lower_case`), in pure Python: the
guest (app.py, inside its component) and the benchmark's numpy pipeline both run this very file.

Basic tokenization: drop control characters, put spaces around CJK ideographs, lower-case, strip
accents (NFD, drop combining marks), split on whitespace and punctuation. Then WordPiece: greedy
longest match first against the vocabulary, continuations prefixed `##`, a word with no match (or
over 100 characters) becomes `[UNK]`. Ids are framed as `[CLS] … [SEP]` and cut to `max_length`.

ASCII text, the common case, takes a shorter road to the same words (`_ascii_words`): a
character-by-character loop in Python costs ~20x more inside the guest's interpreter (CPython in
Wasm) than in the host's, and for ASCII every step above is one of str's own loops in C.
"""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path

MAX_WORD_CHARS = 100
# ASCII control characters (category Cc) other than the three BERT counts as whitespace: dropped.
_ASCII_CONTROLS = dict.fromkeys([*range(0, 9), 11, 12, *range(14, 32), 127])
# After those are gone and the text is lower-cased, an ASCII word is a run of letters and digits,
# and every other printable character is punctuation (BERT counts all of ASCII's as such).
_ASCII_WORD = re.compile(r"[0-9a-z]+|[!-/:-@\[-`{-~]")


def load_vocabulary(path: str | Path) -> dict[str, int]:
    """token -> id, from a vocab.txt of one token per line (line i is id i)."""
    with open(path, encoding="utf-8") as f:
        return {line.rstrip("\n"): i for i, line in enumerate(f)}


def _is_punctuation(ch: str) -> bool:
    cp = ord(ch)
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    return unicodedata.category(ch).startswith("P")


def _is_cjk(cp: int) -> bool:
    return (
        0x4E00 <= cp <= 0x9FFF
        or 0x3400 <= cp <= 0x4DBF
        or 0x20000 <= cp <= 0x2A6DF
        or 0x2A700 <= cp <= 0x2B73F
        or 0x2B740 <= cp <= 0x2B81F
        or 0x2B820 <= cp <= 0x2CEAF
        or 0xF900 <= cp <= 0xFAFF
        or 0x2F800 <= cp <= 0x2FA1F
    )


def _ascii_words(text: str) -> list[str]:
    """`basic_tokens` of an ASCII text."""
    return _ASCII_WORD.findall(text.translate(_ASCII_CONTROLS).lower())


def basic_tokens(text: str) -> list[str]:
    return _ascii_words(text) if text.isascii() else _words(text)


def _words(text: str) -> list[str]:
    """`basic_tokens` of any text, a character at a time."""
    out = []
    for ch in text:
        cp = ord(ch)
        if cp == 0 or cp == 0xFFFD:
            continue
        cat = unicodedata.category(ch)
        if ch in "\t\n\r" or cat == "Zs":
            out.append(" ")
        elif cat.startswith("C"):
            continue
        elif _is_cjk(cp):
            out.append(f" {ch} ")
        else:
            out.append(ch)
    words = []
    for word in "".join(out).lower().split():
        word = "".join(c for c in unicodedata.normalize("NFD", word) if unicodedata.category(c) != "Mn")
        current = ""
        for ch in word:
            if _is_punctuation(ch):
                if current:
                    words.append(current)
                    current = ""
                words.append(ch)
            else:
                current += ch
        if current:
            words.append(current)
    return words


def wordpieces(word: str, vocabulary: dict[str, int]) -> list[int]:
    if len(word) > MAX_WORD_CHARS:
        return [vocabulary["[UNK]"]]
    whole = vocabulary.get(word)
    if whole is not None:  # most words are in the vocabulary whole: one lookup
        return [whole]
    ids, start = [], 0
    while start < len(word):
        end = len(word)
        while end > start:
            piece = word[start:end] if start == 0 else "##" + word[start:end]
            if piece in vocabulary:
                ids.append(vocabulary[piece])
                break
            end -= 1
        else:
            return [vocabulary["[UNK]"]]
        start = end
    return ids


def encode(text: str, vocabulary: dict[str, int], max_length: int = 128) -> list[int]:
    """`[CLS]` + the text's word pieces + `[SEP]`, at most `max_length` ids in all."""
    ids = [i for word in basic_tokens(text) for i in wordpieces(word, vocabulary)]
    return [vocabulary["[CLS]"], *ids[: max_length - 2], vocabulary["[SEP]"]]
