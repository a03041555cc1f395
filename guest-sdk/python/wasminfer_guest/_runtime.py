"""The guest half of wasminfer's Python runtime (host: `wasminfer/runtime/python.py`).

This module is imported once, when the host builds the runtime's snapshot; every instance of every
Python function then starts with it (and numpy, Pillow and the SDK) already imported. The host
calls `validate`, `load` and `invoke` through the export `wasminfer_call(object)` that the snapshot
adds (no source is compiled per call; their addresses are taken once, by `addresses`).

An invocation crosses no door when it can help it: before calling `invoke` the host writes the
request into `INBOX` (a buffer made before the snapshot, so at the same address in every instance),
and `invoke` leaves the addresses of the response's bytes in its head, which the host reads after
the call. The head, in u32 words: [0] body length (`FETCH`: too long for the inbox, ask the door),
[1] content type length, [2] `DONE` once a response is there, [3] [4] its body's address and
length, [5] [6] its content type's. The content type and the body follow the head (`HEAD_BYTES`).
A handler's dict or list with a run of floats near its top comes as `PACKED_JSON` in [2] instead
(`_packjson.py`): its body is u32 n, n float64s (little-endian), then the JSON as a %-format, `%r`
where each float goes and `%%` for a `%`, at most `MAX_PACKED` bytes in all; the host formats the
floats in (`NaN`, `Infinity`, `-Infinity` as `json` writes them), which gives what
`json.dumps(value, separators=(",", ":"))` gives, as `application/json` ([5] [6] unread). Once
`invoke` has copied the request out, the host may write the answers of infer and of decoder steps
there too. A handler that streams sends its parts through the door (`w`) as they come; its
response in the head is then empty, with the first part's content type.

Everything else crosses the door, `_host.call(frame) -> bytes`: one frame each way, copied in and
out of linear memory in bulk by the host. A frame is one op byte and its payload:

    s                     -> marshal {path: source bytes}       (validate: the function's files)
    b <header> <code>...  -> b""                                 (validate: the compiled modules)
    c                     -> <header> <code>...                  (load: the compiled modules)
    r                     -> u32 len(ctype), ctype, body         (a request too long for the inbox)
    w u32 len(ctype), ctype, part -> b""                         (one part, sent at once if streamed)
    d o <sampling> <model> -> 0 u32 handle | 1 <json error>      (open a decoder state)
    d s u32 handle <infer request> -> as i                       (one decoder step)
    d n u32 handle [<infer request>] -> 0 u32 token | as i's 1   (a step that chooses the next token)
    d p u32 handle <as w's> -> as d n                           (a part, then d n on the token chosen last)
    d c u32 handle        -> 0 | 1 <json error>                  (close a decoder state)
    l level, message      -> b""                                 (a log line)
    i <infer request>     -> 0 <tensors> | 1 <json error>       (infer, see `inference.py`)
    f <json failure>      -> b""                                 (the invocation or load failed)
    a <json addresses>    -> b""                                 (snapshot: where the entry points are)

where <header> is a u32 length and JSON.
"""

from __future__ import annotations

import gc
import importlib.abc
import importlib.machinery
import json
import marshal
import sys
import traceback
from types import ModuleType
from typing import Any

import _host  # the door, built into the runtime's interpreter

from wasminfer_guest import export
from wasminfer_guest._packjson import pack as pack_json
from wasminfer_guest._packjson import worth_packing
from wasminfer_guest.http import _BYTES_LIKE, _JSON_ENCODE, _JSON_LIKE, JSON, Reject, Request, Response
from wasminfer_guest.inference import InferError

ENTRY = "app"
FILES = "/fn"  # where the function's own files are (read-only)
MAX_TRACEBACK = 16 << 10
HEAD_BYTES = 32
FETCH = 0xFFFFFFFF
DONE, PACKED_JSON = 1, 2
_JSON_TYPE = JSON.encode()
#: Requests up to this size (content type and body) are written in place by the host. The buffer's
#: pages are zeros in the snapshot: an instance pays only for those its requests touch.
INBOX_BYTES = 1 << 20
INBOX = bytearray(HEAD_BYTES + INBOX_BYTES)
INBOX_VIEW = _VIEW = memoryview(INBOX)
_HEAD = _VIEW[:HEAD_BYTES].cast("I")


def _data_offset() -> int:
    """Where a `bytes` object's data starts, from its address (`id`): CPython's layout, measured."""
    import numpy as np

    probe = b"wasminfer"
    return int(np.frombuffer(probe, np.uint8).__array_interface__["data"][0]) - id(probe)


def address(data: bytes) -> int:
    """The address of the data of `data` (exactly `bytes`: its buffer never moves)."""
    return id(data) + BYTES_DATA


def _buffer_address(buf: bytearray) -> int:
    import numpy as np

    return int(np.frombuffer(buf, np.uint8).__array_interface__["data"][0])


BYTES_DATA = _data_offset()
_kept: tuple[bytes, bytes] | None = None  # the last response, alive until the host has read it
_last_ctype: tuple[bytes, str] = (b"", "")


def door(op: bytes, payload: bytes = b"") -> bytes:
    return bytes(_host.call(op + payload))


def _u32(n: int) -> bytes:
    return n.to_bytes(4, "little")


def pack(header: Any, blobs: list[bytes]) -> bytes:
    raw = json.dumps(header, separators=(",", ":")).encode()
    return _u32(len(raw)) + raw + b"".join(blobs)


def unpack(frame: bytes) -> tuple[Any, memoryview]:
    n = int.from_bytes(frame[:4], "little")
    return json.loads(frame[4:4 + n]), memoryview(frame)[4 + n:]


def fail(kind: str, message: str, **extra: Any) -> None:
    door(b"f", json.dumps({"kind": kind, "message": message[:4096], **extra}).encode())


def _traceback(exc: BaseException) -> str:
    try:
        tb = exc.__traceback__
        while tb is not None and tb.tb_frame.f_code.co_filename.startswith(("<", __file__)):
            tb = tb.tb_next  # the runtime's own frames say nothing to the author
        text = "".join(traceback.format_exception(type(exc), exc, tb))
    except BaseException:  # noqa: BLE001 - formatting may fail when memory is short
        text = ""
    return text if len(text) <= MAX_TRACEBACK else "…" + text[-MAX_TRACEBACK:]


def _message(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


# --- the function's modules -------------------------------------------------------------------------
class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports the function's own modules from their compiled code (never from files)."""

    def __init__(self, modules: dict[str, tuple[bool, str, Any]]) -> None:
        self.modules = modules  # name -> (is_package, file name, code)

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        found = self.modules.get(name)
        if found is None:
            return None
        is_pkg, filename, _ = found
        spec = importlib.machinery.ModuleSpec(name, self, origin=filename, is_package=is_pkg)
        spec.has_location = True
        return spec

    def create_module(self, spec: Any) -> None:
        return None

    def exec_module(self, module: ModuleType) -> None:
        is_pkg, filename, code = self.modules[module.__name__]
        module.__file__ = filename
        if is_pkg:
            module.__path__ = [filename.rsplit("/", 1)[0]]
        exec(code, module.__dict__)


def _module_name(path: str) -> tuple[str, bool] | None:
    """('pkg.mod', is_package) for a file path of the function, None for what is not a module."""
    if not path.endswith(".py"):
        return None
    parts = path[:-3].split("/")
    is_pkg = parts[-1] == "__init__"
    if is_pkg:
        parts = parts[:-1]
    if not parts or not all(p.isidentifier() for p in parts):
        return None
    return ".".join(parts), is_pkg


def _install(modules: dict[str, tuple[bool, str, Any]]) -> None:
    if FILES not in sys.path:
        sys.path.insert(0, FILES)  # for data files found relative to the path; modules come from us
    sys.meta_path.insert(0, _Finder(modules))


def _import_entry() -> bool:
    """Imports the function's entry module; whether it registered a handler."""
    export._registered = None
    importlib_import(ENTRY)
    return export._registered is not None


def importlib_import(name: str) -> ModuleType:
    import importlib

    return importlib.import_module(name)


def validate() -> None:
    """Compiles the function's files, hands the code to the host, imports the entry module once."""
    sources = marshal.loads(door(b"s"))
    modules: dict[str, tuple[bool, str, Any]] = {}
    header, blobs = [], []
    for path in sorted(sources):
        found = _module_name(path)
        if found is None:
            continue
        name, is_pkg = found
        filename = f"{FILES}/{path}"
        try:
            code = compile(sources[path], filename, "exec", dont_inherit=True)
        except SyntaxError as exc:
            line = exc.lineno or 0
            fail("syntax", f"{path}, line {line}: {exc.msg}", file=path, line=line,
                 traceback="".join(traceback.format_exception_only(type(exc), exc)))
            return
        except ValueError as exc:  # e.g. null bytes in the source
            fail("syntax", f"{path}: {exc}", file=path, line=0, traceback="")
            return
        modules[name] = (is_pkg, filename, code)
        raw = marshal.dumps(code)
        header.append([name, is_pkg, filename, len(raw)])
        blobs.append(raw)
    if ENTRY not in modules:
        fail("no_entry", f"the function has no {ENTRY}.py: its entry module, where @handler is")
        return
    door(b"b", pack(header, blobs))
    _install(modules)
    try:
        registered = _import_entry()
    except BaseException as exc:  # noqa: BLE001 - whatever the import raises is the author's to see
        fail("import", f"importing {ENTRY}.py failed: {_message(exc)}", traceback=_traceback(exc))
        return
    if not registered:
        fail("no_handler", f"{ENTRY}.py registers no handler: decorate its entry point with "
             "@wasminfer_guest.handler")


def _flushed(fn: Any) -> Any:
    """Flushes stdout and stderr after `fn`: no turn does it for these calls."""

    def call() -> None:
        try:
            fn()
        finally:
            for stream in (sys.stdout, sys.stderr):
                try:
                    stream.flush()
                except BaseException:  # noqa: BLE001, S110 - a full pipe must not fail the call
                    pass

    call.__name__ = fn.__name__
    return call


def load() -> None:
    """Imports the function from the compiled code the host hands over."""
    header, data = unpack(door(b"c"))
    modules: dict[str, tuple[bool, str, Any]] = {}
    offset = 0
    for name, is_pkg, filename, size in header:
        modules[name] = (is_pkg, filename, marshal.loads(data[offset:offset + size]))
        offset += size
    _install(modules)
    try:
        registered = _import_entry()
    except BaseException as exc:  # noqa: BLE001
        fail("import", f"importing {ENTRY}.py failed: {_message(exc)}", traceback=_traceback(exc))
        return
    if not registered:
        fail("no_handler", f"{ENTRY}.py registers no handler")


def _request() -> Request:
    global _last_ctype
    head = _HEAD
    n, k = head[0], head[1]
    if n == FETCH:
        frame = door(b"r")
        k = int.from_bytes(frame[:4], "little")
        return Request(frame[4 + k:], frame[4:4 + k].decode("utf-8", "replace"))
    raw = _VIEW[HEAD_BYTES:HEAD_BYTES + k]
    last_raw, content_type = _last_ctype
    if raw != last_raw:  # most callers send one content type: decode it once
        last_raw = bytes(raw)
        content_type = last_raw.decode("utf-8", "replace")
        _last_ctype = last_raw, content_type
    return Request(bytes(_VIEW[HEAD_BYTES + k:HEAD_BYTES + k + n]), content_type)


def invoke() -> None:
    """Runs one request through the registered handler."""
    global _kept, _first_type
    _kept = None
    _first_type = b""
    try:
        result = export.registered()(_request())
        kind = type(result)
        done = DONE
        packed = pack_json(result) if (kind is dict or kind is list) and worth_packing(result) else None
        if packed is not None:
            body, ctype, done = packed, b"", PACKED_JSON
        elif _streams(result):  # its parts went through the door: the response is the last, empty
            body, ctype = b"", _stream(result)
        elif kind is dict or kind is list:  # `Response.of`'s JSON, without a Response between
            body, ctype = _JSON_ENCODE(result).encode(), _JSON_TYPE
        else:
            response = Response.of(result)
            body = response.body
            if type(body) is not bytes:
                body = bytes(body)
            ctype = response.content_type.encode("utf-8", "replace")
        _kept = body, ctype
        head = _HEAD
        head[3], head[4], head[5], head[6] = address(body), len(body), address(ctype), len(ctype)
        head[2] = done
    except InferError as exc:
        fail("infer", exc.message, infer_kind=exc.kind)
    except Reject as exc:
        fail("rejected", exc.message, status=exc.status)
    except MemoryError as exc:
        traceback.clear_frames(exc.__traceback__)
        fail("memory", _message(exc), traceback=_traceback(exc))
    except BaseException as exc:  # noqa: BLE001 - SystemExit too: the host must get an answer
        fail("failed", _message(exc), traceback=_traceback(exc))


def _streams(result: Any) -> bool:
    """Whether a handler's result is an iterator of parts (a generator, `iter(...)`), not a body."""
    return hasattr(result, "__next__") and not isinstance(result, _BODIES)


_BODIES = (bytes, bytearray, memoryview, str)  # a tuple: a union in `isinstance` is built per call


def _stream(parts: Any) -> bytes:
    """Sends each part as it comes (`part_frame`). Returns the answer's content type: the first
    part's kind."""
    try:
        for part in parts:
            door(b"w", part_frame(part))
    finally:
        close = getattr(parts, "close", None)
        if close is not None:  # now, in this invocation: its `with` blocks free their host state
            close()
    return _first_type or _TEXT_TYPE


_TEXT_TYPE = b"text/plain; charset=utf-8"
_first_type = b""  # the kind of the invocation's first part (b"": none sent yet); `invoke` resets it


def part_frame(part: Any) -> bytes:
    """A `w` frame's payload for one part of a streamed answer: str as UTF-8 text, bytes as they
    are, dict or list as a JSON line, each with the first part's content type (a `Decoder` step
    sends one along too). Raises `TypeError` for any other part."""
    global _first_type
    if isinstance(part, str):
        data, kind = part.encode("utf-8"), _TEXT_TYPE
    elif isinstance(part, _BYTES_LIKE):
        data, kind = bytes(part), b"application/octet-stream"
    elif isinstance(part, _JSON_LIKE):
        data, kind = json.dumps(part, separators=(",", ":")).encode() + b"\n", b"application/x-ndjson"
    else:
        raise TypeError(f"a part of a streamed answer is str, bytes, dict or list, not {type(part).__name__}")
    ctype = _first_type = _first_type or kind
    return _u32(len(ctype)) + ctype + data


validate, load, invoke = _flushed(validate), _flushed(load), _flushed(invoke)


def addresses() -> None:
    """Tells the host where the entry points are (CPython's objects never move)."""
    door(b"a", json.dumps({"validate": id(validate), "load": id(load), "invoke": id(invoke),
                           "inbox": _buffer_address(INBOX), "inbox_bytes": INBOX_BYTES,
                           "head_bytes": HEAD_BYTES}).encode())


def freeze() -> None:
    """Called last when the snapshot is made: collects garbage and freezes every object alive, so
    that the garbage collector never visits (and writes to) the pages every instance shares."""
    sys.stdout.flush()
    sys.stderr.flush()
    gc.collect()
    gc.freeze()
