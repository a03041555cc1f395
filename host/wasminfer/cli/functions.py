"""Functions: `build`, `deploy function`, `invoke`, `ls`, `versions`, `logs`, `rm function`,
`rollback`."""

from __future__ import annotations

import datetime
import json
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from wasminfer.cli import common
from wasminfer.cli.common import DEFAULT_URL, Key, Url, app, build_with_progress, deploy_app, err, out, rm_app
from wasminfer.cli.output import follow, options_short, tensor_spec, when
from wasminfer.errors import BadRequest
from wasminfer.manifest import MANIFEST_KEYS


@app.command("python-runtime")
def python_runtime() -> None:
    """Build the Python runtime (Python functions as source) now instead of at its first use: once
    per machine, minutes; then it loads in milliseconds from $WASMINFER_CACHE/python-runtime."""
    from wasminfer.runtime import Host, python

    with Host() as host, common.spinner("python runtime") as progress:
        rt = python.runtime(host.engine, progress=progress)
    what = f"built in {rt.build_s:.0f} s" if rt.build_s else "already built"
    err.print(f"python runtime {rt.key}: {what} ({python.runtime_cache_dir() / rt.key})", highlight=False)


@app.command()
def build(
    source: Annotated[Path, typer.Argument(help="A function folder (main.c, manifest.json) or a .c file.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Where to write the .wasm.")],
) -> None:
    """Compile a C function to a wasm32-wasi handler module (zig cc from PyPI)."""
    path = build_with_progress(source, output)
    err.print(f"built {path} ({path.stat().st_size} bytes)")


_SET_HELP = (
    f"Any manifest key: KEY=VALUE; repeatable. Keys: {', '.join(MANIFEST_KEYS)} (ranges and defaults: "
    "SECURITY.md, /docs)."
)


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
        wasm = build_with_progress(path).read_bytes()
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
    with common.client(url, key) as client:
        view = client.put_function(name or default_name, wasm, data)
    what = "deployed" if view.get("created") else "unchanged,"
    err.print(
        f"{view['name']}: {what} version {view['version']} ({view['abi']} ABI, sha256 {view['sha256'][:12]}, "
        f"{view['size']} bytes)",
        highlight=False,
    )


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
    stream: Annotated[
        bool, typer.Option("--stream", help="Print the parts of the output as the function writes them.")
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
    sys.stdout.buffer.write(result.body)
    sys.stdout.buffer.flush()
    if timing:
        parts = ", ".join(f"{k} {v:.3f} ms" for k, v in result.server_timing.items())
        err.print(f"\n[{result.invocation_id}] {result.content_type}: {parts}", highlight=False)


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
                    when = datetime.datetime.fromtimestamp(line["ts"]).strftime("%H:%M:%S.%f")[:-3]
                    inv = f" [{line['invocation']}]" if line.get("invocation") else ""
                    out.print(  # one line per log line, whatever the terminal's width (grep, tail)
                        f"{when} {line['stream']:<6} {line['level']:<5}{inv} {line['message']}",
                        highlight=False,
                        markup=False,
                        soft_wrap=True,
                    )
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
