"""The README's "Writing a function" followed as a user does, through the real `wasminfer` command
and a real server: `wasminfer new`, `wasminfer test` (no server), `wasminfer serve`, `deploy model`,
`deploy function`, `invoke`, `logs`, in C and in Python, on a clock. The time of the whole path is
printed; it is asserted (under 60 s, caches warm) only in the serial test."""

from __future__ import annotations

import json
import time
from pathlib import Path

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
