"""Routes that declare themselves once.

A handler states what it is beside its code (`@operation`): a summary, the query parameters it reads
(`Param`: name, type, range, default), the headers it reads, its body's media types, its replies,
the errors it can raise, an example. `create_app` adds where it answers and who may call it
(`route(method, path, scope, handler)`). From the two come the Starlette route, the parsing of its
query parameters with their 400s (`query_parser`, built once per route: a request pays for a dict
lookup when it has no query string), and its part of `/openapi.json` (`gateway.openapi`).

A handler is called as `handler(request, params)`: `params` maps every declared query parameter to
its parsed value (its default when absent), and a `QueryGroup` (the manifest of an upload, a model's
options) to what the group's own parser made of its keys. A query parameter given twice is a 400;
one nobody declared is ignored, unless the route has a group, which then refuses it by name.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from wasminfer.errors import BadRequest, WasminferError
from wasminfer.gateway.auth import scoped
from wasminfer.params import Param, ParamError

JSON = "application/json"

Params = Mapping[str, Any]
Handler = Callable[[Request, Params], Awaitable[Response]]


@dataclass(frozen=True)
class QueryGroup:
    """Query parameters that make one value together (`name` in the handler's params), parsed by
    `parse` from every key the route does not declare itself (each with its values in order).
    `parse` raises its own errors, naming a key it does not know. Keys in `repeatable` may come
    more than once."""

    name: str
    params: Mapping[str, Param]
    parse: Callable[[Mapping[str, list[str]]], Any]
    repeatable: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Reply:
    """A success the handler answers with: its status, what it means, and its body (a schema of
    `gateway.schemas` by name, or a media type alone) and headers (name: meaning)."""

    status: int
    description: str
    schema: str | None = None
    media: str = JSON
    headers: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Body:
    """The request body: its media types, each with its JSON schema."""

    media: Mapping[str, Mapping[str, Any]]
    required: bool = True


BINARY: Mapping[str, Any] = {"type": "string", "format": "binary"}  # a body of any bytes


@dataclass(frozen=True)
class Operation:
    """What a handler declares about itself (see the module's docstring). `errors` are the error
    classes it raises itself; those of every route (auth, parameters, the body's size and type,
    starting up) are added where the route is made."""

    handler: Handler
    summary: str
    replies: tuple[Reply, ...]
    errors: tuple[type[WasminferError], ...] = ()
    description: str = ""
    query: tuple[Param, ...] = ()
    group: QueryGroup | None = None
    headers: tuple[Param, ...] = ()
    body: Body | None = None
    example: str = ""  # a curl command line; {base} stands for the server's URL


def operation(
    summary: str,
    *replies: Reply,
    errors: tuple[type[WasminferError], ...] = (),
    description: str = "",
    query: tuple[Param, ...] = (),
    group: QueryGroup | None = None,
    headers: tuple[Param, ...] = (),
    body: Body | None = None,
    example: str = "",
) -> Callable[[Handler], Operation]:
    """Declares the handler it decorates (see `Operation`)."""

    def declare(handler: Handler) -> Operation:
        return Operation(handler, summary, replies, errors, description, query, group, headers, body, example)

    return declare


class ApiRoute(Route):
    """A Starlette route made from an `Operation`, which it keeps (with the scope it needs, None:
    public) for the OpenAPI document."""

    def __init__(self, method: str, path: str, scope: str | None, op: Operation) -> None:
        self.operation, self.required_scope = op, scope
        handler, parse = op.handler, query_parser(op)

        async def endpoint(request: Request) -> Response:
            return await handler(request, parse(request))

        super().__init__(
            path,
            endpoint if scope is None else scoped(scope, endpoint),
            methods=[method],
            name=f"{method.lower()} {path}",
        )


def route(method: str, path: str, scope: str | None, op: Operation) -> ApiRoute:
    """`op` answering `method` on `path`, for keys with `scope` (None: for anyone)."""
    return ApiRoute(method, path, scope, op)


def query_parser(op: Operation) -> Callable[[Request], Params]:
    """The function that parses a request's query string as `op` declares it. Built once per
    route: parsers and defaults are made here, not per request. It raises `BadRequest` naming a
    parameter given twice or a value its `Param` refuses, and what the group's parser raises."""
    declared = {p.name: p for p in op.query}
    group = op.group
    defaults: dict[str, Any] = {p.name: p.default for p in op.query}
    if group is not None:
        defaults[group.name] = group.parse({})
    frozen: Params = MappingProxyType(defaults)
    if not declared and group is None:
        return lambda request: frozen

    def parse(request: Request) -> Params:
        if not request.scope["query_string"]:
            return frozen
        values = dict(defaults)
        seen: set[str] = set()
        rest: dict[str, list[str]] = {}
        for key, text in request.query_params.multi_items():
            param = declared.get(key)
            if param is not None:
                if key in seen:
                    raise BadRequest(f"query parameter {key} is given twice")
                seen.add(key)
                try:
                    values[key] = param.parse_text(text)
                except ParamError as exc:
                    raise BadRequest(f"query parameter {key} {exc.problem}") from None
            elif group is not None:
                if key in rest and key not in group.repeatable:
                    raise BadRequest(f"query parameter {key} is given twice")
                rest.setdefault(key, []).append(text)
        if group is not None and rest:
            values[group.name] = group.parse(rest)
        return values

    return parse
