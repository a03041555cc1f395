"""The JSON schemas of what the API answers with (the views of functions, models, jobs, the fleet),
for `/openapi.json`. The schemas of what a caller sends (the manifest, model options, query
parameters) are not here: `gateway.openapi` makes them from their one description (`Param`)."""

from __future__ import annotations

from typing import Any

obj: dict[str, Any] = {"type": "object"}  # a view whose keys are not pinned down

#: Component schemas by name, as `routing.Reply.schema` names them.
RESPONSE_SCHEMAS: dict[str, Any] = {
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
    "Stats": {
        "type": "object",
        "properties": {
            "at": {"type": "number", "description": "the server's Unix time of this read"},
            "functions": {
                "type": "object",
                "additionalProperties": {
                    "type": "object",
                    "properties": {
                        "invocations": {
                            "type": "object",
                            "description": "by outcome: `ok` or the error code",
                            "additionalProperties": {"type": "integer"},
                        },
                        "cold_starts": {"type": "integer"},
                        "latency_seconds": {
                            "type": "object",
                            "properties": {
                                "buckets": {
                                    "type": "array",
                                    "items": {
                                        "type": "array",
                                        "prefixItems": [
                                            {"type": ["number", "string"]},
                                            {"type": "integer"},
                                        ],
                                    },
                                },
                                "sum": {"type": "number"},
                                "count": {"type": "integer"},
                            },
                        },
                    },
                },
            },
        },
    },
    "Whoami": {
        "type": "object",
        "properties": {
            "tenant": {"type": "string"},
            "scopes": {"type": "array", "items": {"enum": ["admin", "invoke", "read"]}},
            "open_access": {"type": "boolean"},
        },
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
