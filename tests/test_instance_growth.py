"""Instances give back what they grew (`runtime.pool.GrowthPolicy`): a request that grows an instance
far past its size at rest gets it renewed at release, small ones keep reusing it, and an idle
instance that grew is renewed once idle; per ABI (handler modules here, command modules, and the
Python runtime in test_python_runtime.py)."""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import wasmtime

from wasminfer.runtime import GrowthPolicy, Host, Manifest

GUESTS = Path(__file__).resolve().parent / "guests"
#: limits.wat's allocator grows memory to hold 2 × the request (and a page), from 2 pages at rest.
POLICY = GrowthPolicy(reset_bytes=1 << 20, slack_bytes=64 << 10, shrink_idle_s=3600)


def echo(n: int) -> bytes:
    return b"e" + struct.pack("<I", 0) + b"x" * n


@pytest.fixture
def host(tmp_path: Path) -> Iterator[Host]:
    with Host(cache_dir=tmp_path, growth_policy=POLICY) as h:
        # These tests follow one instance: optimised code from the start, so that no swap of tiers
        # renews it behind their back (tests/test_tiers.py has the tiers).
        h.engine.tiered = False
        wasm = bytes(wasmtime.wat2wasm((GUESTS / "limits.wat").read_text()))
        h.deploy_function("limits", wasm, Manifest(memory_mb=16, max_instances=1))
        yield h


def the_instance(host: Host) -> object:
    pool = host.function("limits").pool
    assert pool.stats()["idle"] == 1
    return pool._idle[0][0].wasm


def test_small_requests_reuse_the_instance_and_a_big_one_renews_it(host: Host) -> None:
    first = the_instance(host)
    for n in (10, 100_000, 300_000):  # grows under 1 MiB past rest: kept
        assert host.invoke("limits", echo(n)).body == b"x" * n
    kept = the_instance(host)
    assert kept is first and kept.memory_size() > 2 * 65536  # type: ignore[attr-defined]
    assert host.function("limits").pool.stats()["renewed_total"] == 0

    r = host.invoke("limits", echo(1_000_000))  # ~2 MiB past rest: renewed at release
    assert r.body == b"x" * 1_000_000 and not r.cold
    fresh = the_instance(host)
    assert fresh is not first and fresh.memory_size() == 2 * 65536  # type: ignore[attr-defined]
    stats = host.function("limits").pool.stats()
    assert (stats["renewed_total"], stats["live"], stats["discarded_total"]) == (1, 1, 0)
    assert host.invoke("limits", echo(5)).body == b"xxxxx" and the_instance(host) is fresh


def test_a_memory_size_read_before_a_request_is_not_kept_past_it(host: Host) -> None:
    """An instance reads its memory size once per guest call (`WasmInstance.memory_size`): a size
    read at rest must not hide what the next request grew, from the pool's growth check either."""
    inst = the_instance(host)
    assert inst.memory_size() == 2 * 65536  # type: ignore[attr-defined]
    assert host.invoke("limits", echo(300_000)).body == b"x" * 300_000
    assert the_instance(host) is inst
    grown = inst.memory_size()  # type: ignore[attr-defined]
    assert grown > 2 * 65536 + 300_000  # it holds the request at least
    (pooled,) = [i for i, _ in host.function("limits").pool._idle]
    assert pooled.growth() == grown - 2 * 65536
    r = host.invoke("limits", echo(1_000_000))  # past `reset_bytes` from there: renewed at release
    assert r.body == b"x" * 1_000_000 and the_instance(host) is not inst


def test_an_idle_instance_that_grew_is_renewed_and_one_that_did_not_is_kept(host: Host) -> None:
    pool = host.function("limits").pool
    untouched = the_instance(host)
    assert pool.shrink_idle(idle_s=0) == 0 and the_instance(host) is untouched  # at rest: nothing to give
    host.invoke("limits", echo(300_000))
    grown = the_instance(host)
    assert pool.shrink_idle(idle_s=3600) == 0 and the_instance(host) is grown  # not idle long enough
    assert host.shrink_idle() == 0
    assert pool.shrink_idle(idle_s=0) == 1
    fresh = the_instance(host)
    assert fresh is not grown and fresh.memory_size() == 2 * 65536  # type: ignore[attr-defined]
    assert pool.stats()["live"] == 1 and host.invoke("limits", echo(3)).body == b"xxx"


def test_a_renewal_that_fails_frees_the_slot(host: Host) -> None:
    fn = host.function("limits")
    host.invoke("limits", echo(300_000))

    def fail(_inst: object) -> object:
        raise RuntimeError("no instance")

    fn.pool._renew = fail  # type: ignore[assignment]
    assert fn.pool.shrink_idle(idle_s=0) == 0
    assert fn.pool.stats()["live"] == 0
    fn.pool._renew = fn._renew  # type: ignore[assignment]
    r = host.invoke("limits", echo(4))  # the next request makes its own
    assert r.body == b"xxxx" and r.cold


def test_no_policy_keeps_the_grown_instance(tmp_path: Path) -> None:
    keep = GrowthPolicy(reset_bytes=None, shrink_idle_s=3600)
    with Host(cache_dir=tmp_path, growth_policy=keep) as h:
        h.engine.tiered = False  # as in `host`
        h.deploy_function("limits", bytes(wasmtime.wat2wasm((GUESTS / "limits.wat").read_text())),
                          Manifest(memory_mb=16, max_instances=1))
        first = the_instance(h)
        h.invoke("limits", echo(1_000_000))
        assert the_instance(h) is first and first.memory_size() >= 2 << 20  # type: ignore[attr-defined]


def test_a_command_function_keeps_no_instance_between_calls(tmp_path: Path,
                                                           build_guest: Callable[..., bytes]) -> None:
    with Host(cache_dir=tmp_path, growth_policy=POLICY) as h:
        h.deploy_function("tool", build_guest("cmd_tool.c", exec_model="command"),
                          Manifest(memory_mb=32, args=("echo",)))
        body = b"y" * 2_000_000
        assert h.invoke("tool", body).body == body  # cmd_tool echoes stdin by default
        slot = h.function("tool").pool._idle[0][0]
        assert slot.growth() == 0 and not hasattr(slot.wasm, "memory_size")
        assert h.function("tool").pool.stats()["renewed_total"] == 0


def test_freed_memory_is_given_back_at_most_once_a_second() -> None:
    # runtime/_malloc.py: malloc_trim after idle instances are renewed or dropped, rate-limited
    # because it holds each allocator arena's lock while it walks it.
    from wasminfer.runtime import _malloc, release_freed_memory

    assert release_freed_memory(force=True)  # glibc here: it runs
    assert not release_freed_memory()  # within MIN_INTERVAL_S of the last
    _malloc._last -= _malloc.MIN_INTERVAL_S
    assert release_freed_memory()
