"""WASI calls that block, as our own host functions, so that they keep the deadline.

wasmtime's `poll_oneoff` (what `sleep`, `nanosleep` and `poll` become) sleeps inside Rust, where
epoch interruption cannot reach: a guest could sleep past its deadline, and past a delete, holding
its thread. This one waits on the call's state instead (`CallState.sleep_until`: no GIL, woken by
a cancel, ended at the deadline). The other WASI calls do not block here: stdin is bytes or a
regular file, stdout/stderr go to `_output.py`'s callback, there are no sockets, and
`sched_yield` only yields the thread.

`_wasm.WasmEngine` defines them over wasmtime's (`_wasm.WASI_OVERRIDES`).
"""

from __future__ import annotations

import struct
import time
from typing import TYPE_CHECKING

from wasminfer.runtime._engine import CallState
from wasminfer.runtime._traps import GuestFault

if TYPE_CHECKING:
    from wasminfer.runtime._wasm import GuestMemory

_SUBSCRIPTION = struct.Struct("<QB7xIxxxxQQH6x")  # userdata, tag, clock id, timeout, precision, flags
_EVENT = struct.Struct("<QHBxxxxxQH6x")  # userdata, errno, type, nbytes, flags
_EVENTTYPE_CLOCK, _EVENTTYPE_FD_READ, _EVENTTYPE_FD_WRITE = 0, 1, 2
_CLOCK_REALTIME, _CLOCK_MONOTONIC = 0, 1
_SUBCLOCK_ABSTIME = 1
_ERRNO_FAULT, _ERRNO_INVAL = 21, 28
_MAX_SUBSCRIPTIONS = 4096


def poll_oneoff(state: CallState, mem: GuestMemory, in_ptr: int, out_ptr: int, nsubscriptions: int,
                 nevents_ptr: int) -> int:
    """WASI preview1 `poll_oneoff(in, out, nsubscriptions, *nevents) -> errno` (layouts as in
    wasi-libc's `wasi/api.h`: a subscription is 48 bytes, an event 32). fd subscriptions are ready at
    once (nothing here blocks on an fd); clock ones wait for the earliest of them. Raises
    `Interrupted` at the call's deadline or on a cancel."""
    if not 0 < nsubscriptions <= _MAX_SUBSCRIPTIONS:
        return _ERRNO_INVAL
    try:
        raw = mem.read(in_ptr, nsubscriptions * _SUBSCRIPTION.size)
        mem.read(out_ptr, nsubscriptions * _EVENT.size)
        mem.read(nevents_ptr, 4)
    except GuestFault:
        return _ERRNO_FAULT
    now = time.monotonic_ns()
    instance = state.instance
    ready: list[tuple[int, int]] = []  # (userdata, event type)
    clocks: list[tuple[int, int]] = []  # (userdata, wake at in monotonic ns)
    for i in range(nsubscriptions):
        userdata, tag, clock, timeout, _, flags = _SUBSCRIPTION.unpack_from(raw, i * _SUBSCRIPTION.size)
        if tag in (_EVENTTYPE_FD_READ, _EVENTTYPE_FD_WRITE):
            ready.append((userdata, tag))
        elif tag != _EVENTTYPE_CLOCK or clock not in (_CLOCK_REALTIME, _CLOCK_MONOTONIC):
            return _ERRNO_INVAL
        elif not flags & _SUBCLOCK_ABSTIME:
            clocks.append((userdata, now + timeout))
        elif clock == _CLOCK_REALTIME:
            clocks.append((userdata, now + timeout - time.time_ns()))
        else:  # the guest's monotonic clock counts from its WASI context's making
            base = instance.clock_base_ns if instance is not None else now
            clocks.append((userdata, base + timeout))
    if not ready:
        state.sleep_until(min(at for _, at in clocks))
        now = time.monotonic_ns()
    events = [_EVENT.pack(userdata, 0, kind, 0, 0) for userdata, kind in ready]
    events += [_EVENT.pack(userdata, 0, _EVENTTYPE_CLOCK, 0, 0) for userdata, at in clocks if at <= now]
    mem.write(out_ptr, b"".join(events))
    mem.write_u32(nevents_ptr, len(events))
    return 0
