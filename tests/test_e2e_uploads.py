"""Uploads as curl sends them by default, through a real server: `curl -T FILE` (no Content-Type)
and `curl --data-binary @FILE` (`application/x-www-form-urlencoded`) are taken when the bytes say
what they are (a core module, a component, an ONNX model, a Python source, zip or tar.gz of a
Python function's folder), and answered 415 naming the header to send when they do not."""

from __future__ import annotations

import gzip
import io
import json
import subprocess
import tarfile
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import wasmtime

from live_server import live_server

APP = b'''from wasminfer_guest import Request, handler


@handler
def handle(request: Request) -> dict:
    return {"echo": request.text()}
'''


@pytest.fixture(scope="module")
def url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    tmp = tmp_path_factory.mktemp("uploads")
    with live_server(tmp / "data", tmp / "server.log") as (base, _):
        yield base


def curl(*args: str) -> tuple[int, str]:
    """Runs curl (a system tool the suite needs, see .ci/run); returns the status and the body."""
    proc = subprocess.run(["curl", "-sS", "-w", "\n%{http_code}", *args], capture_output=True, check=True,
                          timeout=300)
    body, _, status = proc.stdout.decode().rpartition("\n")
    return int(status), body


def curl_json(*args: str) -> tuple[int, Any]:
    status, body = curl(*args)
    return status, json.loads(body)


def upload(how: str, url: str, file: Path) -> tuple[int, Any]:
    if how == "-T":  # curl sends no Content-Type
        return curl_json("-T", str(file), url)
    return curl_json("-X", "PUT", "--data-binary", f"@{file}", url)  # curl's form default


@pytest.mark.parametrize("how", ["-T", "--data-binary"])
def test_an_onnx_model(url: str, how: str, tmp_path: Path, add_model: bytes) -> None:
    (tmp_path / "add.onnx").write_bytes(add_model)
    name = f"add{len(how)}"
    status, view = upload(how, f"{url}/v1/models/{name}", tmp_path / "add.onnx")
    assert (status, view["name"], view["size"]) == (201, name, len(add_model))
    assert [i["name"] for i in view["inputs"]] == ["a", "b"]


@pytest.mark.parametrize("how", ["-T", "--data-binary"])
def test_a_core_module(url: str, how: str, tmp_path: Path, add_model: bytes, hostile_wasm: bytes) -> None:
    (tmp_path / "add.onnx").write_bytes(add_model)
    assert upload("-T", f"{url}/v1/models/add", tmp_path / "add.onnx")[0] in (200, 201)
    (tmp_path / "fn.wasm").write_bytes(hostile_wasm)
    status, view = upload(how, f"{url}/v1/functions/hostile{len(how)}?models=add&memory_mb=4",
                          tmp_path / "fn.wasm")
    assert (status, view["abi"], view["size"]) == (201, "handler", len(hostile_wasm))
    answer = curl("-X", "POST", "--data-binary", "eok", f"{url}/v1/functions/hostile{len(how)}/invoke")
    assert answer == (200, "eok")  # it echoes


def test_a_component_is_taken_as_wasm(url: str, tmp_path: Path) -> None:
    """A component without our handler is refused by the runtime (400), not by its Content-Type."""
    (tmp_path / "c.wasm").write_bytes(bytes(wasmtime.wat2wasm("(component)")))
    status, body = upload("-T", f"{url}/v1/functions/comp", tmp_path / "c.wasm")
    assert (status, body["error"]["code"]) == (400, "invalid_wasm")
    assert "component" in body["error"]["message"]


def zipped(files: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        for name, data in files.items():
            # a fixed date: the bytes are a test parameter, and pytest-xdist's workers must collect
            # the same ones (a second boundary crossed between two collections broke a run)
            z.writestr(zipfile.ZipInfo(name, date_time=(2026, 1, 1, 0, 0, 0)), data)
    return out.getvalue()


def tar_gz(files: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as t:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return gzip.compress(out.getvalue(), mtime=0)  # no time in the header: see `zipped`


@pytest.mark.parametrize(("file", "data", "how"), [
    ("app.py", APP, "--data-binary"),
    ("fn.zip", zipped({"fn/app.py": APP}), "-T"),
    ("fn.tar.gz", tar_gz({"fn/app.py": APP}), "--data-binary"),
])  # fmt: skip
def test_a_python_function(url: str, tmp_path: Path, file: str, data: bytes, how: str) -> None:
    (tmp_path / file).write_bytes(data)
    name = "py-" + file.split(".")[-1]
    status, view = upload(how, f"{url}/v1/functions/{name}", tmp_path / file)
    assert (status, view["abi"]) == (201, "python"), view
    status, out = curl_json("-X", "POST", "-H", "content-type: text/plain", "--data-binary", "hi",
                       f"{url}/v1/functions/{name}/invoke")
    assert (status, out) == (200, {"echo": "hi"})


@pytest.mark.parametrize(("route", "data", "looks"), [
    ("functions/unknown", b"print('no handler here')\n", "do not say for certain what it is"),
    ("functions/unknown", b"", "do not say for certain what it is"),
    ("models/unknown", b"\x00\x01 not a model", "do not say for certain what it is"),
    ("models/unknown", bytes(wasmtime.wat2wasm("(module)")), "look like a Wasm module, which this route "
     "does not take"),
    ("functions/unknown", b"\x08\x08\x3a\x00", "look like an ONNX model, which this route does not take"),
])  # fmt: skip
def test_what_the_bytes_do_not_say_is_a_415_naming_the_header(
    url: str, tmp_path: Path, route: str, data: bytes, looks: str
) -> None:
    (tmp_path / "body").write_bytes(data)
    for how in ("-T", "--data-binary"):
        status, body = upload(how, f"{url}/v1/{route}", tmp_path / "body")
        assert (status, body["error"]["code"]) == (415, "unsupported_media_type")
        message = body["error"]["message"]
        assert f"its bytes {looks}" in message
        header = "application/octet-stream" if route.startswith("models") else "application/wasm"
        assert f"send it with -H 'Content-Type: {header}'" in message
    assert curl(f"{url}/v1/{route}")[0] == 404  # nothing stored


def test_a_declared_content_type_is_kept(url: str, tmp_path: Path, hostile_wasm: bytes) -> None:
    """A type the client chose is not second-guessed: a module sent as text/plain is a 415."""
    (tmp_path / "fn.wasm").write_bytes(hostile_wasm)
    status, body = curl_json("-T", str(tmp_path / "fn.wasm"), "-H", "content-type: text/plain",
                        f"{url}/v1/functions/typed")
    assert (status, body["error"]["code"]) == (415, "unsupported_media_type")
    assert "not text/plain" in body["error"]["message"]
