"""The README's flows as a user runs them: the `wasminfer` command (a subprocess, `$WASMINFER_URL`
naming the server, as the README's commands carry no `--url`) against a real `wasminfer serve` on
127.0.0.1, one server for the module. Each test holds one line (or block) of README.md or
docs/jobs.md, quoted in its docstring; the server's answers are checked over plain HTTP.

Guests are built from source by the command itself (`wasminfer deploy function DIR`); builds are
cached under ~/.cache by the toolchain, so only the first run on a machine compiles.
"""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import wasmtime

from live_server import last_line, live_server, one_line, seed_compiled_components, wasminfer

# Generous: the first run on a machine builds zig's wasi-libc and translate-c (minutes when loaded).
# One worker runs the module (`--dist loadgroup`, as `just test` runs): one server, not one per worker.
pytestmark = [pytest.mark.integration, pytest.mark.timeout(900), pytest.mark.xdist_group("e2e_readme")]

ROOT = Path(__file__).resolve().parents[1]
GUESTS = Path(__file__).resolve().parent / "guests"


@dataclass
class Server:
    url: str
    data: Path
    work: Path  # the user's working folder: the CLI runs here

    def cli(self, *args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
        return wasminfer(*args, url=self.url, cwd=self.work, **kwargs)

    def get(self, path: str) -> httpx.Response:
        return httpx.get(f"{self.url}{path}", timeout=30)

    def json(self, path: str) -> Any:
        r = self.get(path)
        assert r.status_code == 200, r.text
        return r.json()


def until(condition: Callable[[], Any], what: str, timeout_s: float = 60.0) -> Any:
    """Polls `condition` until it returns something true (and returns that), failing after
    `timeout_s` with `what`: state, not a sleep, is what the tests wait on."""
    deadline = time.monotonic() + timeout_s
    while not (value := condition()):
        assert time.monotonic() < deadline, f"not within {timeout_s:g} s: {what}"
        time.sleep(0.02)
    return value


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("readme")
    work = root / "work"
    work.mkdir()
    with live_server(root / "data", root / "serve.log", stop_timeout_s=60) as (url, _):
        yield Server(url, root / "data", work)


@pytest.fixture(scope="module")
def digits_samples() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Test pixels of `load_digits`, and the labels and probabilities scikit-learn gives them."""
    from wasminfer.examples import digits_classifier, digits_split

    x = digits_split()[1][:20]
    clf = digits_classifier()
    return x, clf.predict(x), clf.predict_proba(x)


@pytest.fixture(scope="module")
def digits_deployed(server: Server) -> tuple[str, str]:
    """README: `wasminfer deploy model digits digits.onnx` and `wasminfer deploy function
    functions/digits` (the folder copied into the user's working folder)."""
    from wasminfer.examples import digits_model

    (server.work / "digits.onnx").write_bytes(digits_model())
    model = server.cli("deploy", "model", "digits", "digits.onnx")
    shutil.copytree(ROOT / "functions" / "digits", server.work / "functions" / "digits")
    function = server.cli("deploy", "function", "functions/digits")
    return last_line(model.stderr), last_line(function.stderr)


def pixels_json(pixels: np.ndarray) -> str:
    return json.dumps([int(p) for p in pixels])


# --- write, build, deploy, invoke -----------------------------------------------------------------
def test_deploy_function_from_a_c_folder_builds_reads_the_manifest_and_invokes(
    server: Server, digits_deployed: tuple[str, str], digits_samples: tuple[np.ndarray, ...]
) -> None:
    """README: `wasminfer deploy function functions/digits  # builds, reads manifest.json, uploads`
    and `echo '[0,0,3,...]' | wasminfer invoke digits --content-type application/json`."""
    model_line, function_line = digits_deployed
    assert model_line.startswith("digits: deployed version 1 (")
    assert "inputs input:float32[?,64]" in model_line
    assert function_line.startswith("digits: deployed version 1 (handler ABI, sha256 ")
    view = server.json("/v1/functions/digits")
    manifest = json.loads((ROOT / "functions" / "digits" / "manifest.json").read_text())
    assert {k: view["manifest"][k] for k in manifest} == manifest  # read from the folder's manifest.json
    assert view["version"] == 1 and view["abi"] == "handler"

    x, labels, probabilities = digits_samples
    out = server.cli("invoke", "digits", "--content-type", "application/json", stdin=pixels_json(x[0]))
    answer = json.loads(out.stdout)
    assert answer["label"] == int(labels[0])
    np.testing.assert_allclose(answer["probabilities"], probabilities[0], rtol=0, atol=1e-5)

    # The function's own rejection reaches the user with its code and message (HTTP 400 underneath).
    bad = server.cli("invoke", "digits", "-t", "application/json", stdin="[0,0,3]", status=1)
    assert one_line(bad.stderr) == "error: rejected_by_function: digits: expected 64 pixel values, got 3"
    r = httpx.post(f"{server.url}/v1/functions/digits/invoke", content=b"[0,0,3]",
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "rejected_by_function"


# --- async and batch jobs -------------------------------------------------------------------------
# The cancel test comes first: its holding job sleeps (no CPU) while the tests after it run.
@pytest.fixture(scope="module")
def held(server: Server) -> Iterator[str]:
    """Function `held` (one instance) with that instance held by an async job that sleeps 20 s
    (no CPU). Yields the holding job's id; at the end, checks that it finished with the guest's output."""
    wasm = bytes(wasmtime.wat2wasm((GUESTS / "sleep.wat").read_text()))
    r = httpx.put(f"{server.url}/v1/functions/held?memory_mb=1&timeout_ms=120000&max_instances=1",
                  content=wasm, headers={"content-type": "application/wasm"})
    assert r.status_code == 201, r.text
    r = httpx.post(f"{server.url}/v1/functions/held/invoke?async=1", content=struct.pack("<I", 20_000))
    assert r.status_code == 202, r.text
    holder = r.json()["id"]
    until(lambda: server.json("/v1/functions/held")["instances"]["busy"] == 1, "the holding job runs")
    yield holder
    view = until(lambda: (v := server.json(f"/v1/jobs/{holder}"))["status"] in ("succeeded", "failed") and v,
                 "the holding job ends", timeout_s=120)
    assert view["status"] == "succeeded" and server.get(f"/v1/jobs/{holder}/result").content == b"ok"


def test_jobs_cancel_cancels_a_queued_job_and_refuses_a_started_one(server: Server, held: str) -> None:
    """docs/jobs.md: `wasminfer jobs ID --cancel`: "cancelling stops what has not started ... an
    invoke job that has started cannot be cancelled (409)"."""
    # A job for `held` cannot start while its one instance is busy (async work never queues for one).
    job_id = server.cli("invoke", "held", "--async", stdin=struct.pack("<I", 1)).stdout.strip()
    assert server.json(f"/v1/jobs/{job_id}")["items"]["done"] == 0
    cancelled = server.cli("jobs", job_id, "--cancel")
    assert one_line(cancelled.stderr) == f"job {job_id}: cancelled"
    started = server.cli("jobs", held, "--cancel", status=1)
    assert one_line(started.stderr).startswith("error: conflict: ")
    # Both answers came while the holder still ran: the first job was queued, not finished, when cancelled.
    assert server.json(f"/v1/jobs/{held}")["status"] == "running"
    view = server.json(f"/v1/jobs/{job_id}")
    assert view["status"] == "cancelled" and view["items"]["done"] == 0
    assert server.get(f"/v1/jobs/{job_id}/result").status_code == 409  # it never ran: no output


def test_invoke_async_wait_prints_the_functions_output(
    server: Server, digits_deployed: tuple[str, str], digits_samples: tuple[np.ndarray, ...]
) -> None:
    """README: `wasminfer invoke digits -d input.json --async --wait  # durable async job`."""
    x, labels, _ = digits_samples
    (server.work / "input.json").write_text(json.dumps({"pixels": x[1].tolist()}))
    out = server.cli("invoke", "digits", "-d", "input.json", "--async", "--wait")
    assert json.loads(out.stdout)["label"] == int(labels[1])
    assert "1/1 succeeded" in one_line(out.stderr)  # its progress line


def test_jobs_result_prints_an_async_jobs_output(
    server: Server, digits_deployed: tuple[str, str], digits_samples: tuple[np.ndarray, ...]
) -> None:
    """docs/jobs.md: `wasminfer invoke digits -d digit.json --async` prints the job's id;
    `wasminfer jobs ID --wait | --result`."""
    x, labels, _ = digits_samples
    (server.work / "digit.json").write_text(json.dumps({"pixels": x[2].tolist()}))
    job_id = server.cli("invoke", "digits", "-d", "digit.json", "--async").stdout.strip()
    assert server.json(f"/v1/jobs/{job_id}")["kind"] == "invoke"
    waited = server.cli("jobs", job_id, "--wait")
    assert f"job {job_id}: succeeded; 1 of 1 succeeded" in one_line(waited.stderr)
    result = server.cli("jobs", job_id, "--result")
    assert json.loads(result.stdout)["label"] == int(labels[2])


def test_batch_writes_one_result_per_item_in_order(
    server: Server, digits_deployed: tuple[str, str], digits_samples: tuple[np.ndarray, ...]
) -> None:
    """README: `wasminfer batch digits items.jsonl -o results.jsonl  # bulk job, per-item results`."""
    x, labels, probabilities = digits_samples
    bad = 7  # one item the function rejects: its line says why, the others still succeed
    items = [json.dumps({"pixels": p.tolist()}) if i != bad else "[0,0,3]" for i, p in enumerate(x)]
    (server.work / "items.jsonl").write_text("\n".join(items) + "\n")
    done = server.cli("batch", "digits", "items.jsonl", "-o", "results.jsonl")
    assert f"succeeded; {len(x) - 1} of {len(x)} succeeded, 1 failed" in one_line(done.stderr)
    results = [json.loads(line) for line in (server.work / "results.jsonl").read_text().splitlines()]
    assert [r["index"] for r in results] == list(range(len(x)))
    assert results[bad]["status"] == 400 and results[bad]["error"] == {
        "code": "rejected_by_function", "message": "digits: expected 64 pixel values, got 3"}
    for i, r in enumerate(results):
        if i != bad:
            assert (r["status"], r["content_type"]) == (200, "application/json")
            assert r["output"]["label"] == labels[i]
            np.testing.assert_allclose(r["output"]["probabilities"], probabilities[i], rtol=0, atol=1e-5)


# --- logs -----------------------------------------------------------------------------------------
def test_logs_prints_the_functions_lines(server: Server, digits_deployed: tuple[str, str]) -> None:
    """README: `wasminfer logs digits`."""
    sha = server.json("/v1/functions/digits")["sha256"]
    out = server.cli("logs", "digits").stdout
    assert f"host   info  deployed version {sha[:12]} (handler ABI)" in out


def test_logs_follow_prints_lines_written_after_it_started(
    server: Server, digits_deployed: tuple[str, str]
) -> None:
    """README: `wasminfer logs digits -f`: new lines appear while it runs, one line each (its output is a
    pipe here, as under `| grep`: no terminal width to wrap at); Ctrl-C ends it (status 0)."""
    env = {**os.environ, "WASMINFER_URL": server.url}
    env.pop("COLUMNS", None)
    command = [sys.executable, "-m", "wasminfer", "logs", "digits", "-f"]
    with subprocess.Popen(command, cwd=server.work, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True) as proc:
        lines: queue.Queue[str] = queue.Queue()
        out, err = proc.stdout, proc.stderr
        assert out is not None and err is not None
        reader = threading.Thread(target=lambda: [lines.put(line) for line in out], daemon=True)
        reader.start()

        def wait_for(text: str) -> str:
            deadline = time.monotonic() + 60
            while True:
                try:
                    line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    raise AssertionError(f"`logs -f` never printed {text!r}") from None
                if text in line:
                    return line

        try:
            wait_for("deployed version")  # what was there before it started
            r = httpx.post(f"{server.url}/v1/functions/digits/invoke", content=b"[1]",
                           headers={"content-type": "application/json"})
            assert r.status_code == 400
            line = wait_for("expected 64 pixel values, got 1")  # written after it started
            expected = (r"\d\d:\d\d:\d\d\.\d{3} host   error \[\S+\] invocation failed: "
                        r"rejected_by_function: digits: expected 64 pixel values, got 1")
            assert re.fullmatch(expected, line.strip()), line
        finally:
            proc.send_signal(signal.SIGINT)  # Ctrl-C
            try:
                code = proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                raise
            reader.join(timeout=30)
        assert code == 0, err.read()


# --- Python --------------------------------------------------------------------------------------
@pytest.mark.slow
def test_deploy_function_from_a_python_folder_sends_its_source_or_builds_a_component(server: Server) -> None:
    """README, "Writing a function (Python)": `wasminfer deploy function functions/text-classify`
    sends the folder's source to the server's Python runtime; with `--component` it is built into a
    componentize-py component instead. Both invoked."""
    from wasminfer.examples import text_classifier_model

    folder = server.work / "functions" / "text-classify"
    shutil.copytree(ROOT / "functions" / "text-classify", folder)
    seed_compiled_components(server.data, folder)  # the build is the command's; the compile is seeded
    (server.work / "text.onnx").write_bytes(text_classifier_model())
    server.cli("deploy", "model", "text-classifier", "text.onnx")
    deployed = server.cli("deploy", "function", "functions/text-classify")
    assert last_line(deployed.stderr).startswith("text-classify: deployed version 1 (python ABI, sha256 ")
    deployed = server.cli("deploy", "function", "functions/text-classify", "--component", "--name", "text-c")
    assert last_line(deployed.stderr).startswith("text-c: deployed version 1 (component ABI, sha256 ")
    for name in ("text-classify", "text-c"):
        out = server.cli("invoke", name, "-t", "text/plain", stdin="the team scored twice in the second half")
        answer = json.loads(out.stdout)
        assert answer["label"] == "sports"
        assert sorted(answer["scores"]) == ["food", "sports", "tech", "weather"]


# --- models with options --------------------------------------------------------------------------
def test_deploy_model_with_batching_then_set_model_changes_only_what_it_names(server: Server) -> None:
    """README: `wasminfer deploy model digits digits.onnx` with its options, and
    `wasminfer set model digits --max-batch-size 32  # dynamic batching, threads (docs/models.md)`."""
    from wasminfer.examples import digits_model

    (server.work / "batched.onnx").write_bytes(digits_model())
    deployed = last_line(
        server.cli("deploy", "model", "batched", "batched.onnx", "--max-batch-size", "8").stderr)
    assert deployed.startswith("batched: deployed version 1 (")
    # the threads are measured at load: 1 on an idle machine, 2 seen once on 2 busy cores
    assert re.search(r"batching up to 8 rows, 2000 µs delay, [12] intra-op thread\(s\)", deployed), deployed
    view = server.json("/v1/models/batched")
    assert view["options"]["max_batch_size"] == 8 and view["options"]["max_queue_delay_us"] == 2000

    updated = last_line(server.cli("set", "model", "batched", "--max-batch-size", "32",
                                  "--max-queue-delay-us", "500").stderr)
    assert updated.startswith("batched: updated version 2 (")
    assert "batching up to 32 rows, 500 µs delay" in updated
    after = server.json("/v1/models/batched")
    assert after["version"] == 2 and after["sha256"] == view["sha256"]  # a new version of the same file
    named = ("max_batch_size", "max_queue_delay_us")
    assert {k: v for k, v in after["options"].items() if k not in named} == {
        k: v for k, v in view["options"].items() if k not in named}  # the others stay
    assert (after["options"]["max_batch_size"], after["options"]["max_queue_delay_us"]) == (32, 500)
    row = next(line for line in server.cli("ls").stdout.splitlines() if "batched" in line)
    assert "batch 32/500µs" in row

    # Past the limit (2..1024): refused with the reason, and the model keeps its options.
    refused = server.cli("set", "model", "batched", "--max-batch-size", "1025", status=1)
    assert one_line(refused.stderr).startswith("error: bad_request: max_batch_size")
    assert server.json("/v1/models/batched")["options"] == after["options"]
    server.cli("rm", "model", "batched")
    assert server.get("/v1/models/batched").status_code == 404


# --- versions, rollback, rm -----------------------------------------------------------------------
def test_versions_rollback_and_rm(server: Server, digits_deployed: tuple[str, str],
                                  digits_samples: tuple[np.ndarray, ...]) -> None:
    """README: `wasminfer ls; wasminfer logs digits -f; wasminfer rollback digits`, with `wasminfer
    versions` and `wasminfer rm function` / `rm model` (the CLI's "manage a server" commands)."""
    x, labels, _ = digits_samples
    first = last_line(server.cli("deploy", "function", "functions/digits", "--name", "ver").stderr)
    assert first.startswith("ver: deployed version 1 (handler ABI")
    second = last_line(server.cli("deploy", "function", "functions/digits", "--name", "ver",
                                 "--timeout-ms", "1000").stderr)
    assert second.startswith("ver: deployed version 2 (handler ABI")  # same module, another manifest

    rows = {cells[0]: cells for line in server.cli("versions", "ver").stdout.splitlines()
            if len(cells := [c.strip() for c in line.split("│")[1:-1]]) == 7 and cells[0].isdigit()}
    assert sorted(rows) == ["1", "2"] and rows["2"][1] == "*" and rows["1"][1] == ""
    assert rows["1"][2] == rows["2"][2]  # one sha256: the manifest is what changed

    rolled = one_line(server.cli("rollback", "ver").stderr)
    assert rolled.startswith("ver: version 1 is current (sha256 ")
    view = server.json("/v1/functions/ver")
    assert view["version"] == 1 and view["manifest"]["timeout_ms"] == 5000
    answer = server.cli("invoke", "ver", "-t", "application/json", stdin=pixels_json(x[3])).stdout
    assert json.loads(answer)["label"] == int(labels[3])

    # A model a function uses is not deleted; the function is, with every version.
    in_use = server.cli("rm", "model", "digits", status=1)
    assert one_line(in_use.stderr).startswith("error: conflict: ") and "ver" in one_line(in_use.stderr)
    assert one_line(server.cli("rm", "function", "ver").stderr) == "deleted function ver"
    gone = server.cli("invoke", "ver", stdin="[]", status=1)
    assert one_line(gone.stderr) == "error: function_not_found: function 'ver' does not exist"
    assert server.get("/v1/functions/ver/versions").status_code == 404
    assert server.get("/v1/models/digits").status_code == 200


# --- the Zig SDK ----------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def zig_guest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tests/guests/zig_add.zig built the way guest-sdk/zig/wasminfer_imports.zig says: the C header
    through `zig translate-c`, then `zig build-exe` for wasm32-wasi as a reactor."""
    folder = tmp_path_factory.mktemp("zig")
    shutil.copyfile(GUESTS / "zig_add.zig", folder / "main.zig")
    shutil.copyfile(ROOT / "guest-sdk" / "zig" / "wasminfer_imports.zig", folder / "wasminfer_imports.zig")
    zig = [sys.executable, "-m", "ziglang"]
    translated = subprocess.run(
        [*zig, "translate-c", str(ROOT / "guest-sdk" / "c" / "wasminfer.h"), "-target", "wasm32-wasi", "-lc"],
        capture_output=True, text=True, timeout=900, check=False)
    assert translated.returncode == 0, translated.stderr
    (folder / "wasminfer.zig").write_text(translated.stdout)
    built = subprocess.run(
        [*zig, "build-exe", "main.zig", "-target", "wasm32-wasi", "-fno-entry", "-mexec-model=reactor",
         "-rdynamic", "-lc", "-O", "ReleaseSmall", "--stack", "65536", "-femit-bin=add.wasm"],
        cwd=folder, capture_output=True, text=True, timeout=900, check=False)
    assert built.returncode == 0, built.stderr
    return folder / "add.wasm"


@pytest.mark.slow  # the first `zig translate-c` on a machine builds the translator (~1-3 min)
def test_a_zig_guest_built_with_the_sdk_deploys_and_infers(
    server: Server, zig_guest: Path, add_model: bytes
) -> None:
    """README: `guest-sdk/`: "SDKs: C/Zig (`c/wasminfer.h`)"; a Zig function through
    guest-sdk/zig/wasminfer_imports.zig, deployed with `wasminfer deploy function FILE.wasm`."""
    (server.work / "add.onnx").write_bytes(add_model)
    server.cli("deploy", "model", "add", "add.onnx")
    shutil.copyfile(zig_guest, server.work / "zig-add.wasm")
    deployed = last_line(server.cli("deploy", "function", "zig-add.wasm", "--models", "add",
                                   "--memory-mb", "2").stderr)
    assert deployed.startswith("zig-add: deployed version 1 (handler ABI")
    out = server.cli("invoke", "zig-add", "-t", "application/json", stdin="[1, 2.5, -3]")
    assert json.loads(out.stdout) == [11.0, 22.5, 27.0]
    bad = server.cli("invoke", "zig-add", "-t", "application/json", stdin="[1]", status=1)
    assert one_line(bad.stderr) == "error: rejected_by_function: send a JSON array of 3 numbers"
    lines = server.json("/v1/functions/zig-add/logs")["lines"]
    assert [line["message"] for line in lines if line["stream"] == "log"] == ["hello from zig"]
