"""A real server: `wasminfer serve` (uvicorn) on 127.0.0.1, driven by the CLI and plain HTTP.

Builds the digits example from source, deploys it and its model with the CLI, invokes it over HTTP,
restarts the server and invokes again: no re-upload, and the module comes from the compile cache.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from live_server import free_port, live_server, wait_optimised

pytestmark = pytest.mark.integration


ROOT = Path(__file__).resolve().parents[1]



def cli(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    proc = subprocess.run(
        [sys.executable, "-m", "wasminfer", *args],
        input=stdin,
        capture_output=True,
        timeout=600,
        cwd=ROOT,
        check=False,
    )
    assert proc.returncode == 0, f"wasminfer {' '.join(args)} failed:\n{proc.stderr.decode()}"
    return proc


@contextmanager
def server(data: Path, port: int, log: Path) -> Iterator[str]:
    with live_server(data, log, port=port, stop_timeout_s=20) as (url, _):
        yield url


def test_build_deploy_invoke_restart(tmp_path: Path) -> None:
    from wasminfer.examples import digits_classifier, digits_model, digits_split

    data, port, log = tmp_path / "data", free_port(), tmp_path / "server.log"
    wasm, model = tmp_path / "digits.wasm", tmp_path / "digits.onnx"
    model.write_bytes(digits_model())
    _, x_test, _, _ = digits_split()
    samples = x_test[:5]
    expected = [int(v) for v in digits_classifier().predict(samples)]
    request = tmp_path / "digit.json"
    request.write_text(json.dumps({"pixels": samples[0].tolist()}))

    cli("build", "functions/digits", "-o", str(wasm))
    assert wasm.read_bytes()[:4] == b"\0asm"

    with server(data, port, log) as url:
        assert "OPEN ACCESS" in log.read_text()  # no keys: said loudly, loopback only
        cli("deploy", "model", "digits", str(model), "--url", url)
        cli(
            "deploy",
            "function",
            str(wasm),
            "--name",
            "digits",
            "--manifest",
            "functions/digits/manifest.json",
            "--url",
            url,
        )
        for pixels, label in zip(samples, expected, strict=True):
            r = httpx.post(f"{url}/v1/functions/digits/invoke", json={"pixels": pixels.tolist()})
            assert r.status_code == 200, r.text
            assert r.json()["label"] == label
            assert "run;dur=" in r.headers["server-timing"] and r.headers["x-invocation-id"]
        out = cli("invoke", "digits", "--data", str(request), "--url", url).stdout
        assert json.loads(out)["label"] == expected[0]
        listed = cli("ls", "--url", url).stdout.decode()
        assert "digits" in listed
        assert httpx.get(f"{url}/v1/functions/digits").json()["module"]["from_cache"] is False
        wait_optimised(url, "digits")  # the cache keeps optimised code: restart only once it is there

    with server(data, port, log) as url:  # restarted: nothing uploaded again
        ready = httpx.get(f"{url}/readyz").json()["loaded"]
        assert (ready["models"], ready["functions"], ready["from_cache"], ready["failures"]) == (1, 1, 1, [])
        r = httpx.post(f"{url}/v1/functions/digits/invoke", json={"pixels": samples[1].tolist()})
        assert r.status_code == 200 and r.json()["label"] == expected[1]
        described = httpx.get(f"{url}/v1/functions/digits").json()
        assert described["module"]["from_cache"] is True and described["version"] == 1
        metrics = httpx.get(f"{url}/metrics").text
        assert 'wasminfer_invocations_total{function="digits",outcome="ok",tenant="default"} 1.0' in metrics
        assert os.path.isdir(data / "cache")
