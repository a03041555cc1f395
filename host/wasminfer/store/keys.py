"""API key tokens: their format, hashing and scopes (the table itself is in `store.py`).

A key reads `wik_<id>_<secret>`: `id` is 16 hex digits, public (listed, used to revoke, safe to log);
`secret` is `secrets.token_urlsafe(32)`, 256 random bits. Only sha256(key) is stored. A slow
password hash (scrypt, argon2) exists to make guessing *low-entropy* passwords expensive; guessing
a 256-bit random secret is infeasible at any hash speed, so a slow hash would add nothing but tens
of milliseconds of CPU to every authenticated request (and a cheap way to load the server).
The fixed prefix lets secret scanners recognise leaked keys.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from collections.abc import Iterable

from wasminfer.errors import BadRequest

PREFIX = "wik"
#: What a key may grant: `admin` may do everything; `invoke` may invoke functions; `read` may list
#: and read (functions, models, logs, metrics) without changing anything.
SCOPES = ("admin", "invoke", "read")
_KEY = re.compile(rf"{PREFIX}_([0-9a-f]{{16}})_[A-Za-z0-9_-]{{43}}")
_SCOPE = re.compile(r"[A-Za-z0-9*][A-Za-z0-9*:._/-]{0,63}")


def new_key() -> tuple[str, str]:
    """A fresh `(key_id, plaintext_key)`."""
    key_id = secrets.token_hex(8)
    return key_id, f"{PREFIX}_{key_id}_{secrets.token_urlsafe(32)}"


def key_id_of(plaintext: str) -> str | None:
    """The public id inside a key, or None if `plaintext` is not shaped like one of our keys."""
    if not isinstance(plaintext, str):
        return None
    match = _KEY.fullmatch(plaintext)
    return match.group(1) if match else None


def hash_key(plaintext: str) -> str:
    """The stored form of a key: its sha256, hex."""
    return hashlib.sha256(plaintext.encode("utf-8", "surrogatepass")).hexdigest()


def check_known_scopes(scopes: Iterable[str]) -> frozenset[str]:
    """`scopes` as a set if it names at least one scope and only scopes of `SCOPES`. Raises
    `BadRequest` naming the unknown ones."""
    given = frozenset(scopes)
    unknown = sorted(given - set(SCOPES))
    if unknown:
        raise BadRequest(f"unknown scope(s) {', '.join(unknown)}; known: {', '.join(SCOPES)}")
    if not given:
        raise BadRequest(f"no scope given; known: {', '.join(SCOPES)}")
    return given


def check_scopes(scopes: Iterable[str]) -> tuple[str, ...]:
    """`scopes` sorted and deduplicated. Raises `BadRequest` for a scope that is not 1-64 characters
    of letters, digits and `*:._/-` (or for a bare string, which would be split into letters)."""
    if isinstance(scopes, str | bytes):
        raise BadRequest("scopes must be a list of strings, not one string")
    result = set()
    for scope in scopes:
        if not isinstance(scope, str) or _SCOPE.fullmatch(scope) is None:
            raise BadRequest(f"invalid scope {scope!r:.80}: use 1-64 letters, digits and '*:._/-'")
        result.add(scope)
    return tuple(sorted(result))
