"""WASI command functions: a `_start` program run once per invocation, in the CGI/WAGI style.

The request body is the program's stdin and its stdout is the response body (content type from the
manifest key `content_type`, else `application/octet-stream`); its stderr goes to the function's
log. `args` (after the program name, which is the function's name) and `env` come from the
manifest, and with `mount_body` the body is also a read-only file at that guest path, for programs
that take an input path as an argument. Exit status 0 (`main` returning 0, or `proc_exit(0)`) is
success; any other status is a `500 guest_error` carrying the tail of stderr.

Every invocation gets a fresh instance: programs expect a fresh process (globals, heap, stdin at
its start), and a new instance of a precompiled module takes microseconds. The pool of a command
function holds `CommandSlot`s instead of instances: they bound its concurrency (`max_instances`)
and hold nothing of the guest between invocations.
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from wasminfer.errors import (
    GuestError,
    LogLimitExceeded,
    MemoryLimitExceeded,
    OutputLimitExceeded,
    WasminferError,
)
from wasminfer.manifest import Manifest
from wasminfer.runtime._engine import CallState
from wasminfer.runtime._traps import Interrupted, WasmExit, WasmLinkError, WasmTrap
from wasminfer.runtime._wasm import CompiledModule, HostFunc, WasiOptions, WasmInstance
from wasminfer.runtime.handler import DEFAULT_CONTENT_TYPE, InvocationState, _trap_error
from wasminfer.runtime.logs import Tail

NAME = "command"
EXPORT_START = "_start"
CALLS = ((EXPORT_START, 0),)
HOST_FUNCS: tuple[HostFunc, ...] = ()  # WASI only (wasi_ephemeral_nn is registered on its own)
# The folder that holds a mounted body for one invocation: RAM-backed where there is one (a temp
# folder on ext4 costs ~4 ms to make, fill and remove; on tmpfs ~0.15 ms).
_MOUNT_ROOT = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK | os.X_OK) else None

Output = Callable[[str, bytes], int | None]


def detect(compiled: CompiledModule) -> bool:
    return EXPORT_START in compiled.exports


def validate(compiled: CompiledModule) -> None:
    """Raises `WasmLinkError` unless `_start` is a `() -> ()` function."""
    compiled.require_func(EXPORT_START, (), ())


class CommandSlot:
    """A command function's unit of concurrency in its pool; no instance lives between invocations.

    Has the parts of `WasmInstance` the host looks at (`close`, the memory-limit predicates).
    """

    def __init__(self, compiled: CompiledModule, manifest: Manifest, output: Output | None) -> None:
        self.compiled = compiled
        self.manifest = manifest
        self.output = output
        self.closed = False

    def at_memory_limit(self) -> bool:
        return False

    def near_memory_limit(self) -> bool:
        return False

    def close(self) -> None:
        self.closed = True


def instantiate(compiled: CompiledModule, manifest: Manifest, state: CallState,
                output: Output | None) -> CommandSlot:
    """A slot for one concurrent invocation.

    Instantiates the module once (without running `_start`) so that a module that cannot link or
    whose start function traps fails its deploy, not its first invocation. Raises `WasmLinkError`
    or `WasmTrap`.
    """
    compiled.instantiate(memory_bytes=manifest.memory_mb << 20, timeout_ms=manifest.timeout_ms).close()
    return CommandSlot(compiled, manifest, output)


class _Streams:
    """stdout (the response, bounded by `max_output_bytes`) and stderr (the log, and a tail for errors).

    A write past a limit fails in the guest (EFBIG) and fails the invocation afterwards. Runs inside
    wasmtime's output callbacks: never raises.
    """

    def __init__(self, state: InvocationState, log: Output | None) -> None:
        self.state = state
        self.log = log
        self.stdout = bytearray()
        self.stderr_tail = Tail()

    def write(self, stream: str, data: bytes) -> int | None:
        state = self.state
        m = state.manifest
        if stream == "stdout" and state.stream is not None:  # flushed as written (streams.py)
            try:
                state.write_chunk(data, m.content_type or DEFAULT_CONTENT_TYPE)
            except OutputLimitExceeded:
                return -errno.EFBIG
            except Interrupted:  # the client left, or the deadline passed: the epoch ends the guest
                return -errno.EPIPE
            return None
        if stream == "stdout":
            if len(self.stdout) + len(data) > m.max_output_bytes:
                state.limit_error = state.limit_error or OutputLimitExceeded.exceeded(
                    state.function, f"tried to write {len(self.stdout) + len(data)} bytes to stdout",
                    m.max_output_bytes,
                )
                return -errno.EFBIG
            self.stdout += data
            return None
        self.stderr_tail.add(data)
        state.log_bytes += len(data)
        if state.log_bytes > m.max_log_bytes:
            state.limit_error = state.limit_error or LogLimitExceeded.exceeded(
                state.function, f"tried to write {state.log_bytes} bytes to stderr in one invocation",
                m.max_log_bytes,
            )
            return -errno.EFBIG
        if self.log is not None:
            self.log("stderr", data)
        return None

    def tail(self) -> str:
        return self.stderr_tail.suffix()


def invoke(slot: CommandSlot, body: bytes, content_type: str, state: InvocationState) -> bool:
    """Runs the program once on `body`. Returns True (the slot is always reusable).

    Raises `GuestError` for a non-zero exit status (its message ends with the tail of stderr),
    `MemoryLimitExceeded` when the program failed with its memory at the limit, `Timeout`,
    `GuestTrap`, and the limit errors (`OutputLimitExceeded`, `LogLimitExceeded`,
    `InferLimitExceeded`).
    """
    m = state.manifest
    streams = _Streams(state, slot.output)
    wasi = WasiOptions(args=[state.function, *m.args], env=dict(m.env), stdin_bytes=body)
    with contextlib.ExitStack() as cleanup:
        if m.mount_body:
            folder = cleanup.enter_context(tempfile.TemporaryDirectory(prefix="wasminfer-body-",
                                                                       dir=_MOUNT_ROOT))
            guest_dir, _, file_name = m.mount_body.rpartition("/")
            (Path(folder) / file_name).write_bytes(body)
            wasi.preopens.append((folder, guest_dir or "/"))  # read-only
        try:
            inst = slot.compiled.instantiate(memory_bytes=m.memory_mb << 20, timeout_ms=m.timeout_ms,
                                             calls=CALLS, output=streams.write, wasi=wasi)
        except WasmTrap as trap:
            raise _trap_error(trap, slot, state) from None
        except WasmLinkError as exc:
            raise GuestError(f"function {state.function!r} could not be instantiated: {exc}") from None
        try:
            status = _run(inst, state)
            near_limit = inst.near_memory_limit()
        finally:
            inst.close()
    if state.limit_error is not None:
        raise state.limit_error
    if status != 0:
        nn = f"; last failed call: {state.nn_error}" if state.nn_error else ""
        if near_limit:
            raise MemoryLimitExceeded.exceeded(
                state.function, f"exited with status {status} with its memory full", m.memory_mb,
                f"{nn}{streams.tail()}",
            )
        raise GuestError(f"function {state.function!r} exited with status {status}{nn}{streams.tail()}")
    state.output = bytes(streams.stdout) if state.stream is None else b""
    state.content_type = m.content_type or DEFAULT_CONTENT_TYPE
    return True


def _run(inst: WasmInstance, state: InvocationState) -> int:
    """The exit status of `_start`. Raises the `WasminferError` of a trap or timeout."""
    try:
        inst.call(EXPORT_START, (), state, state.manifest.timeout_ms, nresults=0)
    except WasmExit as exit_:
        return exit_.status
    except WasmTrap as trap:
        error: WasminferError = _trap_error(trap, inst, state)
        raise error from None
    return 0


__all__ = ["HOST_FUNCS", "NAME", "CommandSlot", "detect", "instantiate", "invoke", "validate"]
