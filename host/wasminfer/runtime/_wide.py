"""The Python runtime's engine: a second wasmtime engine whose linear memories are reserved whole.

The process's engine (`_engine.Engine`) reserves 64 MiB (+ 64 KiB of guard) per memory so that the
thousands of small C/Zig instances a host holds fit in the address space (the density bench keeps
10,000 live digits instances; ~31k 4-GiB reservations fill the 47 bits of it), and its code checks
the bounds of every load and store instead. The Python runtime (`python.py`) is the other case: one
interpreter per instance, nearly every instruction a load or a store, a memory that starts at ~40 MiB
and grows past 64 MiB (its default limit is 128 MiB), so it would move as it grows. On this engine
memories get wasmtime's 64-bit defaults (4 GiB + 32 MiB of guard, `_compiler.engine_config(wide=True)`):
its code has no bounds checks, and a memory grows in place. Its instances are few (each holds
tens of MiB of the memory budget), so their reservations fit. Measured here (5 alternating runs
each, medians of their minima): the digits function in Python, `Host.invoke` 173.9 -> 162.6 µs,
`json.loads` of its request in the guest 39.4 -> 36.2 µs; a new instance to its first answer
1.7-2.2 -> 1.1-1.5 ms (p50s).

Made on first use (`_wasm.WasmEngine.wide`: the first Python function, or a build of the runtime),
not with the process's engine: a host without Python functions makes no second engine, linker or
epoch to tick. Like the instance pool's engine (`_pooling.py`), it is driven by the process's epoch
ticker (`Engine.epoch_engines`) and its linker holds the same host imports and WASI; its artefacts
are named by their own fingerprint (`_cache.fingerprint(wide=True)`) and are compiled by workers
told so. Its instances never take a pool slot.
"""

from __future__ import annotations

import wasmtime

from wasminfer.runtime import _compiler
from wasminfer.runtime._cache import fingerprint
from wasminfer.runtime._engine import engine_address


class WideEngine:
    """The wide wasmtime engine, its address for the C API and its linker of core modules (whose
    imports `_wasm.WasmEngine.wide` defines)."""

    def __init__(self) -> None:
        self.engine = wasmtime.Engine(_compiler.engine_config(wide=True))
        self.address = engine_address(self.engine)
        self.linker = wasmtime.Linker(self.engine)
        #: Names what compiled for it (`_cache.fingerprint`): what loads into no other engine.
        self.fingerprint = fingerprint(wide=True)
