"""`infer`: run a model the function's manifest allows, on named tensors."""

from __future__ import annotations

import struct
from collections.abc import Mapping
from typing import Any

from wasminfer_guest import _bindings as b
from wasminfer_guest.tensor import DTYPES, Tensor

# The cases of the WIT variant `infer-error` (guest-sdk/wit/world.wit), i.e. the handler ABI's codes.
KINDS = (
    "invalid-argument", "model-not-found", "model-not-allowed", "invalid-tensor", "runtime",
    "too-many-calls", "tensor-too-large",
)  # fmt: skip


class InferError(Exception):
    """`infer` failed. `kind` is one of `KINDS`, `message` the host's explanation.

    Not caught, it fails the invocation with the host's own error for it (e.g. 403
    model_not_allowed, 422 invalid_tensor): what the caller needs to fix.
    """

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message

    def __str__(self) -> str:
        return f"{self.kind}: {self.message}"


def infer(model: str, inputs: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Runs `model` on `inputs` (tensor name -> `Tensor`); returns every output by name.

    Raises `InferError` (the model is not in the manifest's `models`, an input does not match
    the model, a limit, ...), `TypeError` for inputs that are not `Tensor`s.
    """
    for name, tensor in inputs.items():
        if not isinstance(tensor, Tensor):
            raise TypeError(f"input {name!r} is {type(tensor).__name__}, not a wasminfer_guest.Tensor")
    if b.IN_RUNTIME:
        return runtime_call(b"i", model, inputs)
    if not b.IN_COMPONENT:
        if b.local_infer is None:
            raise RuntimeError("infer() outside a component needs a backend: wasminfer_guest.local.use()")
        return b.local_infer(model, dict(inputs))
    try:
        outputs = b.wit_inference.infer(model, [_to_wit(name, t) for name, t in inputs.items()])
    except b.Err as err:
        raise InferError(_kind(err.value), err.value.value) from None
    return {t.name: _from_wit(t) for t in outputs}


def runtime_call(op: bytes, model: str, inputs: Mapping[str, Tensor], raw: bool = False) -> Any:
    """One frame to the host: `op` (`i` for infer, or a decoder step's `d s` and handle), then a
    header packed with `struct`, then the bytes of the small tensors. A tensor past `INLINE_BYTES`
    is passed by address instead (the host copies it straight out of the tensor's own `bytes`:
    numpy arrays became bytes with one copy in `Tensor.of`); address 0 means "after the header, in
    order". The answer is a header of the same kind and the outputs' bytes after it. The frames
    (lengths u32, dims i64, little-endian; dtype: index in `DTYPES`):

        op  len(model) model  count  { len(name) name  dtype ndim dims...  address nbytes }...  inline...
        0  count  { len(name) name  dtype ndim dims...  nbytes }...  data...
        1  <json {"kind", "message"}>

    An empty answer means the first form lies in the inbox (`_runtime.INBOX`), after its head.

    A string tensor's bytes are each string as a u32 length and its UTF-8. Returns the outputs by
    name, or with `raw` the answer itself (`answer`: a decoder's next token is no tensor). Raises
    `InferError`.
    """
    global _last_frame
    rt = _rt or _runtime()
    key: list[Any] = [op, model]  # what the frame's header is made of: the last one's is kept
    inline = []  # the small tensors' bytes, after the header
    kept = []  # the large ones', alive until the host has read them
    for name, t in inputs.items():
        data = t.data
        dtype = t.dtype
        if dtype == "string":
            data = b"".join([_U32.pack(len(e)) + e for e in (s.encode("utf-8") for s in t.data)])
        elif type(data) is not bytes:
            data = bytes(data)
        if len(data) <= INLINE_BYTES:
            inline.append(data)
            where = 0
        else:
            kept.append(data)
            where = rt.address(data)
        shape = t.shape
        key += (name, dtype, shape if type(shape) is tuple else tuple(shape), where, len(data))
    known, header = _last_frame
    if key != known:  # a function asks alike: the same header, packed once
        header = _header(key)
        _last_frame = key, header
    found = b._host.call(b"".join([header, *inline]))
    del kept
    if raw:
        return answer(found)
    if not found:  # the host wrote it into the inbox, free while the handler runs
        return _outputs(rt.INBOX, rt.HEAD_BYTES)
    return _outputs(answer(found), 0)


def _header(key: list[Any]) -> bytes:
    """A request frame's header from `runtime_call`'s key: op, model, then per tensor its name,
    dtype, shape, address and size."""
    raw_model = key[1].encode("utf-8")
    parts = [key[0], _U32.pack(len(raw_model)), raw_model, _U32.pack((len(key) - 2) // 5)]
    for i in range(2, len(key), 5):
        name, dtype, shape, where, nbytes = key[i:i + 5]
        raw_name = name.encode("utf-8")
        spec = _SPECS.get(len(shape)) or _spec(len(shape))
        parts += (_U32.pack(len(raw_name)), raw_name,
                  spec.pack(_CODES[dtype], len(shape), *shape, where, nbytes))
    return b"".join(parts)


_last_frame: tuple[list[Any] | None, bytes] = (None, b"")

#: Input tensors up to this size travel inside the frame (one copy here saves the host a read).
INLINE_BYTES = 16 << 10


def answer(found: Any) -> memoryview:
    """A door's answer (`0` and what follows), taken from the inbox when the door left `found`
    empty. Raises `InferError` for an error answer."""
    if not found:
        rt = _rt or _runtime()
        return rt.INBOX_VIEW[rt.HEAD_BYTES:]
    if found[:1] != b"\x00":
        import json

        err = json.loads(bytes(found[1:]))
        raise InferError(err["kind"], err["message"])
    return memoryview(found)


def _outputs(buf: Any, offset: int) -> dict[str, Tensor]:
    """The tensors of an answer that starts at `offset` of `buf` (bytes, the inbox or a view of
    either), each tensor's bytes copied once.

    A function asks the same model the same question many times: the answer's header (names,
    dtypes, shapes, sizes) is then the one before, byte for byte, and its parse is kept
    (`_last_header`): one comparison instead of a parse.
    """
    global _last_header
    header, specs = _last_header
    view = memoryview(buf)
    end = offset + len(header)
    if not specs or view[offset:end] != header:
        specs, end = _parse_header(view, offset)
        _last_header = bytes(view[offset:end]), specs
    offset = end
    out: dict[str, Tensor] = {}
    new = Tensor.__new__
    for name, dtype, shape, nbytes in specs:
        data = view[offset:offset + nbytes].tobytes()
        offset += nbytes
        t = out[name] = new(Tensor)
        t.dtype, t.shape, t.data = dtype, shape, _strings(data) if dtype == "string" else data
    return out


def _parse_header(buf: memoryview, offset: int) -> tuple[list[tuple[str, str, tuple[int, ...], int]], int]:
    """The specs of an answer's tensors, and where their data starts."""
    count, = _U32.unpack_from(buf, offset + 1)
    offset += 5
    specs = []
    for _ in range(count):
        n, = _U32.unpack_from(buf, offset)
        name = bytes(buf[offset + 4:offset + 4 + n]).decode("utf-8")
        code, ndim = _BB.unpack_from(buf, offset + 4 + n)
        offset += 6 + n
        shape = struct.unpack_from(f"<{ndim}q", buf, offset)
        nbytes, = _U32.unpack_from(buf, offset + 8 * ndim)
        offset += 8 * ndim + 4
        specs.append((name, DTYPES[code], shape, nbytes))
    return specs, offset


_last_header: tuple[bytes, list[tuple[str, str, tuple[int, ...], int]]] = (b"", [])


def _spec(ndim: int) -> struct.Struct:
    """The Struct of one input tensor's spec after its name: dtype, ndim, dims, address, nbytes."""
    spec = _SPECS[ndim] = struct.Struct(f"<BB{ndim}qII")
    return spec


_SPECS: dict[int, struct.Struct] = {}
_rt: Any = None  # wasminfer_guest._runtime, once imported (it imports this module)


def _runtime() -> Any:
    global _rt
    import wasminfer_guest._runtime as rt

    _rt = rt
    return rt


def _strings(blob: bytes) -> list[str]:
    out, i = [], 0
    while i < len(blob):
        n, = _U32.unpack_from(blob, i)
        out.append(blob[i + 4:i + 4 + n].decode("utf-8", "replace"))
        i += 4 + n
    return out


_U32 = struct.Struct("<I")
_BB = struct.Struct("<BB")
_CODES = {name: i for i, name in enumerate(DTYPES)}


def _to_wit(name: str, t: Tensor) -> Any:
    types = b.wit_types
    data = types.TensorData_Text(t.data) if t.dtype == "string" else types.TensorData_Raw(t.data)
    return types.Tensor(name=name, dtype=_WIT_DTYPES[t.dtype], shape=list(t.shape), data=data)


def _from_wit(t: Any) -> Tensor:
    return Tensor._trusted(_DTYPE_NAMES[t.dtype], t.shape, t.data.value)


_DTYPE_NAMES = {d: d.name.lower() for d in b.wit_types.Dtype} if b.IN_COMPONENT else {}
_WIT_DTYPES = {name: d for d, name in _DTYPE_NAMES.items()}


def _kind(case: Any) -> str:
    # InferError_ModelNotAllowed -> model-not-allowed
    name = type(case).__name__.split("_", 1)[1]
    return "".join("-" + c.lower() if c.isupper() else c for c in name).lstrip("-")


def to_wit_error(err: InferError) -> Any:
    """The WIT `infer-error` value of `err` (to hand an unrecovered infer error back to the host)."""
    cls = "InferError_" + "".join(part.capitalize() for part in err.kind.split("-"))
    return getattr(b.wit_types, cls)(err.message)
