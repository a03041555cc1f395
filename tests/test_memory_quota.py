"""Memory budgets (`wasminfer.runtime.memory`): the host's budget and each tenant's quota, in
obeyed/violated pairs, through the real app (Starlette's TestClient over a real `Platform`), one
real server for the options, and ONNX Runtime's arena.

The platform here has a budget of 48 MiB and a quota of 32 MiB per tenant; functions run the
hand-written guest tests/guests/hostile.wat with `memory_mb=8`, so a tenant holds at most four
instances. Instances are held busy by taking them from their function's real pool (`acquire`), which
is what an invocation in flight does, so nothing here waits on timing.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from starlette.testclient import TestClient

from live_server import live_server
from wasminfer import cli
from wasminfer.errors import BadRequest
from wasminfer.gateway import create_app
from wasminfer.runtime.memory import MemorySettings, MiB, model_bytes, total_ram_bytes
from wasminfer.runtime.pool import InstancePool
from wasminfer.service import Platform, parse_keys

WASM = {"content-type": "application/wasm"}
ONNX = {"content-type": "application/octet-stream"}
KEYS = {"alice": "alice-secret", "mallory": "mallory-secret"}  # tenants default and acme
FN = "memory_mb=8&max_instances=16&timeout_ms=5000"


class App:
    def __init__(self, client: TestClient, platform: Platform, wasm: bytes) -> None:
        self.client, self.platform, self.wasm = client, platform, wasm
        self.held: list[tuple[InstancePool[Any], Any]] = []

    def as_(self, who: str, **headers: str) -> dict[str, str]:
        return {"authorization": f"Bearer {KEYS[who]}", **headers}

    def deploy(self, who: str, name: str, query: str) -> httpx.Response:
        return self.client.put(f"/v1/functions/{name}?{query}", content=self.wasm,
                               headers=self.as_(who, **WASM))

    def invoke(self, who: str, name: str) -> httpx.Response:
        return self.client.post(f"/v1/functions/{name}/invoke", content=b"ehello", headers=self.as_(who))

    def hold(self, tenant: str, name: str, n: int) -> None:
        """Takes `n` instances of the function from its pool and keeps them busy (as calls in flight)."""
        pool = self.platform.host(tenant).function(name).pool
        for _ in range(n):
            self.held.append((pool, pool.acquire(timeout_s=1)[0]))

    def release_all(self) -> None:
        while self.held:
            pool, inst = self.held.pop()
            pool.release(inst, True)

    def live(self, tenant: str, name: str) -> int:
        return int(self.platform.host(tenant).function(name).pool.stats()["live"])

    def memory(self, who: str) -> dict[str, Any]:
        r = self.client.get("/v1/scaling", headers=self.as_(who))
        assert r.status_code == 200, r.text
        memory: dict[str, Any] = r.json()["memory"]
        return memory


@pytest.fixture
def app(tmp_path: Path, hostile_wasm: bytes) -> Iterator[App]:
    keys = parse_keys(f"{KEYS['alice']}:admin,{KEYS['mallory']}:admin:acme")
    platform = Platform(tmp_path / "data", keys=keys, memory=MemorySettings(budget_mb=48, tenant_quota_mb=32))
    platform.start()
    try:
        with TestClient(create_app(platform), raise_server_exceptions=False) as client:
            a = App(client, platform, hostile_wasm)
            try:
                yield a
            finally:
                a.release_all()
    finally:
        platform.close()


def error(r: httpx.Response, status: int, code: str) -> str:
    assert r.status_code == status, r.text
    body = r.json()["error"]
    assert body["code"] == code, body
    message: str = body["message"]
    return message


# --- deploys ----------------------------------------------------------------------------------------
def test_a_deploy_within_the_quota_is_stored_and_reserved(app: App) -> None:
    r = app.deploy("alice", "f", f"{FN}&prewarm_instances=4")
    assert r.status_code == 201, r.text
    assert app.live("default", "f") == 4
    memory = app.memory("alice")
    assert memory["tenant"]["quota_bytes"] == 32 * MiB
    assert memory["tenant"]["instances_bytes"] == 32 * MiB
    assert (memory["budget_bytes"], memory["used_bytes"]) == (48 * MiB, 32 * MiB)


def test_a_deploy_over_the_quota_is_refused_and_nothing_is_stored(app: App) -> None:
    assert app.deploy("alice", "f", f"{FN}&prewarm_instances=1").status_code == 201
    message = error(app.deploy("alice", "f", f"{FN}&prewarm_instances=5"), 400, "invalid_manifest")
    assert "'prewarm_instances' (5)" in message and "40 MiB" in message and "quota of 32 MiB" in message
    versions = app.client.get("/v1/functions/f/versions", headers=app.as_("alice")).json()["versions"]
    assert [(v["version"], v["manifest"]["prewarm_instances"]) for v in versions] == [(1, 1)]
    assert app.invoke("alice", "f").content == b"ehello"  # version 1 still serves

    message = error(app.deploy("alice", "big", "memory_mb=64"), 400, "invalid_manifest")
    assert message.startswith("manifest key 'memory_mb' (64) is more than the tenant's memory quota of 32")
    assert app.client.get("/v1/functions/big", headers=app.as_("alice")).status_code == 404
    assert app.memory("alice")["tenant"]["instances_bytes"] == 8 * MiB


# --- invocations -----------------------------------------------------------------------------------
def test_invokes_up_to_the_quota_succeed_and_the_next_new_instance_is_429(app: App) -> None:
    assert app.deploy("alice", "f", FN).status_code == 201
    app.hold("default", "f", 3)  # 24 MiB busy
    r = app.invoke("alice", "f")  # makes the fourth instance: 32 of 32 MiB
    assert (r.status_code, r.content) == (200, b"ehello")
    app.hold("default", "f", 1)  # that one, idle again, now busy too

    r = app.invoke("alice", "f")
    message = error(r, 429, "memory_quota_exceeded")
    assert r.headers["retry-after"] == "1"
    assert "32 of 32 MiB reserved (instances 32 MiB, models 0 MiB)" in message
    assert "an instance of function 'f' (manifest key 'memory_mb' 8) needs 8 MiB more" in message
    assert app.memory("alice")["tenant"]["refusals"] == {"tenant": 1, "host": 0}

    pool, inst = app.held.pop()
    pool.release(inst, True)  # a call finishes: its instance serves the next one
    assert app.invoke("alice", "f").content == b"ehello"


def test_idle_instances_of_the_tenant_are_reclaimed_but_busy_ones_are_not(app: App) -> None:
    assert app.deploy("alice", "a", f"{FN}&prewarm_instances=4").status_code == 201  # 32 MiB, idle
    assert app.deploy("alice", "b", FN).status_code == 201  # its instance took one of a's
    assert (app.live("default", "a"), app.live("default", "b")) == (3, 1)
    app.hold("default", "b", 1)
    assert app.invoke("alice", "b").content == b"ehello"  # a second one of b: another of a's went
    assert (app.live("default", "a"), app.live("default", "b")) == (2, 2)

    app.hold("default", "a", 2)
    app.hold("default", "b", 1)  # every instance busy: nothing left to reclaim
    error(app.invoke("alice", "b"), 429, "memory_quota_exceeded")
    assert (app.live("default", "a"), app.live("default", "b")) == (2, 2)
    assert app.memory("alice")["tenant"]["reclaimed_bytes"] == 16 * MiB


def test_the_autoscalers_prewarm_stays_inside_the_quota_and_reclaims_nothing(app: App) -> None:
    assert app.deploy("alice", "a", f"{FN}&prewarm_instances=2").status_code == 201
    assert app.deploy("alice", "b", FN).status_code == 201
    b = app.platform.host("default").function("b")
    assert b.prewarm(10) == 1  # room for one more: 32 of 32 MiB
    assert b.prewarm(10) == 0
    assert (app.live("default", "a"), app.live("default", "b")) == (2, 2)
    assert app.memory("alice")["tenant"]["refusals"] == {"tenant": 0, "host": 0}


# --- tenants and the host -----------------------------------------------------------------------------
def test_another_tenant_is_unaffected_by_one_at_its_quota(app: App) -> None:
    assert app.deploy("alice", "f", f"{FN}&prewarm_instances=4").status_code == 201
    app.hold("default", "f", 4)
    error(app.invoke("alice", "f"), 429, "memory_quota_exceeded")

    assert app.deploy("mallory", "g", FN).status_code == 201
    app.hold("acme", "g", 1)
    assert app.invoke("mallory", "g").content == b"ehello"  # a new instance of its own: 16 MiB
    memory = app.memory("mallory")
    assert memory["tenant"]["used_bytes"] == 16 * MiB
    assert memory["tenant"]["refusals"] == {"tenant": 0, "host": 0}
    assert memory["used_bytes"] == 48 * MiB


def test_a_full_host_budget_is_507_for_a_tenant_within_its_quota(app: App) -> None:
    assert app.deploy("alice", "f", f"{FN}&prewarm_instances=4").status_code == 201
    assert app.deploy("mallory", "g", f"{FN}&prewarm_instances=2").status_code == 201  # 48 of 48 MiB
    app.hold("acme", "g", 2)
    app.hold("default", "f", 4)
    message = error(app.invoke("mallory", "g"), 507, "host_memory_exhausted")
    assert message.startswith("the host's memory budget is full: 48 of 48 MiB reserved by every tenant")
    assert app.memory("mallory")["tenant"] == {
        "quota_bytes": 32 * MiB, "used_bytes": 16 * MiB, "instances_bytes": 16 * MiB, "models_bytes": 0,
        "decoders_bytes": 0,
        "refusals": {"tenant": 0, "host": 1}, "reclaimed_bytes": 0,
    }


# --- models -------------------------------------------------------------------------------------------
def _model_of(mib: int) -> bytes:
    """y = x + w with w a float32 initializer of `mib` MiB."""
    n = mib * MiB // 4
    w = numpy_helper.from_array(np.zeros((1, n), np.float32), "w")
    spec = [helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, n]) for name in ("x", "y")]
    graph = helper.make_graph([helper.make_node("Add", ["x", "w"], ["y"])], "g", spec[:1], spec[1:],
                              initializer=[w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def test_a_model_is_counted_against_the_quota_and_released_when_deleted(app: App, add_model: bytes) -> None:
    r = app.client.put("/v1/models/add", content=add_model, headers=app.as_("alice", **ONNX))
    assert r.status_code == 201, r.text
    assert app.memory("alice")["tenant"]["models_bytes"] == 1 * MiB  # whole MiB, rounded up
    assert app.client.delete("/v1/models/add", headers=app.as_("alice")).status_code == 204
    assert app.memory("alice")["tenant"]["models_bytes"] == 0


def test_replacing_a_model_needs_room_for_its_growth_only(app: App) -> None:
    for mib in (14, 14, 20):  # counted at 18, 18, then 26 MiB of a 32 MiB quota: never both
        r = app.client.put("/v1/models/w", content=_model_of(mib), headers=app.as_("alice", **ONNX))
        assert r.status_code in (200, 201), r.text
        assert app.memory("alice")["tenant"]["models_bytes"] == model_bytes(mib * MiB + 200)
    r = app.client.put("/v1/models/w", content=_model_of(2), headers=app.as_("alice", **ONNX))
    assert r.status_code == 201, r.text
    assert app.memory("alice")["tenant"]["models_bytes"] == 3 * MiB


def test_a_model_that_does_not_fit_is_refused_and_not_stored(app: App, add_model: bytes) -> None:
    r = app.client.put("/v1/models/big", content=_model_of(28), headers=app.as_("alice", **ONNX))
    message = error(r, 413, "payload_too_large")
    assert "counted at 36 MiB once loaded" in message and "quota of 32 MiB" in message
    assert app.client.get("/v1/models/big", headers=app.as_("alice")).status_code == 404

    assert app.deploy("alice", "f", f"{FN}&prewarm_instances=4").status_code == 201
    app.hold("default", "f", 4)  # the quota is full of busy instances
    r = app.client.put("/v1/models/add", content=add_model, headers=app.as_("alice", **ONNX))
    assert "model 'add' needs 1 MiB more" in error(r, 429, "memory_quota_exceeded")
    assert app.client.get("/v1/models/add", headers=app.as_("alice")).status_code == 404
    assert app.memory("alice")["tenant"]["models_bytes"] == 0


# --- metrics ------------------------------------------------------------------------------------------
def test_memory_metrics_show_the_callers_tenant_only(app: App) -> None:
    assert app.deploy("alice", "f", FN).status_code == 201
    assert app.deploy("mallory", "g", f"{FN}&prewarm_instances=2").status_code == 201
    text = app.client.get("/metrics", headers=app.as_("mallory")).text
    assert "wasminfer_memory_budget_bytes 5.0331648e+07" in text
    assert "wasminfer_memory_reserved_bytes 2.5165824e+07" in text
    assert 'wasminfer_tenant_memory_quota_bytes{tenant="acme"} 3.3554432e+07' in text
    assert 'wasminfer_tenant_memory_reserved_bytes{kind="instances",tenant="acme"} 1.6777216e+07' in text
    assert 'wasminfer_tenant_memory_refusals_total{limit="tenant",tenant="acme"} 0.0' in text
    assert 'tenant="default"' not in text
    operator = app.client.get("/metrics", headers=app.as_("alice")).text
    assert 'memory_reserved_bytes{kind="instances",tenant="default"} 8.388608e+06' in operator


# --- settings -----------------------------------------------------------------------------------------
def test_memory_settings_parse_from_the_environment_and_options() -> None:
    ram_mb = total_ram_bytes() // MiB
    default = MemorySettings.from_env({})
    assert (default.budget_mb, default.tenant_quota_mb) == (ram_mb // 2, ram_mb // 2 // 2)
    only_budget = MemorySettings.from_env({"WASMINFER_MEMORY_BUDGET_MB": " 512 "})
    assert (only_budget.budget_mb, only_budget.tenant_quota_mb) == (512, 256)
    both = MemorySettings.from_env({"WASMINFER_MEMORY_BUDGET_MB": "512", "WASMINFER_TENANT_MEMORY_MB": "100"})
    assert (both.budget_mb, both.tenant_quota_mb) == (512, 100)
    options_win = MemorySettings.from_env({"WASMINFER_MEMORY_BUDGET_MB": "512"}, budget_mb=64,
                                          tenant_quota_mb=64)
    assert (options_win.budget_mb, options_win.tenant_quota_mb) == (64, 64)


@pytest.mark.parametrize(
    ("env", "options", "message"),
    [
        ({"WASMINFER_MEMORY_BUDGET_MB": "lots"}, {}, "_BUDGET_MB='lots' is not a whole number"),
        ({"WASMINFER_TENANT_MEMORY_MB": "1.5"}, {}, "WASMINFER_TENANT_MEMORY_MB='1.5' is not a whole number"),
        ({"WASMINFER_MEMORY_BUDGET_MB": "0"}, {}, "budget_mb must be a whole number of MiB, at least 1,"),
        ({}, {"tenant_quota_mb": -5}, "tenant_quota_mb must be a whole number of MiB, at least 1, not -5"),
        ({}, {"budget_mb": 64, "tenant_quota_mb": 65}, "tenant_quota_mb 65 is more than the host's"),
        ({}, {"budget_mb": 1 << 40}, "is more than this machine's RAM"),
    ],
)
def test_memory_settings_reject_nonsense(env: dict[str, str], options: dict[str, int], message: str) -> None:
    with pytest.raises(BadRequest, match=re.escape(message)):
        MemorySettings.from_env(env, **options)


def test_serve_refuses_a_nonsense_budget(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                                         tmp_path: Path) -> None:
    monkeypatch.setattr("sys.argv", ["wasminfer", "serve", "--data", str(tmp_path),
                                     "--memory-budget-mb", "64", "--tenant-memory-mb", "128"])
    with pytest.raises(SystemExit) as info:
        cli.main()
    assert info.value.code == 1
    err = " ".join(capsys.readouterr().err.split())  # rich wraps lines
    assert "bad_request: memory: tenant_quota_mb 128 is more than the host's budget_mb 64" in err
    assert "WASMINFER_MEMORY_BUDGET_MB" not in os.environ or os.environ["WASMINFER_MEMORY_BUDGET_MB"] != "64"


@pytest.mark.integration
def test_a_real_server_takes_its_budget_from_its_options(tmp_path: Path, hostile_wasm: bytes) -> None:
    with live_server(tmp_path / "data", tmp_path / "server.log", "--memory-budget-mb", "64",
                     "--tenant-memory-mb", "16") as (url, _):
        memory = httpx.get(f"{url}/v1/scaling").json()["memory"]
        assert (memory["budget_bytes"], memory["tenant"]["quota_bytes"]) == (64 * MiB, 16 * MiB)
        r = httpx.put(f"{url}/v1/functions/f?{FN}&prewarm_instances=3", content=hostile_wasm, headers=WASM)
        assert "quota of 16 MiB" in error(r, 400, "invalid_manifest")
        assert httpx.put(f"{url}/v1/functions/f?{FN}&prewarm_instances=2", content=hostile_wasm,
                         headers=WASM).status_code == 201


# --- ONNX Runtime's arena -------------------------------------------------------------------------------
def _expand_model(mib: int) -> bytes:
    """x [1,1] -> Expand to `mib` MiB of float32 -> ReduceSum: one run allocates `mib` MiB."""
    shape = numpy_helper.from_array(np.array([mib * MiB // (4 * 65536), 65536], np.int64), "shape")
    graph = helper.make_graph(
        [helper.make_node("Expand", ["x", "shape"], ["big"]),
         helper.make_node("ReduceSum", ["big"], ["y"], keepdims=0)],
        "expand", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [])], initializer=[shape],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.serial
def test_a_large_run_leaves_no_arena_behind_where_ort_s_default_keeps_it() -> None:
    import onnxruntime as ort

    from wasminfer.models import ModelRegistry

    model, x = _expand_model(512), np.ones((1, 1), np.float32)
    with ModelRegistry() as registry:
        registry.load("expand", model)
        before = _rss()
        out = registry.infer("expand", {"x": x})
        held = _rss() - before
    assert float(out["y"]) == 512 * MiB / 4  # the run did allocate its 512 MiB of ones
    assert held < 128 * MiB, f"{held / MiB:.0f} MiB held after the run"

    # The same run on a session with ORT's default arena: what the registry no longer does.
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    before = _rss()
    session.run(None, {"x": x})
    held = _rss() - before
    del session
    assert held > 384 * MiB, f"only {held / MiB:.0f} MiB held: ORT's arena no longer keeps a run's memory"
