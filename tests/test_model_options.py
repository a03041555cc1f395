"""Model load options over HTTP (dynamic batching and ONNX Runtime threads): given at upload as
query parameters, changed with PATCH, kept with each stored version, applied again after a restart
and by host replicas (a real worker process), shown in the model's view, its counters in /metrics;
from the CLI too.

The function is the hand-written `hostile` guest (tests/guests/hostile.wat), whose `i` request
infers with model `add` (y = a + b over a dynamic first dimension: a model that can batch)."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from onnx import TensorProto, helper
from starlette.testclient import TestClient
from typer.testing import CliRunner

from live_server import app_server
from wasminfer import cli
from wasminfer.client import Client
from wasminfer.digests import model_digest
from wasminfer.errors import BadRequest
from wasminfer.gateway import create_app
from wasminfer.models import BatchingConfig, decode_tensors, encode_tensors
from wasminfer.replicas import LocalBackend
from wasminfer.service import Platform, deployment_digest

ONNX = {"content-type": "application/octet-stream"}
WASM = {"content-type": "application/wasm"}
JSON = {"content-type": "application/json"}
DEFAULTS = {
    "intra_op_threads": None,
    "inter_op_threads": 1,
    "max_concurrent_runs": None,
    "max_batch_size": 0,
    "max_queue_delay_us": None,
    "max_concurrent_batches": None,
    "memory_arena": False,
}


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    """The app over a platform on a fresh data folder, once it is ready."""
    with Platform(tmp_path / "data") as p, TestClient(create_app(p), raise_server_exceptions=False) as c:
        while c.get("/readyz").status_code != 200:
            time.sleep(0.01)
        yield c


def error(r: httpx.Response, status: int, code: str) -> str:
    assert r.status_code == status, (r.status_code, r.text)
    assert r.json()["error"]["code"] == code, r.json()
    message: str = r.json()["error"]["message"]
    return message


def fixed_batch_model() -> bytes:
    """y = x + x over a fixed [1, 4] input: no batch dimension to stack requests on."""
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "x"], ["y"])],
        "fixed",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
    )
    return bytes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString())


def infer_request(n: int) -> tuple[bytes, np.ndarray]:
    """One row of model `add` ([N,3] + [N,3])."""
    a = (np.arange(3, dtype=np.float32) + n).reshape(1, 3)
    b = np.full((1, 3), 0.5, dtype=np.float32)
    return b"i" + encode_tensors({"a": a, "b": b}), a + b


def metric(text: str, name: str, **labels: str) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        if line.startswith(f"{name}{{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no {name}{{{want}}} in /metrics")


# --- upload with options --------------------------------------------------------------------------
def test_upload_with_batching_runs_batched_and_shows_its_counters(
    client: TestClient, add_model: bytes, hostile_wasm: bytes
) -> None:
    # Batches of 4 rows, always waited for (no run slot lets a request run alone), for up to 1 s: the
    # four callers below meet in one batch per round unless one of them stalls for a second.
    query = "max_batch_size=4&max_queue_delay_us=1000000&max_concurrent_batches=0"
    r = client.put(f"/v1/models/add?{query}", content=add_model, headers=ONNX)
    assert r.status_code == 201, r.text
    assert r.json()["options"] == {
        **DEFAULTS, "max_batch_size": 4, "max_queue_delay_us": 1_000_000, "max_concurrent_batches": 0
    }
    query = "models=add&memory_mb=4&max_instances=8"
    deployed = client.put(f"/v1/functions/hostile?{query}", content=hostile_wasm, headers=WASM)
    assert deployed.status_code == 201, deployed.text

    errors: list[Any] = []

    def caller(n: int) -> None:
        for i in range(10):
            body, want = infer_request(n + i)
            r = client.post("/v1/functions/hostile/invoke", content=body)
            if r.status_code != 200 or not np.array_equal(decode_tensors(r.content)["y"], want):
                errors.append((r.status_code, r.content[:200]))

    threads = [threading.Thread(target=caller, args=(n,)) for n in range(1, 5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []

    view = client.get("/v1/models/add").json()
    assert view["options"]["max_batch_size"] == 4
    stats = view["stats"]
    # 40 requests in at most 20 runs: requests were really stacked (10 runs of 4 on a quiet machine).
    assert stats["inferences"] == 40 and 10 <= stats["runs"] <= 20, stats
    assert stats["batching"]["batched_requests"] == 40 and stats["batching"]["max_batch_size"] == 4
    text = client.get("/metrics").text
    labels = {"tenant": "default", "model": "add"}
    assert metric(text, "wasminfer_model_inferences_total", **labels) == 40
    assert metric(text, "wasminfer_model_runs_total", **labels) == stats["runs"]
    assert metric(text, "wasminfer_model_batch_size_count", **labels) == stats["batching"]["batches"]
    assert (
        metric(text, "wasminfer_model_batch_size_bucket", le="+Inf", **labels) == stats["batching"]["batches"]
    )
    assert metric(text, "wasminfer_model_queue_delay_seconds_count", **labels) == 40
    assert metric(text, "wasminfer_model_batch_size_sum", **labels) == 40  # one row per request


def test_a_model_without_batching_has_run_counters_and_no_histograms(
    client: TestClient, add_model: bytes
) -> None:
    r = client.put("/v1/models/add", content=add_model, headers=ONNX)
    assert r.status_code == 201 and r.json()["options"] == DEFAULTS
    assert r.json()["stats"]["batching"] is None
    text = client.get("/metrics").text
    assert metric(text, "wasminfer_model_runs_total", tenant="default", model="add") == 0
    assert 'wasminfer_model_batch_size_count{model="add"' not in text


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("max_batch_size=1025", "max_batch_size must be an integer from 0 to 1024"),
        ("max_batch_size=-1", "max_batch_size must be an integer from 0 to 1024"),
        ("max_batch_size=abc", "model option max_batch_size must be an integer"),
        ("max_batch_size=", "model option max_batch_size must be an integer"),
        ("max_batch_size=8&max_queue_delay_us=1000001", "max_queue_delay_us must be an integer from 0"),
        ("max_batch_size=8&max_concurrent_batches=257", "max_concurrent_batches must be an integer from 0"),
        ("max_queue_delay_us=100", "max_queue_delay_us needs max_batch_size"),
        ("intra_op_threads=65", "intra_op_threads must be an integer from 0 to 64"),
        ("max_concurrent_runs=257", "max_concurrent_runs must be an integer from 0 to 256"),
        ("max_concurrent_runs=-1", "max_concurrent_runs must be an integer from 0 to 256"),
        ("memory_arena=maybe", "memory_arena must be true or false (1 or 0) or null, got 'maybe'"),
        ("memory_arena=2", "memory_arena must be true or false (1 or 0) or null, got '2'"),
        ("batch=8", "unknown model option(s): batch"),
        ("max_batch_size=8&max_batch_size=16", "query parameter max_batch_size is given twice"),
    ],
)
def test_bad_options_are_400_and_keep_what_is_stored(
    client: TestClient, add_model: bytes, query: str, message: str
) -> None:
    first = client.put("/v1/models/add?max_batch_size=4", content=add_model, headers=ONNX).json()
    assert message in error(client.put(f"/v1/models/add?{query}", content=add_model, headers=ONNX), 400,
                            "bad_request")  # fmt: skip
    view = client.get("/v1/models/add").json()
    assert view["version"] == first["version"] and view["options"] == first["options"]
    assert [v["version"] for v in view["versions"]] == [1]


def test_the_limits_themselves_are_accepted(client: TestClient, add_model: bytes) -> None:
    query = "max_batch_size=1024&max_queue_delay_us=1000000&max_concurrent_batches=256&intra_op_threads=0"
    r = client.put(f"/v1/models/add?{query}", content=add_model, headers=ONNX)
    assert r.status_code == 201, r.text
    assert r.json()["options"] == {
        **DEFAULTS,
        "max_batch_size": 1024,
        "max_queue_delay_us": 1_000_000,
        "max_concurrent_batches": 256,
        "intra_op_threads": 0,
    }
    again = client.put(
        "/v1/models/add?max_batch_size=2&max_queue_delay_us=0", content=add_model, headers=ONNX
    )
    assert again.status_code == 201 and again.json()["version"] == 2


def test_batching_a_model_without_a_batch_dimension_is_400(client: TestClient) -> None:
    model = fixed_batch_model()
    message = error(
        client.put("/v1/models/fixed?max_batch_size=8", content=model, headers=ONNX), 400, "bad_request"
    )
    assert "cannot batch" in message and "'x'" in message
    assert error(client.get("/v1/models/fixed"), 404, "model_not_found")
    assert client.put("/v1/models/fixed", content=model, headers=ONNX).status_code == 201


# --- PATCH ----------------------------------------------------------------------------------------
def test_patch_changes_options_as_a_new_version_of_the_same_bytes(
    client: TestClient, add_model: bytes
) -> None:
    v1 = client.put("/v1/models/add", content=add_model, headers=ONNX).json()
    r = client.patch("/v1/models/add", json={"max_batch_size": 16, "max_queue_delay_us": 250})
    assert r.status_code == 200 and r.json()["created"] is True
    v2 = r.json()
    assert (v2["version"], v2["sha256"]) == (2, v1["sha256"])
    assert v2["options"] == {**DEFAULTS, "max_batch_size": 16, "max_queue_delay_us": 250}
    assert v2["stats"]["batching"]["max_queue_delay_us"] == 250  # the live model batches

    # only what is given changes; the same options again change nothing
    v3 = client.patch("/v1/models/add", json={"max_queue_delay_us": 100}).json()
    assert v3["options"]["max_batch_size"] == 16 and v3["options"]["max_queue_delay_us"] == 100
    same = client.patch("/v1/models/add", json={"max_queue_delay_us": 100})
    assert same.status_code == 200 and same.json()["created"] is False and same.json()["version"] == 3

    # off: its other knobs go too; null is the default
    off = client.patch("/v1/models/add", json={"max_batch_size": 0}).json()
    assert off["options"] == DEFAULTS and off["stats"]["batching"] is None
    threads = client.patch("/v1/models/add", json={"intra_op_threads": 2}).json()
    assert threads["options"]["intra_op_threads"] == 2
    back = client.patch("/v1/models/add", json={"intra_op_threads": None}).json()
    assert back["options"] == DEFAULTS and back["version"] == 6


def test_bad_patches_change_nothing(client: TestClient, add_model: bytes) -> None:
    client.put("/v1/models/add?max_batch_size=4", content=add_model, headers=ONNX)
    cases = [
        (client.patch("/v1/models/add", content=b"{", headers=JSON), 400, "bad_request"),
        (client.patch("/v1/models/add", json=[1]), 400, "bad_request"),
        (client.patch("/v1/models/add", json={}), 400, "bad_request"),
        (client.patch("/v1/models/add", json={"max_batch_size": "8"}), 400, "bad_request"),
        (client.patch("/v1/models/add", json={"max_batch_size": True}), 400, "bad_request"),
        (client.patch("/v1/models/add", json={"max_batch_size": 4096}), 400, "bad_request"),
        (client.patch("/v1/models/add", json={"nope": 1}), 400, "bad_request"),
        (client.patch("/v1/models/add", content=b'{"max_batch_size": 8}', headers=ONNX), 415,
         "unsupported_media_type"),
        (client.patch("/v1/models/add", content=b"{" + b" " * (16 << 10) + b"}", headers=JSON), 413,
         "payload_too_large"),
        (client.patch("/v1/models/nope", json={"max_batch_size": 8}), 404, "model_not_found"),
    ]  # fmt: skip
    for r, status, code in cases:
        error(r, status, code)
    view = client.get("/v1/models/add").json()
    assert view["version"] == 1 and view["options"]["max_batch_size"] == 4

    client.patch("/v1/models/add", json={"max_batch_size": 0})
    message = error(client.patch("/v1/models/add", json={"max_queue_delay_us": 10}), 400, "bad_request")
    assert "needs max_batch_size" in message


def test_concurrent_runs_and_threads_round_trip_and_show_the_plan(
    client: TestClient, add_model: bytes
) -> None:
    """Chosen at load by default (the add model is too small to measure: no bound), given ones kept
    as given, the plan that runs shown in the view; 0 and 256, the limits, accepted."""
    chosen = client.put("/v1/models/add", content=add_model, headers=ONNX).json()
    assert chosen["run_plan"]["chosen_by"] == "tiny" and chosen["run_plan"]["max_concurrent_runs"] == 0
    assert chosen["run_plan"]["intra_op_threads"] == 1 and chosen["run_plan"]["run_ms"] < 1.0
    query = "max_concurrent_runs=256&intra_op_threads=2"
    r = client.put(f"/v1/models/add?{query}", content=add_model, headers=ONNX)
    assert r.status_code == 201, r.text
    assert r.json()["options"] == {**DEFAULTS, "max_concurrent_runs": 256, "intra_op_threads": 2}
    plan = r.json()["run_plan"]
    assert (plan["intra_op_threads"], plan["max_concurrent_runs"]) == (2, 256)
    # Given threads are timed: "tiny" on an idle machine, not when a run on 2 threads took longer
    # than the tiny bound (seen on 2 busy cores); given either way.
    given = ("given; tiny; max_concurrent_runs given", "given; max_concurrent_runs given")
    assert plan["chosen_by"] in given, plan
    changes = {"max_concurrent_runs": 0, "intra_op_threads": None}
    patched = client.patch("/v1/models/add", json=changes).json()
    assert patched["version"] == 3 and patched["options"] == {**DEFAULTS, "max_concurrent_runs": 0}
    assert patched["run_plan"]["max_concurrent_runs"] == 0 and patched["run_plan"]["intra_op_threads"] == 1
    assert patched["stats"]["runs_in_flight"] == 0 and patched["stats"]["runs_queued"] == 0
    message = error(client.patch("/v1/models/add", json={"max_concurrent_runs": 257}), 400, "bad_request")
    assert "max_concurrent_runs must be an integer from 0 to 256" in message
    assert client.get("/v1/models/add").json()["version"] == 3


def test_memory_arena_round_trips_through_upload_patch_and_the_view(
    client: TestClient, add_model: bytes
) -> None:
    """Off by default; on from a query parameter (measured with it: the plan was chosen on a session
    with the arena), off again with PATCH; a value that is not a bool is 400 and changes nothing."""
    assert client.put("/v1/models/add", content=add_model, headers=ONNX).json()["options"] == DEFAULTS
    r = client.put("/v1/models/add?memory_arena=true", content=add_model, headers=ONNX)
    assert r.status_code == 201, r.text
    assert r.json()["options"] == {**DEFAULTS, "memory_arena": True} and r.json()["version"] == 2
    assert client.get("/v1/models/add").json()["options"]["memory_arena"] is True
    for bad, shown in ((1, "1"), ("on", "'on'"), ([], "[]")):
        message = error(client.patch("/v1/models/add", json={"memory_arena": bad}), 400, "bad_request")
        assert message == f"model option memory_arena must be true or false (1 or 0) or null, got {shown}"
    assert client.get("/v1/models/add").json()["version"] == 2
    off = client.patch("/v1/models/add", json={"memory_arena": False}).json()
    assert off["options"] == DEFAULTS and off["version"] == 3
    on = client.patch("/v1/models/add", json={"memory_arena": True}).json()
    back = client.patch("/v1/models/add", json={"memory_arena": None}).json()
    assert (on["options"]["memory_arena"], back["options"]["memory_arena"]) == (True, False)


# --- durability and replicas ------------------------------------------------------------------------
def test_run_options_survive_a_restart_and_reach_a_platform_that_syncs(
    tmp_path: Path, add_model: bytes, hostile_wasm: bytes
) -> None:
    with Platform(tmp_path / "data") as p:
        p.start()
        p.put_model("add", add_model, options={"max_concurrent_runs": 3, "intra_op_threads": 1})
    with Platform(tmp_path / "data") as gateway, Platform(tmp_path / "data") as replica:
        gateway.start()
        live = gateway.host().models.get("add")
        assert (live.max_concurrent_runs, live.intra_op_threads) == (3, 1)
        assert gateway.get_model("add")["run_plan"]["max_concurrent_runs"] == 3
        replica.start(load=False)
        gateway.put_function("hostile", hostile_wasm, {"models": ["add"], "memory_mb": 4})
        before = deployment_digest(gateway.deployed("hostile"))
        replica.sync("hostile", before)
        assert replica.host().models.get("add").max_concurrent_runs == 3

        gateway.patch_model("add", {"max_concurrent_runs": 1})
        after = deployment_digest(gateway.deployed("hostile"))
        assert after != before
        replica.sync("hostile", after)
        assert replica.host().models.get("add").max_concurrent_runs == 1
        # back to chosen: a change too (given 1 thread and chosen 1 thread are different options)
        gateway.patch_model("add", {"max_concurrent_runs": None, "intra_op_threads": None})
        chosen = deployment_digest(gateway.deployed("hostile"))
        assert chosen not in (before, after)
        replica.sync("hostile", chosen)
        assert replica.host().models.get("add").options()["max_concurrent_runs"] is None
        # The arena too; off is the default, so a version stored before the option existed (no
        # memory_arena in its options) is the same deployment as one stored with it off.
        sha256 = gateway.get_model("add")["sha256"]
        assert model_digest(sha256, {"memory_arena": False}) == model_digest(sha256, {}) == sha256[:12]
        assert model_digest(sha256, {"memory_arena": True}) != sha256[:12]
        gateway.patch_model("add", {"memory_arena": True})
        arena = deployment_digest(gateway.deployed("hostile"))
        assert arena != chosen
        replica.sync("hostile", arena)
        assert replica.host().models.get("add").memory_arena is True


def test_an_option_at_its_default_is_not_stored_so_the_same_upload_stays_one_version(
    tmp_path: Path, add_model: bytes
) -> None:
    """A version stored before `memory_arena` existed has no such key; the same bytes uploaded
    again, the option off, are still that version (the store compares what it keeps)."""
    with Platform(tmp_path / "data") as p:
        p.start()
        first = p.put_model("add", add_model)
        assert "memory_arena" not in p.store.get_model("add").info["options"]
        assert p.get_model("add")["options"]["memory_arena"] is False  # the view says the default
        again = p.put_model("add", add_model, options={"memory_arena": False})
        assert (first["version"], again["version"], again["created"]) == (1, 1, False)
        on = p.put_model("add", add_model, options={"memory_arena": True})
        assert (on["version"], on["created"]) == (2, True)
        assert p.store.get_model("add").info["options"]["memory_arena"] is True


def test_options_survive_a_restart(tmp_path: Path, add_model: bytes) -> None:
    with Platform(tmp_path / "data") as p:
        p.start()
        p.put_model("add", add_model, options={"max_batch_size": 8, "max_queue_delay_us": 300,
                                                "memory_arena": True})  # fmt: skip
        p.put_model("plain", add_model)
    with Platform(tmp_path / "data") as p:
        p.start()
        assert p.host().models.get("add").batching == BatchingConfig(8, 300)
        assert p.host().models.get("add").memory_arena is True
        assert p.host().models.get("plain").batching is None
        assert p.host().models.get("plain").memory_arena is False
        assert p.get_model("add")["options"]["memory_arena"] is True
        assert p.get_model("add")["options"]["max_queue_delay_us"] == 300


@pytest.mark.slow
def test_a_replica_reloads_a_model_whose_options_changed(
    tmp_path: Path, add_model: bytes, hostile_wasm: bytes
) -> None:
    """A replica process (`wasminfer worker` on the same data folder, loading lazily) learns of an
    option change from the deployment digest each routed request carries, as of a new upload."""

    async def main() -> None:
        backend = LocalBackend(gateway.data_dir, threads=4)
        worker = await backend.start([("default", "hostile", before)])

        async def models() -> dict[str, Any]:
            status, _, body = await worker.handle.http.request("GET", "/stats")
            assert status == 200
            loaded: dict[str, Any] = json.loads(body)["models"]
            return loaded

        try:
            assert (await models())["default/add"] == DEFAULTS  # warmed with the first version
            gateway.patch_model("add", {"max_batch_size": 8})
            after = deployment_digest(gateway.deployed("hostile"))
            assert after != before
            a = np.ones((2, 3), np.float32)
            body = b"i" + encode_tensors({"a": a, "b": a})
            result = await backend.route(worker, "default", "hostile", after, body, "application/cbor")
            np.testing.assert_array_equal(decode_tensors(result.body)["y"], a + a)
            batching = {"max_batch_size": 8, "max_queue_delay_us": 2000}  # the delay's default
            assert (await models())["default/add"] == {**DEFAULTS, **batching}
            # Run options too: the next request carries their digest, and the worker reloads.
            gateway.patch_model("add", {"max_concurrent_runs": 1, "intra_op_threads": 1})
            runs = deployment_digest(gateway.deployed("hostile"))
            assert runs != after
            result = await backend.route(worker, "default", "hostile", runs, body, "application/cbor")
            np.testing.assert_array_equal(decode_tensors(result.body)["y"], a + a)
            assert (await models())["default/add"] == {
                **DEFAULTS, **batching, "max_concurrent_runs": 1, "intra_op_threads": 1
            }
        finally:
            await backend.stop(worker)
            await backend.aclose()

    with Platform(tmp_path / "data") as gateway:
        gateway.start()
        gateway.put_model("add", add_model)
        gateway.put_function("hostile", hostile_wasm, {"models": ["add"], "memory_mb": 4})
        before = deployment_digest(gateway.deployed("hostile"))
        asyncio.run(main())


# --- CLI ------------------------------------------------------------------------------------------
def test_cli_deploys_with_options_and_sets_them(
    tmp_path: Path, add_model: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "add.onnx").write_bytes(add_model)
    runner = CliRunner()
    with Platform(tmp_path / "data") as p:
        p.start()
        with app_server(p) as served:
            monkeypatch.setattr(cli.common, "client", lambda url, key: Client(served, key))

            def run(*args: str) -> str:
                result = runner.invoke(cli.app, list(args))
                assert result.exit_code == 0, (result.output, result.exception)
                return result.output

            out = run("deploy", "model", "add", str(tmp_path / "add.onnx"), "--max-batch-size", "8")
            assert "batching up to 8 rows, 2000 µs delay" in out
            out = run("set", "model", "add", "--max-queue-delay-us", "100")
            assert "version 2" in out and "batching up to 8 rows, 100 µs delay" in out
            out = run("set", "model", "add", "--memory-arena")
            assert "version 3" in out and "memory arena" in out
            assert p.get_model("add")["options"]["memory_arena"] is True
            out = run("set", "model", "add", "--no-memory-arena")
            assert "version 4" in out and "memory arena" not in out
            assert "8/100µs" in run("ls")  # the column "batch 8/100µs" (the table may wrap it)
            bad = runner.invoke(cli.app, ["set", "model", "add", "--max-batch-size", "5000"])
            assert isinstance(bad.exception, BadRequest)  # `cli.main` prints it and exits 1
            assert "max_batch_size must be an integer from 0 to 1024" in str(bad.exception)
            assert runner.invoke(cli.app, ["set", "model", "add"]).exit_code == 2
        assert p.get_model("add")["options"]["max_queue_delay_us"] == 100
