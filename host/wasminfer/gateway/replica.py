"""The HTTP side of processes that share the gateway's port (`replicas.reuseport`): what the
gateway's process and each replica process put around the app of `create_app`, and the replica
process itself (`serve_replica`, run by the hidden `wasminfer replica`).

A replica answers invocations itself — the same route, auth, scopes, admission, errors and
Server-Timing as the gateway, with its own `Platform` over the same data folder — and forwards
every other request (deploys, models, jobs, asynchronous invocations, `/metrics`, `/v1/scaling`,
the API's documentation) to the gateway's process over its unix socket: the store keeps one
writer, and what a request reads is what that writer sees. Only `/healthz` and `/readyz` are also
answered locally (they describe the process that answers). Every response a process makes itself
says which one it is (`Wasminfer-Replica`: `primary` or the replica's id).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from wasminfer.api_keys import parse_keys
from wasminfer.errors import WasminferError
from wasminfer.gateway.app import create_app
from wasminfer.gateway.connections import guarded_protocol
from wasminfer.gateway.errors import error_body
from wasminfer.gateway.express import Express
from wasminfer.gateway.settings import Settings
from wasminfer.gateway.state import AppState
from wasminfer.replicas import instance_stats
from wasminfer.replicas.balance import ConnectionShares
from wasminfer.replicas.base import WarmSpec
from wasminfer.replicas.reuseport import listen_socket, unix_socket
from wasminfer.replicas.worker import watch_parent
from wasminfer.scaling import ScalingConfig
from wasminfer.service import Platform

log = logging.getLogger("wasminfer.replica")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

REPLICA_HEADER = b"wasminfer-replica"
# Hop-by-hop headers (RFC 9110 7.6.1) stay on their own connection; uvicorn writes its own date
# and server headers on the way back out.
_HOP = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"te", b"trailer",
                  b"upgrade"})  # fmt: skip
_NOT_PASSED_BACK = _HOP | {b"date", b"server"}


def answered_here(scope: Scope) -> bool:
    """Whether a replica answers this request itself: a synchronous invocation, or its own health.
    Anything that might be asynchronous (an `async` query parameter, a `Prefer` header) goes to the
    gateway's process, which decides: a job is a write to the store."""
    method, path = scope["method"], scope["path"]
    if method == "GET":
        return path in ("/healthz", "/readyz")
    if method != "POST" or not path.startswith("/v1/functions/") or not path.endswith("/invoke"):
        return False
    if path.count("/") != 4 or b"async" in scope["query_string"]:
        return False
    return not any(name == b"prefer" for name, _ in scope["headers"])


class ProcessApp:
    """The app of `create_app` in one process sharing the port: tags the responses it makes with
    `Wasminfer-Replica`; in a replica (`forward` given) sends what it does not answer itself to
    the gateway's process; while `draining`, closes each connection after its response.

    The kernel picks a process per connection, and a kept-alive connection stays where it was
    accepted: an uneven spread (10 and 6 of 16), or a replica added under load, would stay so. The
    process' server sets `surplus` at each tick from the shared counts (`replicas.balance`): that
    many of the next requests on client connections are answered with `Connection: close`, and the
    clients reconnect over all the sockets."""

    def __init__(self, app: ASGIApp, replica_id: str, forward: ASGIApp | None = None) -> None:
        self.app = app
        self.forward = forward
        self.draining = False
        #: Client connections to close after their next response (set by the server's tick).
        self.surplus = 0
        self._tag = (REPLICA_HEADER, replica_id.encode())
        # Invocation ids count per process: a replica's get its id in front, as forwarded ones did.
        self._id_prefix = f"{replica_id}.".encode() if forward is not None else b""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        here = self.forward is None or answered_here(scope)
        close = self.closes(scope.get("client") is not None)  # (None: the unix sockets')

        async def tagged(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", ()))
                if here:
                    headers = self.tagged(headers)
                if close or self.draining:  # uvicorn closes the connection after this response
                    headers.append((b"connection", b"close"))
                message = {**message, "headers": headers}
            await send(message)

        if here:
            await self.app(scope, receive, tagged)
        else:
            assert self.forward is not None
            await self.forward(scope, receive, tagged)

    def closes(self, from_client: bool) -> bool:
        """Whether the connection of a request arriving now is closed after its response (draining,
        or one of the `surplus`; `from_client`: on a client connection, not a unix socket)."""
        if self.surplus > 0 and from_client:
            self.surplus -= 1
            return True
        return self.draining

    def tagged(self, headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
        """The headers of a response this process made, with its `Wasminfer-Replica` tag (and, in a
        replica, its id in front of the invocation id)."""
        headers.append(self._tag)
        prefix = self._id_prefix
        if prefix:
            headers = [(k, prefix + v) if k == b"x-invocation-id" else (k, v) for k, v in headers]
        return headers


class _ClientGone(Exception):
    pass


class Forward:
    """An ASGI app that passes each request on to the gateway's process over its unix socket and
    streams the answer back. A connection per request: this path carries deploys and reads, not
    invocations."""

    def __init__(self, socket_path: Path) -> None:
        self.socket_path = socket_path

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        target = (scope.get("raw_path") or scope["path"].encode()).decode("latin-1")
        if scope["query_string"]:
            target += "?" + scope["query_string"].decode("latin-1")
        headers = [(k, v) for k, v in scope["headers"] if k not in _HOP]
        has_body = any(k in (b"content-length", b"transfer-encoding") for k, _ in scope["headers"])

        async def body() -> Any:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    raise _ClientGone
                if message.get("body"):
                    yield message["body"]
                if not message.get("more_body", False):
                    return

        started = False
        transport = httpx.AsyncHTTPTransport(uds=str(self.socket_path))
        try:
            timeout = httpx.Timeout(None, connect=5.0)  # a deploy may compile for minutes
            async with httpx.AsyncClient(transport=transport, timeout=timeout) as client:
                content = body() if has_body else None
                request = client.build_request(scope["method"], "http://primary" + target, headers=headers,
                                               content=content)  # fmt: skip
                response = await client.send(request, stream=True)
                try:
                    started = True
                    raw = response.headers.raw
                    passed = [(k.lower(), v) for k, v in raw if k.lower() not in _NOT_PASSED_BACK]
                    status = response.status_code
                    await send({"type": "http.response.start", "status": status, "headers": passed})
                    async for chunk in response.aiter_raw():
                        await send({"type": "http.response.body", "body": chunk, "more_body": True})
                    await send({"type": "http.response.body", "body": b""})
                finally:
                    await response.aclose()
        except _ClientGone:
            return
        except httpx.TransportError as exc:
            if started:
                raise  # the answer broke off: uvicorn closes the connection
            log.warning("could not forward %s %s to the gateway's process: %r", scope["method"], target, exc)
            body_bytes = json.dumps(
                error_body("unavailable", "the gateway's process did not answer this replica; retry")
            ).encode()
            await send({
                "type": "http.response.start",
                "status": 503,
                "headers": [(b"content-type", b"application/json"), (b"retry-after", b"1"),
                            (b"content-length", str(len(body_bytes)).encode())],
            })  # fmt: skip
            await send({"type": "http.response.body", "body": body_bytes})


def control_app(state: AppState) -> Starlette:
    """What the gateway's process reads of a replica (and asks of it), on its control socket."""
    platform, fleet = state.platform, state.fleet

    async def readyz(request: Request) -> Response:
        return JSONResponse({"ready": platform.ready}, status_code=200 if platform.ready else 503)

    async def stats(request: Request) -> Response:
        load = fleet.last_load
        return JSONResponse({
            "pid": os.getpid(),
            "functions": instance_stats(platform, fleet.instances),
            "decisions": [d.to_dict() for d in fleet.decisions.recent(50)],
            "load": {"queue_ms": load.queue_ms, "requests": load.requests, "concurrency": load.concurrency},
            "counters": state.metrics.counter_samples(),
        })  # fmt: skip

    async def counters(request: Request) -> Response:
        return JSONResponse(state.metrics.counter_samples())

    return Starlette(
        routes=[
            Route("/readyz", readyz),
            Route("/stats", stats),
            Route("/counters", counters),
        ]
    )


class _BySocket:
    """The control app for connections on the unix socket (uvicorn gives them no port), the public
    app for the rest: a client of the TCP port never reaches the control endpoints."""

    def __init__(self, public: ASGIApp, control: ASGIApp) -> None:
        self.public, self.control = public, control

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        server = scope.get("server")
        if scope["type"] == "http" and server is not None and server[1] is None:
            await self.control(scope, receive, send)
        else:
            await self.public(scope, receive, send)


def _public(connection: Any) -> bool:
    """Whether a connection of uvicorn's is a client's (TCP), not one on a unix socket."""
    return bool(getattr(connection, "server", (None, None))[1])


class PortServer(uvicorn.Server):
    """The uvicorn server of a process sharing the port (the gateway's or a replica's): publishes
    its client connections at each tick and has its `app` close the surplus (`replicas.balance`).
    Give it `app` (the `ProcessApp`) and `shares` before `run`."""

    app: ProcessApp
    shares: ConnectionShares | None = None

    async def on_tick(self, counter: int) -> bool:
        shares = self.shares
        if shares is not None:
            held = sum(1 for c in self.server_state.connections if _public(c))
            self.app.surplus = shares.publish(held)
        return bool(await super().on_tick(counter))


class ReplicaServer(PortServer):
    """A replica's server, draining on the first SIGTERM: the listening socket is closed first (the
    kernel then sends new connections to the other processes) and the process leaves the connection
    shares, every response carries `Connection: close`, and the server waits until its connections
    are gone or the keep-alive timeout has passed — an idle connection would have been closed by
    then anyway, so a client never sees one closed sooner than usual — then shuts down as uvicorn
    does (finishing what is in flight). A second signal stops it at once."""

    _drain_requested = False
    _drain_until: float | None = None

    def handle_exit(self, sig: int, frame: Any) -> None:
        if self._drain_requested or self.should_exit:
            super().handle_exit(sig, frame)
        else:
            self._drain_requested = True

    async def on_tick(self, counter: int) -> bool:
        if self._drain_requested and self._drain_until is None:
            self.app.draining = True
            if self.shares is not None:
                self.shares.close()
                self.shares = None
            for server in self.servers:
                if any(s.family != socket.AF_UNIX for s in server.sockets):
                    server.close()
            self._drain_until = time.monotonic() + self.config.timeout_keep_alive + 1
            log.info("draining: the listening socket is closed")
        if self._drain_until is not None and not self.should_exit:
            public = [c for c in self.server_state.connections if _public(c)]
            if not public or time.monotonic() >= self._drain_until:
                self.should_exit = True
        return bool(await super().on_tick(counter))


def serve_replica(
    data: Path,
    *,
    listen: tuple[str, int],
    primary: Path,
    control: Path,
    parent: int | None = None,
    threads: int = 64,
    config: ScalingConfig | None = None,
    replica_id: str = "replica",
    log_level: str = "warning",
    http: str = "auto",
    loop: str = "auto",
    warm: list[WarmSpec] | None = None,
    shares: tuple[Path, int] | None = None,
) -> None:
    """Runs one replica process until SIGTERM (a drain, see `ReplicaServer`) or its parent is gone.
    API keys come from `WASMINFER_API_KEYS`, the gateway's limits from the other `WASMINFER_*`
    variables (`Settings.from_env`), never from the command line. Loads the `warm` functions, then
    listens on `listen` (with `SO_REUSEPORT`) and on the `control` unix socket. At exit it leaves its
    invocation counters next to the control socket (`.counters.json`) for the gateway to keep.
    `shares`: the connection shares' file and this process' slot in it (`replicas.balance`)."""

    logging.basicConfig(level=log_level.upper(), format=f"[{replica_id}] %(levelname)s %(name)s: %(message)s")
    settings = Settings.from_env(invoke_threads=threads)
    platform = Platform(data, keys=parse_keys(os.environ.get("WASMINFER_API_KEYS", "")))
    state: AppState | None = None
    server: ReplicaServer | None = None
    try:
        platform.start(load=False)
        for tenant, name, _ in warm or []:
            try:
                platform.refresh(name, tenant=tenant)
            except WasminferError as exc:
                log.warning("could not load %s/%s before serving: %s", tenant, name, exc.message)
        gateway = create_app(platform, settings, scaling=config, replica=True, freeze_gc=True)
        state = gateway.state.wasminfer
        public = ProcessApp(gateway, replica_id, forward=Forward(primary))
        sockets = [listen_socket(*listen), unix_socket(control)]
        protocol = guarded_protocol(settings, Express(state, public))
        server = ReplicaServer(
            uvicorn.Config(
                _BySocket(public, control_app(state)),
                lifespan="on",
                log_level=log_level,
                access_log=False,
                http=protocol if http in ("auto", "httptools") else http,
                loop=loop,
                timeout_graceful_shutdown=30,
            )
        )
        server.app = public
        if shares is not None:
            server.shares = ConnectionShares(*shares)
        if parent is not None:
            threading.Thread(target=watch_parent, args=(parent, server), daemon=True).start()
        # uvicorn raises the signal it shut down for again once it has finished: this handler lets
        # the process write its counters, close its platform and exit with status 0.
        signal.signal(signal.SIGTERM, lambda *_: None)
        server.run(sockets=sockets)
    finally:
        if server is not None and server.shares is not None:
            server.shares.close()
        if state is not None:
            final = control.with_suffix(".counters.json")
            final.with_suffix(".tmp").write_text(json.dumps(state.metrics.counter_samples()))
            final.with_suffix(".tmp").replace(final)
        platform.close()
