"""The `wasminfer` command: run a server (`serve`), build functions (`build`), and manage a server
through `wasminfer.Client` (`deploy`, `invoke`, `ls`, `logs`, `rm`, `rollback`, `versions`, `batch`,
`jobs`), and API keys in a store (`key`).

Client commands take `--url` (`$WASMINFER_URL`, default http://127.0.0.1:8000) and `--key`
(`$WASMINFER_KEY`). Errors print `error: <code>: <message>` on stderr and exit with status 1.

One module per group of commands (`serve`, `functions`, `models`, `jobs`, `keys`), beside what they
share (`common`: the command groups, consoles, client), how they show results (`output`), and the
examples `serve --examples` deploys (`examples`). Importing them registers their commands.
"""

from __future__ import annotations

from wasminfer.cli import examples, functions, jobs, keys, models, new, serve
from wasminfer.cli.common import app, err
from wasminfer.errors import WasminferError
from wasminfer.toolchain import BuildError

__all__ = ["app", "examples", "functions", "jobs", "keys", "main", "models", "new", "serve"]


def main() -> None:
    """Runs the command line; a `WasminferError` or a failed build prints and exits 1."""
    try:
        app()
    except WasminferError as exc:
        err.print(f"[red]error:[/red] {exc.code}: {exc.message}", highlight=False)
        raise SystemExit(1) from None
    except BuildError as exc:
        err.print(f"error: {exc}", highlight=False, markup=False)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
