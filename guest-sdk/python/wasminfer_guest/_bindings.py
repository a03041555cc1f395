"""The one module that touches the host: the bindings componentize-py generates (`wit_world`), or
the door of wasminfer's Python runtime (`_host`, see `_runtime.py`).

Inside a component, `wit_world` exists and every call goes to the host. In the Python runtime,
`_host` does, and frames cross it. In plain Python (tests, trying a function out) neither does:
`infer` then goes to the backend that `wasminfer_guest.local` installs, and log lines to stderr.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

try:
    import wit_world.exports as wit_exports
    from componentize_py_types import Err
    from wit_world.exports import handler as wit_handler
    from wit_world.imports import inference as wit_inference
    from wit_world.imports import logging as wit_logging
    from wit_world.imports import types as wit_types

    IN_COMPONENT = True
except ImportError:  # plain Python, or the Python runtime
    IN_COMPONENT = False
    wit_exports = wit_handler = wit_inference = wit_logging = wit_types = None
    Err = None

try:
    import _host

    IN_RUNTIME = True
except ImportError:
    _host = None
    IN_RUNTIME = False

# plain Python only: `(model, {name: Tensor}) -> {name: Tensor}`, set by wasminfer_guest.local
local_infer: Callable[[str, dict[str, Any]], dict[str, Any]] | None = None

LEVELS = ("debug", "info", "warn", "error")


def log(level: str, message: str) -> None:
    if IN_RUNTIME:
        _host.call(b"l" + bytes([LEVELS.index(level)]) + message.encode("utf-8", "replace"))
    elif IN_COMPONENT:
        wit_logging.log(_LEVEL_CASES[level], message)
    else:
        print(f"[{level}] {message}", file=sys.stderr)


_LEVEL_CASES = {name: getattr(wit_logging.Level, name.upper()) for name in LEVELS} if IN_COMPONENT else {}
