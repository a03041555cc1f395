"""The README's "Writing a function" followed as a user does, through the real `wasminfer` command
and a real server: `wasminfer new`, `wasminfer test` (no server), `wasminfer serve`, `deploy model`,
`deploy function`, `invoke`, `logs`, in C and in Python, on a clock. The time of the whole path is
printed; it is asserted (under 60 s, caches warm) only in the serial test."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from live_server import free_port, live_server, wasminfer

SETOSA = {"label": 0, "name": "setosa"}


def follow_the_readme(tmp: Path, lang: str, name: str) -> float:
    """Runs the README's path for a new function in `lang`; returns its seconds, server start included."""
    tmp.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    made = wasminfer("new", name, "--lang", lang, cwd=tmp)
    assert f"made {name}/ ({lang})" in made.stderr
    assert sorted(p.name for p in (tmp / name).iterdir()) == sorted(
        ["README.md", "input.json", "manifest.json", f"{name}.onnx", "main.c" if lang == "c" else "app.py"])
    local = wasminfer("test", name, cwd=tmp)
    assert json.loads(local.stdout) | SETOSA == json.loads(local.stdout)
    assert "classified as setosa" in local.stderr  # its logs
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with live_server(tmp / "data", tmp / "server.log", port=port):
        wasminfer("deploy", "model", name, f"{name}/{name}.onnx", url=url, cwd=tmp)
        deployed = wasminfer("deploy", "function", name, url=url, cwd=tmp)
        assert f"{name}: deployed version 1" in deployed.stderr
        answer = wasminfer("invoke", name, "-d", f"{name}/input.json", url=url, cwd=tmp)
        logs = wasminfer("logs", name, url=url, cwd=tmp)
        elapsed = time.perf_counter() - start
    result = json.loads(answer.stdout)
    assert {k: result[k] for k in SETOSA} == SETOSA
    assert result["probabilities"][0] == pytest.approx(0.9523575, abs=1e-6)
    assert "classified as setosa" in logs.stdout
    print(f"\n{lang}: wasminfer new -> invoked answer and its logs in {elapsed:.1f} s")
    return elapsed


@pytest.mark.parametrize("lang", ["c", "python"])
def test_from_new_to_an_answer_and_its_logs(tmp_path: Path, lang: str) -> None:
    follow_the_readme(tmp_path, lang, f"hello-{lang}")


@pytest.mark.serial
def test_from_new_to_an_answer_within_a_minute_with_caches_warm(tmp_path: Path) -> None:
    """Caches warm: the same sources built once before (the build cache is the machine's), the
    Python runtime built (`wasminfer python-runtime`, which `just test` runs first)."""
    for lang in ("c", "python"):
        follow_the_readme(tmp_path / "warm-up", lang, f"hello-{lang}")
        elapsed = follow_the_readme(tmp_path / "measured", lang, f"hello-{lang}")
        assert elapsed < 60, f"{lang}: {elapsed:.1f} s"


def test_dev_redeploys_on_save_and_keeps_serving_through_a_broken_save(tmp_path: Path) -> None:
    """`wasminfer dev FOLDER`: deploys at start, again when a file is saved (a new version that
    answers the new way), prints a failed build's error and keeps the last good version serving,
    and stops on Ctrl-C with status 0."""
    wasminfer("new", "live", "--lang", "c", cwd=tmp_path)
    source = tmp_path / "live" / "main.c"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with live_server(tmp_path / "data", tmp_path / "server.log", port=port):
        env = {**os.environ, "WASMINFER_URL": url}
        dev = subprocess.Popen(
            [sys.executable, "-m", "wasminfer", "dev", "live", "--interval", "0.1"],
            cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )
        lines: list[str] = []
        seen = threading.Condition()

        def read() -> None:
            assert dev.stderr is not None
            for line in dev.stderr:
                with seen:
                    lines.append(line)
                    seen.notify_all()

        reader = threading.Thread(target=read, daemon=True)
        reader.start()

        def wait_for(text: str) -> None:
            with seen:
                assert seen.wait_for(lambda: any(text in x for x in lines), timeout=120), "".join(lines)

        try:
            wait_for("live: deployed version 1")
            answer = wasminfer("invoke", "live", "-d", "live/input.json", url=url, cwd=tmp_path)
            assert json.loads(answer.stdout)["name"] == "setosa"

            source.write_text(source.read_text().replace('"setosa"', '"SETOSA"'))
            wait_for("live: deployed version 2")
            answer = wasminfer("invoke", "live", "-d", "live/input.json", url=url, cwd=tmp_path)
            assert json.loads(answer.stdout)["name"] == "SETOSA"

            source.write_text(source.read_text() + "\nthis is not C;\n")
            wait_for("error:")
            answer = wasminfer("invoke", "live", "-d", "live/input.json", url=url, cwd=tmp_path)
            assert json.loads(answer.stdout)["name"] == "SETOSA"  # version 2 still serves
            versions = httpx.get(f"{url}/v1/functions/live/versions").json()
            assert sorted(v["version"] for v in versions["versions"]) == [1, 2]
        finally:
            dev.send_signal(signal.SIGINT)
            assert dev.wait(timeout=30) == 0
            reader.join(timeout=10)
            assert dev.stderr is not None
            dev.stderr.close()
