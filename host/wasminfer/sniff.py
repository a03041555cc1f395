"""What an upload's bytes say they are, for a client that did not say (curl's `-T` sends no
Content-Type, its `--data-binary` sends `application/x-www-form-urlencoded`).

Each check is cheap and bounded: a fixed-size prefix, or (ONNX) a walk over at most
`MAX_ONNX_FIELDS` top-level protobuf fields that never reads inside them. A body is named only
when its bytes leave no doubt; otherwise `media_type` says None and the caller asks for a header.
Plain data, like `pysource` (whose media types a Python function's files come as).
"""

from __future__ import annotations

import codecs

from wasminfer.pysource import GZIP, PYTHON, TAR, ZIP, ZIP_MAGIC

WASM = "application/wasm"
ONNX = "application/onnx"

#: The 8-byte preambles of a core module (version 1) and of a component (version 0x0d, layer 1).
WASM_MODULE = b"\0asm\x01\x00\x00\x00"
WASM_COMPONENT = b"\0asm\x0d\x00\x01\x00"
#: Top-level fields walked before an ONNX body is given up on (a model has a dozen or so; a body
#: of a million one-byte fields would cost seconds of the gateway's time).
MAX_ONNX_FIELDS = 4096
#: Bytes of a text body looked at to call it a Python function's source.
PYTHON_PREFIX = 64 << 10

# ModelProto's fields (onnx.proto) with their wire types: 0 varint, 2 length-delimited.
_ONNX_FIELDS = {1: 0, 2: 2, 3: 2, 4: 2, 5: 0, 6: 2, 7: 2, 8: 2, 14: 2, 20: 2, 25: 2}
_IR_VERSION, _GRAPH = 1, 7
_MAX_IR_VERSION = 64  # 10 in 2024; far from any integer a random byte string decodes to


def media_type(data: bytes) -> str | None:
    """The media type `data` is unmistakably, one of this module's constants, or None."""
    head = data[:8]
    if head in (WASM_MODULE, WASM_COMPONENT):
        return WASM
    if head[:4] == ZIP_MAGIC:
        return ZIP
    if head[:3] == b"\x1f\x8b\x08":  # deflate, the only method gzip defines
        return GZIP
    if len(data) >= 512 and data[257:262] == b"ustar":
        return TAR
    if is_onnx(data):
        return ONNX
    if _is_python(data):
        return PYTHON
    return None


def describe(kind: str | None) -> str:
    """`kind` in words, for an error message."""
    return {
        WASM: "a Wasm module", ONNX: "an ONNX model", PYTHON: "Python source", ZIP: "a zip archive",
        TAR: "a tar archive", GZIP: "gzip data",
    }.get(kind or "", "nothing this server recognises")  # fmt: skip


def _varint(data: bytes, pos: int) -> tuple[int, int] | None:
    value = shift = 0
    while pos < len(data) and shift < 64:
        byte = data[pos]
        value |= (byte & 0x7F) << shift
        pos += 1
        if not byte & 0x80:
            return value, pos
        shift += 7
    return None


def is_onnx(data: bytes) -> bool:
    """Whether `data` parses as a ModelProto's top level: only its known fields with their wire
    types, lengths inside the body, an `ir_version` in range and a `graph`, read to the last byte."""
    pos, fields = 0, 0
    seen: set[int] = set()
    while pos < len(data):
        fields += 1
        if fields > MAX_ONNX_FIELDS:
            return False
        key = _varint(data, pos)
        if key is None:
            return False
        tag, pos = key
        number, wire = tag >> 3, tag & 7
        if _ONNX_FIELDS.get(number) != wire:
            return False
        value = _varint(data, pos)
        if value is None:
            return False
        length, pos = value
        if number == _IR_VERSION and not 1 <= length <= _MAX_IR_VERSION:
            return False
        if wire == 2:
            pos += length
            if pos > len(data):
                return False
        seen.add(number)
    return {_IR_VERSION, _GRAPH} <= seen


def _is_python(data: bytes) -> bool:
    """UTF-8 text that imports the guest SDK: what every Python function must do to have a handler
    (a text without it is no function, and better refused with a hint than read as one)."""
    head = data[:PYTHON_PREFIX]
    if b"\0" in head:
        return False
    try:  # incremental: a character cut by the prefix's end waits, an invalid byte raises
        text = codecs.getincrementaldecoder("utf-8")().decode(head, final=len(data) <= PYTHON_PREFIX)
    except UnicodeDecodeError:
        return False
    return any(line.lstrip().startswith(("import wasminfer_guest", "from wasminfer_guest "))
               for line in text.splitlines())
