"""The component ABI: the WIT world `wasminfer:function@0.1.0` (guest-sdk/wit/world.wit).

The path of Python functions built with componentize-py (and of any component that targets the
world). It mirrors the handler ABI (guest-sdk/ABI.md) on purpose: the same `InvocationState`, the
same limits with the same messages (memory, timeout, output, logs, infer calls, tensor bytes), the
same infer errors (one WIT case per error code), the same rule for an infer error the function
passes on (the caller gets the host's own error of the last failed `infer`, never one the guest
made up). What differs is only how values cross: WIT values through `_component`, not pointers.

A guest exception comes back as the `failure` case: its message goes to the caller (500
guest_error), its traceback to the function's logs. A MemoryError comes back as `out-of-memory`
(500 memory_limit_exceeded; the host cannot see a component's memories, so it takes the guest's
word for it). Traps, timeouts and limit violations discard the instance, as for handler modules.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

import numpy as np

from wasminfer.errors import (
    GuestError,
    GuestRejected,
    InvalidManifest,
    InvalidModule,
    InvalidTensor,
    MemoryLimitExceeded,
    ModelNotAllowed,
    OutputLimitExceeded,
    TensorTooLarge,
    WasminferError,
)
from wasminfer.manifest import Manifest
from wasminfer.models.codec import MAX_RANK, MAX_TENSORS
from wasminfer.runtime import handler
from wasminfer.runtime._component import (
    CompiledComponent,
    ComponentFunc,
    ComponentHostFunc,
    ComponentInstance,
    ComponentLinker,
)
from wasminfer.runtime._component_values import U16, U64, Bytes, Enum, List, Record, Result, String, Variant
from wasminfer.runtime._engine import CallState, Engine
from wasminfer.runtime._traps import WasmLinkError, WasmTrap
from wasminfer.runtime.handler import DEFAULT_CONTENT_TYPE, MAX_MESSAGE, InvocationState
from wasminfer.runtime.logs import where_raised

NAME = "component"
# The binary version of a component (a core module's is 01 00 00 00).
BINARY_VERSION = b"\x0d\x00\x01\x00"

VERSION = "0.1.0"
TYPES = f"wasminfer:function/types@{VERSION}"
INFERENCE = f"wasminfer:function/inference@{VERSION}"
LOGGING = f"wasminfer:function/logging@{VERSION}"
HANDLER = f"wasminfer:function/handler@{VERSION}"

# --- the world's types, as `_component` schemas (records are tuples, variants (case, payload)) ------
DTYPES = ("uint8", "int8", "uint16", "int16", "uint32", "int32", "uint64", "int64",
          "float16", "float32", "float64", "bool", "string")
DTYPE = Enum(*DTYPES)
TENSOR = Record(
    ("name", String()),
    ("dtype", DTYPE),
    ("shape", List(U64())),
    ("data", Variant(("raw", Bytes()), ("text", List(String())))),
)
INFER_ERRORS = ("invalid-argument", "model-not-found", "model-not-allowed", "invalid-tensor", "runtime",
                "too-many-calls", "tensor-too-large")
INFER_ERROR = Variant(*((case, String()) for case in INFER_ERRORS))
LEVEL = Enum("debug", "info", "warn", "error")
FAILURE = Record(("message", String()), ("traceback", String()))
HANDLE = ComponentFunc(
    HANDLER, "handle",
    (("request", Record(("body", Bytes()), ("content-type", String()))),),
    Result(
        Record(("body", Bytes()), ("content-type", String())),
        Variant(("rejected", Record(("status", U16()), ("message", String()))), ("failed", FAILURE),
                ("out-of-memory", FAILURE), ("infer", INFER_ERROR)),
    ),
)

# numpy dtypes of the raw dtypes (bool travels as uint8 0/1)
_NUMPY = {name: np.dtype(name).newbyteorder("<") for name in DTYPES if name not in ("bool", "string")}
_NUMPY["bool"] = np.dtype(np.uint8)


# --- host functions ----------------------------------------------------------------------------------
def _fail(state: InvocationState, case: str, error: WasminferError) -> tuple[bool, Any]:
    state.infer_error = error
    return False, (case, error.message)


def _infer(state: InvocationState, model: str, inputs: list[tuple[Any, ...]]) -> tuple[bool, Any]:
    m = state.manifest
    limit_err = state.count_infer("called infer {} times")
    if limit_err is not None:
        return _fail(state, "too-many-calls", limit_err)
    if not m.allows(model):
        return _fail(state, "model-not-allowed", ModelNotAllowed(state.function, model))
    try:
        arrays = _arrays(inputs, m.max_tensor_bytes)
    except TensorTooLarge as exc:
        return _fail(state, "tensor-too-large", exc)
    except InvalidTensor as exc:
        return _fail(state, "invalid-argument", exc)
    try:
        outputs = state.run_model(model, arrays)
    except handler.INFER_FAILURES as exc:
        return _fail(state, handler.infer_failure(exc), exc)
    tensors = [_tensor(name, array) for name, array in outputs.items()]
    state.infer_error = None
    return True, tensors


def _arrays(inputs: list[tuple[Any, ...]], max_tensor_bytes: int) -> dict[str, np.ndarray]:
    """The guest's tensors as numpy arrays (views of the lifted bytes). Raises `InvalidTensor` or
    `TensorTooLarge` with the messages the handler ABI's codec gives."""
    if len(inputs) > MAX_TENSORS:
        raise InvalidTensor(f"{len(inputs)} tensors in one call; at most {MAX_TENSORS} are accepted")
    arrays: dict[str, np.ndarray] = {}
    for name, dtype, shape, (case, payload) in inputs:
        if not name:
            raise InvalidTensor("tensor names must not be empty")
        if name in arrays:
            raise InvalidTensor(f"tensor {name!r} is given twice")
        if len(shape) > MAX_RANK:
            raise InvalidTensor(f"tensor {name!r} has rank {len(shape)}; at most {MAX_RANK} is accepted")
        count = math.prod(shape)
        if dtype == "string":
            if case != "text":
                raise InvalidTensor(f"tensor {name!r} of dtype string must carry text, not raw bytes")
            if len(payload) != count:
                raise InvalidTensor(f"text tensor {name!r} has {len(payload)} strings; shape {list(shape)} "
                                    f"needs {count}")
            text_bytes = sum(len(s.encode()) for s in payload)
            if text_bytes > max_tensor_bytes:
                raise TensorTooLarge(f"tensor {name!r} has {text_bytes} bytes of text; the limit is "
                                     f"{max_tensor_bytes}")
            array = np.empty(count, dtype=object)
            array[:] = payload
        else:
            if case != "raw":
                raise InvalidTensor(f"tensor {name!r} of dtype {dtype} must carry raw bytes, not text")
            np_dtype = _NUMPY[dtype]
            nbytes = count * np_dtype.itemsize
            if len(payload) != nbytes:
                raise InvalidTensor(f"tensor {name!r} has {len(payload)} bytes of data; shape {list(shape)} "
                                    f"of {dtype} needs {nbytes}")
            if nbytes > max_tensor_bytes:
                raise TensorTooLarge(f"tensor {name!r} has {nbytes} bytes of data; the limit is "
                                     f"{max_tensor_bytes}")
            array = np.frombuffer(payload, dtype=np_dtype)
            if dtype == "bool":
                array = array != 0
        try:
            arrays[name] = array.reshape(shape)
        except ValueError:  # zero-size tensors whose other dims numpy cannot hold
            raise InvalidTensor(f"tensor {name!r} has dims {list(shape)}, which are too large") from None
    return arrays


def _tensor(name: str, array: np.ndarray) -> tuple[Any, ...]:
    array = np.asarray(array)
    shape = list(array.shape)
    kind = array.dtype.kind
    if kind in "UO":
        items = [item for item in array.flat]
        if not all(isinstance(item, str) for item in items):
            raise InvalidTensor(f"output {name!r} is an object array holding more than str")
        return name, "string", shape, ("text", items)
    if kind == "b":
        return name, "bool", shape, ("raw", array.astype(np.uint8).tobytes())
    dtype = array.dtype.newbyteorder("<")
    if dtype.name not in _NUMPY or dtype.name == "bool":
        raise InvalidTensor(f"output {name!r} has dtype {array.dtype}, which the world cannot carry")
    return name, dtype.name, shape, ("raw", np.ascontiguousarray(array, dtype=dtype).tobytes())


def _log(state: InvocationState, level: str, message: str) -> None:
    state.log(message.encode("utf-8", "replace"), level)


HOST_FUNCS = (
    ComponentHostFunc(INFERENCE, "infer", (("model", String()), ("inputs", List(TENSOR))),
                      Result(List(TENSOR), INFER_ERROR), _infer),
    ComponentHostFunc(LOGGING, "log", (("level", LEVEL), ("message", String())), None, _log),
)


# --- upload ------------------------------------------------------------------------------------------
def _provided(name: str) -> bool:
    # WASI 0.2 comes from wasmtime (which versions it links is its business: a version it does not
    # have fails the instantiation at deploy); `types` holds types only, nothing to link.
    return name.startswith("wasi:") or name == TYPES


def compile_component(engine: Engine, wasm: bytes, sha256: str) -> CompiledComponent:
    """Compiles (or loads from the disk cache) a component and checks it targets this world.

    Raises `InvalidModule`: not a valid component, imports the host does not provide, or no
    `wasminfer:function/handler@0.1.0#handle` of the world's type.
    """
    linker = ComponentLinker.for_engine(engine, HOST_FUNCS)
    try:
        compiled = linker.compile(wasm, sha256)
    except WasmLinkError as exc:
        raise InvalidModule(f"invalid WebAssembly component: {exc}") from None
    unknown = compiled.unknown_imports(_provided)
    if unknown:
        raise InvalidModule(
            "the component imports what this host does not provide: " + ", ".join(unknown[:10])
            + (" (this host serves the world wasminfer:function@" + VERSION + " and WASI 0.2; "
               "see guest-sdk/wit/world.wit)")
        )
    try:
        validate(compiled)
    except WasmLinkError as exc:
        raise InvalidModule(f"not a valid {NAME} function: {exc}") from None
    return compiled


def detect(compiled: Any) -> bool:
    return isinstance(compiled, CompiledComponent)


def validate(compiled: CompiledComponent) -> None:
    """Raises `WasmLinkError` unless the component exports the world's handler, and imports the
    host's functions, with exactly the world's types (what the schemas above assume)."""
    found = compiled.func_type(HANDLE.interface, HANDLE.name)
    if found is None:
        others = [n for n in compiled.exports if re.match(r"wasminfer:function/handler@", n)]
        raise WasmLinkError(
            f"it exports {others[0]}, a version of the world this host does not serve (it serves {VERSION})"
            if others else f"it does not export {HANDLER} (build it against guest-sdk/wit/world.wit)"
        )
    if found != HANDLE.wit():
        raise WasmLinkError(f"{HANDLER}#handle has type {found}, expected {HANDLE.wit()}")
    imported = compiled.import_types()
    for hf in HOST_FUNCS:
        ty = imported.get((hf.interface, hf.name))
        if ty is not None and ty != hf.wit():
            raise WasmLinkError(f"it imports {hf.interface}#{hf.name} as {ty}, expected {hf.wit()}")


# --- instances and invocations -----------------------------------------------------------------------
_MEMORY_MINIMUM = re.compile(r"memory minimum size of (\d+) pages exceeds memory limits")


def instantiate(compiled: CompiledComponent, manifest: Manifest, state: CallState,
                output: Callable[[str, bytes], None] | None) -> ComponentInstance:
    """A new instance. Raises `InvalidManifest` if the component needs more memory at start than
    `memory_mb` (a Python function needs ~13 MiB before its first request), `WasmLinkError` if
    it cannot be instantiated otherwise."""
    try:
        return compiled.instantiate(memory_bytes=manifest.memory_mb << 20, timeout_ms=manifest.timeout_ms,
                                    exports=(HANDLE,), output=output)
    except WasmLinkError as exc:
        found = _MEMORY_MINIMUM.search(str(exc))
        if found is None:
            raise
        need = int(found.group(1)) * 65536 / (1 << 20)
        raise InvalidManifest.for_key(
            "memory_mb",
            f"is {manifest.memory_mb}, less than the {need:.1f} MiB of memory the component needs at "
            "start: raise it (a Python function needs room beyond that for its requests)",
        ) from None


def invoke(inst: ComponentInstance, body: bytes, content_type: str, state: InvocationState) -> bool:
    """Runs one request through `handle`. Returns whether the instance may be reused.

    Raises the precise `WasminferError` for every failure, as `handler.invoke` does; the instance
    is then not reusable if the failure was a trap, a timeout, a limit or a MemoryError.
    """
    m = state.manifest
    try:
        ok, value = inst.call(HANDLE.name, [(body, content_type)], state, m.timeout_ms)
    except WasmTrap as trap:
        state.discard = True
        raise _trap_error(trap, inst, state) from None
    if state.limit_error is not None:
        state.discard = True
        raise state.limit_error
    if ok:
        out, ctype = value
        if len(out) > m.max_output_bytes:
            state.discard = True
            raise OutputLimitExceeded.exceeded(
                state.function, f"produced {len(out)} bytes of output", m.max_output_bytes
            )
        state.output = out
        state.content_type = ctype[:1024].strip() or DEFAULT_CONTENT_TYPE
        return True
    case, payload = value
    if case in ("failed", "out-of-memory") and payload[1]:
        state.logs.append("log", _tail(payload[1]), "error", state.invocation_id)
    if case == "out-of-memory":
        state.discard = True
        raise MemoryLimitExceeded.exceeded(
            state.function, "ran out of memory", m.memory_mb, f": {payload[0]}"
        )
    if state.infer_error is not None:  # the last infer failed: the caller gets what to fix
        raise state.infer_error
    if case == "infer":  # no infer call failed: the guest made the error up, and gets a 500
        raise GuestError(f"function {state.function!r} failed: {payload[0]}: {payload[1]}")
    if case == "rejected":
        status, message = payload
        message = message or f"function {state.function!r} rejected the request"
        raise GuestRejected(status, message) if 400 <= status <= 499 else GuestError(message)
    raise GuestError((payload[0] or f"function {state.function!r} failed") + where_raised(payload[1]))


# What CPython and Rust print to stderr when an allocation fails where Python cannot raise (say, while
# componentize-py lifts the request): the trap that follows is the memory limit's doing.
_OUT_OF_MEMORY = ("MemoryError", "memory allocation of ")


def _trap_error(trap: WasmTrap, inst: ComponentInstance, state: InvocationState) -> WasminferError:
    m = state.manifest
    if trap.kind == "transfer" and state.fault is None:
        return OutputLimitExceeded(
            f"function {state.function!r} passed more data to the host in one call (its response or an "
            "infer input) than a component may: about 2 MiB, as wasmtime copies every byte as a value of its "
            "own (hostcall fuel)"
        )
    if trap.kind == "unreachable" and state.fault is None:
        stderr = [ln.message for ln in state.logs.tail(20)
                  if ln.invocation == state.invocation_id and ln.stream == "stderr"]
        if any(marker in line for line in stderr for marker in _OUT_OF_MEMORY):
            return MemoryLimitExceeded.exceeded(
                state.function, "ran out of memory and aborted", m.memory_mb, ": see its stderr in the logs"
            )
    return handler._trap_error(trap, inst, state)


def _tail(text: str) -> str:
    """A traceback for the log buffer, whose lines hold 4 KiB: its end says what went wrong."""
    text = text.rstrip("\n")
    return text if len(text) <= MAX_MESSAGE else "…" + text[-(MAX_MESSAGE - 1):]


__all__ = ["BINARY_VERSION", "HANDLER", "HOST_FUNCS", "NAME", "compile_component", "detect", "instantiate",
           "invoke", "validate"]
