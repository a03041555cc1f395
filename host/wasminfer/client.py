"""`Client`: the Python client of a wasminfer server (what the CLI uses).

Every method returns the JSON the server answered (or an `Invocation` for `invoke`) and raises the
server's error as the `wasminfer.errors` type it was on the server, rebuilt from the JSON error body
(`FunctionNotFound`, `TooManyRequests` with `retry_after_s`, …); a server that cannot be reached is
`ServerUnreachable`.

It speaks HTTP/1.1 through urllib3's connection pool (kept-alive connections, one per thread at a
time, a dropped one noticed before it is reused). It spoke it through httpx until that cost more than
the server's own work on small calls: on loopback here, a small invocation's round trip took 0.63 ms
with httpx, 0.44 with urllib3 (the server's part ~0.2); a new digits function's upload and first
answer 9.64 ms with httpx, 8.39 with urllib3 (alternating, medians of 12).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit
from urllib.request import getproxies, proxy_bypass

import urllib3
from urllib3.exceptions import HTTPError as TransportError

from wasminfer.errors import ServerUnreachable, WasminferError, error_from_dict, error_from_http
from wasminfer.manifest import Manifest

DEFAULT_URL = "http://127.0.0.1:8000"
JSONL = "application/jsonl"  # batch bodies and results

__all__ = ["DEFAULT_URL", "Client", "Invocation", "error_from_response"]


@dataclass(frozen=True)
class Invocation:
    """What a function answered."""

    body: bytes
    content_type: str
    invocation_id: str
    server_timing: dict[str, float] = field(default_factory=dict)  # name -> ms (queue, start, run, …)


def error_from_response(response: urllib3.BaseHTTPResponse) -> WasminferError:
    """The `WasminferError` a failed response carries (`wasminfer.errors.error_from_http`): of the
    class its `code` names, else the one its status names, with the server's message and code."""
    return error_from_http(response.status, response.data, response.headers.get("retry-after"))


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


_DEFAULT_MANIFEST = Manifest().to_dict()


def _manifest_query(m: Mapping[str, Any]) -> dict[str, list[str]] | None:
    """Manifest `m` as the query parameters of an upload whose body is the bytes alone (what the
    server reads back with `Manifest.from_query`): its keys that differ from the defaults; or None
    when they cannot carry it as it is (a comma inside an argument, a boolean, a manifest the server
    would refuse: multipart/form-data then carries it, and the server's answer says what is wrong)."""
    try:
        want = Manifest.from_dict(m)
    except WasminferError:
        return None
    query: dict[str, list[str]] = {}
    for key, value in want.to_dict().items():
        if value == _DEFAULT_MANIFEST[key]:
            continue
        if isinstance(value, dict):
            query[key] = [f"{k}={v}" for k, v in value.items()]
        elif isinstance(value, list):
            query[key] = [str(v) for v in value]
        elif isinstance(value, bool) or value is None:
            return None
        else:
            query[key] = [str(value)]
    try:
        return query if Manifest.from_query(query) == want else None
    except WasminferError:
        return None


class Client:
    """A wasminfer server at `url`, with API key `key` (None: no Authorization header); `timeout`:
    seconds to connect, and between the bytes of an answer. Safe to share between threads. A context
    manager; `close()` is idempotent."""

    #: Idle connections kept to the server: one per thread that calls at the same time, up to this.
    MAX_IDLE_CONNECTIONS = 20

    def __init__(self, url: str = DEFAULT_URL, key: str | None = None, *, timeout: float = 120.0) -> None:
        self.url = url.rstrip("/")
        parts = urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL of a wasminfer server: {url!r}")
        self._headers = {"authorization": f"Bearer {key}"} if key else {}
        options: dict[str, Any] = {"maxsize": self.MAX_IDLE_CONNECTIONS, "retries": False,
                                   "timeout": urllib3.Timeout(connect=timeout, read=timeout)}
        # The environment's proxy for this URL ($http_proxy, $https_proxy, $no_proxy), as httpx took it.
        proxy = None if proxy_bypass(parts.hostname) else getproxies().get(parts.scheme)
        self._pool: urllib3.ProxyManager | urllib3.HTTPConnectionPool
        if proxy:  # the manager sends each request through the proxy: absolute targets
            self._pool, self._base = urllib3.ProxyManager(proxy, **options), self.url
        else:  # the server's own pool: targets are paths (under the URL's, for a server behind one)
            self._pool, self._base = urllib3.connection_from_url(self.url, **options), parts.path

    def close(self) -> None:
        if isinstance(self._pool, urllib3.ProxyManager):
            self._pool.clear()
        else:
            self._pool.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- plumbing -----------------------------------------------------------------------------------
    def _send(self, method: str, path: str, body: bytes | None, params: Mapping[str, Any] | None,
              headers: Mapping[str, str] | None, stream: bool) -> urllib3.BaseHTTPResponse:
        target = self._base + path
        if params:
            target += "?" + urlencode(params, doseq=True)
        try:
            return self._pool.urlopen(method, target, body=body, headers={**self._headers, **(headers or {})},
                                      redirect=False, preload_content=not stream)
        except TransportError as exc:
            raise ServerUnreachable(f"cannot reach the wasminfer server at {self.url}: {exc}") from None

    def _request(self, method: str, path: str, body: bytes | None = None, *,
                 params: Mapping[str, Any] | None = None,
                 headers: Mapping[str, str] | None = None) -> urllib3.BaseHTTPResponse:
        response = self._send(method, path, body, params, headers, False)
        if response.status >= 400:
            raise error_from_response(response)
        return response

    def _json(self, method: str, path: str, body: bytes | None = None, **kwargs: Any) -> Any:
        return json.loads(self._request(method, path, body, **kwargs).data)

    def _lines(self, method: str, path: str, body: bytes | None = None,
               headers: Mapping[str, str] | None = None) -> Iterator[str]:
        """The answer's lines as they arrive (without their ends), for a streamed answer. Raises the
        server's error, and `ServerUnreachable` when the connection fails before the end."""
        response = self._send(method, path, body, None, headers, True)
        finished = False
        try:
            if response.status >= 400:
                response.read(cache_content=True)  # kept: `data` is what the error is read from
                raise error_from_response(response)
            pending: list[bytes] = []  # the start of a line not ended yet
            for chunk in response.read_chunked() if response.chunked else response.stream(1 << 16):
                *lines, rest = chunk.split(b"\n")
                if lines:
                    lines[0] = b"".join((*pending, lines[0]))
                    pending = []
                    for line in lines:
                        yield line.rstrip(b"\r").decode()
                if rest:
                    pending.append(rest)
            if pending:
                yield b"".join(pending).rstrip(b"\r").decode()
            finished = True
        except TransportError as exc:
            raise ServerUnreachable(f"cannot reach the wasminfer server at {self.url}: {exc}") from None
        finally:
            if finished:
                response.release_conn()  # read to its end: the connection serves the next request
            else:
                response.close()  # left before the end (an error event, a caller that stopped reading)

    # --- server -------------------------------------------------------------------------------------
    def health(self) -> dict[str, Any]:
        result: dict[str, Any] = self._json("GET", "/healthz")
        return result

    def ready(self) -> dict[str, Any]:
        """The readiness report. Raises `Unavailable` while the server loads its store."""
        result: dict[str, Any] = self._json("GET", "/readyz")
        return result

    # --- models -------------------------------------------------------------------------------------
    def put_model(self, name: str, model: bytes | Path, **options: int | None) -> dict[str, Any]:
        """Uploads ONNX bytes (or a file) as model `name` with load `options` (`max_batch_size`,
        `max_queue_delay_us`, `max_concurrent_batches`, `intra_op_threads`, `inter_op_threads`,
        `max_concurrent_runs`, `memory_arena`; None: the default); `created` says whether it is a
        new version."""
        data = model.read_bytes() if isinstance(model, Path) else model
        result: dict[str, Any] = self._json(
            "PUT",
            f"/v1/models/{name}",
            data,
            params={k: str(v) for k, v in options.items() if v is not None},
            headers={"content-type": "application/octet-stream"},
        )
        return result

    def patch_model(self, name: str, **changes: int | None) -> dict[str, Any]:
        """Changes load options of model `name` (None: back to the default) as a new version."""
        result: dict[str, Any] = self._json("PATCH", f"/v1/models/{name}", json.dumps(changes).encode(),
                                            headers={"content-type": "application/json"})
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
        """Uploads a module (bytes or a `.wasm` file), or a Python function's files zipped
        (`pysource.bundle_folder`), with its manifest as a new version of `name`."""
        m = manifest.to_dict() if isinstance(manifest, Manifest) else dict(manifest or {})
        data = wasm.read_bytes() if isinstance(wasm, Path) else wasm
        media_type = "application/zip" if data[:4] == b"PK\x03\x04" else "application/wasm"
        query = _manifest_query(m)
        if query is not None:  # the bytes as the body (no multipart to frame and parse: ~0.6 ms less)
            result: dict[str, Any] = self._json("PUT", f"/v1/functions/{name}", data, params=query,
                                                headers={"content-type": media_type})
            return result
        form, form_type = urllib3.encode_multipart_formdata({
            "wasm": (f"{name}.{media_type[12:]}", data, media_type),
            "manifest": json.dumps(m),
        })
        result = self._json("PUT", f"/v1/functions/{name}", form, headers={"content-type": form_type})
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
        r = self._request("POST", f"/v1/functions/{name}/invoke", body,
                          headers={"content-type": content_type})
        return Invocation(
            r.data,
            r.headers.get("content-type", ""),
            r.headers.get("x-invocation-id", ""),
            _server_timing(r.headers.get("server-timing", "")),
        )

    def invoke_stream(
        self, name: str, body: bytes = b"", content_type: str = "application/octet-stream"
    ) -> Iterator[str]:
        """The parts of a streamed invocation as they come (Server-Sent Events; docs/streaming.md).
        Raises the invocation's error: before the first part as `invoke` does, after it when its
        error event comes."""
        headers = {"content-type": content_type, "accept": "text/event-stream"}
        event, data = "message", []
        for line in self._lines("POST", f"/v1/functions/{name}/invoke", body, headers):
            if line:
                field, _, value = line.partition(":")
                value = value[1:] if value.startswith(" ") else value
                if field == "event":
                    event = value
                elif field == "data":
                    data.append(value)
                continue
            if event == "error":
                raise error_from_dict(json.loads("\n".join(data))["error"])
            if event == "message":
                yield "\n".join(data)
            event, data = "message", []

    def logs(self, name: str, n: int = 200, since: float | None = None) -> list[dict[str, Any]]:
        params: dict[str, str] = {"n": str(n)}
        if since is not None:
            params["since"] = repr(since)
        result: list[dict[str, Any]] = self._json("GET", f"/v1/functions/{name}/logs", params=params)["lines"]
        return result

    # --- jobs: asynchronous and bulk invocation -----------------------------------------------------
    def invoke_async(
        self,
        name: str,
        body: bytes = b"",
        content_type: str = "application/octet-stream",
        *,
        idempotency_key: str | None = None,
        webhook: str | None = None,
        ttl_s: float | None = None,
    ) -> dict[str, Any]:
        """Submits one invocation as a job (`Prefer: respond-async`); returns the job's view (`id`,
        `status`, …). Its output comes later from `job_result` (see `wait_job`)."""
        headers = {"content-type": content_type, "prefer": "respond-async"}
        result: dict[str, Any] = self._json(
            "POST",
            f"/v1/functions/{name}/invoke",
            body,
            headers={**headers, **_job_headers(idempotency_key)},
            params=_job_params(webhook, ttl_s),
        )
        return result

    def batch(
        self,
        name: str,
        items: bytes | Path | Iterable[Any],
        content_type: str = JSONL,
        *,
        item_content_type: str | None = None,
        idempotency_key: str | None = None,
        webhook: str | None = None,
        ttl_s: float | None = None,
    ) -> dict[str, Any]:
        """Submits a bulk invocation: a JSON Lines (or, with `content_type="application/cbor"`, a
        CBOR array) body as bytes or a file, or an iterable of JSON values sent as JSON Lines.
        Returns the job's view; per-item results come from `job_results`."""
        if isinstance(items, Path):
            data = items.read_bytes()
        elif isinstance(items, bytes | bytearray):
            data = bytes(items)
        else:
            data = b"".join(json.dumps(item, separators=(",", ":")).encode() + b"\n" for item in items)
            content_type = JSONL
        params = _job_params(webhook, ttl_s)
        if item_content_type is not None:
            params["item_content_type"] = item_content_type
        result: dict[str, Any] = self._json(
            "POST",
            f"/v1/functions/{name}/batch",
            data,
            headers={"content-type": content_type, **_job_headers(idempotency_key)},
            params=params,
        )
        return result

    def job(self, job_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self._json("GET", f"/v1/jobs/{job_id}")
        return result

    def jobs(
        self, *, status: str | None = None, function: str | None = None, limit: int = 50
    ) -> list[dict[str, Any]]:
        """The caller's jobs, newest first."""
        params = {"limit": str(limit)}
        params.update({k: v for k, v in (("status", status), ("function", function)) if v is not None})
        result: list[dict[str, Any]] = self._json("GET", "/v1/jobs", params=params)["jobs"]
        return result

    def cancel_job(self, job_id: str) -> dict[str, Any] | None:
        """Cancels a job that has not finished (returns its view), or deletes a finished one
        (returns None). Raises `Conflict` for an invoke job that has started."""
        r = self._request("DELETE", f"/v1/jobs/{job_id}")
        if r.status == 204:
            return None
        result: dict[str, Any] = json.loads(r.data)
        return result

    def wait_job(
        self,
        job_id: str,
        *,
        timeout: float | None = None,
        poll_s: float = 0.5,
        progress: Callable[[dict[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        """Polls the job until it has finished (succeeded, failed or cancelled) and returns its
        view; `progress` is called with every view seen. Raises `TimeoutError` after `timeout` s."""
        deadline = None if timeout is None else time.monotonic() + timeout
        wait = 0.02
        while True:
            view = self.job(job_id)
            if progress is not None:
                progress(view)
            if view["status"] in ("succeeded", "failed", "cancelled"):
                return view
            if deadline is not None and time.monotonic() + wait > deadline:
                raise TimeoutError(f"job {job_id} is still {view['status']} after {timeout} s")
            time.sleep(wait)
            wait = min(poll_s, wait * 2)

    def job_result(self, job_id: str) -> Invocation:
        """The output of a succeeded invoke job. Raises `JobNotFinished` (409) before it has
        finished, and a failed job's error (as the synchronous call would have raised it)."""
        r = self._request("GET", f"/v1/jobs/{job_id}/result")
        return Invocation(r.data, r.headers.get("content-type", ""), job_id)

    def job_results(self, job_id: str) -> Iterator[dict[str, Any]]:
        """The results of a batch job's finished items, in order, streamed: `{"index", "status",
        "content_type", "output" | "output_b64"}` or `{"index", "status", "error"}`."""
        for line in self._lines("GET", f"/v1/jobs/{job_id}/result"):
            if line:
                yield json.loads(line)


def _job_headers(idempotency_key: str | None) -> dict[str, str]:
    return {"idempotency-key": idempotency_key} if idempotency_key is not None else {}


def _job_params(webhook: str | None, ttl_s: float | None) -> dict[str, str]:
    params: dict[str, str] = {}
    if webhook is not None:
        params["webhook"] = webhook
    if ttl_s is not None:
        params["ttl_s"] = repr(ttl_s)
    return params
