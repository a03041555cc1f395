"""What every `wasminfer` command shares: the command groups, the consoles (results on stdout,
progress and messages on stderr), the `--url`/`--key` options, the client, progress spinners."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console

if TYPE_CHECKING:
    from wasminfer.client import Client

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


def client(url: str, key: str | None) -> Client:
    """A client of the server at `url` (commands call it through this module: tests put one over
    an in-process app here)."""
    from wasminfer.client import Client

    return Client(url, key)


@contextmanager
def spinner(title: str) -> Iterator[Callable[[str], None]]:
    """A spinner on stderr with the time elapsed, on a terminal only; the yielded function prints a
    progress line above it and shows the step's phase beside the title."""
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    columns = (SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn())
    with Progress(*columns, console=err, transient=True, disable=not err.is_terminal) as bar:
        task = bar.add_task(title, total=None)

        def progress(message: str) -> None:
            bar.update(task, description=f"{title}: {message.splitlines()[0]}")
            err.print(f"  {message}", style="dim", highlight=False)

        yield progress


@contextmanager
def waiting(title: str, phase: str) -> Iterator[Callable[[str], None]]:
    """A spinner on stderr while one request runs (a terminal only: nothing else is printed); the
    yielded function changes its `phase`."""
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    columns = (SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn())
    with Progress(*columns, console=err, transient=True, disable=not err.is_terminal) as bar:
        task = bar.add_task(f"{title}: {phase}", total=None)
        yield lambda now: bar.update(task, description=f"{title}: {now}")


def size(n: int) -> str:
    """`n` bytes in a few characters: `812 bytes`, `64.0 KiB`, `18.2 MiB`."""
    for unit, scale in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


def build_with_progress(source: Path, out_path: Path | None = None, *, command: bool = False,
                        static_sdk: bool = False) -> Path:
    """Builds with a spinner: a handler module (against the SDK module unless `static_sdk`), or a
    WASI command (`command`, C only); a Python function's folder into a component. Raises
    `toolchain.BuildError`."""
    from wasminfer.toolchain import build

    # The first build on a machine also compiles zig's wasi-libc: about 30 s with nothing to show.
    with spinner(f"building {source.name} (the first build takes ~30 s)") as progress:
        return build(source, out_path, progress=progress, exec_model="command" if command else "reactor",
                     sdk="static" if static_sdk else None)
