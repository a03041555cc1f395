"""The small facts of syntax that several layers check: what a name is, what may stand in a header.

Imports nothing of wasminfer but `wasminfer.errors`, so every layer (the store at the bottom) may
use it. Patterns are matched whole (`fullmatch`): `$` would let a trailing newline through.
"""

from __future__ import annotations

import re
from typing import TypeGuard

from wasminfer.errors import InvalidName

#: A function, model, tenant (…) name: 1-64 characters of a-z, 0-9, '-', '_', '.', starting with a
#: letter or digit. It reaches URLs, metric labels and file names, so it stays this plain.
NAME_REGEX = r"[a-z0-9][a-z0-9._-]{0,63}"
NAME_PATTERN = re.compile(NAME_REGEX)
# Printable ASCII, not starting with a space: a CR or LF would split the header block it stands in.
_HEADER_VALUE = re.compile(r"[\x21-\x7e][\x20-\x7e]*")


def is_name(value: object) -> TypeGuard[str]:
    """Whether `value` is a valid name (`NAME_REGEX`)."""
    return isinstance(value, str) and NAME_PATTERN.fullmatch(value) is not None


def validate_name(kind: str, name: object) -> str:
    """Return `name` if it is a valid name (`NAME_REGEX`). Raises `InvalidName` naming `kind`."""
    if not is_name(name):
        raise InvalidName(kind, str(name)[:100])
    return name


def is_header_value(value: str, max_length: int = 256) -> bool:
    """Whether `value` may be written as an HTTP header value as it is: 1 to `max_length` printable
    ASCII characters, the first not a space."""
    return len(value) <= max_length and _HEADER_VALUE.fullmatch(value) is not None
