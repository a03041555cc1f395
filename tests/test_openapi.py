"""`/openapi.json` against the code it is made from: routes, query parameters, manifest keys, model
options and error codes are in the document exactly when they are in the code; SECURITY.md's limit
table states every manifest key's default and range as `manifest.py` does; the query parser built
from the declarations refuses what they refuse, with the status and message they imply."""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from wasminfer.errors import ERRORS
from wasminfer.gateway import create_app
from wasminfer.gateway.openapi import FRAMEWORK_CODES, NOT_ANSWERED
from wasminfer.gateway.routing import ApiRoute
from wasminfer.manifest import MANIFEST_KEYS, Manifest
from wasminfer.model_options import MODEL_OPTION_PARAMS, MODEL_OPTIONS
from wasminfer.service import Platform

ROOT = Path(__file__).resolve().parents[1]
GATEWAY = ROOT / "host" / "wasminfer" / "gateway"


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    with Platform(tmp_path_factory.mktemp("openapi") / "data") as platform:
        with TestClient(create_app(platform), raise_server_exceptions=False) as c:
            for _ in range(500):
                if c.get("/readyz").status_code == 200:
                    break
            yield c


@pytest.fixture(scope="module")
def doc(client: TestClient) -> dict[str, Any]:
    document: dict[str, Any] = client.get("/openapi.json").json()
    return document


def routes(client: TestClient) -> list[ApiRoute]:
    return [r for r in client.app.routes if isinstance(r, ApiRoute)]  # type: ignore[attr-defined]


def operations(doc: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            yield path, method.upper(), op


def test_every_route_of_the_app_is_declared_and_scoped_as_documented(
    client: TestClient, doc: dict[str, Any]
) -> None:
    served = {(r.path, m, r.required_scope) for r in routes(client) for m in (r.methods or ()) if m != "HEAD"}
    documented = {(path, method, op.get("x-scope")) for path, method, op in operations(doc)}
    assert documented == served
    # Nothing answers outside the declarations (a bare Starlette route would miss the document) but
    # the files of the pages for people (test_gateway_ui.py).
    others = [r for r in client.app.routes if not isinstance(r, ApiRoute)]  # type: ignore[attr-defined]
    assert [(type(r).__name__, r.path) for r in others] == [("Mount", "/static")]
    assert ("/v1/functions/{name}/invoke", "POST", "invoke") in documented
    assert ("/healthz", "GET", None) in documented


def test_query_parameters_in_the_document_are_those_the_routes_parse(
    client: TestClient, doc: dict[str, Any]
) -> None:
    for route in routes(client):
        op = route.operation
        declared = {p.name for p in op.query} | set(op.group.params if op.group else ())
        (method,) = (route.methods or set()) - {"HEAD"}
        params = doc["paths"][route.path][method.lower()].get("parameters", [])
        assert {p["name"] for p in params if p["in"] == "query"} == declared, route.path
    put_function = doc["paths"]["/v1/functions/{name}"]["put"]["parameters"]
    memory = next(p for p in put_function if p["name"] == "memory_mb")["schema"]
    assert (memory["minimum"], memory["maximum"], memory["default"]) == (1, 4096, 64)
    logs = doc["paths"]["/v1/functions/{name}/logs"]["get"]["parameters"]
    n = next(p for p in logs if p["name"] == "n")["schema"]
    assert (n["type"], n["minimum"], n["maximum"], n["default"]) == ("integer", 0, 10_000, 200)


def test_no_handler_reads_a_query_parameter_it_does_not_declare() -> None:
    """Handlers take their query parameters from `params` (the declared parser's output); reading
    `request.query_params` by key would be a parameter the document does not know."""
    def is_query(node: ast.expr) -> bool:
        return isinstance(node, ast.Attribute) and node.attr == "query_params"

    checked = 0
    for path in sorted(GATEWAY.glob("routes_*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            by_key = (isinstance(node, ast.Attribute | ast.Subscript) and is_query(node.value)) or (
                isinstance(node, ast.Compare) and any(is_query(c) for c in node.comparators)
            )
            assert not by_key, f"{path.name}:{getattr(node, 'lineno', '?')} reads request.query_params by key"
        checked += 1
    assert checked == 5


def test_manifest_keys_and_model_options_are_documented_with_their_ranges(doc: dict[str, Any]) -> None:
    schemas = doc["components"]["schemas"]
    assert set(schemas["Manifest"]["properties"]) == set(MANIFEST_KEYS) == set(Manifest.__dataclass_fields__)
    assert set(schemas["ModelOptions"]["properties"]) == set(MODEL_OPTIONS)
    for name, param in MANIFEST_KEYS.items():
        schema = schemas["Manifest"]["properties"][name]
        assert (schema.get("minimum"), schema.get("maximum")) == (param.minimum, param.maximum), name
        assert schema["description"] == param.help
    put_model = doc["paths"]["/v1/models/{name}"]["put"]["parameters"]
    assert {p["name"] for p in put_model if p["in"] == "query"} == set(MODEL_OPTIONS)
    size = schemas["ModelOptions"]["properties"]["max_batch_size"]
    assert (size["minimum"], size["maximum"], size["default"]) == (0, 1024, 0)


def test_every_error_code_is_documented_by_a_route_or_said_why_not(doc: dict[str, Any]) -> None:
    enum = doc["components"]["schemas"]["Error"]["properties"]["error"]["properties"]["code"]["enum"]
    assert set(enum) == set(ERRORS) | set(FRAMEWORK_CODES)
    answered: dict[str, set[str]] = {}
    for _, _, op in operations(doc):
        for status, response in op["responses"].items():
            for code in response.get("x-error-codes", []):
                answered.setdefault(code, set()).add(status)
    assert set(answered) <= set(ERRORS)
    # `internal` and `not_found` (the base classes) are also Starlette's own answers, to any route.
    expected = set(ERRORS) - set(FRAMEWORK_CODES)
    assert set(answered) | set(NOT_ANSWERED) == expected, expected - set(answered) - set(NOT_ANSWERED)
    assert not set(answered) & set(NOT_ANSWERED)
    for code, statuses in answered.items():  # a status comes from its class
        assert statuses == ({"4XX"} if code == "rejected_by_function" else {str(ERRORS[code].status)}), code
    limited = doc["paths"]["/v1/functions/{name}/invoke"]["post"]["responses"]["429"]
    assert "Retry-After" in limited["headers"] and "memory_quota_exceeded" in limited["x-error-codes"]


def test_the_overview_lists_every_error_with_its_status(doc: dict[str, Any]) -> None:
    """`/docs` renders `info.description` (Markdown): its table of errors is made from the classes."""
    overview = doc["info"]["description"]
    for code, cls in ERRORS.items():
        row = f"| {cls.status} | `{code}` |"
        assert (row in overview) == (code not in NOT_ANSWERED), code


# --- the query parser the declarations make: limits in pairs --------------------------------------
@pytest.mark.parametrize(
    ("query", "status", "message"),
    [
        ("n=10000", 404, "function 'nope' does not exist"),
        ("n=10001", 400, "query parameter n must be between 0 and 10000, got 10001"),
        ("n=-1", 400, "query parameter n must be between 0 and 10000, got -1"),
        ("n=ten", 400, "query parameter n must be an integer, got 'ten'"),
        ("n=1&n=2", 400, "query parameter n is given twice"),
        ("since=1.5", 404, "function 'nope' does not exist"),
        ("since=nan", 400, "query parameter since must be a finite number, got nan"),
        ("unknown=1", 404, "function 'nope' does not exist"),  # undeclared: ignored, as before
    ],
)
def test_logs_query_parameters_obeyed_and_violated(
    client: TestClient, query: str, status: int, message: str
) -> None:
    r = client.get(f"/v1/functions/nope/logs?{query}")
    assert (r.status_code, r.json()["error"]["message"]) == (status, message)


@pytest.mark.parametrize(
    ("query", "status", "message"),
    [
        ("limit=1000", 200, None),
        ("limit=1001", 400, "query parameter limit must be between 1 and 1000, got 1001"),
        ("limit=0", 400, "query parameter limit must be between 1 and 1000, got 0"),
        ("status=queued", 200, None),
        ("status=sleeping", 400, "query parameter status must be one of queued, running, succeeded, "
                                 "failed, cancelled, got 'sleeping'"),
    ],
)  # fmt: skip
def test_jobs_query_parameters_obeyed_and_violated(
    client: TestClient, query: str, status: int, message: str | None
) -> None:
    r = client.get(f"/v1/jobs?{query}")
    assert r.status_code == status, r.text
    if message is not None:
        assert r.json()["error"] == {"code": "bad_request", "message": message}
    else:
        assert r.json() == {"jobs": []}


def test_async_flag_is_parsed_once_for_invoke(client: TestClient) -> None:
    bad = client.post("/v1/functions/nope/invoke?async=maybe", content=b"")
    assert bad.status_code == 400
    assert bad.json()["error"]["message"] == (
        "query parameter async must be true or false (1 or 0), got 'maybe'"
    )
    for flag in ("0", "false", "1", ""):
        r = client.post(f"/v1/functions/nope/invoke?async={flag}", content=b"")
        assert (r.status_code, r.json()["error"]["code"]) == (404, "function_not_found"), flag


def test_a_manifest_key_twice_in_the_query_is_400(client: TestClient) -> None:
    r = client.put("/v1/functions/f?memory_mb=4&memory_mb=8", content=b"\0asm",
                   headers={"content-type": "application/wasm"})  # fmt: skip
    assert r.status_code == 400
    assert r.json()["error"] == {"code": "bad_request", "message": "query parameter memory_mb is given twice"}


# --- SECURITY.md's limit table --------------------------------------------------------------------
_UNITS = {"": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}
_AMOUNT = re.compile(r"(\d+(?: \d{3})*)\s*(KiB|MiB|GiB)?(?:\s|$|\()")


def _amount(text: str) -> int:
    m = _AMOUNT.match(text.strip() + " ")
    assert m, text
    return int(m.group(1).replace(" ", "")) * _UNITS[m.group(2) or ""]


def security_limits() -> dict[str, tuple[int, int, int]]:
    """SECURITY.md's per-function table: key -> (default, minimum, maximum)."""
    text = (ROOT / "SECURITY.md").read_text()
    table = text.split("Per function (manifest keys; range in brackets):", 1)[1].split("\n\n", 2)[1]
    limits = {}
    for row in table.splitlines()[2:]:
        key, default = (cell.strip() for cell in row.strip("|").split("|")[:2])
        m = re.fullmatch(r"(.*)\[(.*)-(.*)\]", default)
        if m:
            limits[key.strip("`")] = (_amount(m.group(1)), _amount(m.group(2)), _amount(m.group(3)))
    return limits


def test_security_md_states_every_manifest_range_and_default_as_the_code_does() -> None:
    documented = security_limits()
    ranged = {
        name: (p.default, p.minimum, p.maximum) for name, p in MANIFEST_KEYS.items() if p.maximum is not None
    }
    assert documented == ranged


@pytest.mark.parametrize(("cell", "value"), [("16 MiB ", 16 << 20), ("64 KiB per invocation ", 64 << 10),
                                             ("10 000 ", 10_000), ("0 (off) ", 0), ("1 GiB", 1 << 30)])
def test_the_security_table_reader_reads_amounts(cell: str, value: int) -> None:
    assert _amount(cell) == value


def test_model_option_ranges_are_the_registrys() -> None:
    from wasminfer.models.batching import (
        MAX_BATCH_SIZE_LIMIT,
        MAX_CONCURRENT_BATCHES_LIMIT,
        MAX_QUEUE_DELAY_US_LIMIT,
        BatchingConfig,
    )
    from wasminfer.models.options import MAX_CONCURRENT_RUNS_LIMIT
    from wasminfer.models.registry import DEFAULT_INTER_OP_THREADS, DEFAULT_INTRA_OP_THREADS, MAX_THREADS

    p = MODEL_OPTION_PARAMS
    assert (p["intra_op_threads"].maximum, p["inter_op_threads"].maximum) == (MAX_THREADS, MAX_THREADS)
    # intra_op_threads and max_concurrent_runs: no default value, chosen at load (the registry starts
    # a session at DEFAULT_INTRA_OP_THREADS to measure the model)
    assert (p["intra_op_threads"].default, p["inter_op_threads"].default) == (None, DEFAULT_INTER_OP_THREADS)
    assert DEFAULT_INTRA_OP_THREADS == 1
    runs = p["max_concurrent_runs"]
    assert (runs.default, runs.maximum) == (None, MAX_CONCURRENT_RUNS_LIMIT)
    assert p["max_batch_size"].maximum == MAX_BATCH_SIZE_LIMIT
    assert p["max_queue_delay_us"].maximum == MAX_QUEUE_DELAY_US_LIMIT
    assert p["max_concurrent_batches"].maximum == MAX_CONCURRENT_BATCHES_LIMIT
    assert p["max_queue_delay_us"].default == BatchingConfig().max_queue_delay_us
    assert p["max_concurrent_batches"].default is BatchingConfig().max_concurrent_batches is None
