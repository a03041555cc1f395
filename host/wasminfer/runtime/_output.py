"""What guests write to stdout and stderr, captured through one C callback of ours.

Used by both boundaries (`_wasm.py`, `_component.py`) for every store's WASI context. Guest
stdout/stderr go through one C callback of ours and *no finalizer*, not through wasmtime-py's
`stdout_custom`: that one registers a Python finalizer, which wasmtime runs on one of its tokio
threads whenever it drops the stream, possibly after the store closed; one running while the
interpreter exits aborts the process ("panic in a function that cannot unwind", seen in about one
exit in three after guests had written output). The write callback itself runs only while a guest
is inside fd_write, which waits for it.
"""

from __future__ import annotations

import ctypes
import errno
import itertools
from collections.abc import Callable, Sequence

import wasmtime

from wasminfer.runtime._engine import held

# Receives what the guest writes to stdout/stderr: `(stream, data)`. Returning a negative errno
# fails the guest's write with it (None: the whole write succeeded).
OutputFn = Callable[[str, bytes], int | None]

_OutputCallback = ctypes.CFUNCTYPE(ctypes.c_ssize_t, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)
_set_stdout_custom, _set_stderr_custom = (
    held(name, None, ctypes.c_void_p, _OutputCallback, ctypes.c_void_p, ctypes.c_void_p)
    for name in ("wasi_config_set_stdout_custom", "wasi_config_set_stderr_custom")
)

#: `(output, stream)` by the id passed as the callback's data.
_output_sinks: dict[int, tuple[OutputFn, str]] = {}
_output_ids = itertools.count(1)


@_OutputCallback  # type: ignore[untyped-decorator]
def _write_output(sink_id: int | None, buf: int, size: int) -> int:
    try:
        sink = _output_sinks.get(sink_id or 0)
        if sink is None:
            return -errno.EBADF
        output, stream = sink
        result = output(stream, ctypes.string_at(buf, size) if size else b"")
        return size if result is None else result
    except BaseException:  # noqa: BLE001 - must never escape into ctypes
        return -errno.EIO


def capture_output(wasi: wasmtime.WasiConfig | int, output: OutputFn) -> tuple[int, ...]:
    """Sends what the guest writes to stdout/stderr to `output(stream, data)`; `wasi` is a
    `WasiConfig` or the address of a `wasi_config_t`.

    Use instead of `WasiConfig.stdout_custom` (see the module docstring). Returns the handles to give to
    `release_output` once the store is closed.
    """
    out_id, err_id = next(_output_ids), next(_output_ids)
    _output_sinks[out_id] = (output, "stdout")
    _output_sinks[err_id] = (output, "stderr")
    config = wasi if isinstance(wasi, int) else ctypes.cast(wasi.ptr(), ctypes.c_void_p)
    _set_stdout_custom(config, _write_output, out_id, None)
    _set_stderr_custom(config, _write_output, err_id, None)
    return out_id, err_id


def release_output(handles: Sequence[int]) -> None:
    for handle in handles:
        _output_sinks.pop(handle, None)

