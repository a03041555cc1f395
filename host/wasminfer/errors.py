"""The whole error hierarchy of wasminfer, in one place, and its one wire format.

Every error a user can cause is a `WasminferError` subclass that carries an HTTP status and a
stable machine-readable `code` of its own; subclasses build their own message so that every raise
site says the same thing the same way (the limits a manifest sets: `ManifestLimit`, `InvalidManifest`).

Errors cross process boundaries in one form, `to_dict()` (code, message, status, and
`retry_after_s` where the caller should wait), turned back into the same class by
`error_from_dict`: the gateway answers with it (`http_headers`, and the body's code and message),
worker replicas and Ray actors send it to the gateway, the client rebuilds it from a response
(`error_from_http`). Every class comes back through its own constructor (`from_wire`): one that
builds its message from other arguments also takes the finished message (`message=…`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar, Self


class WasminferError(Exception):
    """Base of every error a caller can see. `status` is the HTTP status the gateway answers with."""

    status: int = 500
    code: str = "internal"
    retry_after_s: float | None = None  # seconds the caller should wait before it tries again

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def to_dict(self) -> dict[str, Any]:
        """The wire form: `code`, `message`, `status` and, where set, `retry_after_s`."""
        wire: dict[str, Any] = {"code": self.code, "message": self.message, "status": self.status}
        if self.retry_after_s is not None:
            wire["retry_after_s"] = self.retry_after_s
        return wire

    def http_headers(self) -> dict[str, str]:
        """The headers an HTTP answer with this error carries besides its body."""
        if self.retry_after_s is None:
            return {}
        return {"Retry-After": str(max(1, math.ceil(self.retry_after_s)))}

    @classmethod
    def from_wire(cls, message: str, status: int, retry_after_s: float | None) -> WasminferError:
        """This class with the `message` (and `status`, `retry_after_s`) it crossed a boundary with.
        A class whose constructor needs more than its message overrides it."""
        return cls(message=message)


if TYPE_CHECKING:
    _LimitBase = WasminferError
else:
    _LimitBase = object


class ManifestLimit(_LimitBase):
    """Mixin of the errors a function causes by going past a limit its manifest sets: `exceeded`
    builds the message from the limit's key and value, so every raise site names the key that
    lifts it, the same way."""

    limit_key: ClassVar[str]
    limit_text: ClassVar[str]  # "memory limit of {} MiB": the limit, with its value

    @classmethod
    def exceeded(cls, function: str, what: str, limit: int, detail: str = "") -> Self:
        """E.g. `function 'f' ran out of memory (its memory limit of 16 MiB, manifest key
        'memory_mb')` + `detail`."""
        return cls(
            message=f"function {function!r} {what} (its {cls.limit_text.format(limit)}, "
            f"manifest key {cls.limit_key!r}){detail}"
        )


# --- 400: the request itself is malformed -------------------------------------------------------
class BadRequest(WasminferError):
    status, code = 400, "bad_request"


class InvalidManifest(BadRequest):
    code = "invalid_manifest"

    @classmethod
    def for_key(cls, key: str, problem: str) -> InvalidManifest:
        """E.g. `manifest key 'args' must be a list of strings`."""
        return cls(f"manifest key {key!r} {problem}")

    @classmethod
    def out_of_range(cls, key: str, value: int, lo: int, hi: int) -> InvalidManifest:
        return cls.for_key(key, f"must be between {lo} and {hi}, got {value}")


class InvalidSampling(BadRequest):
    """A decoder's sampling parameters are out of bounds (`models/sampling.py`)."""

    code = "invalid_sampling"


class InvalidModule(BadRequest):
    """The uploaded bytes are not a Wasm module/component the host can run."""

    code = "invalid_wasm"


class InvalidModel(BadRequest):
    """The uploaded bytes are not an ONNX model the host can load."""

    code = "invalid_model"


class InvalidName(BadRequest):
    code = "invalid_name"

    def __init__(self, kind: str = "", name: str = "", *, message: str = "") -> None:
        super().__init__(
            message
            or f"invalid {kind} name {name!r}: use 1-64 characters of a-z, 0-9, '-', '_', '.', "
            "starting with a letter or digit"
        )


class InvalidDigest(BadRequest):
    """A string used as a blob address is not a sha256 hex digest."""

    code = "invalid_digest"

    def __init__(self, value: object = "", *, message: str = "") -> None:
        super().__init__(message or f"not a sha256 digest (64 lowercase hex characters): {value!r:.80}")


# --- 401 / 403 ----------------------------------------------------------------------------------
class Unauthorized(WasminferError):
    status, code = 401, "unauthorized"

    def http_headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": 'Bearer realm="wasminfer"'}


class Forbidden(WasminferError):
    status, code = 403, "forbidden"


class ModelNotAllowed(Forbidden):
    """A function asked for a model its manifest does not name (deny by default)."""

    code = "model_not_allowed"

    def __init__(self, function: str = "", model: str = "", *, message: str = "") -> None:
        super().__init__(
            message
            or f"function {function!r} may not use model {model!r}: add it to the manifest key "
            f"'models' (e.g. models={model})"
        )


# --- 404 ----------------------------------------------------------------------------------------
class NotFound(WasminferError):
    status, code = 404, "not_found"


class FunctionNotFound(NotFound):
    code = "function_not_found"

    def __init__(self, name: str = "", version: str | None = None, *, message: str = "") -> None:
        what = f"function {name!r}" + (f" version {version!r}" if version else "")
        super().__init__(message or f"{what} does not exist")


class ModelNotFound(NotFound):
    code = "model_not_found"

    def __init__(self, name: str = "", *, message: str = "") -> None:
        super().__init__(message or f"model {name!r} does not exist")


class ModelVersionNotFound(ModelNotFound):
    """A model exists but not at the version asked for."""

    code = "model_version_not_found"

    def __init__(self, name: str = "", version: int = 0, *, message: str = "") -> None:
        super().__init__(message=message or f"model {name!r} version {version} does not exist")


class JobNotFound(NotFound):
    code = "job_not_found"

    def __init__(self, job_id: str = "", *, message: str = "") -> None:
        super().__init__(message or f"job {job_id!r:.80} does not exist (or its results expired)")


class BlobNotFound(NotFound):
    code = "blob_not_found"

    def __init__(self, sha256: str = "", *, message: str = "") -> None:
        super().__init__(message or f"blob {sha256} does not exist")


# --- 408 / 409 / 413 / 415 / 422 ----------------------------------------------------------------
class RequestTimeout(WasminferError):
    """The client sent its request's headers or body too slowly; the server closes the connection."""

    status, code = 408, "request_timeout"

    def http_headers(self) -> dict[str, str]:
        # The rest of that body may still come: it must not be read as a next request.
        return {"Connection": "close"}


class Conflict(WasminferError):
    status, code = 409, "conflict"


class JobNotFinished(Conflict):
    """A job's result was asked for before the job finished."""

    code = "job_not_finished"


class IdempotencyKeyReused(WasminferError):
    """An `Idempotency-Key` came back with a different request than the one it was first used for."""

    status, code = 422, "idempotency_key_reused"


class PayloadTooLarge(WasminferError):
    status, code = 413, "payload_too_large"


class UnsupportedMediaType(WasminferError):
    status, code = 415, "unsupported_media_type"


class GuestRejected(WasminferError):
    """The function rejected its input: its handler returned an HTTP client-error status (400-499)."""

    code = "rejected_by_function"

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status

    @classmethod
    def from_wire(cls, message: str, status: int, retry_after_s: float | None) -> WasminferError:
        return cls(status, message)


class InvalidTensor(WasminferError):
    """A tensor given to a model has the wrong name, dtype or shape, or does not decode."""

    status, code = 422, "invalid_tensor"


class TensorTooLarge(ManifestLimit, InvalidTensor):
    code = "tensor_too_large"
    limit_key, limit_text = "max_tensor_bytes", "tensor limit of {} bytes"


# --- 429 / 503 / 507: overload -----------------------------------------------------------------
class TooManyRequests(WasminferError):
    status, code = 429, "too_many_requests"

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s

    @classmethod
    def from_wire(cls, message: str, status: int, retry_after_s: float | None) -> WasminferError:
        return cls(message, 1.0 if retry_after_s is None else retry_after_s)


class MemoryQuotaExceeded(TooManyRequests):
    """A new instance (or model) would take the tenant past its memory quota. 429, not 507: the
    tenant holds the memory itself, and it frees as its calls finish (retry after `Retry-After`)."""

    code = "memory_quota_exceeded"


class Unavailable(WasminferError):
    status, code = 503, "unavailable"


class HostMemoryExhausted(WasminferError):
    """The host's memory budget, shared by every tenant, is fully reserved. 507 (Insufficient
    Storage: the server lacks room to complete this request), not 429 (the caller is within its own
    quota) nor 503 (the server is up and serves whatever needs no new memory)."""

    status, code = 507, "host_memory_exhausted"


class InvocationCancelled(Unavailable):
    """An invocation ended by the host before it finished (its function was deleted meanwhile)."""

    code = "invocation_cancelled"


class FunctionLoading(Unavailable):
    """The function is stored but still loading after a restart (its `_initialize` is slow)."""

    code = "function_loading"


class FunctionLoadFailed(Unavailable):
    """The function is stored but failed to load after a restart; its view says why."""

    code = "function_load_failed"


class ServerUnreachable(Unavailable):
    """`wasminfer.Client` could not reach the server (raised by the client, never sent by a server)."""

    code = "unreachable"


class NotDelivered(Unavailable):
    """The request never reached the replica (it could not be connected to): safe to send elsewhere."""

    code = "not_delivered"


class LostWithIdempotentRequest(NotDelivered):
    """The replica was lost with the request, and the function is idempotent: the fleet sends it
    once more, elsewhere."""

    code = "replica_lost"


# --- 500 / 504: the guest failed ----------------------------------------------------------------
class GuestError(WasminferError):
    """The function returned an error status; `message` is the guest's own message."""

    status, code = 500, "guest_error"


class GuestTrap(GuestError):
    """The guest trapped (unreachable, out-of-bounds access, stack overflow, host-import misuse)."""

    code = "guest_trap"


class MemoryLimitExceeded(ManifestLimit, GuestError):
    code = "memory_limit_exceeded"
    limit_key, limit_text = "memory_mb", "memory limit of {} MiB"


class OutputLimitExceeded(ManifestLimit, GuestError):
    code = "output_limit_exceeded"
    limit_key, limit_text = "max_output_bytes", "output limit of {} bytes"


class LogLimitExceeded(ManifestLimit, GuestError):
    code = "log_limit_exceeded"
    limit_key, limit_text = "max_log_bytes", "log limit of {} bytes per invocation"


class InferLimitExceeded(ManifestLimit, GuestError):
    code = "infer_limit_exceeded"
    limit_key, limit_text = "max_infer_calls", "limit of {} infer calls per invocation"


class InferenceFailed(GuestError):
    """ONNX Runtime failed while running a model on inputs that passed validation."""

    code = "inference_failed"


class DecoderNotFound(GuestError):
    """A guest named a decoder state its invocation does not hold (never opened, closed, freed at
    the end of an earlier invocation, or another's)."""

    code = "decoder_not_found"


class Timeout(ManifestLimit, WasminferError):
    status, code = 504, "timeout"
    limit_key, limit_text = "timeout_ms", "timeout of {} ms"


# --- the wire -----------------------------------------------------------------------------------
def _classes() -> list[type[WasminferError]]:
    found: list[type[WasminferError]] = []
    stack: list[type[WasminferError]] = [WasminferError]
    while stack:
        cls = stack.pop(0)
        if cls.__module__ == __name__ and cls not in found:
            found.append(cls)
        stack.extend(cls.__subclasses__())
    return found


#: code -> the class that declares it, for every error class of this module.
ERRORS: Mapping[str, type[WasminferError]] = {cls.code: cls for cls in _classes() if "code" in vars(cls)}
# A code this side does not know (a newer server's) comes back as the general class of its status.
_BY_STATUS: Mapping[int, type[WasminferError]] = {
    cls.status: cls
    for cls in (
        BadRequest, Unauthorized, Forbidden, NotFound, Conflict, PayloadTooLarge, UnsupportedMediaType,
        InvalidTensor, TooManyRequests, WasminferError, Unavailable, Timeout,
    )
}


def error_from_dict(wire: Mapping[str, Any]) -> WasminferError:
    """The error `WasminferError.to_dict` made `wire` from: the class its `code` names, else the
    general class of its `status` (keeping the code it was sent with), else `WasminferError`."""
    code, message = str(wire.get("code") or ""), str(wire.get("message", ""))
    status = _int(wire.get("status"), 500)
    retry = wire.get("retry_after_s")
    retry_after_s = float(retry) if isinstance(retry, int | float) and not isinstance(retry, bool) else None
    cls = ERRORS.get(code)
    if cls is not None:
        return cls.from_wire(message, status, retry_after_s)
    err = _BY_STATUS.get(status, WasminferError).from_wire(message, status, retry_after_s)
    err.status = status
    if code:
        err.code = code
    return err


def error_from_http(status: int, body: bytes, retry_after: str | bytes | None = None) -> WasminferError:
    """The error an HTTP answer carries: its body `{"error": {"code", "message", …}}` (the rest of
    the wire form, where the body lacks it, from the status line and `Retry-After`). A body that
    is not such JSON becomes a `WasminferError` of that status quoting it."""
    wire: dict[str, Any] = {"status": status}
    if retry_after is not None:
        try:
            wire["retry_after_s"] = float(retry_after)
        except ValueError:
            pass
    try:
        error = json.loads(body)["error"]
        wire.update(code=str(error["code"]), message=str(error["message"]))
        wire.update({k: error[k] for k in ("status", "retry_after_s") if k in error})
    except (ValueError, KeyError, TypeError):
        wire["message"] = f"HTTP {status}: {body[:200].decode('utf-8', 'replace')}"
    return error_from_dict(wire)


def _int(value: object, default: int) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else default
