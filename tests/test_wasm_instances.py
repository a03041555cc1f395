"""New core instances on demand (`runtime/_wasm.py`: a store and an instantiation of the module's
`InstancePre` through the C API): instances of one `InstancePre` keep their own memory and limits,
a start function runs under the deadline and a failed start frees its store, a module past the
memory limit does not instantiate, and the `InstancePre` goes with its code."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest
import wasmtime

from wasminfer.runtime import Host, Manifest
from wasminfer.runtime._traps import WasmLinkError, WasmTrap
from wasminfer.runtime._wasm import CompiledModule, WasmEngine, WasmInstance, _Store
from wasminfer.runtime.handler import InvocationState

# Its initial image holds "init" at 16; `poke` writes a word anywhere, `peek` reads one, `grow` grows.
MEMORY_WAT = """
(module
  (memory (export "memory") 2)
  (data (i32.const 16) "init")
  (func (export "peek") (param i32) (result i32) (i32.load (local.get 0)))
  (func (export "poke") (param i32 i32) (i32.store (local.get 0) (local.get 1)))
  (func (export "grow") (param i32) (result i32) (memory.grow (local.get 0))))
"""
CALLS = (("peek", 1), ("poke", 0), ("grow", 1))
INIT = int.from_bytes(b"init", "little")
SECRET = 0x5EC12E7
PAGES_PER_MIB = 16


@pytest.fixture
def engine() -> Iterator[WasmEngine]:
    with Host.new_engine(None, pool_slots=0) as e:  # on demand: what every instance is by default
        e.tiered = False  # one code from the start
        yield e


def compiled(engine: WasmEngine, wat: str = MEMORY_WAT) -> CompiledModule:
    return engine.compile(bytes(wasmtime.wat2wasm(wat)))


def start(module: CompiledModule, memory_bytes: int = 1 << 20, timeout_ms: int = 5000) -> WasmInstance:
    return module.instantiate(memory_bytes=memory_bytes, timeout_ms=timeout_ms, calls=CALLS)


def call(inst: WasmInstance, name: str, *args: int) -> int:
    return inst.call(name, args, InvocationState("t", Manifest(), None, None, "x"),  # type: ignore[arg-type]
                     timeout_ms=5000, nresults=0 if name == "poke" else 1)


def test_instances_of_one_instance_pre_keep_their_own_memory_and_limits(engine: WasmEngine) -> None:
    module = compiled(engine)
    small, large = start(module, 1 << 20), start(module, 4 << 20)
    assert not small.pooled and not large.pooled
    assert module.code.derived is not None and module.pre() is module.code.derived  # one InstancePre

    call(small, "poke", 16, SECRET)
    assert (call(small, "peek", 16), call(large, "peek", 16)) == (SECRET, INIT)
    assert small.store is not large.store and small.store.address != large.store.address

    # 2 pages at start: the small one grows to its 1 MiB and not a page past it, the large one on.
    assert call(small, "grow", PAGES_PER_MIB - 2) == 2
    assert call(small, "grow", 1) == -1
    assert small.memory_size() == 1 << 20
    assert call(large, "grow", PAGES_PER_MIB) == 2
    assert large.memory_size() == (PAGES_PER_MIB + 2) << 16

    fresh = start(module)  # a third instance starts from the initial image, whatever the others did
    assert (call(fresh, "peek", 16), fresh.memory_size()) == (INIT, 2 << 16)
    for inst in (small, large, fresh):
        inst.close()


def test_an_initial_memory_within_the_limit_instantiates_and_past_it_does_not(engine: WasmEngine) -> None:
    module = compiled(engine)
    inst = start(module, memory_bytes=2 << 16)  # exactly its 2 initial pages
    assert inst.memory_size() == 2 << 16
    inst.close()
    with pytest.raises(WasmLinkError, match="memory"):
        start(module, memory_bytes=1 << 16)


START_WAT = """
(module
  (memory (export "memory") 1)
  (global $mode i32 (i32.const {mode}))
  (func $start
    (if (i32.eq (global.get $mode) (i32.const 1)) (then unreachable))
    (if (i32.eq (global.get $mode) (i32.const 2)) (then (loop $l (br $l))))
    (i32.store (i32.const 0) (i32.const 7)))
  (start $start)
  (func (export "peek") (param i32) (result i32) (i32.load (local.get 0))))
"""


def test_a_start_function_runs_at_instantiation(engine: WasmEngine) -> None:
    inst = start(compiled(engine, START_WAT.format(mode=0)))
    assert call(inst, "peek", 0) == 7
    inst.close()


@pytest.mark.parametrize(("mode", "kind"), [(1, "unreachable"), (2, "timeout")])
def test_a_start_function_that_traps_or_runs_past_the_deadline_fails_the_instance(
        engine: WasmEngine, mode: int, kind: str) -> None:
    module = compiled(engine, START_WAT.format(mode=mode))
    with pytest.raises(WasmTrap) as trap:
        start(module, timeout_ms=30)
    assert trap.value.kind == kind
    # Its store is still referenced (by the traceback's frames), and closed already.
    stores = [s for s in gc.get_objects() if isinstance(s, _Store)]
    assert stores and [s.address for s in stores] == [0] * len(stores)


def test_closing_an_instance_is_idempotent(engine: WasmEngine) -> None:
    inst = start(compiled(engine))
    inst.close()
    inst.close()
    assert inst.closed and inst.store.address == 0
    with pytest.raises(WasmLinkError, match="missing export function 'peek'"):
        call(inst, "peek", 16)


def test_an_instance_pre_goes_with_its_code(engine: WasmEngine) -> None:
    module = compiled(engine)
    inst = start(module)
    assert module.code.derived is not None
    pre = weakref.ref(module.code.derived[1])
    # A better tier swapped in drops the old code's InstancePre at once, instances still running.
    better = MEMORY_WAT.replace('(memory (export "memory") 2)', '(memory (export "memory") 3)')
    module.code.optimised(compiled(engine, better).module)
    gc.collect()
    assert pre() is None and module.code.derived is None
    assert call(inst, "peek", 16) == INIT and inst.outdated()
    inst.close()

    again = start(module)  # the new code's own InstancePre, dropped with the module
    assert again.memory_size() == 3 << 16 and module.code.derived is not None
    pre = weakref.ref(module.code.derived[1])
    again.close()
    del module, again, inst
    gc.collect()
    assert pre() is None
