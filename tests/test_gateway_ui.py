"""The pages for people and what they read, in-process: `/docs` (Swagger UI over `/openapi.json`) and
`/ui` (the console) with every file they reference served by this server and nothing referenced
elsewhere, the static files' allow-list, and the two read endpoints the console added:
`/v1/stats` (counters and latency histograms per function, per tenant) and `/v1/whoami`.
The pages themselves run in a real browser in test_ui_browser.py."""

from __future__ import annotations

import re
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from test_gateway import ONNX, WASM, bearer, error, wait_ready
from wasminfer.gateway import create_app
from wasminfer.gateway.assets import STATIC
from wasminfer.service import Platform, parse_keys

PAGES = ("/docs", "/ui")
# The one URL the console's script names that is not a request: the SVG namespace.
NAMESPACES = {"http://www.w3.org/2000/svg"}


@pytest.fixture(scope="module")
def keyed(
    tmp_path_factory: pytest.TempPathFactory, add_model: bytes, hostile_wasm: bytes
) -> Iterator[TestClient]:
    keys = parse_keys("adm:admin,inv:invoke,rd:read,acme-rd:read:acme,acme-adm:admin:acme")
    with Platform(tmp_path_factory.mktemp("ui") / "data", keys=keys) as platform:
        with TestClient(create_app(platform), raise_server_exceptions=False) as c:
            wait_ready(c)
            assert (
                c.put("/v1/models/add", content=add_model, headers={**ONNX, **bearer("adm")}).status_code
                == 201
            )
            r = c.put(
                "/v1/functions/echo?models=add&memory_mb=4",
                content=hostile_wasm,
                headers={**WASM, **bearer("adm")},
            )
            assert r.status_code == 201, r.text
            yield c


class _References(HTMLParser):
    """Every URL an HTML page makes the browser load (src, href), and its inline scripts."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []
        self.inline_scripts = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        for name in ("src", "href"):
            if found.get(name):
                self.urls.append(found[name] or "")
        if tag == "script" and not found.get("src"):
            self.inline_scripts += 1


def references(html: str) -> _References:
    parser = _References()
    parser.feed(html)
    return parser


@pytest.mark.parametrize("path", PAGES)
def test_a_page_and_every_file_it_references_come_from_this_server(keyed: TestClient, path: str) -> None:
    page = keyed.get(path)  # public: the page holds no data, it asks for a key
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    csp = page.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "script-src 'self';" in csp and "connect-src 'self'" in csp
    assert not re.search(r"https?://", page.text), "the page names another host"
    refs = references(page.text)
    assert refs.inline_scripts == 0  # the policy allows scripts from files of this server only
    scripts = [u for u in refs.urls if u.endswith(".js")]
    assert scripts and all(u.startswith("/static/") for u in scripts)
    for url in refs.urls:
        assert url.startswith("/") and not url.startswith("//"), url
        r = keyed.get(url)
        assert r.status_code == 200, url
        if url.startswith("/static/"):
            expected = {".js": "text/javascript", ".css": "text/css"}[Path(url).suffix]
            assert r.headers["content-type"].startswith(expected), url
            assert (
                r.headers["content-security-policy"] == csp
                and r.headers["x-content-type-options"] == "nosniff"
            )
    for url in scripts:  # and what the scripts fetch is this server's too
        if "swagger-ui" not in url:  # Swagger UI's own: the browser test checks what it loads
            named = set(re.findall(r"https?://[^\s\"'`)]+", keyed.get(url).text))
            assert named <= NAMESPACES, named


def test_docs_page_loads_swagger_ui_from_the_installed_package(keyed: TestClient) -> None:
    refs = references(keyed.get("/docs").text).urls
    assert "/static/swagger-ui/swagger-ui-bundle.js" in refs and "/static/swagger-ui/swagger-ui.css" in refs
    bundle = keyed.get("/static/swagger-ui/swagger-ui-bundle.js")
    assert "SwaggerUIBundle" in bundle.text and int(bundle.headers["content-length"]) > 500_000
    docs_js = keyed.get("/static/docs.js").text
    assert 'fetch("/openapi.json")' in docs_js and "validatorUrl: null" in docs_js  # no badge from outside


def test_openapi_declares_the_bearer_scheme_and_markdown_for_swagger_ui(keyed: TestClient) -> None:
    doc = keyed.get("/openapi.json").json()
    assert doc["components"]["securitySchemes"]["bearer"] == {
        "type": "http",
        "scheme": "bearer",
        "description": doc["components"]["securitySchemes"]["bearer"]["description"],
    }
    assert doc["security"] == [{"bearer": []}]
    ops = [op for ops in doc["paths"].values() for op in ops.values()]
    assert len({op["operationId"] for op in ops}) == len(ops)  # unique: Swagger UI's anchors
    assert {tag["name"] for tag in doc["tags"]} == {"functions", "jobs", "models", "system", "ui"}
    assert (
        doc["paths"]["/v1/stats"]["get"]["tags"] == ["ui"] and doc["paths"]["/docs"]["get"]["security"] == []
    )
    overview = doc["info"]["description"]
    assert "| 404 | `function_not_found` |" in overview and "| 429 | `memory_quota_exceeded` |" in overview


def test_static_files_are_an_allow_list(keyed: TestClient) -> None:
    # The package's demo page loads a spec from the internet: never served here.
    assert "no route /static/swagger-ui/index.html" in error(keyed.get("/static/swagger-ui/index.html"), 404)
    error(keyed.get("/static/swagger-ui/swagger-initializer.js"), 404, "not_found")
    error(keyed.get("/static/../routes_ui.py"), 404, "not_found")
    error(keyed.get("/static/console.html"), 404, "not_found")  # the page is /ui
    error(keyed.post("/static/console.js"), 405, "method_not_allowed")
    head = keyed.head("/static/console.js")
    assert (
        head.status_code == 200
        and int(head.headers["content-length"]) == (STATIC / "console.js").stat().st_size
    )


def test_stats_count_invocations_by_outcome_with_a_latency_histogram(
    keyed: TestClient, hostile_wasm: bytes
) -> None:
    r = keyed.put(
        "/v1/functions/counted?memory_mb=4", content=hostile_wasm, headers={**WASM, **bearer("adm")}
    )
    assert r.status_code == 201, r.text
    assert "counted" not in keyed.get("/v1/stats", headers=bearer("rd")).json()["functions"]
    # The trap discards the deploy's instance; whether the next call makes one or finds one the
    # autoscaler made meanwhile is a race: the host's own count says which.
    for body in (b"t", b"ehi", b"ehello"):
        keyed.post("/v1/functions/counted/invoke", content=body, headers=bearer("inv"))
    stats = keyed.get("/v1/stats", headers=bearer("rd")).json()
    counted = stats["functions"]["counted"]
    assert counted["invocations"] == {"ok": 2, "guest_trap": 1}
    host_count = keyed.get("/v1/functions/counted", headers=bearer("rd")).json()["counters"]["cold_starts"]
    assert counted["cold_starts"] == host_count and isinstance(stats["at"], float)
    latency = counted["latency_seconds"]
    bounds = [le for le, _ in latency["buckets"]]
    counts = [n for _, n in latency["buckets"]]
    assert bounds[-1] == "+Inf" and bounds[:-1] == sorted(bounds[:-1]) and counts == sorted(counts)
    assert counts[-1] == latency["count"] == 3 and latency["sum"] > 0


def test_stats_and_whoami_are_the_callers_tenant_only(keyed: TestClient) -> None:
    keyed.post("/v1/functions/echo/invoke", content=b"ehi", headers=bearer("inv"))
    assert "echo" in keyed.get("/v1/stats", headers=bearer("rd")).json()["functions"]
    assert keyed.get("/v1/stats", headers=bearer("acme-rd")).json()["functions"] == {}
    assert keyed.get("/v1/whoami", headers=bearer("rd")).json() == {
        "tenant": "default",
        "scopes": ["read"],
        "open_access": False,
    }
    assert keyed.get("/v1/whoami", headers=bearer("acme-adm")).json() == {
        "tenant": "acme",
        "scopes": ["admin"],
        "open_access": False,
    }


@pytest.mark.parametrize("path", ["/v1/stats", "/v1/whoami"])
def test_the_consoles_reads_need_a_read_key(keyed: TestClient, path: str) -> None:
    assert error(keyed.get(path), 401, "unauthorized").startswith("an API key is required")
    assert (
        error(keyed.get(path, headers=bearer("wrong")), 401, "unauthorized") == "invalid or revoked API key"
    )
    assert "lacks the 'read' scope" in error(keyed.get(path, headers=bearer("inv")), 403, "forbidden")
    assert keyed.get(path, headers=bearer("adm")).status_code == 200


def test_whoami_in_open_access(tmp_path: Path) -> None:
    with Platform(tmp_path / "data") as platform, TestClient(create_app(platform)) as c:
        wait_ready(c)
        assert c.get("/v1/whoami").json() == {"tenant": "default", "scopes": ["admin"], "open_access": True}
