"""A host replica process (`wasminfer worker`): a whole `Platform` on the gateway's data folder,
behind a small internal HTTP endpoint that only the gateway calls.

It loads nothing at start: every routed request carries the deployment digest of its function, and
a replica whose copy is missing or stale reloads it (and its models, by sha256) from the store first
(`Platform.sync`). Its own instance autoscaler runs over its own pools.

The endpoint is a bare ASGI app (no starlette: this layer sits under the gateway) on a unix socket
in a folder only the gateway's user can enter (0700), or on a loopback port:

- `POST /invoke/{tenant}/{name}` — header `x-wasminfer-deployment`; the response has the
  function's body and content type, and `x-wasminfer-timing: queue,start,run,infer,cold,id`
  (µs); an error is `{"error": …}` of its wire form (`WasminferError.to_dict`) with its status
  and its `http_headers()`.
- `POST /warm` — JSON `[[tenant, name, deployment], …]`: load these before taking requests.
- `GET /stats` — instance pools, the loaded models' options, recent instance decisions.
  `GET /readyz`.

The process exits when its parent (the gateway) is gone, and on SIGTERM finishes what is in flight
(uvicorn's graceful shutdown) before it closes its platform.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread

from wasminfer.errors import BadRequest, NotFound, WasminferError
from wasminfer.replicas.instances import InstanceController, instance_stats
from wasminfer.scaling import DecisionLog, ScalingConfig
from wasminfer.service import Platform
from wasminfer.syntax import is_header_value

log = logging.getLogger("wasminfer.worker")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

DEPLOYMENT_HEADER = b"x-wasminfer-deployment"
TIMING_HEADER = "x-wasminfer-timing"


class _Disconnected(Exception):
    pass


class WorkerApp:
    """The internal endpoint of one replica process over `platform`."""

    def __init__(self, platform: Platform, instances: InstanceController, threads: int = 64) -> None:
        self.platform = platform
        self.instances = instances
        self.threads = threads
        self._limiter: anyio.CapacityLimiter | None = None  # made on the event loop, at first use

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        method, path = scope["method"], scope["path"]
        try:
            if method == "POST" and path.startswith("/invoke/"):
                await self._invoke(scope, receive, send)
            elif method == "POST" and path == "/warm":
                await self._warm(receive, send)
            elif method == "GET" and path == "/stats":
                await _json(send, 200, self.stats())
            elif method == "GET" and path == "/readyz":
                await _json(send, 200 if self.platform.ready else 503, {"ready": self.platform.ready})
            else:
                raise NotFound(f"no route {method} {path} on a replica")
        except _Disconnected:
            return
        except WasminferError as exc:
            headers = [(k.lower().encode(), v.encode()) for k, v in exc.http_headers().items()]
            await _json(send, exc.status, {"error": exc.to_dict()}, headers)
        except Exception:
            log.exception("unexpected error on %s %s", method, path)
            await _json(send, 500, {"error": WasminferError("internal server error").to_dict()})

    @property
    def limiter(self) -> anyio.CapacityLimiter:
        if self._limiter is None:
            self._limiter = anyio.CapacityLimiter(self.threads)
        return self._limiter

    async def _invoke(self, scope: Scope, receive: Receive, send: Send) -> None:
        parts = scope["path"].split("/")
        if len(parts) != 4 or not parts[2] or not parts[3]:
            raise NotFound(f"no route {scope['path']} on a replica")
        tenant, name = parts[2], parts[3]
        headers = dict(scope["headers"])
        deployment = headers.get(DEPLOYMENT_HEADER, b"").decode("latin-1")
        content_type = headers.get(b"content-type", b"application/octet-stream").decode("latin-1")
        body = await _read_body(receive)
        platform = self.platform

        def run() -> Any:
            if deployment:
                platform.sync(name, deployment, tenant=tenant)
            return platform.invoke(name, body, content_type, tenant=tenant)

        result = await anyio.to_thread.run_sync(run, limiter=self.limiter)
        # The gateway sends a guest's content type on only if it is a plain header value; this
        # process must not even write one that is not (a CR/LF would split its own response).
        ctype = result.content_type if is_header_value(result.content_type) else "application/octet-stream"
        timing = (
            f"{result.queue_us:.1f},{result.start_us:.1f},{result.run_us:.1f},{result.infer_us:.1f},"
            f"{int(result.cold)},{result.invocation_id}"
        )
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", ctype.encode()),
                    (b"content-length", str(len(result.body)).encode()),
                    (TIMING_HEADER.encode(), timing.encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": result.body})

    async def _warm(self, receive: Receive, send: Send) -> None:
        try:
            specs = json.loads(await _read_body(receive))
            items = [(str(t), str(n), str(d)) for t, n, d in specs]
        except (ValueError, TypeError) as exc:
            raise BadRequest(f"/warm takes [[tenant, name, deployment], …]: {exc}") from None
        platform = self.platform

        def warm() -> dict[str, str]:
            outcome = {}
            for tenant, name, deployment in items:
                try:
                    platform.sync(name, deployment, tenant=tenant)
                    outcome[f"{tenant}/{name}"] = "ok"
                except WasminferError as exc:
                    outcome[f"{tenant}/{name}"] = f"{exc.code}: {exc.message}"
            return outcome

        await _json(send, 200, await anyio.to_thread.run_sync(warm))

    def stats(self) -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "functions": instance_stats(self.platform, self.instances),
            "models": {
                f"{tenant}/{model.name}": model.options()
                for tenant, host in self.platform.hosts().items()
                for model in host.models.list()
            },
            "decisions": [d.to_dict() for d in self.instances.decisions.recent(50)],
        }


async def _read_body(receive: Receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _Disconnected
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def _json(send: Send, status: int, data: Any, headers: list[tuple[bytes, bytes]] | None = None) -> None:
    body = json.dumps(data, separators=(",", ":")).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *(headers or []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def watch_parent(parent: int, server: Any) -> None:
    """Stops the server once the gateway that started this process is gone (killed, crashed):
    its replica processes must not outlive it."""
    while not server.should_exit:
        if os.getppid() != parent:
            log.warning("the gateway (pid %d) is gone: shutting down", parent)
            server.should_exit = True
            return
        time.sleep(0.5)


def serve_worker(
    data: Path,
    *,
    socket_path: Path | None = None,
    port: int | None = None,
    parent: int | None = None,
    threads: int = 64,
    config: ScalingConfig | None = None,
    replica_id: str = "local",
    log_level: str = "warning",
) -> None:
    """Runs one replica process until SIGTERM/SIGINT (or its parent is gone)."""
    import uvicorn

    if (socket_path is None) == (port is None):
        raise BadRequest("a replica listens on exactly one of a unix socket or a loopback port")
    config = config or ScalingConfig()
    logging.basicConfig(level=log_level.upper(), format=f"[{replica_id}] %(levelname)s %(name)s: %(message)s")
    platform = Platform(data)
    instances = InstanceController(platform, config.instance_policy(), DecisionLog(), replica_id)
    try:
        platform.start(load=False)
        instances.start()
        server = uvicorn.Server(
            uvicorn.Config(
                WorkerApp(platform, instances, threads),
                uds=str(socket_path) if socket_path is not None else None,
                host="127.0.0.1",
                port=port or 0,
                lifespan="off",
                log_level=log_level,
                access_log=False,
                timeout_graceful_shutdown=30,
                # The gateway keeps its connections open: an idle one closed under it costs a retry.
                timeout_keep_alive=3600,
                server_header=False,
                date_header=False,
            )
        )
        if parent is not None:
            threading.Thread(target=watch_parent, args=(parent, server), daemon=True).start()
        # uvicorn re-raises the SIGTERM it shut down for once it has finished, with the handler it
        # found installed: this one lets the process close its platform and exit with status 0.
        signal.signal(signal.SIGTERM, lambda *_: None)
        server.run()
    finally:
        instances.close()
        platform.close()
