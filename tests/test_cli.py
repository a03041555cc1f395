"""The `wasminfer` CLI against the in-process app (its `Client` is pointed at a TestClient)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from starlette.testclient import TestClient
from typer.testing import CliRunner

from wasminfer import cli
from wasminfer.client import Client
from wasminfer.gateway import create_app
from wasminfer.service import Platform

runner = CliRunner()


@pytest.fixture
def server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Platform]:
    p = Platform(tmp_path / "data")
    p.start()
    with TestClient(create_app(p)) as http:
        monkeypatch.setattr(cli, "_client", lambda url, key: Client("http://testserver", key, http=http))
        yield p
    p.close()


def run(*args: str, stdin: bytes | None = None) -> str:
    result = runner.invoke(cli.app, list(args), input=stdin)
    assert result.exit_code == 0, (result.output, result.exception)
    return result.output


def test_deploy_invoke_list_logs_rollback_rm(
    server: Platform, tmp_path: Path, add_model: bytes, hostile_wasm: bytes
) -> None:
    (tmp_path / "add.onnx").write_bytes(add_model)
    (tmp_path / "hostile.wasm").write_bytes(hostile_wasm)
    assert "version 1" in run("deploy", "model", "add", str(tmp_path / "add.onnx"))
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
    )
    assert "hostile: deployed version 1 (handler ABI" in out
    assert server.host().function("hostile").manifest.max_queue == 8

    assert run("invoke", "hostile", stdin=b"ghello from stdin") == "ghello from stdin"
    body = tmp_path / "req.txt"
    body.write_bytes(b"efile")
    assert run("invoke", "hostile", "--data", str(body)) == "efile"

    listed = run("ls")
    assert "hostile" in listed and "add" in listed
    assert "hello from the guest" in run("logs", "hostile")

    run("deploy", "function", str(tmp_path / "hostile.wasm"), "--models", "add", "--memory-mb", "8")
    assert "2" in run("versions", "hostile")
    assert "version 1 is current" in run("rollback", "hostile")
    assert "version 2 is current" in run("rollback", "hostile", "--version", "2")

    assert "deleted function hostile" in run("rm", "function", "hostile")
    assert "deleted model add" in run("rm", "model", "add")
    assert server.list_functions() == [] and server.list_models() == []


def test_errors_exit_1_with_code_and_message(
    server: Platform, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr("sys.argv", ["wasminfer", "rm", "function", "nope"])
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
        cli._print_example_requests(p, "127.0.0.1", 8000)
    line = capsys.readouterr().out.strip()
    assert line.startswith("curl -s http://127.0.0.1:8000/v1/functions/digits/invoke")
    pixels = json.loads(line.split("-d '")[1].rstrip("'"))["pixels"]
    assert len(pixels) == 64 and all(0 <= v <= 16 for v in pixels)
