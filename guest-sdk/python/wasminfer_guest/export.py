"""`@handler`: the function's entry point, and `Handler`, the class the component exports.

componentize-py calls `Handler.handle` with the request; it calls the function registered with
`@handler` and turns what happens into the WIT world's result: the response, or a `failure` (an
exception: its message for the caller, its traceback for the function's logs), `rejected` (a
`Reject`: a 4xx for the caller), `out-of-memory` (a MemoryError) or `infer` (an `InferError` the
function let through).
"""

from __future__ import annotations

import gc
import linecache
import os
import traceback
from collections.abc import Callable
from types import ModuleType
from typing import Any

from wasminfer_guest import _bindings as b
from wasminfer_guest.http import Reject, Request, Response
from wasminfer_guest.inference import InferError, to_wit_error

HandlerFn = Callable[[Request], Any]
_registered: HandlerFn | None = None
MAX_TRACEBACK = 16 << 10


def handler(fn: HandlerFn) -> HandlerFn:
    """Registers `fn(request) -> Response | bytes | str | dict | list` as the function's handler.

    One per function; the last registration wins.
    """
    global _registered
    if not callable(fn):
        raise TypeError("@handler decorates a function taking a Request")
    _registered = fn
    return fn


def registered() -> HandlerFn:
    if _registered is None:
        raise LookupError("no handler: decorate the function's entry point with @wasminfer_guest.handler")
    return _registered


def call(body: bytes, content_type: str) -> Response:
    """Runs the registered handler on one request (what the host's `handle` does, minus the WIT)."""
    return Response.of(registered()(Request(body, content_type)))


def prepare(module: ModuleType) -> None:
    """Called once by the entry module the build generates, after the function's module is imported
    (that is, while componentize-py snapshots the interpreter at build time):

    - checks that the module registered a handler (the build fails otherwise);
    - keeps the source lines of the function's files, so tracebacks at run time show them (the
      files themselves are not there at run time);
    - collects garbage and freezes every object alive: the garbage collector never visits them
      again, so an instance's first requests do not write to (and copy) the pages of the snapshot
      that every instance shares.
    """
    registered()
    folder = os.path.dirname(os.path.abspath(module.__file__ or "."))
    for root, _dirs, files in os.walk(folder):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(root, name)
                try:
                    with open(path, encoding="utf-8") as f:
                        lines = f.read().splitlines(keepends=True)
                except (OSError, UnicodeDecodeError):
                    continue
                # mtime None: linecache.checkcache keeps the entry although the file is gone
                linecache.cache[path] = (sum(map(len, lines)), None, lines, path)
    gc.collect()
    gc.freeze()


_SDK = os.path.dirname(os.path.abspath(__file__))


def _failure(exc: BaseException) -> Any:
    try:
        message = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        tb = exc.__traceback__
        while tb is not None and tb.tb_frame.f_code.co_filename.startswith(_SDK):
            tb = tb.tb_next  # the SDK's own frames on the way to the handler say nothing
        tb_text = "".join(traceback.format_exception(type(exc), exc, tb))
    except BaseException:  # noqa: BLE001 - formatting may fail when memory is short
        message, tb_text = type(exc).__name__, ""
    if len(tb_text) > MAX_TRACEBACK:
        tb_text = "…" + tb_text[-MAX_TRACEBACK:]
    return b.wit_handler.Failure(message=message[:4096], traceback=tb_text)


if b.IN_COMPONENT:

    class Handler(b.wit_exports.Handler):
        """The export `wasminfer:function/handler` (componentize-py finds it by this name)."""

        def handle(self, request: Any) -> Any:
            try:
                response = call(request.body, request.content_type)
            except InferError as exc:
                raise b.Err(b.wit_handler.HandlerError_Infer(to_wit_error(exc))) from None
            except Reject as exc:
                rejection = b.wit_handler.Rejection(status=exc.status, message=exc.message[:4096])
                raise b.Err(b.wit_handler.HandlerError_Rejected(rejection)) from None
            except MemoryError as exc:
                traceback.clear_frames(exc.__traceback__)  # free their locals; keep the line numbers
                raise b.Err(b.wit_handler.HandlerError_OutOfMemory(_failure(exc))) from None
            except BaseException as exc:  # noqa: BLE001 - SystemExit too: the host must get an answer
                raise b.Err(b.wit_handler.HandlerError_Failed(_failure(exc))) from None
            return b.wit_handler.Response(body=response.body, content_type=response.content_type)
