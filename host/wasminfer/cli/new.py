"""Starting a function: `new` (a folder from a template in `wasminfer/templates/`, with its manifest,
a sample request and a model to run it against), `test` (build it and run a request through it on
an in-process platform over a temporary data folder: no server) and `dev` (deploy it again on every
save)."""

from __future__ import annotations

import json
import sys
import tempfile
import time
from importlib import resources
from pathlib import Path
from typing import Annotated, Any

import typer

from wasminfer.cli import common
from wasminfer.cli.common import DEFAULT_URL, Key, Url, app, err
from wasminfer.cli.functions import CONTENT_TYPES, load_function, write_output
from wasminfer.cli.output import print_log_line
from wasminfer.errors import BadRequest, WasminferError
from wasminfer.syntax import validate_name

#: --lang: (the source file, what it is, what `deploy function` does with it, the manifest).
LANGS: dict[str, tuple[str, str, str, dict[str, Any]]] = {
    "c": ("main.c", "a C handler module (zig cc from PyPI builds it; instances are reused)",
          "builds main.c with zig cc, sends the module", {"memory_mb": 2, "timeout_ms": 5000}),
    "python": ("app.py", "a Python function, sent as its source and run by the server's Python runtime",
               "sends app.py (no build)", {"timeout_ms": 5000}),
    "wasi": ("main.c", "a WASI command in C (main() with stdin and stdout) that calls the model through "
             "wasi-nn, as existing wasi-nn programs do",
             "builds main.c as a WASI command, sends it",
             {"abi": "command", "memory_mb": 2, "timeout_ms": 5000, "content_type": "application/json"}),
}  # fmt: skip
SAMPLE = {"features": [5.1, 3.5, 1.4, 0.2]}


def starter_model() -> bytes:
    """A small linear classifier as ONNX: `features` float32 [N, 4] -> `label` int64 [N] (the argmax)
    and `probabilities` float32 [N, 3] (softmax), weights fixed so that SAMPLE is class 0."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weights = np.array([[0.4, 0.1, -0.5], [1.0, -0.3, -0.7], [-1.5, 0.3, 1.2], [-0.8, -0.5, 1.3]], np.float32)
    bias = np.array([0.5, 1.0, -1.5], np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["features", "W"], ["xw"]),
            helper.make_node("Add", ["xw", "b"], ["logits"]),
            helper.make_node("ArgMax", ["logits"], ["label"], axis=1, keepdims=0),
            helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
        ],
        "starter",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("label", TensorProto.INT64, ["N"]),
         helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", 3])],
        [numpy_helper.from_array(weights, "W"), numpy_helper.from_array(bias, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                              producer_name="wasminfer new")
    model.ir_version = 8
    onnx.checker.check_model(model)
    data: bytes = model.SerializeToString()
    return data


def _template(path: str, name: str, **values: str) -> str:
    # `.tmpl`: no tool takes a template for the package's own code (mypy, the layering test)
    text = resources.files("wasminfer").joinpath("templates", f"{path}.tmpl").read_text()
    for key, value in {"name": name, **values}.items():
        text = text.replace("{{" + key + "}}", value)
    return text


@app.command()
def new(
    name: Annotated[
        str, typer.Argument(help="The function's name (and its folder's): a-z, 0-9, '-', '_', '.'.")
    ],
    lang: Annotated[
        str, typer.Option("--lang", "-l", help="c, python or wasi (a wasi-nn command in C).")
    ] = "c",
    into: Annotated[Path | None, typer.Option("--dir", help="The folder to make (default: ./NAME).")] = None,
) -> None:
    """Start a function: a folder with its source, manifest.json, a sample input.json, a model to try
    it with (NAME.onnx) and a README. Then `wasminfer test NAME` runs it without a server."""
    validate_name("function", name)
    if lang not in LANGS:
        raise BadRequest(f"--lang {lang!r}: expected one of {', '.join(LANGS)}")
    source, what, deploy, limits = LANGS[lang]
    folder = into or Path(name)
    if folder.exists() and any(folder.iterdir()):
        raise BadRequest(f"{folder} exists and is not empty: choose another name or --dir")
    template_dir = "python" if lang == "python" else lang
    files = {
        source: _template(f"{template_dir}/{source}", name),
        "manifest.json": json.dumps({"models": [name], **limits}, indent=2) + "\n",
        "input.json": json.dumps(SAMPLE) + "\n",
        "README.md": _template("README.md", name, lang=lang, what=what, source=source, deploy=deploy),
    }
    folder.mkdir(parents=True, exist_ok=True)
    for file, text in files.items():
        (folder / file).write_text(text)
    (folder / f"{name}.onnx").write_bytes(starter_model())
    err.print(f"made {folder}/ ({lang}): {', '.join([*files, f'{name}.onnx'])}", highlight=False)
    err.print(f"next: wasminfer test {folder}", highlight=False)


def model_files(folder: Path, manifest: dict[str, Any], given: list[str]) -> dict[str, Path]:
    """The ONNX file of each model the manifest names: `--model NAME=PATH`, else FOLDER/NAME.onnx.
    Raises `BadRequest` for a malformed --model or a model without a file."""
    files: dict[str, Path] = {}
    for item in given:
        model, sep, path = item.partition("=")
        if not sep or not model or not path:
            raise BadRequest(f"--model {item!r}: expected NAME=PATH")
        files[model] = Path(path)
    for model in manifest.get("models", []):
        if model not in files:
            files[model] = folder / f"{model}.onnx"
            if not files[model].is_file():
                raise BadRequest(f"the manifest names model {model!r} and there is no {files[model]}: "
                                 f"give its file with --model {model}=PATH")
    return files


ModelOption = Annotated[
    list[str] | None, typer.Option("--model", "-m", help="NAME=PATH of a model (default: FOLDER/NAME.onnx).")
]


@app.command("test")
def test_function(
    folder: Annotated[
        Path, typer.Argument(help="A function folder (as `wasminfer new` makes).", exists=True)
    ],
    data: Annotated[Path | None, typer.Option("--data", "-d", help="Request body file (default: FOLDER/"
                                              "input.json; '-': stdin).")] = None,
    content_type: Annotated[str | None, typer.Option("--content-type", "-t", help="Request content type.")
                            ] = None,
    model: ModelOption = None,
) -> None:
    """Run a function without a server: build it, load its models and it into an in-process platform
    over a temporary data folder, invoke it once; the response to stdout, its log lines to stderr.
    Fails (exit 1) with the function's error, its logs printed first."""
    from wasminfer.service import Platform

    wasm, manifest, name = load_function(folder)
    models = model_files(folder, manifest, model or [])
    if data is None and (folder / "input.json").is_file():
        data = folder / "input.json"
    body = sys.stdin.buffer.read() if data is not None and str(data) == "-" else (
        data.read_bytes() if data is not None else b"")
    ctype = (content_type or (CONTENT_TYPES.get(data.suffix.lower()) if data else None)
             or "application/octet-stream")
    with tempfile.TemporaryDirectory(prefix="wasminfer-test-") as tmp, \
            Platform(Path(tmp) / "data") as platform:
        platform.start()
        for model_name, path in models.items():
            with common.waiting(f"loading model {model_name}", "ONNX Runtime builds its session"):
                platform.put_model(model_name, path.read_bytes())
        with common.waiting(f"loading {name}", "validating, compiling and prewarming it"):
            platform.put_function(name, wasm, manifest)
        try:
            result = platform.invoke(name, body, ctype)
        finally:
            for line in platform.logs(name):
                print_log_line(line.to_dict(), err)
    write_output(result.body)


def _stamp(folder: Path) -> tuple[tuple[str, int, int], ...]:
    return tuple(sorted((str(p), p.stat().st_mtime_ns, p.stat().st_size) for p in folder.rglob("*")
                        if p.is_file() and "__pycache__" not in p.parts))


@app.command()
def dev(
    folder: Annotated[Path, typer.Argument(help="A function folder.", exists=True, file_okay=False)],
    interval: Annotated[float, typer.Option(help="Seconds between looks at the files.")] = 0.5,
    url: Url = DEFAULT_URL,
    key: Key = None,
) -> None:
    """Deploy a function folder (and its NAME.onnx models) to the server, then again on every save
    (its files' times, looked at every --interval), until Ctrl-C. A failed build or deploy prints its
    error and waits for the next save."""
    last = None
    try:
        while True:
            stamp = _stamp(folder)
            if stamp != last:
                last = stamp
                _deploy(folder, url, key)
            time.sleep(interval)
    except KeyboardInterrupt:
        return


def _deploy(folder: Path, url: str, key: str | None) -> None:
    from wasminfer.toolchain import BuildError

    try:
        wasm, manifest, name = load_function(folder)
        with common.client(url, key) as client:
            for model_name in manifest.get("models", []):
                path = folder / f"{model_name}.onnx"
                if path.is_file():
                    client.put_model(model_name, path.read_bytes())
            with common.waiting(f"deploying {name}", "the server validates, compiles and prewarms it"):
                view = client.put_function(name, wasm, manifest)
    except WasminferError as exc:
        err.print(f"[red]error:[/red] {exc.code}: {exc.message}", highlight=False)
        return
    except BuildError as exc:
        err.print(f"error: {exc}", highlight=False, markup=False)
        return
    what = "deployed" if view.get("created") else "unchanged,"
    err.print(f"{view['name']}: {what} version {view['version']} ({view['abi']} ABI); watching {folder}",
              highlight=False)
