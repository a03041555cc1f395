"""The handler ABI v1 (guest-sdk/ABI.md): the `wasminfer` host imports and one invocation.

Host imports here never touch wasmtime: they get a `GuestMemory` whose every access is bounds-
checked (a bad pointer raises `GuestFault`, which traps the guest) and a per-call
`InvocationState`. Limit violations are raised as their own `WasminferError`; `_wasm` turns any
exception into a trap and keeps it in `state.fault`, and `invoke` raises it after the call.

Over 500 lines and one concept, the handler ABI: its imports (infer, decoder steps, output and its
parts, errors, logs) share `InvocationState` and the error codes `wasminfer.h` names, and are the
list `ABI.md` documents in one place.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Protocol

import numpy as np

from wasminfer.errors import (
    DecoderNotFound,
    GuestError,
    GuestRejected,
    GuestTrap,
    InferenceFailed,
    InferLimitExceeded,
    InvalidTensor,
    InvocationCancelled,
    LogLimitExceeded,
    MemoryLimitExceeded,
    ModelNotAllowed,
    ModelNotFound,
    OutputLimitExceeded,
    TensorTooLarge,
    Timeout,
    WasminferError,
)
from wasminfer.manifest import Manifest
from wasminfer.models import ModelRegistry
from wasminfer.models.batching import Stack
from wasminfer.models.codec import decode_tensors, encode_tensors
from wasminfer.runtime._engine import CallState
from wasminfer.runtime._traps import GuestFault, Interrupted, WasmLinkError, WasmTrap
from wasminfer.runtime._wasm import CompiledModule, GuestMemory, HostFunc, WasmInstance
from wasminfer.runtime.decoders import InvocationDecoders
from wasminfer.runtime.logs import LEVELS, LogBuffer
from wasminfer.runtime.memory import MEMORY_REFUSALS, MemoryBudget, TenantMemory
from wasminfer.runtime.streams import OutputStream

NAME = "handler"
ABI_MARKER = "wasminfer_abi_v1"
EXPORT_ALLOC = "wasminfer_alloc"
EXPORT_HANDLE = "wasminfer_handle"
#: Optional: a buffer the guest keeps for requests, so that one that fits needs no `wasminfer_alloc`
#: call (ABI.md, "The inbox"); asked for once per instance.
EXPORT_INBOX = "wasminfer_inbox"
EXPORT_INBOX_SIZE = "wasminfer_inbox_size"
CALLS = ((EXPORT_ALLOC, 1), (EXPORT_HANDLE, 4))
_STARTING_CALLS = (*CALLS, ("_initialize", 0), (EXPORT_INBOX, 0), (EXPORT_INBOX_SIZE, 0))

E_INVALID_ARGUMENT = 1
E_NOT_FOUND = 2
E_NOT_ALLOWED = 3
E_INVALID_TENSOR = 4
E_RUNTIME = 5
E_TOO_SMALL = 6
E_NO_RESULT = 7
E_LIMIT = 8

MAX_MESSAGE = 4096
DEFAULT_CONTENT_TYPE = "application/octet-stream"

class InferFn(Protocol):
    """`ModelRegistry.infer`: runs a model, stopped at `deadline_ns` (then it raises `Timeout`)."""

    def __call__(self, name: str, inputs: Mapping[str, np.ndarray], *, deadline_ns: int | None = None,
                 stack: Stack | None = None) -> dict[str, np.ndarray]: ...


def run_model(state: CallState, infer: InferFn, model: str, inputs: Mapping[str, np.ndarray],
              stack: Stack | None = None) -> dict[str, np.ndarray]:
    """`infer(model, inputs)` under the invocation's deadline, for every ABI's infer import
    (`stack`: how the call may share a batched run, see `ModelRegistry.infer`).

    A run still going at the deadline is stopped and the guest call ends as a timeout: raises
    `Interrupted` then (which traps the guest), and what `infer` raises otherwise.
    """
    try:
        return infer(model, inputs, deadline_ns=state.deadline_ns, stack=stack)
    except Timeout as exc:
        raise Interrupted("timeout", exc.message) from None


#: What an infer call of a WIT-world guest (components, the Python runtime) gets back when the model
#: cannot answer: the world's error variant for each error `run_model` raises.
INFER_FAILURES = (ModelNotFound, InvalidTensor, InferenceFailed)


def infer_failure(exc: WasminferError) -> str:
    """The WIT world's variant for one of `INFER_FAILURES`."""
    if isinstance(exc, ModelNotFound):
        return "model-not-found"
    return "invalid-tensor" if isinstance(exc, InvalidTensor) else "runtime"


class InvocationState(CallState):
    """Everything one invocation of one function needs in its host imports.

    What starts the same in every invocation is a class default (the instance takes its own value
    when one is set): an empty handler's whole invoke costs ~15 µs, and setting two dozen attributes
    per call took ~1.5 µs of it."""

    output: bytes | None = None
    content_type = DEFAULT_CONTENT_TYPE
    error_message: str | None = None
    pending: bytes | None = None
    last_error = b""
    infer_error: WasminferError | None = None  # the last infer failure, cleared by a success
    #: A limit hit: fails the invocation whatever the guest does.
    limit_error: WasminferError | None = None
    infer_calls = 0
    infer_ns = 0
    log_bytes = 0
    discard = False  # the instance must not be reused (trap, timeout, limit)
    alloc_failed = False  # the request buffer could not be allocated (before the handler ran)
    nn_error: str | None = None  # the last failed wasi-nn call, cleared by a successful compute
    nn_errors = 0  # failed wasi-nn calls (the first few are logged)
    #: Where the parts the guest writes go while it runs (None: kept in `chunks`, see `streams`).
    stream: OutputStream | None = None
    streamed_bytes = 0
    streamed_type: str | None = None  # the content type of the first part
    boundary_bytes = 0  # bytes of tensors and frames that crossed in and out of the guest
    decoders: InvocationDecoders | None = None  # made by `decoder_states`
    memory: TenantMemory | None = None  # the tenant's account, for decoder states (set by the host)

    def __init__(self, function: str, manifest: Manifest, infer: InferFn, logs: LogBuffer,
                 invocation_id: str, models: ModelRegistry | None = None) -> None:
        self.function = function
        self.manifest = manifest
        self.infer = infer
        self.models = models  # the host's registry, for what `infer` does not tell (wasi-nn's model specs)
        self.logs = logs
        self.invocation_id = invocation_id
        self.chunks = bytearray()

    def count_infer(self, did: str) -> InferLimitExceeded | None:
        """Counts one inference of the invocation (every ABI's infer import). Past the manifest's
        `max_infer_calls` returns the limit error, which is also the invocation's `limit_error` unless
        another came first; `did` tells what the guest did, `{}` standing for the count."""
        self.infer_calls += 1
        limit = self.manifest.max_infer_calls
        if self.infer_calls <= limit:
            return None
        err = InferLimitExceeded.exceeded(self.function, f"{did.format(self.infer_calls)} in one invocation",
                                          limit)
        self.limit_error = self.limit_error or err
        return err

    def run_model(self, model: str, inputs: Mapping[str, np.ndarray],
                  stack: Stack | None = None) -> dict[str, np.ndarray]:
        """`run_model` for this invocation's infer import, its time counted in `infer_ns`."""
        t0 = time.perf_counter_ns()
        try:
            return run_model(self, self.infer, model, inputs, stack)
        finally:
            self.infer_ns += time.perf_counter_ns() - t0

    def _waited(self, ns: int) -> None:
        """Time a decoder's next token waited for its step run ahead: inference, as `run_model`'s."""
        self.infer_ns += ns

    def decoder_states(self) -> InvocationDecoders:
        """The invocation's decoder states (`runtime.decoders`), made on first use."""
        if self.decoders is None:
            if self.models is None:
                raise InferenceFailed("decoder states need the host's model registry")
            memory = self.memory or MemoryBudget.unlimited().tenant("default")
            self.decoders = InvocationDecoders(self, self.models, memory, waited=self._waited)
        return self.decoders

    def check_output(self, nbytes: int) -> None:
        """Raises `OutputLimitExceeded` (also the invocation's `limit_error`) if `nbytes` more bytes of
        output would take the invocation past the manifest's `max_output_bytes`: the parts written and
        the last `output` set count together."""
        total = self.streamed_bytes + nbytes
        limit = self.manifest.max_output_bytes
        if total > limit:
            err = OutputLimitExceeded.exceeded(self.function, f"produced {total} bytes of output", limit)
            self.limit_error = self.limit_error or err
            raise err

    def write_chunk(self, data: bytes, content_type: str) -> None:
        """One part of the answer, sent at once when the invocation streams (`stream`), else kept
        in `chunks`. Raises `Interrupted` once the stream was cancelled (the client left) or the
        deadline passed, `OutputLimitExceeded` past `max_output_bytes`."""
        self.check()
        self.check_output(len(data) + len(self.output or b""))
        self.streamed_bytes += len(data)
        if self.streamed_type is None:
            self.streamed_type = content_type or DEFAULT_CONTENT_TYPE
        if self.stream is None:
            self.chunks += data
        elif data:
            self.stream.write(data, self.streamed_type)

    def answer(self) -> tuple[bytes, str]:
        """The body and content type of the one answer: the parts kept, then the last `output` set."""
        body = self.output or b""
        if self.chunks:
            body = bytes(self.chunks) + body
        if self.output is None and self.streamed_type is not None:
            return body, self.streamed_type
        return body, self.content_type

    def log(self, raw: bytes, level: str) -> None:
        """Appends a line the guest logs to the function's logs (cut at `MAX_MESSAGE` bytes, the cut marked).
        Raises `LogLimitExceeded`, which becomes the invocation's `limit_error`, once the invocation
        has logged more than the manifest's `max_log_bytes`."""
        self.log_bytes += len(raw)
        limit = self.manifest.max_log_bytes
        if self.log_bytes > limit:
            err = LogLimitExceeded.exceeded(
                self.function, f"tried to log {self.log_bytes} bytes in one invocation", limit
            )
            self.limit_error = err
            raise err
        # A byte past the limit: the log buffer cuts the line there and marks the cut.
        self.logs.append("log", raw[: MAX_MESSAGE + 1].decode("utf-8", "replace"), level, self.invocation_id)


def _fail(state: InvocationState, code: int, error: WasminferError) -> int:
    state.infer_error = error
    state.last_error = error.message.encode()
    return -code


def _host_failure(state: InvocationState, exc: WasminferError) -> int:
    """The handler ABI's answer to a host error met while serving an infer or a decoder call: the
    error kept for `last_error`, its code returned (negative). A memory refusal is also the
    invocation's limit error."""
    if isinstance(exc, MEMORY_REFUSALS):
        state.limit_error = state.limit_error or exc
        return _fail(state, E_LIMIT, exc)
    if isinstance(exc, (ModelNotFound, DecoderNotFound)):
        return _fail(state, E_NOT_FOUND, exc)
    if isinstance(exc, InvalidTensor):
        return _fail(state, E_INVALID_TENSOR, exc)
    if isinstance(exc, InferenceFailed):
        return _fail(state, E_RUNTIME, exc)
    return _fail(state, E_LIMIT, exc)  # InferLimitExceeded


def _begin(state: InvocationState, mem: GuestMemory, call: str, in_ptr: int, in_len: int, out_ptr: int,
           out_cap: int, counted: str) -> bytes | int:
    """What every call that takes tensors and answers tensors does first: reads its input, checks
    its output buffer (a bad pointer traps), forgets the last pending answer, and counts the call
    against `max_infer_calls`. Returns the input's bytes, or the (negative) code of a refusal."""
    data = mem.read(in_ptr, in_len)
    mem.read(out_ptr, 0)
    if out_cap and out_ptr + out_cap > mem.size():
        raise GuestFault(f"{call}: output buffer [{out_ptr}, {out_ptr + out_cap}) is outside guest memory")
    state.pending = None
    limit_err = state.count_infer(counted)
    return data if limit_err is None else _fail(state, E_LIMIT, limit_err)


def _inputs(state: InvocationState, data: bytes) -> dict[str, np.ndarray] | int:
    """The tensors a guest sent, or the (negative) code of a refusal."""
    try:
        return decode_tensors(data, max_tensor_bytes=state.manifest.max_tensor_bytes)
    except TensorTooLarge as exc:
        return _fail(state, E_LIMIT, exc)
    except InvalidTensor as exc:
        return _fail(state, E_INVALID_ARGUMENT, exc)


def _answer(state: InvocationState, mem: GuestMemory, in_len: int, outputs: Mapping[str, np.ndarray],
            out_ptr: int, out_cap: int) -> int:
    """Writes `outputs` to the guest's buffer when they fit (else keeps them for `infer_result`)
    and returns their encoded length."""
    encoded = encode_tensors(outputs)
    state.boundary_bytes += in_len + len(encoded)
    state.infer_error = None
    if len(encoded) <= out_cap:
        mem.write(out_ptr, encoded)
    else:
        state.pending = encoded
    return len(encoded)


def _model_name(state: InvocationState, raw: bytes, call: str) -> str | int:
    """A model name the guest sent, allowed by the manifest; or the (negative) code of a refusal."""
    try:
        model = raw.decode("utf-8")
    except UnicodeDecodeError:
        return _fail(state, E_INVALID_ARGUMENT, InvalidTensor(f"{call}: the model name is not valid UTF-8"))
    if not state.manifest.allows(model):
        return _fail(state, E_NOT_ALLOWED, ModelNotAllowed(state.function, model))
    return model


def _infer(state: InvocationState, mem: GuestMemory, model_ptr: int, model_len: int, in_ptr: int,
           in_len: int, out_ptr: int, out_cap: int) -> int:
    name_raw = mem.read(model_ptr, model_len)
    data = _begin(state, mem, "infer", in_ptr, in_len, out_ptr, out_cap, "called infer {} times")
    if isinstance(data, int):
        return data
    model = _model_name(state, name_raw, "infer")
    if isinstance(model, int):
        return model
    inputs = _inputs(state, data)
    if isinstance(inputs, int):
        return inputs
    t0 = time.perf_counter_ns()
    try:
        outputs = run_model(state, state.infer, model, inputs)
    except (ModelNotFound, InvalidTensor, InferenceFailed) as exc:
        return _host_failure(state, exc)
    finally:
        state.infer_ns += time.perf_counter_ns() - t0
    return _answer(state, mem, in_len, outputs, out_ptr, out_cap)


def _decoder_open(state: InvocationState, mem: GuestMemory, model_ptr: int, model_len: int) -> int:
    model = _model_name(state, mem.read(model_ptr, model_len), "decoder_open")
    if isinstance(model, int):
        return model
    try:
        return state.decoder_states().open(model, state.function)
    except (ModelNotFound, InvalidTensor, InferLimitExceeded, *MEMORY_REFUSALS) as exc:
        return _host_failure(state, exc)


def _decoder_step(state: InvocationState, mem: GuestMemory, handle: int, in_ptr: int, in_len: int,
                  out_ptr: int, out_cap: int) -> int:
    data = _begin(state, mem, "decoder_step", in_ptr, in_len, out_ptr, out_cap,
                  "ran {} inferences and decoder steps")
    if isinstance(data, int):
        return data
    inputs = _inputs(state, data)
    if isinstance(inputs, int):
        return inputs
    try:
        spec, outputs = state.decoder_states().step(handle, inputs, state.run_model)
    except (DecoderNotFound, ModelNotFound, InvalidTensor, InferenceFailed, *MEMORY_REFUSALS) as exc:
        return _host_failure(state, exc)
    return _answer(state, mem, in_len, spec.split(outputs)[0], out_ptr, out_cap)


def _decoder_close(state: InvocationState, mem: GuestMemory, handle: int) -> int:
    try:
        state.decoder_states().close_one(handle)
    except DecoderNotFound as exc:
        return _fail(state, E_NOT_FOUND, exc)
    return 0


def _infer_result(state: InvocationState, mem: GuestMemory, out_ptr: int, out_cap: int) -> int:
    pending = state.pending
    if pending is None:
        state.last_error = b"infer_result: no pending result"
        return -E_NO_RESULT
    if len(pending) > out_cap:
        mem.read(out_ptr, min(out_cap, 0))
        state.last_error = f"infer_result: buffer of {out_cap} bytes, result has {len(pending)}".encode()
        return -E_TOO_SMALL
    mem.write(out_ptr, pending)
    state.pending = None
    return len(pending)


def _last_error(state: InvocationState, mem: GuestMemory, buf: int, cap: int) -> int:
    msg = state.last_error
    if cap:
        mem.write(buf, msg[:cap])
    return len(msg)


def _output(state: InvocationState, mem: GuestMemory, body_ptr: int, body_len: int, ct_ptr: int,
            ct_len: int) -> int:
    state.check_output(body_len)
    body = mem.read(body_ptr, body_len)
    ctype = mem.read(ct_ptr, min(ct_len, 1024)).decode("utf-8", "replace").strip()
    state.output = body
    state.content_type = ctype or DEFAULT_CONTENT_TYPE
    return 0


def _output_chunk(state: InvocationState, mem: GuestMemory, body_ptr: int, body_len: int, ct_ptr: int,
                  ct_len: int) -> int:
    state.check_output(body_len + len(state.output or b""))
    body = mem.read(body_ptr, body_len)
    ctype = mem.read(ct_ptr, min(ct_len, 1024)).decode("utf-8", "replace").strip()
    state.write_chunk(body, ctype)
    return 0


def _error(state: InvocationState, mem: GuestMemory, msg_ptr: int, msg_len: int) -> None:
    state.error_message = mem.read(msg_ptr, min(msg_len, MAX_MESSAGE)).decode("utf-8", "replace")


def _log(state: InvocationState, mem: GuestMemory, level: int, msg_ptr: int, msg_len: int) -> None:
    state.log(mem.read(msg_ptr, msg_len), LEVELS[level] if 0 <= level < len(LEVELS) else "info")


HOST_FUNCS = (
    HostFunc("wasminfer", "infer", ("i32",) * 6, ("i32",), _infer),
    HostFunc("wasminfer", "infer_result", ("i32",) * 2, ("i32",), _infer_result),
    HostFunc("wasminfer", "last_error", ("i32",) * 2, ("i32",), _last_error),
    HostFunc("wasminfer", "output", ("i32",) * 4, ("i32",), _output),
    HostFunc("wasminfer", "output_chunk", ("i32",) * 4, ("i32",), _output_chunk),
    HostFunc("wasminfer", "decoder_open", ("i32",) * 2, ("i32",), _decoder_open),
    HostFunc("wasminfer", "decoder_step", ("i32",) * 5, ("i32",), _decoder_step),
    HostFunc("wasminfer", "decoder_close", ("i32",), ("i32",), _decoder_close),
    HostFunc("wasminfer", "error", ("i32",) * 2, (), _error),
    HostFunc("wasminfer", "log", ("i32",) * 3, (), _log),
)


def detect(compiled: CompiledModule) -> bool:
    return ABI_MARKER in compiled.exports or EXPORT_HANDLE in compiled.exports


def validate(compiled: CompiledModule) -> None:
    """Raises `WasmLinkError` unless the module follows handler ABI v1."""
    if "memory" not in compiled.exports or compiled.exports["memory"].kind != "memory":
        raise WasmLinkError("a handler module must export its 'memory'")
    compiled.require_func(EXPORT_ALLOC, ("i32",), ("i32",))
    compiled.require_func(EXPORT_HANDLE, ("i32",) * 4, ("i32",))
    if "_initialize" in compiled.exports:
        compiled.require_func("_initialize", (), ())
    inbox = [name for name in (EXPORT_INBOX, EXPORT_INBOX_SIZE) if name in compiled.exports]
    if inbox and len(inbox) != 2:
        raise WasmLinkError(f"a handler module that exports {inbox[0]!r} must export both "
                            f"{EXPORT_INBOX!r} and {EXPORT_INBOX_SIZE!r}")
    for name in inbox:
        compiled.require_func(name, (), ("i32",))


def instantiate(compiled: CompiledModule, manifest: Manifest, state: CallState,
                output: Callable[[str, bytes], None] | None) -> WasmInstance:
    inst = compiled.instantiate(
        memory_bytes=manifest.memory_mb << 20,
        timeout_ms=manifest.timeout_ms,
        calls=_STARTING_CALLS,
        output=output,
    )
    try:
        if inst.has("_initialize"):
            inst.call("_initialize", (), state, manifest.timeout_ms, nresults=0)
        if inst.has(EXPORT_INBOX):
            inst.inbox = _inbox(inst, state)
    except BaseException:
        inst.close()
        raise
    return inst


def _inbox(inst: WasmInstance, state: CallState) -> tuple[int, int] | None:
    """The instance's request inbox `(address, capacity)`, None for a capacity of 0. Raises
    `WasmLinkError` for a range outside its memory as it is now (a memory never shrinks)."""
    address = inst.call(EXPORT_INBOX, (), state) & 0xFFFFFFFF
    capacity = inst.call(EXPORT_INBOX_SIZE, (), state) & 0xFFFFFFFF
    if capacity == 0:
        return None
    if address == 0 or address + capacity > inst.memory_size():
        raise WasmLinkError(f"{EXPORT_INBOX} and {EXPORT_INBOX_SIZE} give bytes {address}-"
                            f"{address + capacity} of a memory of {inst.memory_size()}: an inbox must lie "
                            "inside it")
    return address, capacity


def invoke(inst: WasmInstance, body: bytes, content_type: str, state: InvocationState) -> bool:
    """Runs one request through `wasminfer_handle`. Returns whether the instance may be reused.

    Raises the precise `WasminferError` for every failure (see ABI.md); the instance is then not
    reusable if the failure was a trap, a timeout, or a memory limit.
    """
    m = state.manifest
    ctype = content_type.encode("utf-8", "replace")
    total = len(body) + len(ctype)
    try:
        inbox = inst.inbox
        if inbox is not None and total <= inbox[1]:
            ptr = inbox[0]
            inst.start_deadline(state, m.timeout_ms)  # as the alloc call would have
        else:
            ptr = inst.call(EXPORT_ALLOC, (total,), state, m.timeout_ms)
        if ptr == 0 and total > 0:
            state.alloc_failed = True
            raise MemoryLimitExceeded.exceeded(
                state.function, f"could not allocate {total} bytes for the request", m.memory_mb
            )
        mem = inst.memory()
        try:
            mem.write(ptr & 0xFFFFFFFF, body)
            mem.write((ptr & 0xFFFFFFFF) + len(body), ctype)
        except GuestFault as exc:
            raise GuestTrap(f"wasminfer_alloc returned an invalid pointer: {exc}") from None
        status = inst.call(EXPORT_HANDLE, (ptr, len(body), ptr + len(body), len(ctype)), state)
    except WasmTrap as trap:
        state.discard = True
        raise _trap_error(trap, inst, state) from None
    except MemoryLimitExceeded:
        state.discard = True
        raise
    if state.limit_error is not None:
        state.discard = True
        raise state.limit_error
    if status != 0:
        if inst.near_memory_limit():
            state.discard = True
            raise MemoryLimitExceeded.exceeded(
                state.function,
                f"failed (status {status}) with its memory full",
                m.memory_mb,
                f": {state.error_message}" if state.error_message else "",
            )
        if state.infer_error is not None:
            raise state.infer_error
        if 400 <= status <= 499:
            message = state.error_message or f"function {state.function!r} rejected the request"
            raise GuestRejected(status, message)
        raise GuestError(state.error_message or f"function {state.function!r} returned status {status}")
    state.discard = inst.at_memory_limit()
    return not state.discard


class MemoryProbe(Protocol):
    """What `_trap_error` asks of the instance that trapped (a stand-in where none was made)."""

    def near_memory_limit(self) -> bool: ...


def _trap_error(trap: WasmTrap, inst: MemoryProbe, state: InvocationState) -> WasminferError:
    m = state.manifest
    if trap.kind == "cancelled":
        if isinstance(state.cancelled, WasminferError):
            return state.cancelled
        return InvocationCancelled(f"the invocation of function {state.function!r} was cancelled")
    if trap.kind == "timeout":
        return Timeout.exceeded(state.function, "ran past its timeout", m.timeout_ms)
    if state.fault is not None:
        if isinstance(state.fault, WasminferError):
            return state.fault
        if isinstance(state.fault, GuestFault):
            return GuestTrap(f"function {state.function!r} trapped: {state.fault}")
        return GuestTrap(f"function {state.function!r} trapped in a host import: {state.fault!r}")
    if inst.near_memory_limit():
        return MemoryLimitExceeded.exceeded(
            state.function, f"trapped ({trap.message}) with its memory full", m.memory_mb
        )
    what = "stack overflow" if trap.kind == "stack_overflow" else trap.message
    return GuestTrap(f"function {state.function!r} trapped: {what}")


__all__ = ["HOST_FUNCS", "InferFn", "InvocationState", "NAME", "detect", "invoke", "instantiate", "run_model",
           "validate"]
