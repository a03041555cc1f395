"""`Client`: the Python client of a wasminfer server (what the CLI uses).

Every method returns the JSON the server answered (or an `Invocation` for `invoke`) and raises the
server's error as the `wasminfer.errors` type it was on the server, rebuilt from the JSON error body
(`FunctionNotFound`, `TooManyRequests` with `retry_after_s`, …); a server that cannot be reached is
`ServerUnreachable`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from wasminfer import errors
from wasminfer.errors import ServerUnreachable, TooManyRequests, WasminferError
from wasminfer.manifest import Manifest

DEFAULT_URL = "http://127.0.0.1:8000"

__all__ = ["DEFAULT_URL", "Client", "Invocation", "error_from_response"]


@dataclass(frozen=True)
class Invocation:
    """What a function answered."""

    body: bytes
    content_type: str
    invocation_id: str
    server_timing: dict[str, float] = field(default_factory=dict)  # name -> ms (queue, start, run, …)


def _error_classes() -> dict[str, type[WasminferError]]:
    """code -> class, for every `WasminferError` subclass defined in `wasminfer.errors` (the first
    class wins when subclasses share a code)."""
    found: dict[str, type[WasminferError]] = {}
    stack: list[type[WasminferError]] = [WasminferError]
    while stack:
        cls = stack.pop(0)
        if cls.__module__ == errors.__name__:
            found.setdefault(cls.code, cls)
        stack.extend(cls.__subclasses__())
    return found


_BY_CODE = _error_classes()
_BY_STATUS = {
    cls.status: cls
    for cls in reversed(list(_BY_CODE.values()))
    if cls.code
    in {
        "bad_request",
        "unauthorized",
        "forbidden",
        "not_found",
        "conflict",
        "payload_too_large",
        "unsupported_media_type",
        "invalid_tensor",
        "too_many_requests",
        "internal",
        "unavailable",
        "timeout",
    }
}


def error_from_response(response: httpx.Response) -> WasminferError:
    """The `WasminferError` a failed response carries, of the class its `code` names (else the one
    its status names), with the server's message, code and status."""
    try:
        body = response.json()["error"]
        code, message = str(body["code"]), str(body["message"])
    except (ValueError, KeyError, TypeError):
        code, message = "", f"HTTP {response.status_code}: {response.text[:200]}"
    cls = _BY_CODE.get(code) or _BY_STATUS.get(response.status_code, WasminferError)
    err = cls.__new__(cls)  # subclasses build their messages from other arguments: skip their __init__
    WasminferError.__init__(err, message)
    err.status = response.status_code
    if code:
        err.code = code
    if isinstance(err, TooManyRequests):
        try:
            err.retry_after_s = float(response.headers.get("retry-after", "1"))
        except ValueError:
            err.retry_after_s = 1.0
    return err


def _server_timing(header: str) -> dict[str, float]:
    timings: dict[str, float] = {}
    for entry in header.split(","):
        name, _, params = entry.strip().partition(";")
        for param in params.split(";"):
            key, _, value = param.strip().partition("=")
            if key == "dur":
                try:
                    timings[name.strip()] = float(value)
                except ValueError:
                    pass
    return timings


class Client:
    """A wasminfer server at `url`, with API key `key` (None: no Authorization header).

    `http` may be any configured `httpx.Client` (e.g. Starlette's `TestClient`); the Client then
    does not close it. A context manager; `close()` is idempotent.
    """

    def __init__(
        self,
        url: str = DEFAULT_URL,
        key: str | None = None,
        *,
        timeout: float = 120.0,
        http: httpx.Client | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        headers = {"authorization": f"Bearer {key}"} if key else {}
        self._owned = http is None
        self._http = http if http is not None else httpx.Client(timeout=timeout)
        self._headers = headers

    def close(self) -> None:
        if self._owned:
            self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- plumbing -----------------------------------------------------------------------------------
    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        headers = {**self._headers, **kwargs.pop("headers", {})}
        try:
            response = self._http.request(method, self.url + path, headers=headers, **kwargs)
        except httpx.TransportError as exc:
            raise ServerUnreachable(f"cannot reach the wasminfer server at {self.url}: {exc}") from None
        if response.status_code >= 400:
            raise error_from_response(response)
        return response

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        return self._request(method, path, **kwargs).json()

    # --- server -------------------------------------------------------------------------------------
    def health(self) -> dict[str, Any]:
        result: dict[str, Any] = self._json("GET", "/healthz")
        return result

    def ready(self) -> dict[str, Any]:
        """The readiness report. Raises `Unavailable` while the server loads its store."""
        result: dict[str, Any] = self._json("GET", "/readyz")
        return result

    # --- models -------------------------------------------------------------------------------------
    def put_model(self, name: str, model: bytes | Path) -> dict[str, Any]:
        """Uploads ONNX bytes (or a file) as model `name`; `created` says whether it is a new version."""
        data = model.read_bytes() if isinstance(model, Path) else model
        result: dict[str, Any] = self._json(
            "PUT", f"/v1/models/{name}", content=data, headers={"content-type": "application/octet-stream"}
        )
        return result

    def models(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self._json("GET", "/v1/models")["models"]
        return result

    def model(self, name: str) -> dict[str, Any]:
        result: dict[str, Any] = self._json("GET", f"/v1/models/{name}")
        return result

    def delete_model(self, name: str) -> None:
        self._request("DELETE", f"/v1/models/{name}")

    # --- functions ----------------------------------------------------------------------------------
    def put_function(
        self, name: str, wasm: bytes | Path, manifest: Manifest | Mapping[str, Any] | None = None
    ) -> dict[str, Any]:
        """Uploads a module (bytes or a `.wasm` file) with its manifest as a new version of `name`."""
        m = manifest.to_dict() if isinstance(manifest, Manifest) else dict(manifest or {})
        data = wasm.read_bytes() if isinstance(wasm, Path) else wasm
        files = {
            "wasm": (f"{name}.wasm", data, "application/wasm"),
            "manifest": (None, json.dumps(m), "application/json"),
        }
        result: dict[str, Any] = self._json("PUT", f"/v1/functions/{name}", files=files)
        return result

    def functions(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self._json("GET", "/v1/functions")["functions"]
        return result

    def function(self, name: str) -> dict[str, Any]:
        result: dict[str, Any] = self._json("GET", f"/v1/functions/{name}")
        return result

    def delete_function(self, name: str) -> None:
        self._request("DELETE", f"/v1/functions/{name}")

    def versions(self, name: str) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self._json("GET", f"/v1/functions/{name}/versions")["versions"]
        return result

    def rollback(self, name: str, version: int | None = None) -> dict[str, Any]:
        params = {"version": str(version)} if version is not None else {}
        result: dict[str, Any] = self._json("POST", f"/v1/functions/{name}/rollback", params=params)
        return result

    def invoke(
        self, name: str, body: bytes = b"", content_type: str = "application/octet-stream"
    ) -> Invocation:
        r = self._request(
            "POST", f"/v1/functions/{name}/invoke", content=body, headers={"content-type": content_type}
        )
        return Invocation(
            r.content,
            r.headers.get("content-type", ""),
            r.headers.get("x-invocation-id", ""),
            _server_timing(r.headers.get("server-timing", "")),
        )

    def logs(self, name: str, n: int = 200, since: float | None = None) -> list[dict[str, Any]]:
        params: dict[str, str] = {"n": str(n)}
        if since is not None:
            params["since"] = repr(since)
        result: list[dict[str, Any]] = self._json("GET", f"/v1/functions/{name}/logs", params=params)["lines"]
        return result
