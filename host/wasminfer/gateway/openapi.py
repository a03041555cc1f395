"""The HTTP API's OpenAPI 3.1 document (`/openapi.json`, which `/docs` renders with Swagger UI),
derived, never written by hand: the paths, scopes, parameters, bodies and replies from the app's
routes (`routing.ApiRoute`: each handler's declaration and where `create_app` put it), the statuses
and codes of errors from the error classes (`errors.ERRORS`), the manifest and model options from
their one description (`manifest.MANIFEST_KEYS`, `model_options.MODEL_OPTION_PARAMS`), and the shapes
of what the API answers from `gateway.schemas`. Descriptions are Markdown; operations are tagged
by the module of their handler (`routes_models` -> `models`), whose docstring describes the tag.
"""

from __future__ import annotations

import copy
import json
import re
import sys
from collections.abc import Iterable, Mapping
from typing import Any

from starlette.routing import BaseRoute

from wasminfer import __version__
from wasminfer.errors import (
    ERRORS,
    BadRequest,
    Forbidden,
    GuestRejected,
    InvalidName,
    PayloadTooLarge,
    RequestTimeout,
    TooManyRequests,
    Unauthorized,
    Unavailable,
    UnsupportedMediaType,
    WasminferError,
)
from wasminfer.gateway.routing import JSON, ApiRoute, Reply
from wasminfer.gateway.schemas import RESPONSE_SCHEMAS
from wasminfer.jobs.records import JOB_ID
from wasminfer.manifest import MANIFEST_KEYS
from wasminfer.model_options import MODEL_OPTION_PARAMS
from wasminfer.params import Param
from wasminfer.syntax import NAME_REGEX

#: Codes Starlette's own answers carry (`gateway.errors`): no route, wrong method, and the one no
#: request may ever cause.
FRAMEWORK_CODES = ("not_found", "method_not_allowed", "http_error", "internal")
#: Error codes no route answers with, and why.
NOT_ANSWERED = {
    "unreachable": "raised by the client when it cannot reach a server",
    "not_delivered": "between the gateway and its replicas: the fleet sends the request elsewhere",
    "blob_not_found": "a store fault, reported as `internal`",
    "invalid_digest": "a store fault, reported as `internal`",
    "model_version_not_found": "the API names no model versions",
}
# A guest's rejection carries the guest's own status, 400-499.
_STATUS_KEYS: Mapping[type[WasminferError], str] = {GuestRejected: "4XX"}
_PATH_PARAMS = {
    "name": {"type": "string", "pattern": f"^{NAME_REGEX}$"},
    "id": {"type": "string", "pattern": f"^{JOB_ID.pattern}$"},
}
_ERROR_SCHEMA = {"$ref": "#/components/schemas/Error"}


def route_errors(route: ApiRoute) -> list[type[WasminferError]]:
    """The error classes `route` can answer with: those its handler declares, and those of every
    route with its scope, parameters and body."""
    op = route.operation
    found: list[type[WasminferError]] = list(op.errors)
    if route.required_scope is not None:
        found += [Unauthorized, Forbidden, Unavailable]  # Unavailable: until the store is loaded
    if op.query or op.group or op.body:
        found.append(BadRequest)
    if "{name}" in route.path:
        found.append(InvalidName)
    if op.body is not None:
        found += [PayloadTooLarge, RequestTimeout]
        if "*/*" not in op.body.media:
            found.append(UnsupportedMediaType)
    return list(dict.fromkeys(found))


def openapi_document(routes: Iterable[BaseRoute]) -> dict[str, Any]:
    """The OpenAPI document of the `ApiRoute`s among `routes` (an app's)."""
    paths: dict[str, dict[str, Any]] = {}
    tags: dict[str, str] = {}
    for route in routes:
        if isinstance(route, ApiRoute):
            tag, about = _tag(route)
            tags.setdefault(tag, about)
            for method in sorted((route.methods or set()) - {"HEAD"}):
                paths.setdefault(route.path, {})[method.lower()] = {**_operation(route), "tags": [tag]}
    schemas = {
        "Error": _error_schema(),
        "Manifest": _object_schema(MANIFEST_KEYS),
        "ModelOptions": _object_schema(MODEL_OPTION_PARAMS),
        **RESPONSE_SCHEMAS,
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "wasminfer",
            "version": __version__,
            "description": _overview(),
        },
        "security": [{"bearer": []}],
        "tags": [{"name": name, "description": about} for name, about in tags.items()],
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "An API key: `Authorization: Bearer KEY`. Not needed when the server runs "
                    "without keys (then it listens on loopback only).",
                }
            },
        },
    }


def _operation(route: ApiRoute) -> dict[str, Any]:
    op = route.operation
    doc: dict[str, Any] = {"operationId": op.handler.__name__, "summary": op.summary}
    description = op.description
    if route.required_scope is None:
        doc["security"] = []
    else:
        doc["x-scope"] = route.required_scope
        description += (
            f"\n\nNeeds an API key with scope `{route.required_scope}` (`admin` grants every scope)."
        )
    if description.strip():
        doc["description"] = description.strip()
    parameters = [_path_param(name, route.path) for name in re.findall(r"{(\w+)}", route.path)]
    parameters += [_param("query", p) for p in op.query]
    if op.group is not None:
        parameters += [_param("query", p, group=True) for p in op.group.params.values()]
    parameters += [_param("header", p) for p in op.headers]
    if parameters:
        doc["parameters"] = parameters
    if op.body is not None:
        doc["requestBody"] = {
            "required": op.body.required,
            "content": {media: {"schema": copy.deepcopy(schema)} for media, schema in op.body.media.items()},
        }
    responses = {str(reply.status): _reply(reply) for reply in op.replies}
    by_status: dict[str, list[type[WasminferError]]] = {}
    for cls in route_errors(route):
        by_status.setdefault(_STATUS_KEYS.get(cls, str(cls.status)), []).append(cls)
    for status, classes in sorted(by_status.items()):
        responses[status] = _errors_reply(classes)
    doc["responses"] = responses
    if op.example:
        doc["x-example"] = op.example
    return doc


def _tag(route: ApiRoute) -> tuple[str, str]:
    """The tag of `route` (its handler's module, less `routes_`) and its description (the first
    paragraph of that module's docstring)."""
    module = route.operation.handler.__module__
    about = (sys.modules[module].__doc__ or "").strip().split("\n\n")[0]
    return module.rsplit(".", 1)[-1].removeprefix("routes_"), " ".join(about.split())


def _overview() -> str:
    """The API's description: what it is, how to authenticate, every error it answers with by status."""
    rows = [
        f"| {cls.status} | `{cls.code}` | {_meaning(cls).replace('|', '&#124;')} |"
        for cls in sorted(ERRORS.values(), key=lambda c: (c.status, c.code))
        if cls.code not in NOT_ANSWERED
    ]
    errors = "\n".join(["| status | code | meaning |", "|---|---|---|", *rows])
    example = json.dumps({"error": {"code": "function_not_found", "message": "function 'x' does not exist"}})
    return (
        "Serverless ML inference on WebAssembly: upload small Wasm functions and ONNX models, invoke the "
        "functions over HTTP. A web console is at [/ui](/ui).\n\n"
        "**Authentication**: `Authorization: Bearer KEY` (the *Authorize* button here). Scopes: `admin` "
        "(everything), `invoke`, `read`; a key sees only its tenant's functions, models and jobs.\n\n"
        f"**Errors** are JSON, e.g. `{example}`, with these statuses and codes:\n\n{errors}"
    )


def _path_param(name: str, path: str) -> dict[str, Any]:
    resource = path.split("/")[2].removesuffix("s")  # /v1/functions/{name} -> function
    return {
        "name": name,
        "in": "path",
        "required": True,
        "description": f"the {resource}'s {name}",
        "schema": _PATH_PARAMS[name],
    }


def _param(where: str, param: Param, *, group: bool = False) -> dict[str, Any]:
    schema = param.schema()
    if group and param.kind == "object":
        # In a query string an object is a repeated KEY=VALUE, not one parameter per key.
        schema = {"type": "array", "items": {"type": "string"}, "description": param.help}
    return {"name": param.name, "in": where, "required": False, "description": param.help, "schema": schema}


def _reply(reply: Reply) -> dict[str, Any]:
    doc: dict[str, Any] = {"description": reply.description}
    if reply.schema is not None:
        doc["content"] = {reply.media: {"schema": {"$ref": f"#/components/schemas/{reply.schema}"}}}
    elif reply.media != JSON:
        body = {"type": "string", "format": "binary"} if reply.media == "*/*" else {"type": "string"}
        doc["content"] = {reply.media: {"schema": body}}
    if reply.headers:
        doc["headers"] = {
            name: {"schema": {"type": "string"}, "description": meaning}
            for name, meaning in reply.headers.items()
        }
    return doc


def _errors_reply(classes: list[type[WasminferError]]) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "description": "; ".join(_describe(cls) for cls in classes),
        "content": {JSON: {"schema": _ERROR_SCHEMA}},
        "x-error-codes": [cls.code for cls in classes],
    }
    if any(issubclass(cls, TooManyRequests) for cls in classes):
        doc["headers"] = {"Retry-After": {"schema": {"type": "integer"}, "description": "seconds"}}
    return doc


def _describe(cls: type[WasminferError]) -> str:
    first = _meaning(cls)
    return f"`{cls.code}`" + (f": {first}" if first else "")


def _meaning(cls: type[WasminferError]) -> str:
    """The first paragraph of the class' own docstring, on one line ("" without one)."""
    own = cls.__doc__ if "__doc__" in vars(cls) and cls.__doc__ else ""
    return " ".join(own.strip().split("\n\n")[0].split())


def _error_schema() -> dict[str, Any]:
    codes = sorted({*ERRORS, *FRAMEWORK_CODES})
    return {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["code", "message"],
                "properties": {
                    "code": {"type": "string", "enum": codes, "examples": ["function_not_found"]},
                    "message": {"type": "string"},
                },
            }
        },
    }


def _object_schema(params: Mapping[str, Param]) -> dict[str, Any]:
    return {
        "type": "object",
        "additionalProperties": False,
        "properties": {name: param.schema() for name, param in params.items()},
    }
