"""The instance pool of core modules (`runtime/_pooling.py`): instances within its slots take one,
instances past them start on demand and serve the same; a slot's next instance holds nothing of the
previous one's memory; modules and limits that do not fit a slot never take one; deadlines hold in
pooled instances (the engine's ticker drives the pooled engine too)."""

from __future__ import annotations

import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import wasmtime

from wasminfer.runtime import GrowthPolicy, Host, Manifest, _pooling
from wasminfer.runtime._traps import WasmTrap
from wasminfer.runtime._wasm import CompiledModule, WasmEngine, WasmInstance
from wasminfer.runtime.handler import InvocationState

GUESTS = Path(__file__).resolve().parent / "guests"

# Its initial image holds "init" at 16; `poke` writes a word anywhere, `peek` reads one, `grow` grows.
MEMORY_WAT = """
(module
  (memory (export "memory") 2)
  (table 1 funcref)
  (data (i32.const 16) "init")
  (func (export "peek") (param i32) (result i32) (i32.load (local.get 0)))
  (func (export "poke") (param i32 i32) (i32.store (local.get 0) (local.get 1)))
  (func (export "grow") (param i32) (result i32) (memory.grow (local.get 0)))
  (func (export "spin") (loop $l (br $l))))
"""
CALLS = (("peek", 1), ("poke", 0), ("grow", 1), ("spin", 0))
INIT = int.from_bytes(b"init", "little")
SECRET = 0x5EC12E7


@pytest.fixture
def engine() -> Iterator[WasmEngine]:
    with Host.new_engine(None, pool_slots=2) as e:
        e.tiered = False  # one code from the start: no tier swap renews instances behind the tests
        yield e


def compiled(engine: WasmEngine, wat: str = MEMORY_WAT) -> CompiledModule:
    return engine.compile(bytes(wasmtime.wat2wasm(wat)))


def start(module: CompiledModule, memory_mb: int = 1, timeout_ms: int = 5000) -> WasmInstance:
    return module.instantiate(memory_bytes=memory_mb << 20, timeout_ms=timeout_ms, calls=CALLS)


def call(inst: WasmInstance, name: str, *args: int) -> int:
    return inst.call(name, args, InvocationState("t", Manifest(), None, None, "x"),  # type: ignore[arg-type]
                     timeout_ms=5000, nresults=0 if name in ("poke", "spin") else 1)


def test_instances_within_the_pool_take_slots_and_past_it_start_on_demand(engine: WasmEngine) -> None:
    module = compiled(engine)
    instances = [start(module) for _ in range(5)]
    assert [i.pooled for i in instances] == [True, True, False, False, False]
    assert engine.pool is not None and engine.pool.live == 2
    for n, inst in enumerate(instances):  # on demand or in a slot, each serves and is its own
        call(inst, "poke", 1024, n)
    assert [call(i, "peek", 1024) for i in instances] == [0, 1, 2, 3, 4]
    instances[0].close()
    instances[0].close()  # idempotent: the slot is given back once
    assert engine.pool.live == 1
    again = start(module)
    assert again.pooled and engine.pool.live == 2
    for inst in (again, *instances[1:]):
        inst.close()
    assert engine.pool.live == 0


def test_ten_times_more_live_instances_than_slots_all_serve(engine: WasmEngine) -> None:
    # The density bench's 10 000 live instances on a 1000-slot pool, at a 2-slot scale.
    module = compiled(engine)
    instances = [start(module) for _ in range(20)]
    assert sum(i.pooled for i in instances) == 2
    for n, inst in enumerate(instances):
        call(inst, "poke", 2048, n + 100)
    assert [call(i, "peek", 2048) for i in instances] == list(range(100, 120))
    for inst in instances:
        inst.close()
    assert engine.pool is not None and engine.pool.live == 0


def test_a_slot_taken_behind_the_count_sends_the_instance_on_demand(engine: WasmEngine) -> None:
    # Another thread took the last slot between our count and wasmtime's: wasmtime refuses, and the
    # instance starts on demand instead of failing.
    module = compiled(engine)
    pool = engine.pool
    assert pool is not None
    pre = module.pooled_pre()
    assert pre is not None
    outside = [wasmtime.Store(pool.engine) for _ in range(2)]
    for store in outside:
        store.set_wasi(wasmtime.WasiConfig())
        pre[1].instantiate(store)
    inst = start(module)
    assert not inst.pooled and pool.live == 0
    call(inst, "poke", 64, 7)
    assert call(inst, "peek", 64) == 7
    inst.close()
    assert pool.live == 0


def test_the_next_instance_of_a_slot_holds_nothing_of_the_previous_ones_memory() -> None:
    with Host.new_engine(None, pool_slots=1) as engine:
        engine.tiered = False
        module = compiled(engine)
        first = start(module, memory_mb=4)
        assert first.pooled
        # Below `KEEP_RESIDENT_BYTES` the slot's pages are reset in place, past it given back: both.
        call(first, "poke", 16, SECRET)  # over the initial image
        call(first, "poke", 70_000, SECRET)  # a page the image leaves zero
        assert call(first, "grow", 2) == 2
        call(first, "poke", 3 * 65536 + 8, SECRET)  # a grown page
        first.memory().write(200_000, b"secret bytes")
        first.close()

        second = start(module, memory_mb=4)
        assert second.pooled  # the one slot: the same memory, reset
        assert second.memory_size() == 2 * 65536
        assert call(second, "peek", 16) == INIT
        assert call(second, "peek", 70_000) == 0
        assert second.memory().read(0, 2 * 65536).count(b"init") == 1
        assert call(second, "grow", 2) == 2
        assert call(second, "peek", 3 * 65536 + 8) == 0
        assert second.memory().read(2 * 65536, 2 * 65536) == bytes(2 * 65536)
        second.close()


def test_a_renewed_instance_starts_from_the_initial_image_in_its_slot(tmp_path: Path) -> None:
    engine = Host.new_engine(tmp_path, pool_slots=1)
    engine.tiered = False
    policy = GrowthPolicy(reset_bytes=1 << 20, slack_bytes=64 << 10, shrink_idle_s=3600)
    try:
        with Host(engine=engine, growth_policy=policy) as host:
            wasm = bytes(wasmtime.wat2wasm((GUESTS / "limits.wat").read_text()))
            host.deploy_function("limits", wasm, Manifest(memory_mb=16, max_instances=1))
            pool = host.function("limits").pool
            grown = pool._idle[0][0].wasm
            assert grown.pooled
            payload = b"s" * 1_000_000
            assert host.invoke("limits", b"e" + struct.pack("<I", 0) + payload).body == payload
            fresh = pool._idle[0][0].wasm
            assert fresh is not grown and fresh.pooled and pool.stats()["renewed_total"] == 1
            assert fresh.memory_size() == 2 * 65536
            assert fresh.memory().read(4096, 2 * 65536 - 4096) == bytes(2 * 65536 - 4096)
    finally:
        engine.close()


def test_an_instance_that_fails_to_start_gives_its_slot_back(engine: WasmEngine) -> None:
    boom = '(data (i32.const 16) "init") (start $boom) (func $boom unreachable)'
    trapping = compiled(engine, MEMORY_WAT.replace('(data (i32.const 16) "init")', boom))
    for _ in range(3):  # more than the 2 slots: each failure gave its slot back, to wasmtime too
        with pytest.raises(WasmTrap) as caught:
            start(trapping)
        assert caught.value.kind == "unreachable"
    assert engine.pool is not None and engine.pool.live == 0
    inst = start(compiled(engine))
    assert inst.pooled and engine.pool.live == 1
    inst.close()


def test_a_freed_slot_is_taken_again_by_the_next_instance_of_any_module(engine: WasmEngine) -> None:
    # What bounds the pages slots keep resident (`_pooling.KEEP_RESIDENT_BYTES`) to the slots that
    # were live at once: instances of ever new modules one after another use one slot, not one each.
    modules = [compiled(engine, MEMORY_WAT.replace('"init"', f'"in{i:02d}"')) for i in range(6)]
    bases = set()
    for module in modules:
        inst = start(module)
        assert inst.pooled
        bases.add(inst.memory()._base(0, 0))
        inst.close()
    assert len(bases) == 1
    live = [start(m) for m in modules[:2]]  # two at once: two slots
    assert len({i.memory()._base(0, 0) for i in live}) == 2 and all(i.pooled for i in live)
    for inst in live:
        inst.close()


def test_what_does_not_fit_a_slot_never_takes_one(engine: WasmEngine) -> None:
    big = start(compiled(engine), memory_mb=(_pooling.SLOT_MEMORY_BYTES >> 20) + 1)
    assert not big.pooled and big.memory_size() == 2 * 65536
    fits = start(compiled(engine), memory_mb=_pooling.SLOT_MEMORY_BYTES >> 20)
    assert fits.pooled
    two_tables = compiled(engine, MEMORY_WAT.replace("(table 1 funcref)", "(table 1 funcref) " * 2))
    assert two_tables.pooled_pre() is None
    inst = start(two_tables)
    assert not inst.pooled and call(inst, "peek", 16) == INIT
    assert engine.pool is not None and engine.pool.live == 1
    for i in (big, fits, inst):
        i.close()


def test_no_pool_when_its_slots_are_zero() -> None:
    with Host.new_engine(None, pool_slots=0) as engine:
        assert engine.pool is None and engine.epoch_engines == [engine.engine]
        inst = start(compiled(engine))
        assert not inst.pooled and call(inst, "peek", 16) == INIT
        inst.close()


def test_the_slots_setting_is_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WASMINFER_INSTANCE_POOL", "0")
    assert _pooling.slots_from_env() == 0
    monkeypatch.setenv("WASMINFER_INSTANCE_POOL", "100000")
    assert _pooling.slots_from_env() == 100_000
    monkeypatch.setenv("WASMINFER_INSTANCE_POOL", "100001")
    with pytest.raises(ValueError, match="WASMINFER_INSTANCE_POOL must be from 0 .* not '100001'"):
        _pooling.slots_from_env()
    monkeypatch.setenv("WASMINFER_INSTANCE_POOL", "-1")
    with pytest.raises(ValueError, match="not '-1'"):
        _pooling.slots_from_env()


def test_a_deadline_holds_in_a_pooled_instance(engine: WasmEngine) -> None:
    inst = start(compiled(engine))
    assert inst.pooled
    outcome: list[BaseException] = []

    def spin() -> None:
        try:
            inst.call("spin", (), InvocationState("t", Manifest(), None, None, "x"),  # type: ignore[arg-type]
                      timeout_ms=50, nresults=0)
        except BaseException as exc:  # noqa: BLE001 - looked at below
            outcome.append(exc)

    runner = threading.Thread(target=spin, daemon=True)
    runner.start()
    runner.join(30)  # generous: only a missing epoch tick would make it run on
    assert not runner.is_alive(), "the pooled instance was never interrupted"
    assert len(outcome) == 1 and isinstance(outcome[0], WasmTrap) and outcome[0].kind == "timeout"
    inst.close()
    assert engine.pool is not None and engine.pool.live == 0


FILL_MAPS = """
import sys, wasmtime
from wasminfer.runtime import Host, _pooling
from wasminfer.runtime.handler import InvocationState
from wasminfer.runtime import Manifest
engines = []
while True:  # engines kept alive, as a test process keeps many: each pool maps ~2 areas a slot
    e = Host.new_engine(None, pool_slots=1000)
    engines.append(e)
    if e.pool is None:
        break
    assert len(engines) < 200, "the pools never reached vm.max_map_count"
module = e.compile(bytes(wasmtime.wat2wasm(sys.argv[1])))
inst = module.instantiate(memory_bytes=1 << 20, timeout_ms=5000, calls=(("peek", 1),))
state = InvocationState("t", Manifest(), None, None, "x")
print(len(engines), inst.pooled, inst.call("peek", (16,), state, timeout_ms=5000, nresults=1),
      _pooling.room_for(2), _pooling.room_for(1000))
"""


def test_engines_past_the_map_limit_make_no_pool_instead_of_aborting(tmp_path: Path) -> None:
    # wasmtime aborts the process when a pool's reservation fails; `room_for` declines the pool first.
    import subprocess
    import sys

    limit = int(Path("/proc/sys/vm/max_map_count").read_text())
    proc = subprocess.run([sys.executable, "-c", FILL_MAPS, MEMORY_WAT], capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    made, pooled, value, small_fits, full_fits = proc.stdout.split()
    # every engine but the last got its pool: as many as fit under the limit with the headroom
    assert 1 <= int(made) - 1 <= limit * (1 - _pooling.MAPS_HEADROOM) // (1000 * _pooling.MAPS_PER_SLOT)
    assert (pooled, int(value)) == ("False", INIT)  # the last one serves on demand
    assert "no instance pool of 1000 slots" in proc.stderr
    assert (small_fits, full_fits) == ("True", "False")  # near the limit: 2 slots fit, 1000 do not
    # (its own fresh process: a test worker's engines of earlier tests already hold many areas)
    fresh = subprocess.run([sys.executable, "-c", "from wasminfer.runtime import _pooling; "
                            "print(_pooling.room_for(1000), _pooling.room_for(10**9))"],
                           capture_output=True, text=True, timeout=60, check=True)
    assert fresh.stdout.split() == ["True", "False"]
