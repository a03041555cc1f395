"""The README's quick start, as a user runs it: `python -m wasminfer serve --examples` builds the
example functions from source, deploys them with their models, prints one `curl` line per example,
and each line, run by a shell, answers.

Builds come from the toolchain's cache under ~/.cache when other tests (or an earlier run) made them;
cold, the C examples take ~30 s (zig's wasi-libc) and the Python one 10-30 s (componentize-py). The
compiled text-classify component is put in the data folder's compile cache first
(`seed_compiled_components`): the server would otherwise spend 20-50 s compiling it.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest

from live_server import live_server, seed_compiled_components

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(900)
def test_serve_examples_prints_curl_lines_that_answer(tmp_path: Path) -> None:
    """README: `python -m wasminfer serve --examples` ("the example functions built from source and
    their models deployed; it prints a `curl` line to try")."""
    from wasminfer.examples import ORIENTATION_LABELS, digits_classifier, digits_split

    # The printed lines are for a shell with curl: the README's reader runs them as they are.
    # (.ci/run installs curl; a machine without it fails here rather than skipping.)
    assert shutil.which("curl"), "curl is not installed: the quick start's lines need it"
    log, data = tmp_path / "serve.log", tmp_path / "data"
    seed_compiled_components(data, ROOT / "functions" / "text-classify")
    with live_server(data, log, "--examples", ready_timeout_s=600) as (url, _):
        text = log.read_text()
        lines = {line.split("/v1/functions/")[1].split("/")[0]: line
                 for line in text.splitlines() if line.startswith(f"curl -s {url}/v1/functions/")}
        assert sorted(lines) == ["digits", "image-classify", "text-classify"], text[-5000:]
        for name in lines:
            assert f"example {name}: deployed version 1" in text
        # The chatbot's decoder is served masked and batching (its steps run ahead in step loops),
        # and measured at load.
        gpt = httpx.get(f"{url}/v1/models/tiny-gpt", timeout=30).json()
        assert gpt["options"]["max_batch_size"] == 32, gpt  # batching (examples.TINY_GPT)
        assert not gpt["run_plan"]["chosen_by"].startswith("default"), gpt["run_plan"]  # its sample ran
        assert [i["name"] for i in gpt["inputs"]][:3] == ["input_ids", "attention_mask", "position_ids"]

        answers = {}
        for name, line in lines.items():
            proc = subprocess.run(["sh", "-c", line], capture_output=True, timeout=60, cwd=tmp_path,
                                  check=False)
            assert proc.returncode == 0, (line, proc.stderr)
            answers[name] = json.loads(proc.stdout)

    pixels = digits_split()[1][:1]
    assert answers["digits"]["label"] == int(digits_classifier().predict(pixels)[0])
    assert len(answers["digits"]["probabilities"]) == 10

    top = answers["image-classify"]["top"]
    assert sorted(t["label"] for t in top) == sorted(ORIENTATION_LABELS)
    scores = [t["score"] for t in top]
    assert scores == sorted(scores, reverse=True) and abs(sum(scores) - 1) < 1e-4

    labels = (ROOT / "functions" / "text-classify" / "labels.txt").read_text().split()
    text_answer = answers["text-classify"]
    assert text_answer["label"] == "sports"  # "the team scored twice in the second half"
    assert sorted(text_answer["scores"]) == sorted(labels)
    assert max(text_answer["scores"], key=text_answer["scores"].get) == "sports"
