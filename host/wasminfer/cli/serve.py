"""`wasminfer serve` (the gateway over the embedded host and a data folder) and the hidden
`wasminfer replica` (a host replica process taking connections on the gateway's port, which `serve
--max-replicas N` and `--reuseport-replicas N` start) and `wasminfer worker` (one the gateway
forwards invocations to: `--scaling primary_replica=false`, or no `SO_REUSEPORT`)."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.panel import Panel

from wasminfer.cli.common import DEFAULT_DATA, app, err, spinner
from wasminfer.cli.examples import deploy_examples, print_example_requests
from wasminfer.errors import BadRequest

LOOPBACK = "127.0.0.1"


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Interface to listen on (with API keys only).")] = LOOPBACK,
    port: Annotated[int, typer.Option(help="Port.")] = 8000,
    data: Annotated[Path, typer.Option(help="Data folder (store, blobs, compile cache).")] = DEFAULT_DATA,
    key: Annotated[
        list[str] | None,
        typer.Option(
            "--key", help="API key KEY:SCOPE[+SCOPE…][:TENANT]; repeatable; also $WASMINFER_API_KEYS."
        ),
    ] = None,
    examples: Annotated[bool, typer.Option(help="Deploy the example functions and models first.")] = False,
    access_log: Annotated[bool, typer.Option(help="Log every request.")] = False,
    log_level: Annotated[str, typer.Option(help="uvicorn log level.")] = "info",
    http: Annotated[
        str,
        typer.Option(
            help="HTTP parser: auto or httptools (with the header timeout and the connection cap), or "
            "h11 (without them)."
        ),
    ] = "auto",
    header_timeout: Annotated[
        float | None,
        typer.Option(
            help="Seconds a request's line and headers may take: 408 past it (default 10; "
            "$WASMINFER_HEADER_TIMEOUT_S)."
        ),
    ] = None,
    body_timeout: Annotated[
        float | None,
        typer.Option(
            help="Seconds a body may pause between bytes: 408 past it (default 30; "
            "$WASMINFER_BODY_TIMEOUT_S)."
        ),
    ] = None,
    max_connections_per_client: Annotated[
        int | None,
        typer.Option(
            help="Connections one client address may hold open (default 64; 0: no cap; "
            "$WASMINFER_MAX_CONNECTIONS_PER_CLIENT); addresses exempt: $WASMINFER_CONNECTION_CAP_EXEMPT "
            "(comma-separated, default loopback; empty: none)."
        ),
    ] = None,
    loop: Annotated[
        str, typer.Option(help="Event loop: auto (uvloop if installed), asyncio, uvloop.")
    ] = "auto",
    min_replicas: Annotated[int, typer.Option(help="Host replicas to keep (this process counts).")] = 1,
    max_replicas: Annotated[
        int,
        typer.Option(
            help="Most host replicas; above 1 the autoscaler adds worker processes (Ray actors with --ray)."
        ),
    ] = 1,
    scaling: Annotated[
        list[str] | None,
        typer.Option(
            "--scaling", help="A scaling knob KEY=VALUE (docs/scaling.md), e.g. replica_up_window_s=2."
        ),
    ] = None,
    ray: Annotated[
        str | None,
        typer.Option(
            "--ray",
            help="Run the host replicas beyond this process as Ray actors (docs/ray.md): 'auto' (the "
            "cluster this machine belongs to, or $RAY_ADDRESS), a head's HOST:PORT, ray://…, or 'local'.",
        ),
    ] = None,
    memory_budget_mb: Annotated[
        int | None,
        typer.Option(
            help="MiB that every tenant's instances and models may reserve together, per process "
            "(SECURITY.md); default half the RAM, or $WASMINFER_MEMORY_BUDGET_MB.",
        ),
    ] = None,
    tenant_memory_mb: Annotated[
        int | None,
        typer.Option(
            help="MiB one tenant may reserve; default half the budget, or $WASMINFER_TENANT_MEMORY_MB.",
        ),
    ] = None,
    reuseport_replicas: Annotated[
        int | None,
        typer.Option(
            help="Keep N processes taking connections on the port from the start, this one included, "
            "with no autoscaling (SO_REUSEPORT, Linux; docs/scaling.md).",
        ),
    ] = None,
) -> None:
    """Run the server: the HTTP gateway over the embedded host and the store in DATA."""
    import uvicorn

    from wasminfer.gateway import Settings, create_app, guarded_protocol
    from wasminfer.gateway.express import Express
    from wasminfer.replicas.reuseport import reuseport_supported
    from wasminfer.runtime.memory import MemorySettings
    from wasminfer.scaling import ScalingConfig
    from wasminfer.service import Platform, parse_keys

    try:
        settings = Settings.from_env(
            header_timeout_s=header_timeout,
            body_timeout_s=body_timeout,
            max_connections_per_client=max_connections_per_client,
        )
    except ValueError as exc:
        raise BadRequest(str(exc)) from None

    if reuseport_replicas is not None:
        if reuseport_replicas < 1:
            raise BadRequest(f"--reuseport-replicas {reuseport_replicas}: give 1 or more")
        if min_replicas != 1 or max_replicas != 1 or ray:
            raise BadRequest(
                "--reuseport-replicas N fixes the number of processes: give it without --min-replicas, "
                "--max-replicas and --ray"
            )
        if not reuseport_supported():
            raise BadRequest("--reuseport-replicas needs SO_REUSEPORT spreading connections (Linux)")
        min_replicas = max_replicas = reuseport_replicas
    scaling_config = ScalingConfig.from_options(
        scaling or [],
        min_replicas=min_replicas,
        max_replicas=max_replicas,
        backend="ray" if ray else None,
        ray_address=ray,
    )
    if scaling_config.backend == "ray" and scaling_config.max_replicas <= int(scaling_config.primary_replica):
        raise BadRequest(
            f"--ray: with --max-replicas {scaling_config.max_replicas} every request runs in this process "
            "and nothing on Ray; give --max-replicas N (N above 1, or --scaling primary_replica=false)"
        )

    # Replicas beyond this process take their own connections on the port, unless they cannot
    # (no SO_REUSEPORT) or everything must pass through this process (primary_replica=false).
    reuseport = (
        scaling_config.backend == "local"
        and scaling_config.primary_replica
        and (reuseport_replicas is not None or scaling_config.max_replicas > 1)
        and reuseport_supported()
    )
    if reuseport_replicas is not None and not scaling_config.primary_replica:
        raise BadRequest("--reuseport-replicas: this process takes connections too (primary_replica=true)")

    memory = MemorySettings.from_env(budget_mb=memory_budget_mb, tenant_quota_mb=tenant_memory_mb)
    # Host replica processes read theirs from the environment they inherit.
    os.environ["WASMINFER_MEMORY_BUDGET_MB"] = str(memory.budget_mb)
    os.environ["WASMINFER_TENANT_MEMORY_MB"] = str(memory.tenant_quota_mb)

    _log_to_stderr(log_level)
    specs = list(key or [])
    if os.environ.get("WASMINFER_API_KEYS"):
        specs.append(os.environ["WASMINFER_API_KEYS"])
    keys = parse_keys(specs)
    platform = Platform(data, keys=keys, memory=memory)
    try:
        if platform.open_access:
            if host not in (LOOPBACK, "localhost", "::1"):
                err.print(
                    f"[yellow]--host {host} ignored:[/yellow] without API keys the server listens on "
                    f"{LOOPBACK} only"
                )
            host = LOOPBACK
            err.print(
                Panel(
                    "[bold]No API keys are configured: every request is allowed, as admin.[/bold]\n"
                    f"So the server listens on {LOOPBACK} only.\n"
                    "To require keys (and listen elsewhere): --key KEY:admin (or KEY:invoke,\n"
                    "KEY:read), or WASMINFER_API_KEYS, or a stored key:\n"
                    f"  wasminfer key add --scope admin --data {data}",
                    title="OPEN ACCESS",
                    border_style="red",
                )
            )
        if examples:
            with spinner("loading the store") as progress:
                platform.start(progress)
            deploy_examples(platform)
            print_example_requests(platform, host, port)
        app: Any = None
        sockets = None
        shares: Any = None
        server_class: Any = None
        if reuseport:
            from wasminfer.gateway.replica import PortServer, ProcessApp
            from wasminfer.replicas.balance import ConnectionShares
            from wasminfer.replicas.reuseport import ReuseportBackend, listen_socket, unix_socket

            tcp = listen_socket(host, port)
            backend = ReuseportBackend(
                data,
                scaling_config,
                listen=(host, tcp.getsockname()[1]),
                threads=settings.invoke_threads,
                # Keys only in the environment (the command line of a process is public).
                env={"WASMINFER_API_KEYS": ",".join(specs), **settings.to_env()},
                options=["--http", http, "--loop", loop],
            )
            sockets = [tcp, unix_socket(backend.primary_socket)]
            gateway = create_app(platform, settings, scaling=scaling_config, backend=backend, freeze_gc=True,
                                 warm_up=True)
            app = ProcessApp(gateway, "primary")
            express = Express(gateway.state.wasminfer, app)
            shares = ConnectionShares(backend.shares, 0)
            server_class = PortServer
        else:
            app = create_app(platform, settings, scaling=scaling_config, freeze_gc=True, warm_up=True)
            express = Express(app.state.wasminfer)
        server: Any = (server_class or uvicorn.Server)(
            uvicorn.Config(
                app,
                host=host,
                port=port,
                log_level=log_level,
                access_log=access_log,
                # X-Forwarded-For rewrites the client address, which only the access log reads: a
                # layer around every request for nothing when it is off.
                proxy_headers=access_log,
                http=guarded_protocol(settings, express) if http in ("auto", "httptools") else http,
                loop=loop,
                timeout_graceful_shutdown=10,
            )
        )
        # uvicorn finishes what is in flight on SIGTERM, then raises the signal again with the handler
        # it found: this no-op lets the platform close below, and the exit status be 0.
        signal.signal(signal.SIGTERM, lambda *_: None)
        if shares is not None:
            server.app, server.shares = app, shares
        server.run(sockets=sockets)
    finally:
        if shares is not None:
            shares.close()
        platform.close()


def _log_to_stderr(level: str) -> None:
    """The `wasminfer` loggers (scaling decisions, store loads, replicas) next to uvicorn's lines."""
    import logging

    logger = logging.getLogger("wasminfer")
    logger.setLevel(getattr(logging, level.upper(), logging.INFO))
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)-9s %(name)s: %(message)s"))
        logger.addHandler(handler)


@app.command(hidden=True)
def worker(
    data: Annotated[Path, typer.Option(help="The gateway's data folder.")],
    socket: Annotated[Path | None, typer.Option(help="Unix socket to listen on.")] = None,
    port: Annotated[int | None, typer.Option(help="Or a port on 127.0.0.1.")] = None,
    parent: Annotated[int | None, typer.Option(help="Exit when this process is gone.")] = None,
    threads: Annotated[int, typer.Option(help="Worker threads for invocations.")] = 64,
    id_: Annotated[str, typer.Option("--id", help="The replica's name in logs.")] = "local",
    scaling: Annotated[list[str] | None, typer.Option("--scaling", help="KEY=VALUE")] = None,
    log_level: Annotated[str, typer.Option(help="Log level.")] = "warning",
) -> None:
    """A host replica process (started by `serve --max-replicas N`, not by hand)."""
    from wasminfer.replicas.worker import serve_worker
    from wasminfer.scaling import ScalingConfig

    serve_worker(
        data,
        socket_path=socket,
        port=port,
        parent=parent,
        threads=threads,
        config=ScalingConfig.from_options(scaling or []),
        replica_id=id_,
        log_level=log_level,
    )


@app.command(hidden=True)
def replica(
    data: Annotated[Path, typer.Option(help="The gateway's data folder.")],
    listen: Annotated[str, typer.Option(help="HOST:PORT of the gateway (joined with SO_REUSEPORT).")],
    primary: Annotated[Path, typer.Option(help="The gateway's unix socket, for what a replica forwards.")],
    socket: Annotated[Path, typer.Option(help="The control socket to listen on.")],
    parent: Annotated[int | None, typer.Option(help="Exit when this process is gone.")] = None,
    threads: Annotated[int, typer.Option(help="Worker threads for invocations.")] = 64,
    id_: Annotated[str, typer.Option("--id", help="Its name (Wasminfer-Replica).")] = "replica",
    scaling: Annotated[list[str] | None, typer.Option("--scaling", help="KEY=VALUE")] = None,
    log_level: Annotated[str, typer.Option(help="Log level.")] = "warning",
    http: Annotated[str, typer.Option(help="HTTP parser, as serve's.")] = "auto",
    loop: Annotated[str, typer.Option(help="Event loop, as serve's.")] = "auto",
    shares: Annotated[str | None, typer.Option(help="FILE:SLOT of the connection shares.")] = None,
) -> None:
    """A host replica process on the gateway's port (started by `serve`, not by hand). Reads the
    functions to load first from stdin (JSON `[[tenant, name, digest], …]`), API keys from
    $WASMINFER_API_KEYS."""
    from wasminfer.gateway.replica import serve_replica
    from wasminfer.scaling import ScalingConfig

    host, _, port = listen.rpartition(":")
    try:
        warm = [(str(t), str(n), str(d)) for t, n, d in json.loads(sys.stdin.buffer.read() or b"[]")]
    except (ValueError, TypeError) as exc:
        raise BadRequest(f"replica: stdin must hold [[tenant, name, digest], …]: {exc}") from None
    share: tuple[Path, int] | None = None
    if shares is not None:
        file, _, slot = shares.rpartition(":")
        if not file or not slot.isdigit():
            raise BadRequest(f"replica: --shares {shares!r}: give FILE:SLOT")
        share = (Path(file), int(slot))
    serve_replica(
        data,
        listen=(host.strip("[]"), int(port)),
        primary=primary,
        control=socket,
        parent=parent,
        threads=threads,
        config=ScalingConfig.from_options(scaling or []),
        replica_id=id_,
        log_level=log_level,
        http=http,
        loop=loop,
        warm=warm,
        shares=share,
    )
