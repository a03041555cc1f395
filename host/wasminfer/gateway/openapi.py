"""The HTTP API, described by hand: an OpenAPI 3.1 document (`/openapi.json`) and a small human
page made from it (`/docs`). A test checks that every route of the app is in the document, and only
those."""

from __future__ import annotations

import functools
import html
import json
from typing import Any

from wasminfer import __version__, pysource
from wasminfer.syntax import NAME_REGEX

JSON = "application/json"

_ERROR_STATUSES = {
    "400": "Malformed request: bad manifest, name, parameter or module (`code` says which)",
    "401": "Missing or invalid API key",
    "403": "The key lacks the scope, or the function may not use a model (`model_not_allowed`)",
    "404": "No such function, version or model",
    "409": "Conflicts with what is deployed (model in use, nothing to roll back to)",
    "413": "Body larger than the server's limit",
    "415": "Wrong Content-Type for an upload",
    "422": "A tensor does not match the model (`invalid_tensor`, `tensor_too_large`), or an "
    "`Idempotency-Key` came back with another request (`idempotency_key_reused`)",
    "429": "All instances busy and the queue full, or the tenant's memory quota full "
    "(`memory_quota_exceeded`); retry after `Retry-After` seconds",
    "500": "The guest failed (`guest_error`, `guest_trap`, a limit) or an internal error",
    "503": "Starting up (store not loaded yet) or the function is being replaced",
    "504": "The guest ran past `timeout_ms`",
    "507": "The host's memory budget, shared by every tenant, is full (`host_memory_exhausted`)",
}


def _error(status: str) -> dict[str, Any]:
    response: dict[str, Any] = {
        "description": _ERROR_STATUSES[status],
        "content": {JSON: {"schema": {"$ref": "#/components/schemas/Error"}}},
    }
    if status == "429":
        response["headers"] = {"Retry-After": {"schema": {"type": "integer"}, "description": "seconds"}}
    return response


def _op(
    summary: str,
    scope: str | None,
    ok: dict[str, Any],
    errors: str,
    *,
    description: str = "",
    parameters: list[dict[str, Any]] | None = None,
    body: dict[str, Any] | None = None,
) -> dict[str, Any]:
    responses = dict(ok)
    responses.update({s: _error(s) for s in errors.split()})
    op: dict[str, Any] = {"summary": summary, "responses": responses}
    if description:
        op["description"] = description
    if parameters:
        op["parameters"] = parameters
    if body:
        op["requestBody"] = body
    if scope is None:
        op["security"] = []
    else:
        op["x-scope"] = scope
        op["description"] = (
            op.get("description", "") + f"\n\nNeeds an API key with scope `{scope}`"
            " (`admin` grants every scope)."
        ).strip()
    return op


def _ok(status: str, description: str, schema: str | None = None, media: str = JSON) -> dict[str, Any]:
    response: dict[str, Any] = {"description": description}
    if schema is not None:
        response["content"] = {media: {"schema": {"$ref": f"#/components/schemas/{schema}"}}}
    return {status: response}


def _path_name(what: str) -> dict[str, Any]:
    return {
        "name": "name",
        "in": "path",
        "required": True,
        "description": f"the {what}'s name",
        "schema": {"type": "string", "pattern": f"^{NAME_REGEX}$"},
    }


def _query(name: str, description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "description": description, "schema": schema}


_MANIFEST_QUERY = [
    _query("models", "models the function may use, comma-separated (deny by default)", {"type": "string"}),
    _query("memory_mb", "memory limit per instance, MiB (default 64)", {"type": "integer"}),
    _query("timeout_ms", "time limit per invocation (default 10000)", {"type": "integer"}),
    _query("max_instances", "most instances at once (default 64)", {"type": "integer"}),
    _query("max_queue", "most requests waiting for an instance (default 256)", {"type": "integer"}),
    _query(
        "min_instances", "instances kept warm (default 0; one is prewarmed at deploy)", {"type": "integer"}
    ),
    _query(
        "max_concurrency",
        "requests in flight at once across every host replica; past it they queue up to max_queue, "
        "then 429 (default 0: no limit but max_instances per host; docs/scaling.md)",
        {"type": "integer"},
    ),
]


_MODEL_OPTION_DOCS = {
    "max_batch_size": "dynamic batching: the most rows one batched run takes, 2..1024 "
    "(default 0: off; needs a dynamic first dimension on every input and output)",
    "max_queue_delay_us": "dynamic batching: the longest a request waits for others, 0..1000000 µs "
    "(default 2000)",
    "max_concurrent_batches": "dynamic batching: batched runs in flight before a new one waits to grow, "
    "0..256 (default: the cores a run can use; 0: always wait for a full batch or the delay)",
    "intra_op_threads": "ONNX Runtime threads inside one run, 0..64 (default 1; 0: one per core)",
    "inter_op_threads": "ONNX Runtime threads across independent nodes, 0..64 (default 1)",
}
_MODEL_OPTIONS_QUERY = [_query(name, doc, {"type": "integer"}) for name, doc in _MODEL_OPTION_DOCS.items()]


def _header(name: str, description: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": "header",
        "required": False,
        "description": description,
        "schema": {"type": "string"},
    }


# The options of both ways to submit a job (asynchronous invoke, batch).
_JOB_OPTIONS = [
    _header(
        "Idempotency-Key",
        "the same key and request again return the first job (202, "
        "`Idempotent-Replayed: true`) instead of a second one; another request with it is 422",
    ),
    _query(
        "webhook",
        "URL POSTed the job's view when it finishes (hosts the server allows only)",
        {"type": "string"},
    ),
    _query("ttl_s", "seconds the finished job and its results are kept (default: a day)", {"type": "number"}),
]
_JOB_ACCEPTED = {
    "202": {
        "description": "Accepted: the job, durable; poll `Location` (or wait for the webhook)",
        "headers": {"Location": {"schema": {"type": "string"}, "description": "/v1/jobs/{id}"}},
        "content": {JSON: {"schema": {"$ref": "#/components/schemas/Job"}}},
    }
}
_JOB_ID = {
    "name": "id",
    "in": "path",
    "required": True,
    "description": "the job's id",
    "schema": {"type": "string", "pattern": "^[0-9a-z]{26}$"},
}


@functools.cache
def openapi_document() -> dict[str, Any]:
    fn, model = _path_name("function"), _path_name("model")
    paths: dict[str, Any] = {
        "/v1/functions": {
            "get": _op(
                "List functions (current versions, counters)",
                "read",
                _ok("200", "The functions", "FunctionList"),
                "401 403",
            ),
        },
        "/v1/functions/{name}": {
            "put": _op(
                "Upload a function: a new immutable version that becomes current",
                "admin",
                {
                    **_ok("201", "A new version was created", "FunctionVersion"),
                    **_ok("200", "Identical to the current version: nothing changed", "FunctionVersion"),
                },
                "400 401 403 404 413 415 429 503 507",
                description="Either `Content-Type: application/wasm` with the manifest as query parameters, "
                "or `multipart/form-data` with a file part `wasm` and a JSON part `manifest`. "
                "A Python function is sent as its source instead of a module: one `.py` as "
                "`text/x-python` (it becomes `app.py`), or its folder as `application/zip`, "
                "`application/x-tar` or `application/gzip` (or such a file in the `wasm` part); it is "
                "imported once to validate it (a syntax error, an import error or no `@handler`: 400). "
                "The module is validated, compiled and prewarmed before it is stored, so the "
                "first invocation is warm. 404 when the manifest names a model that does not "
                "exist.",
                parameters=[fn, *_MANIFEST_QUERY],
                body={
                    "required": True,
                    "content": {
                        **{media: {"schema": {"type": "string", "format": "binary"}}
                           for media in ("application/wasm", *pysource.MEDIA_TYPES)},
                        "multipart/form-data": {
                            "schema": {
                                "type": "object",
                                "required": ["wasm"],
                                "properties": {
                                    "wasm": {"type": "string", "format": "binary"},
                                    "manifest": {"$ref": "#/components/schemas/Manifest"},
                                },
                            }
                        },
                    },
                },
            ),
            "get": _op(
                "A function: current version, every version, counters, instances",
                "read",
                _ok("200", "The function", "Function"),
                "401 403 404",
                parameters=[fn],
            ),
            "delete": _op(
                "Delete a function and all its versions",
                "admin",
                {"204": {"description": "Deleted"}},
                "401 403 404",
                parameters=[fn],
            ),
        },
        "/v1/functions/{name}/versions": {
            "get": _op(
                "Every version of a function, oldest first",
                "read",
                _ok("200", "The versions", "VersionList"),
                "401 403 404",
                parameters=[fn],
            ),
        },
        "/v1/functions/{name}/rollback": {
            "post": _op(
                "Make an earlier version current again",
                "admin",
                _ok("200", "The now current version", "Function"),
                "400 401 403 404 409 429 507",
                description="Without `version`: the version before the current one (409 if there is none).",
                parameters=[
                    fn,
                    _query("version", "the version to make current", {"type": "integer", "minimum": 1}),
                ],
            ),
        },
        "/v1/functions/{name}/invoke": {
            "post": _op(
                "Invoke a function",
                "invoke",
                {
                    "200": {
                        "description": "The function's output, with the content type it chose",
                        "headers": {
                            "Server-Timing": {
                                "schema": {"type": "string"},
                                "description": "queue, start (0 when warm), run, infer and total, in ms",
                            },
                            "X-Invocation-Id": {
                                "schema": {"type": "string"},
                                "description": "the id its log lines carry",
                            },
                        },
                        "content": {"*/*": {"schema": {"type": "string", "format": "binary"}}},
                    },
                    **_JOB_ACCEPTED,
                },
                "400 401 403 404 413 422 429 500 503 504 507",
                description="The body and its Content-Type go to the function as they are. With "
                "`Prefer: respond-async` or `?async=1` the invocation becomes a job: 202 at once, "
                "the function's answer later from `GET /v1/jobs/{id}/result`. Jobs are durable "
                "(they run after a restart) and run at least once; they use the capacity "
                "synchronous invocations leave.",
                parameters=[
                    fn,
                    _query("async", "1: run as a job (as `Prefer: respond-async`)", {"type": "string"}),
                    _header("Prefer", "`respond-async`: run as a job"),
                    *_JOB_OPTIONS,
                ],
                body={
                    "required": False,
                    "content": {"*/*": {"schema": {"type": "string", "format": "binary"}}},
                },
            ),
        },
        "/v1/functions/{name}/logs": {
            "get": _op(
                "Recent log lines of a function (guest stdout/stderr, log calls, host events)",
                "read",
                _ok("200", "The lines, oldest first", "LogLines"),
                "400 401 403 404",
                parameters=[
                    fn,
                    _query(
                        "n",
                        "at most this many lines (default 200)",
                        {"type": "integer", "minimum": 0, "maximum": 10000},
                    ),
                    _query("since", "only lines after this Unix time", {"type": "number"}),
                ],
            ),
        },
        "/v1/functions/{name}/batch": {
            "post": _op(
                "Invoke a function on many inputs: one job, one result per item",
                "invoke",
                _JOB_ACCEPTED,
                "400 401 403 404 413 415 422 503",
                description="JSON Lines (`application/jsonl`, `application/x-ndjson`): each line goes "
                "to the function as `application/json`. CBOR (`application/cbor`): one array; a byte "
                "string item goes as `item_content_type` (default application/octet-stream), a text "
                "string as text/plain, anything else as `application/cbor`. A failed item is reported "
                "in its result line; it does not fail the job.",
                parameters=[
                    fn,
                    _query(
                        "item_content_type", "the content type of CBOR byte-string items", {"type": "string"}
                    ),
                    *_JOB_OPTIONS,
                ],
                body={
                    "required": True,
                    "content": {
                        "application/jsonl": {"schema": {"type": "string"}},
                        "application/cbor": {"schema": {"type": "array"}},
                    },
                },
            ),
        },
        "/v1/jobs": {
            "get": _op(
                "The caller's jobs, newest first",
                "invoke",
                _ok("200", "The jobs", "JobList"),
                "400 401 403",
                parameters=[
                    _query(
                        "status",
                        "only jobs in this status",
                        {"enum": ["queued", "running", "succeeded", "failed", "cancelled"]},
                    ),
                    _query("function", "only jobs of this function", {"type": "string"}),
                    _query(
                        "limit",
                        "at most this many (default 50)",
                        {"type": "integer", "minimum": 1, "maximum": 1000},
                    ),
                    _query("before", "only jobs older than this job id (paging)", {"type": "string"}),
                ],
            )
        },
        "/v1/jobs/{id}": {
            "get": _op(
                "A job: status, progress, timings, error",
                "invoke",
                _ok("200", "The job", "Job"),
                "401 403 404",
                parameters=[_JOB_ID],
            ),
            "delete": _op(
                "Cancel a job (what has not started), or delete a finished one and its results",
                "invoke",
                {**_ok("200", "Cancelled: the job", "Job"), "204": {"description": "Deleted"}},
                "401 403 404 409",
                description="409 for an invoke job that has started. A batch's chunks that have "
                "started finish and keep their results.",
                parameters=[_JOB_ID],
            ),
        },
        "/v1/jobs/{id}/result": {
            "get": _op(
                "A job's result",
                "invoke",
                {
                    "200": {
                        "description": "An invoke job: the function's output with its content type (a "
                        "failed one answers the error a synchronous call would have). A batch: JSON "
                        "Lines, `{index, status, content_type, output | output_b64}` or `{index, "
                        "status, error}` per finished item, in order (partial while it runs; "
                        "`X-Job-Status` says)",
                        "headers": {"X-Job-Status": {"schema": {"type": "string"}}},
                        "content": {
                            "*/*": {"schema": {"type": "string", "format": "binary"}},
                            "application/jsonl": {"schema": {"type": "string"}},
                        },
                    }
                },
                "401 403 404 409 422 500 504",
                description="409 `job_not_finished` while an invoke job is queued or running.",
                parameters=[_JOB_ID],
            )
        },
        "/v1/models": {
            "get": _op(
                "List models (latest versions)", "read", _ok("200", "The models", "ModelList"), "401 403"
            ),
        },
        "/v1/models/{name}": {
            "put": _op(
                "Upload an ONNX model",
                "admin",
                {
                    **_ok("201", "A new version was created", "Model"),
                    **_ok("200", "Identical to the latest version: nothing changed", "Model"),
                },
                "400 401 403 413 415 429 503 507",
                description="Validated by loading it into ONNX Runtime; a model whose tensors live in "
                "external files is refused. Functions using the name switch to the new version at once. "
                "Load options are query parameters; an upload states them all (missing ones take their "
                "defaults): change them alone with PATCH.",
                parameters=[model, *_MODEL_OPTIONS_QUERY],
                body={
                    "required": True,
                    "content": {
                        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}
                    },
                },
            ),
            "patch": _op(
                "Change a model's load options (threads, dynamic batching)",
                "admin",
                {
                    **_ok("201", "A new version was created", "Model"),
                    **_ok("200", "The options were already these: nothing changed", "Model"),
                },
                "400 401 403 404 413 415 429 503 507",
                description="The latest version's bytes are loaded again with its options merged with "
                "these (null: back to the default) and stored as a new version. Turning batching off "
                "(max_batch_size 0) drops its other options.",
                parameters=[model],
                body={
                    "required": True,
                    "content": {
                        "application/json": {"schema": {"$ref": "#/components/schemas/ModelOptions"}}
                    },
                },
            ),
            "get": _op(
                "A model: inputs, outputs, versions, options, load time, memory, run and batching counters",
                "read",
                _ok("200", "The model", "Model"),
                "401 403 404",
                parameters=[model],
            ),
            "delete": _op(
                "Delete a model",
                "admin",
                {"204": {"description": "Deleted"}},
                "401 403 404 409",
                description="409 while any function's current manifest names it.",
                parameters=[model],
            ),
        },
        "/healthz": {"get": _op("Liveness: the process answers", None, _ok("200", "Alive"), "")},
        "/readyz": {
            "get": _op(
                "Readiness: the store is loaded and everything in it redeployed",
                None,
                _ok("200", "Ready"),
                "503",
            )
        },
        "/metrics": {
            "get": _op(
                "Prometheus metrics",
                "read",
                {
                    "200": {
                        "description": "Prometheus text format",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    }
                },
                "401 403",
            )
        },
        "/v1/scaling": {
            "get": _op(
                "Host replicas, instances per function per replica, recent scaling decisions",
                "read",
                _ok("200", "The fleet as of the autoscaler's last tick", "Scaling"),
                "401 403",
                description="Functions and instance decisions of the caller's tenant only. "
                "See docs/scaling.md.",
            )
        },
        "/openapi.json": {"get": _op("This document", None, _ok("200", "OpenAPI 3.1"), "")},
        "/docs": {
            "get": _op(
                "Human-readable API documentation",
                None,
                {"200": {"description": "HTML", "content": {"text/html": {}}}},
                "",
            )
        },
    }
    obj: dict[str, Any] = {"type": "object"}
    schemas: dict[str, Any] = {
        "Error": {
            "type": "object",
            "required": ["error"],
            "properties": {
                "error": {
                    "type": "object",
                    "required": ["code", "message"],
                    "properties": {
                        "code": {"type": "string", "examples": ["function_not_found"]},
                        "message": {"type": "string"},
                    },
                }
            },
        },
        "Manifest": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "models": {"type": "array", "items": {"type": "string"}},
                **{
                    k: {"type": "integer"}
                    for k in (
                        "memory_mb",
                        "timeout_ms",
                        "min_instances",
                        "max_instances",
                        "max_concurrency",
                        "max_queue",
                        "max_output_bytes",
                        "max_log_bytes",
                        "max_infer_calls",
                        "max_tensor_bytes",
                        "idle_timeout_s",
                        "prewarm_instances",
                        "target_utilization_pct",
                    )
                },
                "env": {"type": "object", "additionalProperties": {"type": "string"}},
                "args": {"type": "array", "items": {"type": "string"}},
                "mount_body": {"type": ["string", "null"]},
                "allow_guest_models": {"type": "boolean"},
                "idempotent": {"type": "boolean"},
                "abi": {"enum": ["auto", "handler", "command", "component"]},
            },
        },
        "FunctionVersion": {
            "type": "object",
            "properties": {
                "name": {"type": "string"},
                "tenant": {"type": "string"},
                "version": {"type": "integer"},
                "sha256": {"type": "string"},
                "size": {"type": "integer"},
                "abi": {"type": "string"},
                "manifest": {"$ref": "#/components/schemas/Manifest"},
                "info": obj,
                "created_at": {"type": "string", "format": "date-time"},
                "is_current": {"type": "boolean"},
                "created": {"type": "boolean"},
                "loaded": {"type": "boolean"},
                "counters": obj,
                "instances": obj,
                "module": obj,
            },
        },
        "Function": {
            "allOf": [
                {"$ref": "#/components/schemas/FunctionVersion"},
                {"type": "object", "properties": {"versions": {"type": "array", "items": obj}}},
            ]
        },
        "FunctionList": {
            "type": "object",
            "properties": {
                "functions": {"type": "array", "items": {"$ref": "#/components/schemas/FunctionVersion"}}
            },
        },
        "VersionList": {
            "type": "object",
            "properties": {
                "versions": {"type": "array", "items": {"$ref": "#/components/schemas/FunctionVersion"}}
            },
        },
        "TensorSpec": {
            "type": "object",
            "properties": {
                "name": {"type": "string"},
                "dtype": {"type": "string"},
                "shape": {"type": ["array", "null"], "items": {"type": ["integer", "string", "null"]}},
            },
        },
        "Model": {
            "type": "object",
            "properties": {
                "name": {"type": "string"},
                "tenant": {"type": "string"},
                "version": {"type": "integer"},
                "sha256": {"type": "string"},
                "size": {"type": "integer"},
                "inputs": {"type": "array", "items": {"$ref": "#/components/schemas/TensorSpec"}},
                "outputs": {"type": "array", "items": {"$ref": "#/components/schemas/TensorSpec"}},
                "loaded": {"type": "boolean"},
                "load_seconds": {"type": "number"},
                "resident_bytes": {"type": "integer"},
                "created": {"type": "boolean"},
                "options": {"$ref": "#/components/schemas/ModelOptions"},
                "stats": {
                    "type": "object",
                    "description": "runs, inferences (more than runs when calls share batched runs), "
                    "errors, rates over the last 10 s, and `batching` (batch size and queue delay "
                    "histograms) for a batching model",
                },
            },
        },
        "ModelOptions": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                name: {"type": ["integer", "null"], "description": doc}
                for name, doc in _MODEL_OPTION_DOCS.items()
            },
        },
        "ModelList": {
            "type": "object",
            "properties": {"models": {"type": "array", "items": {"$ref": "#/components/schemas/Model"}}},
        },
        "Scaling": {
            "type": "object",
            "properties": {
                "serving": {"type": "integer"},
                "starting": {"type": "integer"},
                "min_replicas": {"type": "integer"},
                "max_replicas": {"type": "integer"},
                "backend": {"type": ["string", "null"]},
                "replicas": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "properties": {
                            "id": {"type": "string"},
                            "kind": {"enum": ["in-process", "local"]},
                            "state": {"enum": ["starting", "serving", "draining", "stopped"]},
                            "outstanding": {"type": "integer"},
                            "cpu": {"type": "number"},
                            "functions": {"type": "object", "additionalProperties": obj},
                        },
                    },
                },
                "load": obj,
                "rejected": obj,
                "memory": {
                    "type": "object",
                    "description": "This process' memory budget and what every tenant reserves "
                    "(bytes), and the caller's tenant: quota_bytes, used_bytes, instances_bytes, "
                    "models_bytes, refusals (SECURITY.md)",
                    "properties": {
                        "budget_bytes": {"type": "integer"},
                        "used_bytes": {"type": "integer"},
                        "tenant": obj,
                    },
                },
                "decisions": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "properties": {
                            "at": {"type": "number"},
                            "scope": {"enum": ["instances", "replicas"]},
                            "subject": {"type": "string"},
                            "before": {"type": "integer"},
                            "after": {"type": "integer"},
                            "direction": {"enum": ["up", "down", "hold"]},
                            "reason": {"type": "string"},
                        },
                    },
                },
            },
        },
        "Job": {
            "type": "object",
            "properties": {
                "id": {"type": "string"},
                "function": {"type": "string"},
                "kind": {"enum": ["invoke", "batch"]},
                "status": {"enum": ["queued", "running", "succeeded", "failed", "cancelled"]},
                "items": {
                    "type": "object",
                    "properties": {k: {"type": "integer"} for k in ("total", "done", "succeeded", "failed")},
                },
                **{
                    k: {"type": ["string", "null"], "format": "date-time"}
                    for k in ("created_at", "started_at", "finished_at", "expires_at")
                },
                "timings": {
                    "type": "object",
                    "properties": {"queued_s": {"type": "number"}, "run_s": {"type": ["number", "null"]}},
                },
                "attempts": {"type": "integer", "description": "times it was taken up again after a restart"},
                "location": {"type": "string"},
                "result": {"type": "string"},
                "error": obj,
                "webhook": obj,
                "idempotency_key": {"type": "string"},
            },
        },
        "JobList": {
            "type": "object",
            "properties": {"jobs": {"type": "array", "items": {"$ref": "#/components/schemas/Job"}}},
        },
        "LogLines": {
            "type": "object",
            "properties": {
                "lines": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "properties": {
                            "ts": {"type": "number"},
                            "stream": {"enum": ["stdout", "stderr", "log", "host"]},
                            "level": {"enum": ["debug", "info", "warn", "error"]},
                            "message": {"type": "string"},
                            "invocation": {"type": ["string", "null"]},
                        },
                    },
                }
            },
        },
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "wasminfer",
            "version": __version__,
            "description": "Serverless ML inference on WebAssembly: upload small Wasm functions and ONNX "
            "models, invoke the functions over HTTP.",
        },
        "security": [{"bearer": []}],
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


_CURL = {
    ("put", "/v1/functions/{name}"): "curl -X PUT '{base}/v1/functions/NAME?models=MODEL&memory_mb=16' "
    "-H 'content-type: application/wasm' --data-binary @fn.wasm",
    (
        "put",
        "/v1/models/{name}",
    ): "curl -X PUT {base}/v1/models/NAME -H 'content-type: application/octet-stream' "
    "--data-binary @model.onnx",
    ("patch", "/v1/models/{name}"): "curl -X PATCH {base}/v1/models/NAME -H 'content-type: application/json' "
    '-d \'{{"max_batch_size": 32, "max_queue_delay_us": 2000}}\'',
    ("post", "/v1/functions/{name}/batch"): "curl -X POST {base}/v1/functions/NAME/batch "
    "-H 'content-type: application/jsonl' --data-binary @inputs.jsonl",
    ("post", "/v1/functions/{name}/invoke"): "curl -X POST {base}/v1/functions/NAME/invoke "
    "-H 'content-type: application/json' -d @request.json",
}


def docs_page(base_url: str) -> str:
    doc = openapi_document()
    rows = []
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            statuses = ", ".join(op["responses"])
            scope = op.get("x-scope", "none")
            curl = _CURL.get((method, path), "").format(base=base_url)
            rows.append(
                f"<section><h3><code>{method.upper()} {html.escape(path)}</code></h3>"
                f"<p>{html.escape(op['summary'])}. Scope: <code>{scope}</code>. Statuses: {statuses}.</p>"
                + (f"<p>{html.escape(op['description'])}</p>" if op.get("description") else "")
                + (f"<pre>{html.escape(curl)}</pre>" if curl else "")
                + "</section>"
            )
    errors = "".join(f"<li><b>{s}</b> {html.escape(d)}</li>" for s, d in _ERROR_STATUSES.items())
    example = html.escape(
        json.dumps({"error": {"code": "function_not_found", "message": "function 'x' does not exist"}})
    )
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>wasminfer API</title>"
        "<style>body{font:15px/1.45 system-ui,sans-serif;max-width:60em;margin:2em auto;padding:0 1em}"
        "code,pre{background:#f4f4f4;padding:.1em .3em}pre{padding:.6em;overflow-x:auto}</style></head><body>"
        f"<h1>wasminfer API {html.escape(doc['info']['version'])}</h1>"
        f"<p>{html.escape(doc['info']['description'])} Machine-readable: <a href='/openapi.json'>"
        "/openapi.json</a> (OpenAPI 3.1).</p>"
        "<p>Authentication: <code>Authorization: Bearer KEY</code>. Scopes: <code>admin</code> (everything), "
        "<code>invoke</code>, <code>read</code>.</p>"
        f"<h2>Errors</h2><p>Every error is JSON, e.g. <code>{example}</code>:</p><ul>{errors}</ul>"
        f"<h2>Routes</h2>{''.join(rows)}</body></html>"
    )
