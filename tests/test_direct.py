"""`gateway.direct.Gateway`: a direct route answers exactly what Starlette's router would. Two apps
side by side, one with the invoke-shaped route direct (matched by string comparison) and one
without (Starlette's regex and router), get the same requests: every path shape the route could be
confused with, other methods, a `root_path`, and an error raised by the endpoint."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.testclient import TestClient

from wasminfer.errors import FunctionNotFound, WasminferError
from wasminfer.gateway.direct import Gateway, _matcher


async def invoke(request: Request) -> Response:
    name = request.path_params["name"]
    if name == "missing":
        raise FunctionNotFound(name)
    endpoint = request.scope["endpoint"].__name__
    return JSONResponse({"name": name, "params": request.path_params, "endpoint": endpoint})


async def other(request: Request) -> Response:
    return JSONResponse({"other": dict(request.path_params)})


async def wasminfer_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, WasminferError)
    return JSONResponse({"error": exc.code}, status_code=exc.status)


def routes() -> list[Route]:
    return [
        Route("/v1/functions/{name}", other, methods=["GET"]),
        Route("/v1/functions/{name}/invoke", invoke, methods=["POST"]),
        Route("/v1/functions/{name}/{rest:path}", other, methods=["POST"]),
    ]


@pytest.fixture(scope="module")
def clients() -> Iterator[tuple[TestClient, TestClient]]:
    handlers = {WasminferError: wasminfer_error}
    plain = routes()
    direct = routes()
    apps = (
        Gateway(routes=plain, exception_handlers=handlers),
        Gateway(routes=direct, direct=[direct[1]], exception_handlers=handlers),
    )
    with TestClient(apps[0]) as a, TestClient(apps[1]) as b:
        yield a, b


PATHS = [
    "/v1/functions/digits/invoke",
    "/v1/functions/a.b-c_d/invoke",
    "/v1/functions/missing/invoke",  # the endpoint raises: the app's handler answers
    "/v1/functions//invoke",  # no name
    "/v1/functions/a/b/invoke",  # a name with a slash: the path route's
    "/v1/functions/digits/invoke/",
    "/v1/functions/digits/invok",
    "/v1/functions/digits",
    "/v1/functions/%2F/invoke",  # decoded: a slash in the name
    "/v1/functions/x%0A/invoke",
    "/v1/functions/x/invoke%0A",  # decoded: "\n" at the end, which the regex's `$` lets through
    "/v2/functions/digits/invoke",
    "/v1/functions/invoke",
]


@pytest.mark.parametrize("method", ["POST", "GET", "PUT"])
@pytest.mark.parametrize("path", PATHS)
def test_a_direct_route_answers_as_the_router_does(
    clients: tuple[TestClient, TestClient], method: str, path: str
) -> None:
    plain, direct = clients
    a, b = plain.request(method, path), direct.request(method, path)
    assert a.status_code in (200, 404, 405)
    assert (a.status_code, a.headers.get("allow"), a.content) == (
        b.status_code, b.headers.get("allow"), b.content
    )  # fmt: skip


def test_the_string_match_finds_what_the_regex_finds() -> None:
    route = routes()[1]
    match = _matcher(route)
    scope = {"type": "http", "method": "POST", "path": "/v1/functions/digits/invoke", "root_path": ""}
    assert match(scope) == {"endpoint": invoke, "path_params": {"name": "digits"}}
    assert match({**scope, "method": "GET"}) is None  # (the router answers 405)
    assert match({**scope, "path": "/v1/functions/a/b/invoke"}) is None
    # under a root_path Starlette matches (the path must then start with it)
    rooted = {**scope, "root_path": "/api", "path": "/api/v1/functions/digits/invoke"}
    assert match(rooted) == {"endpoint": invoke, "path_params": {"name": "digits"}}
    # a route of another shape is matched by Starlette itself
    path_route = routes()[2]
    assert _matcher(path_route)({**scope, "path": "/v1/functions/a/b/c"}) == {
        "endpoint": other,
        "path_params": {"name": "a", "rest": "b/c"},
    }
