"""Functions: `build`, `deploy function`, `invoke`, `ls`, `versions`, `logs`, `rm function`,
`rollback`."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from wasminfer.cli import common
from wasminfer.cli.common import (
    DEFAULT_URL,
    Key,
    Url,
    app,
    build_with_progress,
    deploy_app,
    err,
    out,
    rm_app,
    size,
)
from wasminfer.cli.output import follow, options_short, print_log_line, tensor_spec, when
from wasminfer.errors import BadRequest
from wasminfer.manifest import MANIFEST_KEYS


@app.command("python-runtime")
def python_runtime(
    prune: Annotated[bool, typer.Option(
        help="Then remove the runtimes other versions built (~360 MB each); stop their servers first.",
    )] = False,
) -> None:
    """Build the Python runtime (Python functions as source) now instead of at its first use: once
    per machine, minutes; then it loads in milliseconds from $WASMINFER_CACHE/python-runtime."""
    from wasminfer.runtime import Host, python

    with Host() as host, common.spinner("python runtime") as progress:
        rt = python.runtime(host.engine, progress=progress)
    what = f"built in {rt.build_s:.0f} s" if rt.build_s else "already built"
    err.print(f"python runtime {rt.key}: {what} ({python.runtime_cache_dir() / rt.key})", highlight=False)
    if prune:
        removed = python.prune_runtimes(rt.key)
        for path, nbytes in removed:
            err.print(f"removed {path} ({size(nbytes)})", highlight=False)
        freed = size(sum(n for _, n in removed))
        err.print(f"pruned {len(removed)} other runtime(s), {freed}", highlight=False)


@app.command()
def build(
    source: Annotated[
        Path, typer.Argument(help="A function folder (main.c or app.py) or one .c or .py file.")
    ],
    output: Annotated[Path, typer.Option("-o", "--output", help="Where to write the .wasm.")],
    command: Annotated[
        bool, typer.Option("--command", help="C only: a WASI command (main() on stdin/stdout) instead of a "
                                             "handler module.")
    ] = False,
    static_sdk: Annotated[
        bool, typer.Option("--static-sdk", help="C only: compile the SDK into the module instead of "
                                                "importing it from the SDK module the host links "
                                                "(guest-sdk/ABI.md, \"Building\").")
    ] = False,
) -> None:
    """Compile a function to WebAssembly: C to a wasm32-wasi handler module (zig cc from PyPI), or a
    WASI command with --command; Python to a component (componentize-py, 10-30 s). Python functions
    need no build to deploy: `deploy function` sends their source."""
    path = build_with_progress(source, output, command=command, static_sdk=static_sdk)
    err.print(f"built {path} ({path.stat().st_size} bytes)")


_SET_HELP = (
    f"Any manifest key: KEY=VALUE; repeatable. Keys: {', '.join(MANIFEST_KEYS)} (ranges and defaults: "
    "SECURITY.md, /docs)."
)


def load_function(path: Path, manifest: Path | None = None, component: bool = False
                  ) -> tuple[bytes, dict[str, Any], str]:
    """What `deploy function PATH` sends: the function's bytes (a Python folder or .py as its source,
    a C folder built: as a WASI command where its manifest says `"abi": "command"`, a .wasm as it
    is), its manifest (`manifest`, else FOLDER/manifest.json, else empty) and its default name.
    Raises `BadRequest` (no such path, a manifest that is not a JSON object), `BuildError`."""
    from wasminfer import pysource

    folder = path if path.is_dir() else None
    if manifest is None and folder is not None and (folder / "manifest.json").is_file():
        manifest = folder / "manifest.json"
    data: Any = {}
    if manifest is not None:
        try:
            data = json.loads(manifest.read_text())
        except (OSError, ValueError) as exc:
            raise BadRequest(f"{manifest}: cannot read it as JSON: {exc}") from None
        if not isinstance(data, dict):
            raise BadRequest(f"{manifest}: expected a JSON object of manifest keys")
    if folder is not None and (folder / "app.py").is_file() and not component:
        wasm = pysource.bundle_folder(folder)
    elif path.is_file() and path.suffix == ".py":
        wasm = pysource.bundle(path.read_bytes(), pysource.PYTHON)
    elif folder is not None:
        wasm = build_with_progress(folder, command=data.get("abi") == "command").read_bytes()
    elif path.is_file():
        wasm = path.read_bytes()
    else:
        raise BadRequest(f"{path}: no such file or folder")
    return wasm, data, folder.resolve().name if folder is not None else path.stem


@deploy_app.command("function")
def deploy_function(
    path: Annotated[
        Path, typer.Argument(help="A function folder (C: built; Python: its source sent; manifest.json "
                                  "read), a .py file or a .wasm.")
    ],
    name: Annotated[
        str | None, typer.Option(help="Function name (default: the folder or file name).")
    ] = None,
    manifest: Annotated[
        Path | None, typer.Option(help="Manifest JSON file (default: FOLDER/manifest.json).")
    ] = None,
    models: Annotated[str | None, typer.Option(help=MANIFEST_KEYS["models"].cli_help())] = None,
    memory_mb: Annotated[int | None, typer.Option(help=MANIFEST_KEYS["memory_mb"].cli_help())] = None,
    timeout_ms: Annotated[int | None, typer.Option(help=MANIFEST_KEYS["timeout_ms"].cli_help())] = None,
    max_instances: Annotated[int | None, typer.Option(help=MANIFEST_KEYS["max_instances"].cli_help())] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help=_SET_HELP)] = None,
    component: Annotated[
        bool, typer.Option(help="Build a Python function into a component instead of sending its source.")
    ] = False,
    url: Url = DEFAULT_URL,
    key: Key = None,
) -> None:
    """Deploy a function: a new version that becomes current. A Python function (a folder with an
    app.py, or one .py file) is sent as its source, run by the server's Python runtime; --component
    builds it into a componentize-py component instead (for functions that bring native code). A C
    folder is built first (a WASI command where its manifest says "abi": "command"); its .onnx files
    are not sent (deploy models with `wasminfer deploy model`)."""
    wasm, data, default_name = load_function(path, manifest, component)
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
    target = name or default_name
    phase = f"sent {size(len(wasm))}; the server validates, compiles and prewarms it"
    with common.client(url, key) as client, common.waiting(f"deploying {target}", phase):
        view = client.put_function(target, wasm, data)
    what = "deployed" if view.get("created") else "unchanged,"
    err.print(
        f"{view['name']}: {what} version {view['version']} ({view['abi']} ABI, sha256 {view['sha256'][:12]}, "
        f"{view['size']} bytes)",
        highlight=False,
    )


CONTENT_TYPES = {
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
    stream: Annotated[
        bool, typer.Option("--stream", help="Print the parts of the output as the function writes them.")
    ] = False,
    url: Url = DEFAULT_URL,
    key: Key = None,
) -> None:
    """Invoke a function on the server: the body from --data or stdin, the content type from -t or the
    file's suffix; the response body to stdout (a newline added on a terminal). --async runs it as a
    durable job. To run a function folder without a server: `wasminfer test`."""
    if data is not None and str(data) != "-":
        body = data.read_bytes()
    elif data is not None or not sys.stdin.isatty():
        body = sys.stdin.buffer.read()
    else:
        body = b""
    ctype = (
        content_type
        or (CONTENT_TYPES.get(data.suffix.lower()) if data else None)
        or "application/octet-stream"
    )
    if stream and async_:
        raise typer.BadParameter("--stream and --async do not go together: a job answers once")
    with common.client(url, key) as client:
        if stream:
            for part in client.invoke_stream(name, body, ctype):
                sys.stdout.write(part)
                sys.stdout.flush()
            return
        if async_:
            job = client.invoke_async(name, body, ctype)
            if not wait:
                out.print(job["id"], highlight=False)
                err.print(f"queued; follow it with: wasminfer jobs {job['id']} --wait", highlight=False)
                return
            follow(client, job["id"])
            result = client.job_result(job["id"])
        else:
            result = client.invoke(name, body, ctype)
    write_output(result.body)
    if timing:
        parts = ", ".join(f"{k} {v:.3f} ms" for k, v in result.server_timing.items())
        err.print(f"\n[{result.invocation_id}] {result.content_type}: {parts}", highlight=False)


def write_output(body: bytes) -> None:
    """Writes a response body to stdout as it is, and on a terminal ends it with a newline where it
    has none (the shell's prompt would follow it on its last line); a pipe or file gets the bytes."""
    sys.stdout.buffer.write(body)
    if sys.stdout.isatty() and body and not body.endswith(b"\n"):
        sys.stdout.buffer.write(b"\n")
    sys.stdout.buffer.flush()


@app.command("ls")
def list_all(url: Url = DEFAULT_URL, key: Key = None) -> None:
    """List functions and models."""
    with common.client(url, key) as client:
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
            when(f["created_at"]),
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
            "; ".join(tensor_spec(s) for s in m.get("inputs", [])),
            "; ".join(tensor_spec(s) for s in m.get("outputs", [])),
            options_short(m.get("options")),
            ",".join(m.get("users", [])),
        )
    out.print(table)


@app.command()
def versions(
    name: Annotated[str, typer.Argument(help="The function.")], url: Url = DEFAULT_URL, key: Key = None
) -> None:
    """List every version of a function."""
    with common.client(url, key) as client:
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
            when(v["created_at"]),
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
    with common.client(url, key) as client:
        try:
            while True:
                for line in client.logs(name, n, since):
                    print_log_line(line, out)
                    since = line["ts"]
                if not follow:
                    return
                time.sleep(1.0)
        except KeyboardInterrupt:  # Ctrl-C ends -f: during the wait or a request alike, exit 0
            return


@rm_app.command("function")
def rm_function(name: Annotated[str, typer.Argument()], url: Url = DEFAULT_URL, key: Key = None) -> None:
    """Delete a function and every version of it."""
    with common.client(url, key) as client:
        client.delete_function(name)
    err.print(f"deleted function {name}")


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
    with common.client(url, key) as client:
        view = client.rollback(name, version)
    err.print(f"{name}: version {view['version']} is current (sha256 {view['sha256'][:12]})")
