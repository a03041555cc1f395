"""Tenants and API keys: every way one tenant could reach another's functions and models, refused.

Two tenants, `default` and `acme`, each with stored keys (hashed in the store) of every scope, and a
configured key for a third. A tenant comes only from the key: nothing in a request names one. Each
crossing is its own test, and each checks that the victim's function or model is unchanged after.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from starlette.testclient import TestClient

from wasminfer.gateway import create_app
from wasminfer.models import decode_tensors, encode_tensors
from wasminfer.service import Platform, parse_keys

WASM = {"content-type": "application/wasm"}
ONNX = {"content-type": "application/octet-stream"}
QUERY = "models=add&memory_mb=4&timeout_ms=2000&max_instances=2"


class Tenants:
    def __init__(self, client: TestClient, platform: Platform, keys: dict[str, str]) -> None:
        self.client, self.platform, self.keys = client, platform, keys

    def as_(self, who: str, **headers: str) -> dict[str, str]:
        return {"authorization": f"Bearer {self.keys[who]}", **headers}

    def victim_unchanged(self) -> None:
        """The default tenant's function and model are as deployed, and serve as before."""
        c = self.client
        fn = c.get("/v1/functions/victim", headers=self.as_("alice-read")).json()
        assert (fn["version"], fn["loaded"]) == (1, True), fn
        model = c.get("/v1/models/add", headers=self.as_("alice-read")).json()
        assert model["version"] == 1 and model["users"] == ["victim"], model
        a = np.full((1, 3), 2, np.float32)
        r = c.post("/v1/functions/victim/invoke", content=b"i" + encode_tensors({"a": a, "b": a}),
                   headers=self.as_("alice-invoke"))
        np.testing.assert_array_equal(decode_tensors(r.content)["y"], a + a)  # add, not acme's mul


def _mul_model() -> bytes:
    from onnx import TensorProto, helper

    spec = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", 3]) for n in ("a", "b", "y")]
    graph = helper.make_graph([helper.make_node("Mul", ["a", "b"], ["y"])], "mul", spec[:2], spec[2:])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


@pytest.fixture
def t(tmp_path: Path, add_model: bytes, hostile_wasm: bytes) -> Iterator[Tenants]:
    platform = Platform(tmp_path / "data", keys=parse_keys("ops-secret:admin:globex"))
    keys = {"ops": "ops-secret"}
    for tenant, person in (("default", "alice"), ("acme", "mallory")):
        for scope in ("admin", "invoke", "read"):
            keys[f"{person}-{scope}"] = platform.add_key([scope], tenant=tenant)
    try:
        with TestClient(create_app(platform), raise_server_exceptions=False) as client:
            for _ in range(200):
                if client.get("/readyz").status_code == 200:
                    break
                time.sleep(0.01)
            tenants = Tenants(client, platform, keys)
            assert client.put("/v1/models/add", content=add_model,
                              headers=tenants.as_("alice-admin", **ONNX)).status_code == 201
            r = client.put(f"/v1/functions/victim?{QUERY}", content=hostile_wasm,
                           headers=tenants.as_("alice-admin", **WASM))
            assert r.status_code == 201, r.text
            yield tenants
    finally:
        platform.close()


def status(r: object, expected: int, code: str | None = None) -> None:
    assert r.status_code == expected, r.text  # type: ignore[attr-defined]
    if code is not None:
        assert r.json()["error"]["code"] == code  # type: ignore[attr-defined]


# --- listing and reading --------------------------------------------------------------------------------
def test_a_tenant_lists_only_its_own_functions_and_models(t: Tenants) -> None:
    for who in ("mallory-read", "mallory-admin", "ops"):
        assert t.client.get("/v1/functions", headers=t.as_(who)).json() == {"functions": []}
        assert t.client.get("/v1/models", headers=t.as_(who)).json() == {"models": []}
    listed = t.client.get("/v1/functions", headers=t.as_("alice-read")).json()["functions"]
    assert [f["name"] for f in listed] == ["victim"]


@pytest.mark.parametrize("path", [
    "/v1/functions/victim", "/v1/functions/victim/versions", "/v1/functions/victim/logs", "/v1/models/add",
])
def test_a_tenant_cannot_read_anothers(t: Tenants, path: str) -> None:
    t.client.post("/v1/functions/victim/invoke", content=b"g", headers=t.as_("alice-invoke"))  # a log line
    status(t.client.get(path, headers=t.as_("mallory-admin")), 404)
    t.victim_unchanged()


def test_a_tenant_cannot_invoke_anothers_function(t: Tenants) -> None:
    for who in ("mallory-invoke", "mallory-admin", "ops"):
        status(t.client.post("/v1/functions/victim/invoke", content=b"eok", headers=t.as_(who)), 404,
               "function_not_found")
    t.victim_unchanged()


# --- changing -------------------------------------------------------------------------------------------
def test_a_tenant_cannot_overwrite_anothers_function(t: Tenants, hostile_wasm: bytes) -> None:
    # The same name under acme is acme's own function (it needs its own model "add" first).
    status(t.client.put(f"/v1/functions/victim?{QUERY}", content=hostile_wasm,
                        headers=t.as_("mallory-admin", **WASM)), 404, "model_not_found")
    r = t.client.put("/v1/functions/victim?memory_mb=4", content=hostile_wasm,
                     headers=t.as_("mallory-admin", **WASM))
    assert r.status_code == 201 and r.json()["version"] == 1
    t.victim_unchanged()
    theirs = t.client.get("/v1/functions/victim", headers=t.as_("alice-read")).json()
    assert theirs["manifest"]["models"] == ["add"]


def test_a_tenant_cannot_overwrite_anothers_model(t: Tenants) -> None:
    r = t.client.put("/v1/models/add", content=_mul_model(), headers=t.as_("mallory-admin", **ONNX))
    assert r.status_code == 201 and r.json()["version"] == 1  # acme's own "add"
    t.victim_unchanged()  # still adds


def test_a_tenant_cannot_delete_anothers_function_or_model(t: Tenants) -> None:
    status(t.client.delete("/v1/functions/victim", headers=t.as_("mallory-admin")), 404, "function_not_found")
    status(t.client.delete("/v1/models/add", headers=t.as_("mallory-admin")), 404, "model_not_found")
    t.victim_unchanged()


def test_a_tenant_cannot_roll_back_anothers_function(t: Tenants, hostile_wasm: bytes) -> None:
    assert t.client.put("/v1/functions/victim?models=add&memory_mb=8", content=hostile_wasm,
                        headers=t.as_("alice-admin", **WASM)).json()["version"] == 2
    status(t.client.post("/v1/functions/victim/rollback", headers=t.as_("mallory-admin")), 404)
    status(t.client.post("/v1/functions/victim/rollback?version=1", headers=t.as_("mallory-admin")), 404)
    assert t.client.get("/v1/functions/victim", headers=t.as_("alice-read")).json()["version"] == 2


def test_a_manifest_cannot_name_another_tenants_model(t: Tenants, hostile_wasm: bytes) -> None:
    for query in ("models=add", "models=add,other", "models=default/add", "models=../default/add"):
        r = t.client.put(f"/v1/functions/thief?{query}&memory_mb=4", content=hostile_wasm,
                         headers=t.as_("mallory-admin", **WASM))
        assert r.status_code in (400, 404), r.text
        assert r.json()["error"]["code"] in ("model_not_found", "invalid_manifest")
    assert t.client.get("/v1/functions", headers=t.as_("mallory-read")).json() == {"functions": []}


def test_a_function_cannot_infer_with_another_tenants_model(t: Tenants, hostile_wasm: bytes) -> None:
    # acme's function names a model of its own called "add" (a Mul): infer reaches acme's, never ours
    t.client.put("/v1/models/add", content=_mul_model(), headers=t.as_("mallory-admin", **ONNX))
    assert t.client.put(f"/v1/functions/f?{QUERY}", content=hostile_wasm,
                        headers=t.as_("mallory-admin", **WASM)).status_code == 201
    a = np.full((1, 3), 3, np.float32)
    r = t.client.post("/v1/functions/f/invoke", content=b"i" + encode_tensors({"a": a, "b": a}),
                      headers=t.as_("mallory-invoke"))
    np.testing.assert_array_equal(decode_tensors(r.content)["y"], a * a)
    t.victim_unchanged()


# --- where the tenant comes from ------------------------------------------------------------------------
@pytest.mark.parametrize("extra", [
    {"x-tenant": "default"}, {"x-wasminfer-tenant": "default"}, {"forwarded": "for=127.0.0.1;tenant=default"},
])
def test_no_header_chooses_the_tenant(t: Tenants, extra: dict[str, str]) -> None:
    r = t.client.post("/v1/functions/victim/invoke", content=b"eok", headers=t.as_("mallory-invoke", **extra))
    status(r, 404)


def test_no_query_parameter_chooses_the_tenant(t: Tenants, hostile_wasm: bytes) -> None:
    status(t.client.post("/v1/functions/victim/invoke?tenant=default", content=b"eok",
                         headers=t.as_("mallory-invoke")), 404)
    r = t.client.put("/v1/functions/victim?tenant=default", content=hostile_wasm,
                     headers=t.as_("mallory-admin", **WASM))
    status(r, 400, "invalid_manifest")
    t.victim_unchanged()


def test_function_names_cannot_escape_the_tenant(t: Tenants, hostile_wasm: bytes) -> None:
    for name in ("..%2Fdefault%2Fvictim", "default%2Fvictim", "%2E%2E", "victim%00"):
        r = t.client.post(f"/v1/functions/{name}/invoke", content=b"eok", headers=t.as_("mallory-admin"))
        assert r.status_code in (400, 404), (name, r.text)


# --- scopes and keys ------------------------------------------------------------------------------------
@pytest.mark.parametrize(("who", "method", "path", "expected"), [
    ("mallory-invoke", "PUT", "/v1/functions/x", 403), ("mallory-read", "PUT", "/v1/functions/x", 403),
    ("mallory-invoke", "DELETE", "/v1/functions/x", 403), ("mallory-read", "DELETE", "/v1/models/x", 403),
    ("mallory-read", "POST", "/v1/functions/x/invoke", 403), ("mallory-invoke", "GET", "/v1/functions", 403),
    ("mallory-invoke", "POST", "/v1/functions/x/rollback", 403), ("mallory-invoke", "GET", "/metrics", 403),
])
def test_scopes_are_enforced(t: Tenants, who: str, method: str, path: str, expected: int) -> None:
    status(t.client.request(method, path, headers=t.as_(who)), expected, "forbidden")


def test_a_revoked_key_is_refused_and_keys_are_stored_hashed(t: Tenants) -> None:
    key = t.keys["mallory-admin"]
    assert t.client.get("/v1/functions", headers=t.as_("mallory-admin")).status_code == 200
    raw = b"".join(p.read_bytes() for p in t.platform.data_dir.rglob("*") if p.is_file())
    secret = key.split("_", 2)[2]  # wik_<id>_<secret>: the secret is URL-safe base64 and may hold "_"
    assert len(secret) == 43, key
    assert secret.encode() not in raw and key.encode() not in raw
    t.platform.store.revoke_key(key.split("_")[1], tenant="acme")
    status(t.client.get("/v1/functions", headers=t.as_("mallory-admin")), 401, "unauthorized")


@pytest.mark.parametrize("forged", [
    "wik_0000000000000000_" + "A" * 43,  # well-formed, unknown
    "ops-secret2",
    "OPS-SECRET",
    "ops-secre",
])
def test_forged_keys_are_refused(t: Tenants, forged: str) -> None:
    status(t.client.get("/v1/functions", headers={"authorization": f"Bearer {forged}"}), 401)


def test_metrics_show_only_the_callers_tenant(t: Tenants) -> None:
    t.client.post("/v1/functions/victim/invoke", content=b"eok", headers=t.as_("alice-invoke"))
    ours = t.client.get("/metrics", headers=t.as_("alice-read")).text
    assert 'function="victim"' in ours
    theirs = t.client.get("/metrics", headers=t.as_("mallory-read")).text
    assert "victim" not in theirs and 'tenant="default"' not in theirs
    assert "wasminfer_ready 1.0" in theirs


def test_readiness_names_no_tenant_or_function(t: Tenants) -> None:
    body = t.client.get("/readyz").json()
    assert body["status"] == "ready"
    assert "victim" not in str(body) and "acme" not in str(body)


def test_a_compile_cache_hit_on_another_tenants_bytes_is_not_shown(t: Tenants, hostile_wasm: bytes) -> None:
    """The compile cache is shared: acme uploading the bytes alice uploaded loads her compiled
    module, which its view must not tell (only the operator's tenant, `default`, sees `from_cache`)."""
    c = t.client
    r = c.put("/v1/functions/copy?memory_mb=4", content=hostile_wasm, headers=t.as_("mallory-admin", **WASM))
    assert r.status_code == 201, r.text
    assert t.platform.host("acme").function("copy").compiled.from_cache is True  # the hit happened
    for view in (r.json(), c.get("/v1/functions/copy", headers=t.as_("mallory-read")).json(),
                 c.get("/v1/functions", headers=t.as_("mallory-read")).json()["functions"][0]):
        assert set(view["module"]) == {"sha256", "uses_wasi_nn"}, view["module"]
    own = c.get("/v1/functions/victim", headers=t.as_("alice-read")).json()["module"]
    assert set(own) == {"sha256", "from_cache", "uses_wasi_nn", "tier"} and own["from_cache"] is False
