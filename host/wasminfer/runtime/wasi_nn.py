"""WASI-NN, the legacy witx ABI (`wasi_ephemeral_nn`), over the shared model registry.

Programs written for WasmEdge or Wasmtime's wasi-nn (the Rust `wasi-nn` crate 0.6, the WasmEdge
WASINN examples) run unmodified: `load_by_name` resolves to a model deployed on this host (subject
to the function's manifest allowlist) and every `compute` goes through `ModelRegistry.infer`, so
thousands of instances share one ONNX Runtime session. See guest-sdk/WASI-NN.md for the contract.

Graphs and execution contexts are per-instance handles, kept in an `NnState` stored in the
instance's `host_state` and closed with it. Graphs loaded from guest bytes (`load`, only with the
manifest key `allow_guest_models`) live in a `ModelRegistry` of the instance's own: validated like
every upload, served by the same `infer`, invisible to every other instance and function (no name
any manifest could list reaches them), and freed with the instance.

Every call returns an `nn_errno`; a failure also keeps its message (`InvocationState.nn_error`,
the function's log) and, where one exists, the `WasminferError` a handler module's failure reports
(`InvocationState.infer_error`). Pointers outside guest memory trap the guest, as in handler ABI v1.

Over 500 lines and one concept, the `wasi_ephemeral_nn` module: every call reads and changes the
same per-instance graph and context tables (`NnState`), and WasmEdge's single-step calls
(`compute_single`, `fini_single`) step the same contexts.
"""

from __future__ import annotations

import math
import struct
import time
from dataclasses import dataclass, field
from typing import Any, NoReturn

import numpy as np

from wasminfer.errors import (
    InferenceFailed,
    InferLimitExceeded,
    InvalidModel,
    InvalidTensor,
    ModelNotAllowed,
    ModelNotFound,
    TensorTooLarge,
    WasminferError,
)
from wasminfer.models import ModelInfo, ModelRegistry, TensorSpec
from wasminfer.runtime._traps import GuestFault
from wasminfer.runtime._wasm import GuestMemory, HostFunc
from wasminfer.runtime.handler import InvocationState, run_model

MODULE = "wasi_ephemeral_nn"
STATE_KEY = "wasi_nn"

# nn_errno
SUCCESS = 0
INVALID_ARGUMENT = 1
INVALID_ENCODING = 2
MISSING_MEMORY = 3
BUSY = 4
RUNTIME_ERROR = 5
UNSUPPORTED_OPERATION = 6
TOO_LARGE = 7
NOT_FOUND = 8
ERRNO_NAMES = ("success", "invalid_argument", "invalid_encoding", "missing_memory", "busy", "runtime_error",
               "unsupported_operation", "too_large", "not_found")

# tensor_type (wasi-nn 0.6 numbering) → numpy dtype
TENSOR_TYPES = ("float16", "float32", "float64", "uint8", "int32", "int64")
TENSOR_TYPE_NAMES = ("f16", "f32", "f64", "u8", "i32", "i64")
TYPE_U8 = 3

# graph_encoding
ENCODINGS = ("openvino", "onnx", "tensorflow", "pytorch", "tensorflowlite", "autodetect", "ggml")
ENCODING_ONNX = 1
ENCODING_AUTODETECT = 5

# execution_target; 3 is WasmEdge's AUTO
TARGETS = ("cpu", "gpu", "tpu", "auto")
TARGET_CPU, TARGET_GPU, TARGET_TPU, TARGET_AUTO = range(4)

MAX_GRAPHS = 64  # open graph handles per instance
MAX_CONTEXTS = 256  # open execution contexts per instance
MAX_GUEST_MODELS = 4  # graphs from guest bytes per instance: each is an ORT session in host memory
MAX_RANK = 32
MAX_LOGGED_ERRORS = 16  # per invocation: a guest failing in a loop must not flood the log

_TENSOR = struct.Struct("<IIB3xII")  # dims ptr, dims len, type (+3 padding, ignored), data ptr, data len
_BUILDER = struct.Struct("<II")  # graph_builder: a list<u8> (ptr, len)
assert _TENSOR.size == 20


class NnFailure(Exception):
    """A wasi-nn call failed with `errno`; `error` is what a handler module's failure reports."""

    def __init__(self, errno: int, message: str, error: WasminferError | None = None) -> None:
        super().__init__(message)
        self.errno = errno
        self.message = message
        self.error = error


def _fail(errno: int, message: str, error: WasminferError | None = None) -> NoReturn:
    raise NnFailure(errno, message, error)


# --- per-instance state ---------------------------------------------------------------------------
@dataclass(eq=False)
class _Graph:
    model: str  # the name in its registry
    info: ModelInfo
    private: bool  # loaded from guest bytes into the instance's own registry
    contexts: set[int] = field(default_factory=set)


@dataclass(eq=False)
class _Context:
    graph_id: int
    graph: _Graph
    inputs: list[np.ndarray | None]
    outputs: list[np.ndarray] | None = None
    encoded: dict[int, bytes] = field(default_factory=dict)
    decoder: int = 0  # the invocation's decoder state behind compute_single (0: none yet)


class NnState:
    """The graphs and execution contexts of one instance. Idempotent `close()`.

    Handles are never reused within an instance: a stale handle is `invalid_argument`, never
    someone else's graph.
    """

    def __init__(self) -> None:
        self.graphs: dict[int, _Graph] = {}
        self.contexts: dict[int, _Context] = {}
        self._next_graph = 0
        self._next_context = 0
        self.private: ModelRegistry | None = None
        self.guest_models = 0

    @property
    def next_graph(self) -> int:
        return self._next_graph

    def add_graph(self, graph: _Graph) -> int:
        gid = self._next_graph
        self._next_graph += 1
        self.graphs[gid] = graph
        return gid

    def add_context(self, graph_id: int, graph: _Graph) -> int:
        cid = self._next_context
        self._next_context += 1
        self.contexts[cid] = _Context(graph_id, graph, [None] * len(graph.info.inputs))
        graph.contexts.add(cid)
        return cid

    def graph(self, gid: int) -> _Graph:
        graph = self.graphs.get(gid)
        if graph is None:
            _fail(INVALID_ARGUMENT, f"no graph {gid} in this instance (graphs come from load, load_by_name)")
        return graph

    def context(self, cid: int) -> _Context:
        ctx = self.contexts.get(cid)
        if ctx is None:
            _fail(INVALID_ARGUMENT,
                  f"no execution context {cid} in this instance (contexts come from init_execution_context)")
        return ctx

    def unload(self, gid: int) -> None:
        graph = self.graphs.pop(gid)
        for cid in graph.contexts:
            self.contexts.pop(cid, None)
        if graph.private and self.private is not None:
            self.private.unload(graph.model)
            self.guest_models -= 1

    def close(self) -> None:
        self.graphs.clear()
        self.contexts.clear()
        if self.private is not None:
            self.private.close()
            self.private = None


def _nn(state: InvocationState) -> NnState:
    inst = state.instance
    assert inst is not None, "wasi-nn called outside WasmInstance.call"
    nn = inst.host_state.get(STATE_KEY)
    if nn is None:
        nn = inst.host_state[STATE_KEY] = NnState()
    return nn


def _need_memory(mem: GuestMemory) -> None:
    if not mem.exported():
        _fail(MISSING_MEMORY, "the module exports no memory named 'memory'")


def _check_range(mem: GuestMemory, ptr: int, length: int) -> None:
    """Traps now, before any work, if a range (an out-parameter, say) is outside guest memory."""
    mem.read(ptr, 0)
    if ptr + length > mem.size():
        raise GuestFault(f"range [{ptr}, {ptr + length}) is outside guest memory of {mem.size()} bytes")


# --- graphs ---------------------------------------------------------------------------------------
def _sniff(data: bytes) -> str | None:
    """The encoding of model bytes that are recognisably not ONNX (for `autodetect`), else None."""
    if data[4:8] == b"TFL3":
        return "tensorflowlite"
    if data[:4] == b"GGUF":
        return "ggml"
    if data[:4] == b"PK\x03\x04":
        return "pytorch"  # TorchScript and .pt files are zip archives
    head = data[:64].lstrip()
    if head.startswith((b"<?xml", b"<net")):
        return "openvino"
    return None


def _load(state: InvocationState, mem: GuestMemory, builder_ptr: int, builder_len: int, encoding: int,
          target: int, graph_ptr: int) -> None:
    _need_memory(mem)
    if encoding not in (ENCODING_ONNX, ENCODING_AUTODETECT):
        what = ENCODINGS[encoding] if encoding < len(ENCODINGS) else "unknown"
        _fail(INVALID_ENCODING, f"encoding {encoding} ({what}): this host runs ONNX models only "
                                "(encoding onnx=1 or autodetect=5)")
    if target in (TARGET_GPU, TARGET_TPU):
        _fail(UNSUPPORTED_OPERATION, f"execution target {TARGETS[target]}: this host runs models on the CPU "
                                     "(target cpu=0)")
    if target not in (TARGET_CPU, TARGET_AUTO):
        _fail(INVALID_ARGUMENT, f"unknown execution target {target}")
    if not state.manifest.allow_guest_models:
        _fail(UNSUPPORTED_OPERATION,
              f"function {state.function!r} may not load models from its own bytes: deploy the model and use "
              "load_by_name, or set the manifest key 'allow_guest_models'")
    if builder_len != 1:
        _fail(INVALID_ARGUMENT,
              f"an ONNX graph is built from exactly one builder (the model bytes), got {builder_len}")
    ptr, length = _BUILDER.unpack(mem.read(builder_ptr, _BUILDER.size))
    data = mem.read(ptr, length)
    _check_range(mem, graph_ptr, 4)
    if encoding == ENCODING_AUTODETECT:
        found = _sniff(data)
        if found is not None:
            _fail(INVALID_ENCODING, f"autodetect: the bytes are a {found} model; this host runs ONNX only")
    nn = _nn(state)
    if nn.guest_models >= MAX_GUEST_MODELS or len(nn.graphs) >= MAX_GRAPHS:
        _fail(BUSY, f"this instance holds {nn.guest_models} guest-loaded graph(s) and {len(nn.graphs)} "
                    f"graph(s) in all (at most {MAX_GUEST_MODELS} and {MAX_GRAPHS}); unload some")
    if nn.private is None:
        nn.private = ModelRegistry()
    name = f"graph-{nn.next_graph}"  # unique within the instance's own registry
    try:
        info = nn.private.load(name, data)
    except InvalidModel as exc:
        _fail(INVALID_ARGUMENT, exc.message, exc)
    nn.guest_models += 1
    mem.write_u32(graph_ptr, nn.add_graph(_Graph(name, info, private=True)))


def _load_by_name(state: InvocationState, mem: GuestMemory, name_ptr: int, name_len: int,
                  graph_ptr: int) -> None:
    _need_memory(mem)
    raw = mem.read(name_ptr, name_len)
    _check_range(mem, graph_ptr, 4)
    try:
        name = raw.decode("utf-8")
    except UnicodeDecodeError:
        _fail(INVALID_ARGUMENT, "the model name is not valid UTF-8")
    # A denied name is `not_found` like an unknown one: wasi-nn has no permission error, and a
    # guest cannot tell which models exist beyond its allowlist. The message (log, caller) tells.
    if not state.manifest.allows(name):
        err: WasminferError = ModelNotAllowed(state.function, name)
        _fail(NOT_FOUND, err.message, err)
    nn = _nn(state)
    if len(nn.graphs) >= MAX_GRAPHS:
        _fail(BUSY, f"this instance holds {MAX_GRAPHS} graphs; unload some")
    try:
        if state.models is None:
            raise ModelNotFound(name)
        info = state.models.get(name)
    except ModelNotFound as exc:
        _fail(NOT_FOUND, exc.message, exc)
    mem.write_u32(graph_ptr, nn.add_graph(_Graph(name, info, private=False)))


def _load_by_name_with_config(state: InvocationState, mem: GuestMemory, name_ptr: int, name_len: int,
                              config_ptr: int, config_len: int, graph_ptr: int) -> None:
    _need_memory(mem)
    _check_range(mem, config_ptr, config_len)  # WasmEdge's backend options (GGML); ONNX takes none
    _load_by_name(state, mem, name_ptr, name_len, graph_ptr)


def _unload(state: InvocationState, mem: GuestMemory, graph: int) -> None:
    nn = _nn(state)
    nn.graph(graph)
    nn.unload(graph)


# --- execution contexts ---------------------------------------------------------------------------
def _init_execution_context(state: InvocationState, mem: GuestMemory, graph: int, ctx_ptr: int) -> None:
    _need_memory(mem)
    _check_range(mem, ctx_ptr, 4)
    nn = _nn(state)
    g = nn.graph(graph)
    if len(nn.contexts) >= MAX_CONTEXTS:
        _fail(BUSY, f"this instance holds {MAX_CONTEXTS} execution contexts; finalize some")
    mem.write_u32(ctx_ptr, nn.add_context(graph, g))


def _finalize_execution_context(state: InvocationState, mem: GuestMemory, ctx: int) -> None:
    nn = _nn(state)
    c = nn.context(ctx)
    _drop_decoder(state, c)
    del nn.contexts[ctx]
    c.graph.contexts.discard(ctx)


def _fini_single(state: InvocationState, mem: GuestMemory, ctx: int) -> None:
    """Ends a compute_single sequence: frees the context's decoder state."""
    _drop_decoder(state, _nn(state).context(ctx))


def _drop_decoder(state: InvocationState, c: _Context) -> None:
    decoders = state.decoders
    if c.decoder and decoders is not None and c.decoder in decoders.handles:
        decoders.close_one(c.decoder)
    c.decoder = 0


def _compute_single(state: InvocationState, mem: GuestMemory, ctx: int) -> None:
    """WasmEdge's token-by-token compute, on a decoder model (inputs past…, outputs present…): each
    call is one step whose past the host keeps (`runtime.decoders`), from the first call of the
    invocation (or after `fini_single`) to its end; the past inputs need not be set and are not
    read. On any other model it is `compute`."""
    nn = _nn(state)
    c = nn.context(ctx)
    graph = c.graph
    if graph.private:
        _compute(state, mem, ctx)
        return
    decoders = state.decoder_states()
    try:
        spec = decoders.spec(graph.model)
    except InvalidTensor:  # no decoder: one-shot, as WasmEdge's ONNX-less backends treat it
        _compute(state, mem, ctx)
        return
    except ModelNotFound as exc:
        _fail(NOT_FOUND, exc.message, exc)
    past = spec.host_names  # the past, and a mask and positions the host makes
    specs = graph.info.inputs
    for i, (s, value) in enumerate(zip(specs, c.inputs, strict=True)):
        if value is None and s.name not in past:
            err = InvalidTensor(f"input {s.name!r} is missing (set_input)")
            _fail(INVALID_ARGUMENT, f"model {graph.model!r} input {i}: {err.message}", err)
    limit_err = state.count_infer("ran {} inferences")
    if limit_err is not None:
        _fail(BUSY, limit_err.message, limit_err)
    inputs = {s.name: v for s, v in zip(specs, c.inputs, strict=True) if v is not None and s.name not in past}
    t0 = time.perf_counter_ns()
    try:
        if not c.decoder or c.decoder not in decoders.handles:  # a new sequence in this invocation
            c.decoder = decoders.open(graph.model, state.function)
        _, outputs = decoders.step(c.decoder, inputs,
                                   lambda m, f, s=None: run_model(state, state.infer, m, f, s))
    except ModelNotFound as exc:
        _fail(NOT_FOUND, exc.message, exc)
    except InvalidTensor as exc:
        _fail(INVALID_ARGUMENT, exc.message, exc)
    except InferLimitExceeded as exc:
        _fail(BUSY, exc.message, exc)
    except WasminferError as exc:  # ORT failed, the memory quota, the host shutting down
        _fail(RUNTIME_ERROR, exc.message, exc)
    finally:
        state.infer_ns += time.perf_counter_ns() - t0
    c.outputs = list(outputs.values())
    c.encoded = {}
    state.infer_error = None
    state.nn_error = None


def _shape_text(shape: Any) -> str:
    return "[" + ",".join("?" if d is None else str(d) for d in shape) + "]"


def _check_spec(spec: TensorSpec, model: str, index: int, ttype: int, dims: tuple[int, ...]) -> None:
    """The registry's dtype and shape check, at `set_input` where the guest can tell which call failed."""
    dtype = spec.dtype
    if dtype != TENSOR_TYPES[ttype] and not (dtype == "bool" and ttype == TYPE_U8):
        err = InvalidTensor(f"input {spec.name!r} has dtype {TENSOR_TYPES[ttype]}, the model expects {dtype}")
        _fail(INVALID_ARGUMENT, f"model {model!r} input {index}: {err.message}", err)
    shape = spec.shape
    if shape is not None and (
        len(dims) != len(shape)
        or any(isinstance(want, int) and want >= 0 and d != want for d, want in zip(dims, shape, strict=True))
    ):
        err = InvalidTensor(
            f"input {spec.name!r} has shape {_shape_text(dims)}, the model expects {_shape_text(shape)}"
        )
        _fail(INVALID_ARGUMENT, f"model {model!r} input {index}: {err.message}", err)


def _set_input(state: InvocationState, mem: GuestMemory, ctx: int, index: int, tensor_ptr: int) -> None:
    _need_memory(mem)
    c = _nn(state).context(ctx)
    dims_ptr, dims_len, ttype, data_ptr, data_len = _TENSOR.unpack(mem.read(tensor_ptr, _TENSOR.size))
    specs = c.graph.info.inputs
    if index >= len(specs):
        names = ", ".join(f"{i}: {s.name!r}" for i, s in enumerate(specs)) or "none"
        _fail(INVALID_ARGUMENT, f"model {c.graph.model!r} has no input {index} (its inputs: {names})")
    if ttype >= len(TENSOR_TYPES):
        _fail(INVALID_ARGUMENT, f"unknown tensor type {ttype} (f16=0 f32=1 f64=2 u8=3 i32=4 i64=5)")
    if dims_len > MAX_RANK:
        _fail(INVALID_ARGUMENT, f"a tensor of rank {dims_len}: at most {MAX_RANK} dimensions")
    dims = struct.unpack(f"<{dims_len}I", mem.read(dims_ptr, 4 * dims_len))
    limit = state.manifest.max_tensor_bytes
    if data_len > limit:
        err = TensorTooLarge.exceeded(
            state.function, f"gave input {specs[index].name!r} of {data_len} bytes", limit
        )
        _fail(TOO_LARGE, err.message, err)
    dtype = np.dtype(TENSOR_TYPES[ttype]).newbyteorder("<")
    needed = math.prod(dims) * dtype.itemsize
    if needed != data_len:
        _fail(INVALID_ARGUMENT, f"a {TENSOR_TYPE_NAMES[ttype]} tensor of shape {_shape_text(dims)} has "
                                f"{needed} bytes of data, not {data_len}")
    _check_spec(specs[index], c.graph.model, index, ttype, dims)
    c.inputs[index] = np.frombuffer(mem.read(data_ptr, data_len), dtype).reshape(dims)


def _compute(state: InvocationState, mem: GuestMemory, ctx: int) -> None:
    nn = _nn(state)
    c = nn.context(ctx)
    graph = c.graph
    specs = graph.info.inputs
    for i, (spec, value) in enumerate(zip(specs, c.inputs, strict=True)):
        if value is None:
            err = InvalidTensor(f"input {spec.name!r} is missing; the model's inputs are "
                                + ", ".join(repr(s.name) for s in specs))
            _fail(INVALID_ARGUMENT, f"model {graph.model!r} input {i}: {err.message} (set_input)", err)
    limit_err = state.count_infer("ran {} inferences")
    if limit_err is not None:
        _fail(BUSY, limit_err.message, limit_err)
    inputs = {spec.name: value for spec, value in zip(specs, c.inputs, strict=True) if value is not None}
    infer = nn.private.infer if graph.private and nn.private is not None else state.infer
    t0 = time.perf_counter_ns()
    try:
        outputs = run_model(state, infer, graph.model, inputs)
    except ModelNotFound as exc:  # undeployed since load_by_name
        _fail(NOT_FOUND, exc.message, exc)
    except InvalidTensor as exc:
        _fail(INVALID_ARGUMENT, exc.message, exc)
    except InferenceFailed as exc:
        _fail(RUNTIME_ERROR, exc.message, exc)
    except WasminferError as exc:  # e.g. Unavailable: the host is shutting down
        _fail(RUNTIME_ERROR, exc.message, exc)
    finally:
        state.infer_ns += time.perf_counter_ns() - t0
    c.outputs = list(outputs.values())
    c.encoded = {}
    state.infer_error = None
    state.nn_error = None


def _get_output(state: InvocationState, mem: GuestMemory, ctx: int, index: int, out_ptr: int, out_max: int,
                written_ptr: int) -> None:
    _need_memory(mem)
    c = _nn(state).context(ctx)
    if c.outputs is None:
        _fail(INVALID_ARGUMENT, f"execution context {ctx} has no outputs: call compute first")
    if index >= len(c.outputs):
        _fail(INVALID_ARGUMENT, f"model {c.graph.model!r} has {len(c.outputs)} output(s), no output {index}")
    _check_range(mem, out_ptr, out_max)
    _check_range(mem, written_ptr, 4)
    data = c.encoded.get(index)
    if data is None:
        array = c.outputs[index]
        if array.dtype.kind in "OUS":
            _fail(UNSUPPORTED_OPERATION, f"output {index} of model {c.graph.model!r} is a string tensor, "
                                         "which wasi-nn cannot return")
        data = c.encoded[index] = np.ascontiguousarray(array, array.dtype.newbyteorder("<")).tobytes()
    if len(data) > out_max:
        mem.write_u32(written_ptr, len(data))  # an extension: the size the buffer needs
        _fail(TOO_LARGE, f"output {index} has {len(data)} bytes, the buffer {out_max}")
    mem.write(out_ptr, data)
    mem.write_u32(written_ptr, len(data))


# --- the host functions ---------------------------------------------------------------------------
def _record(state: InvocationState, func: str, failure: NnFailure) -> int:
    text = f"wasi-nn {func}: {ERRNO_NAMES[failure.errno]} ({failure.errno}): {failure.message}"
    state.nn_error = text
    state.infer_error = failure.error
    state.nn_errors += 1
    if state.nn_errors <= MAX_LOGGED_ERRORS:
        state.logs.append("host", text, "warn", state.invocation_id)
    elif state.nn_errors == MAX_LOGGED_ERRORS + 1:
        state.logs.append("host", "wasi-nn: further failed calls in this invocation are not logged", "warn",
                          state.invocation_id)
    return failure.errno


def _host_func(name: str, nparams: int, body: Any) -> HostFunc:
    def impl(state: InvocationState, mem: GuestMemory, *args: int) -> int:
        try:
            body(state, mem, *args)
        except NnFailure as failure:
            return _record(state, name, failure)
        return SUCCESS

    return HostFunc(MODULE, name, ("i32",) * nparams, ("i32",), impl)


HOST_FUNCS = (
    _host_func("load", 5, _load),
    _host_func("load_by_name", 3, _load_by_name),
    _host_func("load_by_name_with_config", 5, _load_by_name_with_config),
    _host_func("init_execution_context", 2, _init_execution_context),
    _host_func("set_input", 3, _set_input),
    _host_func("compute", 1, _compute),
    _host_func("get_output", 5, _get_output),
    # WasmEdge's additions: on a decoder model, compute_single steps a decoder state the host keeps.
    _host_func("compute_single", 1, _compute_single),
    _host_func("get_output_single", 5, _get_output),
    _host_func("fini_single", 1, _fini_single),
    _host_func("unload", 1, _unload),
    _host_func("finalize_execution_context", 1, _finalize_execution_context),
)


def uses_wasi_nn(imports: Any) -> bool:
    """Whether a module imports anything from `wasi_ephemeral_nn` (`imports`: its `ExternInfo`s)."""
    return any(imp.module == MODULE for imp in imports)


__all__ = ["ERRNO_NAMES", "HOST_FUNCS", "MODULE", "NnState", "uses_wasi_nn"]
