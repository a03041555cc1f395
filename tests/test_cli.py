"""The `wasminfer` CLI, run in-process (typer's CliRunner: cheap) against a real server: `wasminfer
serve` on 127.0.0.1, one for the module. The README's flows as a user runs them, each command a
subprocess, are in test_e2e_readme.py."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from live_server import live_server
from wasminfer import cli
from wasminfer.service import Platform

# One worker runs the module (`--dist loadgroup`, as `just test` runs): one server, not one per worker.
pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("cli")]

runner = CliRunner()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("cli")
    with live_server(root / "data", root / "serve.log") as (url, _):
        yield url


def run(*args: str, url: str | None = None, stdin: bytes | None = None) -> str:
    result = runner.invoke(cli.app, list(args), input=stdin, env={"WASMINFER_URL": url} if url else None)
    assert result.exit_code == 0, (result.output, result.exception)
    return result.output


def get(url: str, path: str) -> Any:
    r = httpx.get(f"{url}{path}")
    assert r.status_code == 200, r.text
    return r.json()


def test_deploy_invoke_list_logs_rollback_rm(
    server: str, tmp_path: Path, add_model: bytes, hostile_wasm: bytes
) -> None:
    (tmp_path / "add.onnx").write_bytes(add_model)
    (tmp_path / "hostile.wasm").write_bytes(hostile_wasm)
    assert "version 1" in run("deploy", "model", "add", str(tmp_path / "add.onnx"), url=server)
    out = run(
        "deploy",
        "function",
        str(tmp_path / "hostile.wasm"),
        "--models",
        "add",
        "--memory-mb",
        "4",
        "--set",
        "max_queue=8",
        url=server,
    )
    assert "hostile: deployed version 1 (handler ABI" in out
    assert get(server, "/v1/functions/hostile")["manifest"]["max_queue"] == 8

    assert run("invoke", "hostile", url=server, stdin=b"ghello from stdin") == "ghello from stdin"
    body = tmp_path / "req.txt"
    body.write_bytes(b"efile")
    assert run("invoke", "hostile", "--data", str(body), url=server) == "efile"

    listed = run("ls", url=server)
    assert "hostile" in listed and "add" in listed
    assert "hello from the guest" in run("logs", "hostile", url=server)

    wasm = str(tmp_path / "hostile.wasm")
    run("deploy", "function", wasm, "--models", "add", "--memory-mb", "8", url=server)
    rows = [[c.strip() for c in line.split("│")[1:3]] for line in run("versions", "hostile", url=server)
            .splitlines() if line.startswith("│") and line.split("│")[1].strip().isdigit()]
    assert rows == [["1", ""], ["2", "*"]]
    assert "version 1 is current" in run("rollback", "hostile", url=server)
    assert get(server, "/v1/functions/hostile")["manifest"]["memory_mb"] == 4
    assert "version 2 is current" in run("rollback", "hostile", "--version", "2", url=server)
    assert get(server, "/v1/functions/hostile")["manifest"]["memory_mb"] == 8

    assert "deleted function hostile" in run("rm", "function", "hostile", url=server)
    assert "deleted model add" in run("rm", "model", "add", url=server)
    assert get(server, "/v1/functions")["functions"] == [] and get(server, "/v1/models")["models"] == []


def test_errors_exit_1_with_code_and_message(
    server: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr("sys.argv", ["wasminfer", "rm", "function", "nope", "--url", server])
    with pytest.raises(SystemExit) as info:
        cli.main()
    assert info.value.code == 1
    assert "function_not_found: function 'nope' does not exist" in capsys.readouterr().err


def test_keys_in_the_store(tmp_path: Path) -> None:
    data = str(tmp_path / "keys")
    key = run("key", "add", "--scope", "invoke", "--scope", "read", "--data", data).strip()
    assert key.startswith("wik_")
    key_id = key.split("_")[1]
    assert key_id in run("key", "ls", "--data", data)
    run("key", "revoke", key_id, "--data", data)
    assert "revoked" in run("key", "ls", "--data", data)
    with Platform(data) as p:
        assert p.open_access is False
        assert p.authenticate(key) is None


def test_serve_prints_working_example_requests(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The curl line `serve --examples` prints carries a body the digits function accepts."""
    with Platform(tmp_path / "d") as p:
        p.start()
        monkeypatch.setattr(p, "list_functions", lambda **_: [{"name": "digits"}])
        cli.examples.print_example_requests(p, "127.0.0.1", 8000)
    line = capsys.readouterr().out.strip()
    assert line.startswith("curl -s http://127.0.0.1:8000/v1/functions/digits/invoke")
    pixels = json.loads(line.split("-d '")[1].rstrip("'"))["pixels"]
    assert len(pixels) == 64 and all(0 <= v <= 16 for v in pixels)


def test_option_help_comes_from_the_one_description() -> None:
    """The ranges and defaults the CLI shows are those of `MANIFEST_KEYS` and `MODEL_OPTION_PARAMS`."""
    wide = {"COLUMNS": "400"}
    function_help = runner.invoke(cli.app, ["deploy", "function", "--help"], env=wide).output
    assert "memory limit per instance, MiB; 1..4096; default 64." in function_help
    assert "time limit per invocation, ms; 1..900000; default 10000." in function_help
    model_help = runner.invoke(cli.app, ["set", "model", "--help"], env=wide).output
    assert "ONNX Runtime threads inside one run (default: chosen at load by measuring" in model_help
    assert "0..1024; default 0." in model_help
