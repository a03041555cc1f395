"""`Gateway`: the Starlette app with a direct way in for its hottest routes (the invoke route).

Starlette takes every request through ServerErrorMiddleware, ExceptionMiddleware, the router's scan
of its routes in order, and the route's own exception wrapper: four layers of coroutines, three of
them wrapping `send` in a closure of their own. For an invocation of a small model that was about a
tenth of the GIL time of the whole request (`bench/hotpath.py`'s profile). A route given as `direct`
is matched first and its endpoint called with the app's own exception handlers, found the same way
(the first of the exception's classes, in method resolution order, with a handler; anything else is
answered by the `Exception` handler and raised again for the server's log, as ServerErrorMiddleware
does): the same answers, without the layers. Every other request goes the usual way.

A direct route must be one no route listed before it can match (Starlette's router takes the first
match in order): the invoke route's path is the only route of that shape.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, cast

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Match, Route
from starlette.types import Receive, Scope, Send

Handler = Callable[[Request, Exception], Awaitable[Response]]


class Gateway(Starlette):
    """A Starlette app whose `direct` routes skip the middleware and the router (see the module).

    `shared`: what every request's handler shares, read from the request's scope (`scope["app"]`)
    in one attribute lookup."""

    def __init__(self, *, direct: Sequence[Route] = (), shared: Any = None, **kwargs: Any) -> None:
        """Takes Starlette's arguments. Raises `ValueError` for a direct route that is not among
        `routes`, an exception handler that is not a coroutine function, or one keyed by a status
        other than 500."""
        super().__init__(**kwargs)
        self.shared = shared
        for r in direct:
            if r not in self.router.routes:
                raise ValueError(f"direct route {r.path} is not one of the app's routes")
        self._direct = tuple(direct)
        self._direct_matches = tuple((r, _matcher(r)) for r in direct)
        self._handlers: dict[Any, Handler] = {}
        self._unexpected: Handler | None = None
        for key, handler in self.exception_handlers.items():
            if not inspect.iscoroutinefunction(handler):
                raise ValueError(f"the exception handler of {key!r} must be a coroutine function")
            if key in (500, Exception):
                self._unexpected = cast(Handler, handler)
            elif isinstance(key, int):
                raise ValueError(f"status handlers ({key}) are not supported beside direct routes")
            else:
                self._handlers[key] = cast(Handler, handler)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            for route, match in self._direct_matches:
                child = match(scope)
                if child is not None:
                    scope["app"] = self
                    scope["router"] = self.router
                    scope.update(child)
                    await self._serve(route, scope, receive, send)
                    return
        await super().__call__(scope, receive, send)

    async def _serve(self, route: Route, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive, send)
        try:
            response = await route.endpoint(request)
        except Exception as exc:
            handler = self._handler_for(exc)
            if handler is None:
                if self._unexpected is not None:
                    await (await self._unexpected(request, exc))(scope, receive, send)
                raise
            response = await handler(request, exc)
            exc.__traceback__ = None  # as Starlette: a reused exception must not pile up tracebacks
        await response(scope, receive, send)

    def _handler_for(self, exc: Exception) -> Handler | None:
        handlers = self._handlers
        for cls in type(exc).__mro__:
            handler = handlers.get(cls)
            if handler is not None:
                return handler
        return None


def _matcher(route: Route) -> Callable[[Scope], Mapping[str, Any] | None]:
    """What `route.matches(scope)` finds as a full match (its child scope), None otherwise. For a path
    of one `{name}` between fixed parts (the invoke route's), compared as strings: Starlette's regex
    and its copy of the path parameters took about as long as the rest of routing. Any other route,
    and a request under a `root_path`, is matched by Starlette."""

    def starlette(scope: Scope) -> Mapping[str, Any] | None:
        match, child = route.matches(scope)
        return child if match is Match.FULL else None

    head, sep, rest = route.path.partition("{")
    name, sep2, tail = rest.partition("}")
    if not sep or not sep2 or not name.isidentifier() or "{" in tail or not head.endswith("/") or not tail:
        return starlette
    if route.param_convertors[name].regex != "[^/]+":  # only the `str` convertor: no conversion
        return starlette
    methods = frozenset(route.methods or ())
    endpoint = route.endpoint
    start, end = len(head), -len(tail)

    def match(scope: Scope) -> Mapping[str, Any] | None:
        if scope.get("root_path") or scope.get("path_params"):
            return starlette(scope)
        path: str = scope["path"]
        if not (path.startswith(head) and path.endswith(tail)) or len(path) <= start - end:
            return None
        value = path[start:end]
        if "/" in value or scope["method"] not in methods:
            return None  # (a method not allowed: Starlette's router answers 405)
        return {"endpoint": endpoint, "path_params": {name: value}}

    return match
