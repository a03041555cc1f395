"""The one pattern of names: functions, models, tenants (and blob kinds) are 1-64 characters of
a-z, 0-9, '.', '_', '-', starting with a letter or digit. A leaf module: every layer imports it.

Always `fullmatch`: `re`'s `$` also matches before a final newline, so `^...$` with `match`
would accept "add\\n".
"""

from __future__ import annotations

import re
from typing import TypeGuard

__all__ = ["NAME_PATTERN", "NAME_REGEX", "is_name"]

#: Without anchors: `NAME_PATTERN.fullmatch` anchors it; JSON Schema (`openapi.py`) adds ^ and $.
NAME_REGEX = r"[a-z0-9][a-z0-9._-]{0,63}"
NAME_PATTERN = re.compile(NAME_REGEX)


def is_name(value: object) -> TypeGuard[str]:
    """Whether `value` is a `str` that is a valid name in full."""
    return isinstance(value, str) and NAME_PATTERN.fullmatch(value) is not None
