"""Models: `deploy model`, `set model` (load options, described once in
`model_options.MODEL_OPTION_PARAMS`), `rm model`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from wasminfer.cli import common
from wasminfer.cli.common import DEFAULT_URL, Key, Url, deploy_app, err, rm_app, set_app, size
from wasminfer.cli.output import print_model
from wasminfer.model_options import MODEL_OPTION_PARAMS


def _option(name: str) -> typer.models.OptionInfo:
    info: typer.models.OptionInfo = typer.Option(help=MODEL_OPTION_PARAMS[name].cli_help())
    return info


# Range, default and help from the options' one description; the server checks the ranges (a value
# out of range is its 400, naming the option).
MaxBatchSize = Annotated[int | None, _option("max_batch_size")]
MaxQueueDelayUs = Annotated[int | None, _option("max_queue_delay_us")]
MaxConcurrentBatches = Annotated[int | None, _option("max_concurrent_batches")]
IntraOpThreads = Annotated[int | None, _option("intra_op_threads")]
InterOpThreads = Annotated[int | None, _option("inter_op_threads")]
MaxConcurrentRuns = Annotated[int | None, _option("max_concurrent_runs")]
MemoryArena = Annotated[bool | None, _option("memory_arena")]


@deploy_app.command("model")
def deploy_model(
    name: Annotated[str, typer.Argument(help="The name functions call it by.")],
    file: Annotated[Path, typer.Argument(help="The .onnx file.", exists=True, dir_okay=False)],
    max_batch_size: MaxBatchSize = None,
    max_queue_delay_us: MaxQueueDelayUs = None,
    max_concurrent_batches: MaxConcurrentBatches = None,
    intra_op_threads: IntraOpThreads = None,
    inter_op_threads: InterOpThreads = None,
    max_concurrent_runs: MaxConcurrentRuns = None,
    memory_arena: MemoryArena = None,
    url: Url = DEFAULT_URL,
    key: Key = None,
) -> None:
    """Deploy an ONNX model (validated by loading it), with its load options."""
    data = file.read_bytes()
    phase = f"sent {size(len(data))}; the server loads it into ONNX Runtime"
    with common.client(url, key) as client, common.waiting(f"deploying model {name}", phase):
        view = client.put_model(
            name,
            data,
            max_batch_size=max_batch_size,
            max_queue_delay_us=max_queue_delay_us,
            max_concurrent_batches=max_concurrent_batches,
            intra_op_threads=intra_op_threads,
            inter_op_threads=inter_op_threads,
            max_concurrent_runs=max_concurrent_runs,
            memory_arena=memory_arena,
        )
    print_model(view, "deployed")


@set_app.command("model")
def set_model(
    name: Annotated[str, typer.Argument(help="The model.")],
    max_batch_size: MaxBatchSize = None,
    max_queue_delay_us: MaxQueueDelayUs = None,
    max_concurrent_batches: MaxConcurrentBatches = None,
    intra_op_threads: IntraOpThreads = None,
    inter_op_threads: InterOpThreads = None,
    max_concurrent_runs: MaxConcurrentRuns = None,
    memory_arena: MemoryArena = None,
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
            "max_concurrent_runs": max_concurrent_runs,
            "memory_arena": memory_arena,
        }.items()
        if v is not None
    }
    if not changes:
        raise typer.BadParameter("give at least one option to change, e.g. --max-batch-size 32")
    with common.client(url, key) as client, common.waiting(f"updating model {name}", "the server reloads it"):
        view = client.patch_model(name, **changes)
    print_model(view, "updated")


@rm_app.command("model")
def rm_model(name: Annotated[str, typer.Argument()], url: Url = DEFAULT_URL, key: Key = None) -> None:
    """Delete a model (refused while a function uses it)."""
    with common.client(url, key) as client:
        client.delete_model(name)
    err.print(f"deleted model {name}")
