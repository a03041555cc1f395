"""The `wasminfer` command: run a server (`serve`), build functions (`build`), and manage a server
through `wasminfer.Client` (`deploy`, `invoke`, `ls`, `logs`, `rm`, `rollback`, `versions`).

Client commands take `--url` (`$WASMINFER_URL`, default http://127.0.0.1:8000) and `--key`
(`$WASMINFER_KEY`). Errors print `error: <code>: <message>` on stderr and exit with status 1.
"""

from __future__ import annotations

import datetime
import json
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.panel import Panel
from rich.table import Table

from wasminfer.errors import BadRequest, WasminferError
from wasminfer.toolchain import BuildError

if TYPE_CHECKING:
    from wasminfer.client import Client
    from wasminfer.service import Platform

app = typer.Typer(
    name="wasminfer",
    help="Serverless ML inference on WebAssembly: serve, build, deploy and invoke functions.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
deploy_app = typer.Typer(
    help="Deploy a function (a folder or a .wasm) or an ONNX model.", no_args_is_help=True
)
rm_app = typer.Typer(help="Delete a function (every version) or a model.", no_args_is_help=True)
key_app = typer.Typer(
    help="API keys kept in a data folder's store (the server need not run).", no_args_is_help=True
)
set_app = typer.Typer(help="Change a model's load options.", no_args_is_help=True)
app.add_typer(deploy_app, name="deploy")
app.add_typer(set_app, name="set")
app.add_typer(rm_app, name="rm")
app.add_typer(key_app, name="key")

err = Console(stderr=True)
out = Console()

DEFAULT_DATA = Path(".wasminfer")
Url = Annotated[str, typer.Option("--url", envvar="WASMINFER_URL", help="The server.")]
Key = Annotated[str | None, typer.Option("--key", envvar="WASMINFER_KEY", help="API key (Bearer).")]
DEFAULT_URL = "http://127.0.0.1:8000"


def main() -> None:
    try:
        app()
    except WasminferError as exc:
        err.print(f"[red]error:[/red] {exc.code}: {exc.message}", highlight=False)
        raise SystemExit(1) from None
    except BuildError as exc:
        err.print(f"error: {exc}", highlight=False, markup=False)
        raise SystemExit(1) from None


def _client(url: str, key: str | None) -> Client:
    from wasminfer.client import Client

    return Client(url, key)


@contextmanager
def _spinner(title: str) -> Iterator[Callable[[str], None]]:
    """A spinner on stderr; the yielded function prints a progress line above it."""
    with err.status(title) as status:

        def progress(message: str) -> None:
            status.update(f"{title}: {message}")
            err.print(f"  {message}", style="dim", highlight=False)

        yield progress


def _build(source: Path, out_path: Path | None = None) -> Path:
    """Builds with a spinner. Raises `toolchain.BuildError`."""
    from wasminfer.toolchain import build

    # The first build on a machine also compiles zig's wasi-libc: about 30 s with nothing to show.
    with _spinner(f"building {source.name} (the first build takes ~30 s)") as progress:
        return build(source, out_path, progress=progress)


# --- serve ---------------------------------------------------------------------------------------
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
        str, typer.Option(help="HTTP parser: auto (httptools if installed), h11, httptools.")
    ] = "auto",
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
) -> None:
    """Run the server: the HTTP gateway over the embedded host and the store in DATA."""
    import uvicorn

    from wasminfer.gateway import create_app
    from wasminfer.runtime.memory import MemorySettings
    from wasminfer.scaling import ScalingConfig
    from wasminfer.service import Platform, parse_keys

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
            with _spinner("loading the store") as progress:
                platform.start(progress)
            _deploy_examples(platform)
            _print_example_requests(platform, host, port)
        server = uvicorn.Server(
            uvicorn.Config(
                create_app(platform, scaling=scaling_config),
                host=host,
                port=port,
                log_level=log_level,
                access_log=access_log,
                http=http,
                loop=loop,
                timeout_graceful_shutdown=10,
            )
        )
        # uvicorn finishes what is in flight on SIGTERM, then raises the signal again with the handler
        # it found: this no-op lets the platform close below, and the exit status be 0.
        signal.signal(signal.SIGTERM, lambda *_: None)
        server.run()
    finally:
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


def _deploy_examples(platform: Platform) -> None:
    """Deploys every example (and its models) the store does not hold yet. An example that cannot be
    made here (a missing optional package, a failed build, a module this host refuses) is skipped
    with a warning: the others still serve."""
    from wasminfer.examples import EXAMPLES
    from wasminfer.manifest import Manifest
    from wasminfer.store import DEFAULT_TENANT

    tenant = DEFAULT_TENANT
    stored_models = {m["name"] for m in platform.list_models(tenant=tenant)}
    stored_functions = {f["name"] for f in platform.list_functions(tenant=tenant)}
    for ex in EXAMPLES:
        if ex.name in stored_functions:
            err.print(f"example {ex.name}: already deployed")
            continue
        try:
            for model in ex.models:
                if model.name not in stored_models:
                    with _spinner(f"model {model.name}") as progress:
                        progress("making the ONNX model")
                        data = model.make()
                        progress(f"loading {len(data)} bytes")
                        platform.put_model(model.name, data, tenant=tenant)
                    stored_models.add(model.name)
            wasm = ex.upload(_build)
            view = platform.put_function(ex.name, wasm, Manifest.from_dict(ex.manifest()), tenant=tenant)
        except (ImportError, FileNotFoundError) as exc:
            err.print(
                f"[yellow]example {ex.name} skipped:[/yellow] {exc} (pip install 'wasminfer[examples]')",
                markup=True,
                highlight=False,
            )
            continue
        except Exception as exc:  # a failed build, a module this host refuses, a bug: the rest still serve
            text = str(exc).strip()
            first_line = text.splitlines()[0] if text else ""
            err.print(
                f"[yellow]example {ex.name} skipped:[/yellow] {type(exc).__name__}: {first_line}",
                highlight=False,
            )
            continue
        err.print(f"example {ex.name}: deployed version {view['version']} ({view['abi']} ABI)")


def _print_example_requests(platform: Platform, host: str, port: int) -> None:
    """One curl line per deployed example, with a request body that works."""
    base = f"http://{host}:{port}"
    auth = "" if platform.open_access else ' -H "authorization: Bearer $WASMINFER_KEY"'
    deployed = {f["name"] for f in platform.list_functions()}
    lines = []
    if "digits" in deployed:
        from wasminfer.examples import digits_split

        pixels = [int(v) for v in digits_split()[1][0]]
        body = json.dumps({"pixels": pixels}, separators=(",", ":"))
        lines.append(
            f"curl -s {base}/v1/functions/digits/invoke{auth} -H 'content-type: application/json' -d '{body}'"
        )
    if "image-classify" in deployed:
        sample = platform.data_dir.resolve() / "examples" / "text.ppm"
        sample.parent.mkdir(parents=True, exist_ok=True)
        sample.write_bytes(_sample_ppm())
        lines.append(
            f"curl -s {base}/v1/functions/image-classify/invoke{auth} "
            f"-H 'content-type: image/x-portable-pixmap' --data-binary @{sample}"
        )
    if "text-classify" in deployed:
        lines.append(
            f"curl -s {base}/v1/functions/text-classify/invoke{auth} -H 'content-type: text/plain' "
            "-d 'the team scored twice in the second half'"
        )
    if lines:
        err.print("[bold]Try:[/bold]")
        for line in lines:
            out.print(line, soft_wrap=True, highlight=False, markup=False)
        sys.stdout.flush()


def _sample_ppm(width: int = 96, height: int = 64) -> bytes:
    """A small binary PPM: dark bars like lines of text on white."""
    rows = []
    for y in range(height):
        ink = 8 <= y % 16 < 13 and y < 56
        rows.append(
            bytes(
                (30 if ink and 6 <= x < 90 - (y // 16) * 14 else 250) for x in range(width) for _ in range(3)
            )
        )
    return f"P6\n{width} {height}\n255\n".encode() + b"".join(rows)


# --- build ---------------------------------------------------------------------------------------
@app.command()
def build(
    source: Annotated[Path, typer.Argument(help="A function folder (main.c, manifest.json) or a .c file.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Where to write the .wasm.")],
) -> None:
    """Compile a C function to a wasm32-wasi handler module (zig cc from PyPI)."""
    path = _build(source, output)
    err.print(f"built {path} ({path.stat().st_size} bytes)")


@app.command("python-runtime")
def python_runtime() -> None:
    """Build the Python runtime (Python functions as source) now instead of at its first use: once
    per machine, minutes; then it loads in milliseconds from $WASMINFER_CACHE/python-runtime."""
    from wasminfer.runtime import Host, python

    with Host() as host, _spinner("python runtime") as progress:
        rt = python.runtime(host.engine, progress=progress)
    what = f"built in {rt.build_s:.0f} s" if rt.build_s else "already built"
    err.print(f"python runtime {rt.key}: {what} ({python.runtime_cache_dir() / rt.key})", highlight=False)


# --- deploy --------------------------------------------------------------------------------------
@deploy_app.command("function")
def deploy_function(
    path: Annotated[
        Path, typer.Argument(help="A function folder (built, its manifest.json read) or a .wasm.")
    ],
    name: Annotated[
        str | None, typer.Option(help="Function name (default: the folder or file name).")
    ] = None,
    manifest: Annotated[
        Path | None, typer.Option(help="Manifest JSON file (default: FOLDER/manifest.json).")
    ] = None,
    models: Annotated[str | None, typer.Option(help="Models it may use, comma-separated.")] = None,
    memory_mb: Annotated[int | None, typer.Option(help="Memory limit per instance, MiB.")] = None,
    timeout_ms: Annotated[int | None, typer.Option(help="Time limit per invocation, ms.")] = None,
    max_instances: Annotated[int | None, typer.Option(help="Most instances at once.")] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Any manifest key: KEY=VALUE; repeatable.")
    ] = None,
    component: Annotated[
        bool, typer.Option(help="Build a Python function into a component instead of sending its source.")
    ] = False,
    url: Url = DEFAULT_URL,
    key: Key = None,
) -> None:
    """Deploy a function: a new version that becomes current. A Python function (a folder with an
    app.py, or one .py file) is sent as its source, run by the server's Python runtime; --component
    builds it into a componentize-py component instead (for functions that bring native code)."""
    from wasminfer import pysource

    if path.is_dir() and (path / "app.py").is_file() and not component:
        wasm = pysource.bundle_folder(path)
        manifest = manifest or (path / "manifest.json" if (path / "manifest.json").is_file() else None)
        default_name = path.resolve().name
    elif path.is_file() and path.suffix == ".py":
        wasm = pysource.bundle(path.read_bytes(), pysource.PYTHON)
        default_name = path.stem
    elif path.is_dir():
        wasm = _build(path).read_bytes()
        manifest = manifest or (path / "manifest.json" if (path / "manifest.json").is_file() else None)
        default_name = path.resolve().name
    elif path.is_file():
        wasm = path.read_bytes()
        default_name = path.stem
    else:
        raise BadRequest(f"{path}: no such file or folder")
    data: dict[str, Any] = json.loads(manifest.read_text()) if manifest else {}
    for flag, value in (
        ("models", models),
        ("memory_mb", memory_mb),
        ("timeout_ms", timeout_ms),
        ("max_instances", max_instances),
    ):
        if value is not None:
            data[flag] = value.split(",") if flag == "models" and isinstance(value, str) else value
    for item in set_ or []:
        k, sep, v = item.partition("=")
        if not sep:
            raise BadRequest(f"--set {item!r}: expected KEY=VALUE")
        data[k] = v
    with _client(url, key) as client:
        view = client.put_function(name or default_name, wasm, data)
    what = "deployed" if view.get("created") else "unchanged,"
    err.print(
        f"{view['name']}: {what} version {view['version']} ({view['abi']} ABI, sha256 {view['sha256'][:12]}, "
        f"{view['size']} bytes)",
        highlight=False,
    )


MaxBatchSize = Annotated[
    int | None,
    typer.Option(
        help="Dynamic batching: the most rows one batched run takes, 2..1024 (0: off, the default)."
    ),
]
MaxQueueDelayUs = Annotated[
    int | None,
    typer.Option(help="Dynamic batching: the longest a request waits for others, µs (default 2000)."),
]
MaxConcurrentBatches = Annotated[
    int | None,
    typer.Option(
        help="Dynamic batching: batched runs in flight before a new one waits (default: the cores)."
    ),
]
IntraOpThreads = Annotated[
    int | None, typer.Option(help="ONNX Runtime threads inside one run (default 1; 0: one per core).")
]
InterOpThreads = Annotated[int | None, typer.Option(help="ONNX Runtime inter-op threads (default 1).")]


@deploy_app.command("model")
def deploy_model(
    name: Annotated[str, typer.Argument(help="The name functions call it by.")],
    file: Annotated[Path, typer.Argument(help="The .onnx file.")],
    max_batch_size: MaxBatchSize = None,
    max_queue_delay_us: MaxQueueDelayUs = None,
    max_concurrent_batches: MaxConcurrentBatches = None,
    intra_op_threads: IntraOpThreads = None,
    inter_op_threads: InterOpThreads = None,
    url: Url = DEFAULT_URL,
    key: Key = None,
) -> None:
    """Deploy an ONNX model (validated by loading it), with its load options."""
    with _client(url, key) as client:
        view = client.put_model(
            name,
            file,
            max_batch_size=max_batch_size,
            max_queue_delay_us=max_queue_delay_us,
            max_concurrent_batches=max_concurrent_batches,
            intra_op_threads=intra_op_threads,
            inter_op_threads=inter_op_threads,
        )
    _print_model(view, "deployed")


@set_app.command("model")
def set_model(
    name: Annotated[str, typer.Argument(help="The model.")],
    max_batch_size: MaxBatchSize = None,
    max_queue_delay_us: MaxQueueDelayUs = None,
    max_concurrent_batches: MaxConcurrentBatches = None,
    intra_op_threads: IntraOpThreads = None,
    inter_op_threads: InterOpThreads = None,
    url: Url = DEFAULT_URL,
    key: Key = None,
) -> None:
    """Change a model's load options (the others stay), as a new version of the same file."""
    changes = {
        k: v
        for k, v in {
            "max_batch_size": max_batch_size,
            "max_queue_delay_us": max_queue_delay_us,
            "max_concurrent_batches": max_concurrent_batches,
            "intra_op_threads": intra_op_threads,
            "inter_op_threads": inter_op_threads,
        }.items()
        if v is not None
    }
    if not changes:
        raise typer.BadParameter("give at least one option to change, e.g. --max-batch-size 32")
    with _client(url, key) as client:
        view = client.patch_model(name, **changes)
    _print_model(view, "updated")


def _print_model(view: dict[str, Any], done: str) -> None:
    what = done if view.get("created") else "unchanged,"
    io = "; ".join(_spec(s) for s in view.get("inputs", []))
    err.print(
        f"{view['name']}: {what} version {view['version']} ({view['size']} bytes; inputs {io}; "
        f"{_options(view.get('options'))})",
        highlight=False,
    )


def _options_short(options: dict[str, Any] | None) -> str:
    """Batching as `batch 8/2000µs` (rows/delay), or `-`."""
    size = (options or {}).get("max_batch_size") or 0
    return f"batch {size}/{options['max_queue_delay_us']}µs" if options and size >= 2 else "-"


def _options(options: dict[str, Any] | None) -> str:
    """A model's load options in a few words: batching and threads."""
    if not options:
        return "defaults"
    size = options.get("max_batch_size") or 0
    batching = (
        f"batching up to {size} rows, {options.get('max_queue_delay_us')} µs delay"
        if size >= 2
        else "no batching"
    )
    return f"{batching}, {options.get('intra_op_threads')} intra-op thread(s)"


def _spec(spec: dict[str, Any]) -> str:
    """A tensor spec as `name:dtype[N,64]` (`?` for an unnamed free dimension)."""
    shape = spec.get("shape")
    dims = "?" if shape is None else ",".join("?" if d is None else str(d) for d in shape)
    return f"{spec['name']}:{spec['dtype']}[{dims}]"


def _when(iso: str) -> str:
    """`2026-11-24T12:22:41.564Z` as `2026-11-24 12:22:41`."""
    return iso.replace("T", " ")[:19]


# --- invoke, ls, logs ----------------------------------------------------------------------------
_CONTENT_TYPES = {
    ".json": "application/json",
    ".ppm": "image/x-portable-pixmap",
    ".txt": "text/plain",
    ".cbor": "application/cbor",
}


@app.command()
def invoke(
    name: Annotated[str, typer.Argument(help="The function.")],
    data: Annotated[Path | None, typer.Option("--data", "-d", help="Request body file ('-': stdin).")] = None,
    content_type: Annotated[
        str | None, typer.Option("--content-type", "-t", help="Request content type.")
    ] = None,
    timing: Annotated[bool, typer.Option(help="Print the Server-Timing on stderr.")] = False,
    async_: Annotated[
        bool,
        typer.Option("--async", help="Run it as a job: print the job id (see `wasminfer jobs`)."),
    ] = False,
    wait: Annotated[
        bool, typer.Option(help="With --async: wait for the job, then print its output.")
    ] = False,
    url: Url = DEFAULT_URL,
    key: Key = None,
) -> None:
    """Invoke a function: the body from --data or stdin; the output to stdout."""
    if data is not None and str(data) != "-":
        body = data.read_bytes()
    elif data is not None or not sys.stdin.isatty():
        body = sys.stdin.buffer.read()
    else:
        body = b""
    ctype = (
        content_type
        or (_CONTENT_TYPES.get(data.suffix.lower()) if data else None)
        or "application/octet-stream"
    )
    with _client(url, key) as client:
        if async_:
            job = client.invoke_async(name, body, ctype)
            if not wait:
                out.print(job["id"], highlight=False)
                err.print(f"queued; follow it with: wasminfer jobs {job['id']} --wait", highlight=False)
                return
            _follow(client, job["id"])
            result = client.job_result(job["id"])
        else:
            result = client.invoke(name, body, ctype)
    sys.stdout.buffer.write(result.body)
    sys.stdout.buffer.flush()
    if timing:
        parts = ", ".join(f"{k} {v:.3f} ms" for k, v in result.server_timing.items())
        err.print(f"\n[{result.invocation_id}] {result.content_type}: {parts}", highlight=False)


# --- batch, jobs ----------------------------------------------------------------------------------
@app.command()
def batch(
    name: Annotated[str, typer.Argument(help="The function.")],
    file: Annotated[
        Path,
        typer.Argument(help="The inputs: JSON Lines (one request body per line) or, .cbor, a CBOR array."),
    ],
    output: Annotated[
        Path | None, typer.Option("-o", "--output", help="Write the results (JSON Lines) here, not stdout.")
    ] = None,
    wait: Annotated[
        bool, typer.Option(help="Wait for the results with a progress bar (--no-wait: print the job id).")
    ] = True,
    item_content_type: Annotated[
        str | None, typer.Option(help="Content type of CBOR byte-string items.")
    ] = None,
    idempotency_key: Annotated[
        str | None, typer.Option(help="Submitting again with this key returns the first job.")
    ] = None,
    webhook: Annotated[str | None, typer.Option(help="URL to POST the job to when it finishes.")] = None,
    url: Url = DEFAULT_URL,
    key: Key = None,
) -> None:
    """Invoke a function on every input of FILE as one job, then print one result per input."""
    ctype = "application/cbor" if file.suffix.lower() == ".cbor" else "application/jsonl"
    with _client(url, key) as client:
        job = client.batch(
            name,
            file,
            ctype,
            item_content_type=item_content_type,
            idempotency_key=idempotency_key,
            webhook=webhook,
        )
        if not wait:
            out.print(job["id"], highlight=False)
            err.print(f"{job['items']['total']} items queued; follow: wasminfer jobs {job['id']} --wait")
            return
        view = _follow(client, job["id"])
        _write_results(client, job["id"], output)
    _summary(view)


@app.command()
def jobs(
    job_id: Annotated[str | None, typer.Argument(help="A job: show it (default: list your jobs).")] = None,
    wait: Annotated[bool, typer.Option(help="Follow the job with a progress bar until it ends.")] = False,
    result: Annotated[
        bool, typer.Option(help="Print its result: the output, or a batch's JSON Lines.")
    ] = False,
    cancel: Annotated[
        bool, typer.Option(help="Cancel what has not started (a finished job: delete it).")
    ] = False,
    output: Annotated[Path | None, typer.Option("-o", "--output", help="With --result: write here.")] = None,
    status: Annotated[str | None, typer.Option(help="List only jobs in this status.")] = None,
    limit: Annotated[int, typer.Option(help="List at most this many.")] = 20,
    url: Url = DEFAULT_URL,
    key: Key = None,
) -> None:
    """List your jobs with their progress; or show, follow, cancel one, or print its result."""
    with _client(url, key) as client:
        if job_id is None:
            _jobs_table(client.jobs(status=status, limit=limit))
            return
        if cancel:
            view = client.cancel_job(job_id)
            err.print(f"deleted job {job_id}" if view is None else f"job {job_id}: {view['status']}")
            return
        view = _follow(client, job_id) if wait else client.job(job_id)
        if result:
            if view["kind"] == "batch":
                _write_results(client, job_id, output)
            else:
                body = client.job_result(job_id).body
                if output is not None:
                    output.write_bytes(body)
                else:
                    sys.stdout.buffer.write(body)
                    sys.stdout.buffer.flush()
        elif not wait:
            out.print_json(data=view)
    if wait:
        _summary(view)


def _follow(client: Client, job_id: str) -> dict[str, Any]:
    """Waits for the job with a progress bar on stderr; returns its last view."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[note]}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=err) as bar:
        task = bar.add_task(f"job {job_id}", total=None, note="")

        def update(view: dict[str, Any]) -> None:
            items = view["items"]
            note = f"{view['status']}" + (f", {items['failed']} failed" if items["failed"] else "")
            bar.update(task, total=items["total"], completed=items["done"], note=note)

        return client.wait_job(job_id, progress=update)


def _write_results(client: Client, job_id: str, output: Path | None) -> None:
    lines = (
        json.dumps(r, separators=(",", ":"), ensure_ascii=False) + "\n" for r in client.job_results(job_id)
    )
    if output is None:
        for line in lines:
            sys.stdout.write(line)
        sys.stdout.flush()
        return
    with output.open("w") as f:
        f.writelines(lines)


def _summary(view: dict[str, Any]) -> None:
    items, timings = view["items"], view["timings"]
    run = timings.get("run_s")
    rate = f", {items['done'] / run:,.0f} items/s" if run else ""
    err.print(
        f"job {view['id']}: {view['status']}; {items['succeeded']} of {items['total']} succeeded, "
        f"{items['failed']} failed (queued {timings['queued_s']:.2f} s, ran {run or 0:.2f} s{rate})",
        highlight=False,
    )
    if view.get("error"):
        err.print(f"error: {view['error']['code']}: {view['error']['message']}", highlight=False)


def _jobs_table(rows: list[dict[str, Any]]) -> None:
    table = Table(title="jobs", title_justify="left")
    for column in ("id", "function", "kind", "status", "progress", "failed", "created", "ran"):
        table.add_column(column, justify="right" if column in ("progress", "failed", "ran") else "left")
    for j in rows:
        items = j["items"]
        pct = f"{100 * items['done'] / items['total']:.0f}%" if items["total"] else "-"
        run = j["timings"].get("run_s")
        table.add_row(
            j["id"],
            j["function"],
            j["kind"],
            j["status"],
            f"{items['done']}/{items['total']} {pct}",
            str(items["failed"]),
            _when(j["created_at"]),
            f"{run:.2f} s" if run is not None else "-",
        )
    out.print(table)


@app.command("ls")
def list_all(url: Url = DEFAULT_URL, key: Key = None) -> None:
    """List functions and models."""
    with _client(url, key) as client:
        functions, models = client.functions(), client.models()
    table = Table(title="functions", title_justify="left")
    for column in ("name", "version", "abi", "models", "invocations", "errors", "instances", "updated"):
        table.add_column(
            column, justify="right" if column in ("version", "invocations", "errors", "instances") else "left"
        )
    for f in functions:
        counters = f.get("counters", {})
        table.add_row(
            f["name"],
            str(f["version"]),
            f["abi"],
            ",".join(f["manifest"].get("models", [])),
            str(counters.get("invocations", "-")),
            str(sum(counters.get("errors", {}).values())),
            str(f.get("instances", {}).get("live", "-")),
            _when(f["created_at"]),
        )
    out.print(table)
    table = Table(title="models", title_justify="left")
    for column in ("name", "version", "size", "inputs", "outputs", "options", "used by"):
        table.add_column(column, justify="right" if column in ("version", "size") else "left")
    for m in models:
        table.add_row(
            m["name"],
            str(m["version"]),
            f"{m['size']:,}",
            "; ".join(_spec(s) for s in m.get("inputs", [])),
            "; ".join(_spec(s) for s in m.get("outputs", [])),
            _options_short(m.get("options")),
            ",".join(m.get("users", [])),
        )
    out.print(table)


@app.command()
def versions(
    name: Annotated[str, typer.Argument(help="The function.")], url: Url = DEFAULT_URL, key: Key = None
) -> None:
    """List every version of a function."""
    with _client(url, key) as client:
        rows = client.versions(name)
    table = Table(title=name, title_justify="left")
    for column in ("version", "current", "sha256", "size", "abi", "models", "created"):
        table.add_column(column)
    for v in rows:
        table.add_row(
            str(v["version"]),
            "*" if v["is_current"] else "",
            v["sha256"][:12],
            str(v["size"]),
            v["abi"],
            ",".join(v["manifest"].get("models", [])),
            _when(v["created_at"]),
        )
    out.print(table)


@app.command()
def logs(
    name: Annotated[str, typer.Argument(help="The function.")],
    n: Annotated[int, typer.Option("-n", help="Lines.")] = 200,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing new lines.")] = False,
    url: Url = DEFAULT_URL,
    key: Key = None,
) -> None:
    """Print a function's recent log lines (guest stdout/stderr, log calls, host events)."""
    since: float | None = None
    with _client(url, key) as client:
        while True:
            for line in client.logs(name, n, since):
                when = datetime.datetime.fromtimestamp(line["ts"]).strftime("%H:%M:%S.%f")[:-3]
                inv = f" [{line['invocation']}]" if line.get("invocation") else ""
                out.print(
                    f"{when} {line['stream']:<6} {line['level']:<5}{inv} {line['message']}",
                    highlight=False,
                    markup=False,
                )
                since = line["ts"]
            if not follow:
                return
            try:
                time.sleep(1.0)
            except KeyboardInterrupt:
                return


# --- rm, rollback --------------------------------------------------------------------------------
@rm_app.command("function")
def rm_function(name: Annotated[str, typer.Argument()], url: Url = DEFAULT_URL, key: Key = None) -> None:
    """Delete a function and every version of it."""
    with _client(url, key) as client:
        client.delete_function(name)
    err.print(f"deleted function {name}")


@rm_app.command("model")
def rm_model(name: Annotated[str, typer.Argument()], url: Url = DEFAULT_URL, key: Key = None) -> None:
    """Delete a model (refused while a function uses it)."""
    with _client(url, key) as client:
        client.delete_model(name)
    err.print(f"deleted model {name}")


@app.command()
def rollback(
    name: Annotated[str, typer.Argument(help="The function.")],
    version: Annotated[
        int | None, typer.Option(help="Version to make current (default: the previous).")
    ] = None,
    url: Url = DEFAULT_URL,
    key: Key = None,
) -> None:
    """Make an earlier version of a function current again."""
    with _client(url, key) as client:
        view = client.rollback(name, version)
    err.print(f"{name}: version {view['version']} is current (sha256 {view['sha256'][:12]})")


# --- keys ----------------------------------------------------------------------------------------
@key_app.command("add")
def key_add(
    scope: Annotated[list[str], typer.Option(help="admin, invoke or read; repeatable.")],
    tenant: Annotated[str, typer.Option(help="The tenant the key acts for.")] = "default",
    data: Annotated[Path, typer.Option(help="Data folder.")] = DEFAULT_DATA,
) -> None:
    """Create an API key in the store and print it (shown once). A server started without keys
    requires them after its next restart."""
    from wasminfer.store import Store
    from wasminfer.store.keys import check_known_scopes

    with Store(data) as store:
        plaintext = store.add_key(check_known_scopes(scope), tenant=tenant)
    out.print(plaintext, highlight=False)


@key_app.command("ls")
def key_ls(
    tenant: Annotated[str, typer.Option(help="The tenant.")] = "default",
    data: Annotated[Path, typer.Option(help="Data folder.")] = DEFAULT_DATA,
) -> None:
    """List a tenant's stored keys (ids and scopes, never secrets)."""
    from wasminfer.store import Store

    with Store(data) as store:
        keys = store.list_keys(tenant=tenant)
    for k in keys:
        out.print(f"{k.id}  {'+'.join(k.scopes)}  {k.created_at:.0f}{'  revoked' if k.revoked else ''}")


@key_app.command("revoke")
def key_revoke(
    key_id: Annotated[str, typer.Argument(help="The key's id (the hex part after 'wik_').")],
    tenant: Annotated[str, typer.Option(help="The tenant.")] = "default",
    data: Annotated[Path, typer.Option(help="Data folder.")] = DEFAULT_DATA,
) -> None:
    """Revoke a stored key (takes effect at once, also on a running server)."""
    from wasminfer.store import Store

    with Store(data) as store:
        store.revoke_key(key_id, tenant=tenant)
    err.print(f"revoked {key_id}")


if __name__ == "__main__":
    main()
