"""The whole error hierarchy of wasminfer, in one place.

Every error a user can cause is a `WasminferError` subclass that carries an HTTP status and a
stable machine-readable `code`; the gateway maps them to responses in one handler. Subclasses build
their own message so that every raise site says the same thing the same way.
"""

from __future__ import annotations


class WasminferError(Exception):
    """Base of every error a caller can see. `status` is the HTTP status the gateway answers with."""

    status: int = 500
    code: str = "internal"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def to_dict(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message}


# --- 400: the request itself is malformed -------------------------------------------------------
class BadRequest(WasminferError):
    status, code = 400, "bad_request"


class InvalidManifest(BadRequest):
    code = "invalid_manifest"


class InvalidModule(BadRequest):
    """The uploaded bytes are not a Wasm module/component the host can run."""

    code = "invalid_wasm"


class InvalidModel(BadRequest):
    """The uploaded bytes are not an ONNX model the host can load."""

    code = "invalid_model"


class InvalidName(BadRequest):
    code = "invalid_name"

    def __init__(self, kind: str, name: str) -> None:
        super().__init__(
            f"invalid {kind} name {name!r}: use 1-64 characters of a-z, 0-9, '-', '_', '.', "
            "starting with a letter or digit"
        )


# --- 401 / 403 ----------------------------------------------------------------------------------
class Unauthorized(WasminferError):
    status, code = 401, "unauthorized"


class Forbidden(WasminferError):
    status, code = 403, "forbidden"


class ModelNotAllowed(Forbidden):
    """A function asked for a model its manifest does not name (deny by default)."""

    code = "model_not_allowed"

    def __init__(self, function: str, model: str) -> None:
        super().__init__(
            f"function {function!r} may not use model {model!r}: add it to the manifest key "
            f"'models' (e.g. models={model})"
        )


# --- 404 ----------------------------------------------------------------------------------------
class NotFound(WasminferError):
    status, code = 404, "not_found"


class FunctionNotFound(NotFound):
    code = "function_not_found"

    def __init__(self, name: str, version: str | None = None) -> None:
        what = f"function {name!r}" + (f" version {version!r}" if version else "")
        super().__init__(f"{what} does not exist")


class ModelNotFound(NotFound):
    code = "model_not_found"

    def __init__(self, name: str) -> None:
        super().__init__(f"model {name!r} does not exist")


class JobNotFound(NotFound):
    code = "job_not_found"

    def __init__(self, job_id: str) -> None:
        super().__init__(f"job {job_id!r:.80} does not exist (or its results expired)")


# --- 408 / 409 / 413 / 415 / 422 ----------------------------------------------------------------
class RequestTimeout(WasminferError):
    """The client sent its request's headers or body too slowly; the server closes the connection."""

    status, code = 408, "request_timeout"


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


class InvalidTensor(WasminferError):
    """A tensor given to a model has the wrong name, dtype or shape, or does not decode."""

    status, code = 422, "invalid_tensor"


class TensorTooLarge(InvalidTensor):
    code = "tensor_too_large"


# --- 429 / 503: overload ------------------------------------------------------------------------
class TooManyRequests(WasminferError):
    status, code = 429, "too_many_requests"

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class Unavailable(WasminferError):
    status, code = 503, "unavailable"


class ServerUnreachable(Unavailable):
    """`wasminfer.Client` could not reach the server (raised by the client, never sent by a server)."""

    code = "unreachable"


# --- 500 / 504: the guest failed ----------------------------------------------------------------
class GuestError(WasminferError):
    """The function returned an error status; `message` is the guest's own message."""

    status, code = 500, "guest_error"


class GuestTrap(GuestError):
    """The guest trapped (unreachable, out-of-bounds access, stack overflow, host-import misuse)."""

    code = "guest_trap"


class MemoryLimitExceeded(GuestError):
    code = "memory_limit_exceeded"


class OutputLimitExceeded(GuestError):
    code = "output_limit_exceeded"


class LogLimitExceeded(GuestError):
    code = "log_limit_exceeded"


class InferLimitExceeded(GuestError):
    code = "infer_limit_exceeded"


class InferenceFailed(GuestError):
    """ONNX Runtime failed while running a model on inputs that passed validation."""

    code = "inference_failed"


class Timeout(WasminferError):
    status, code = 504, "timeout"
