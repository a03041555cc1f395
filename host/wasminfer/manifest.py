"""A function's manifest: which models it may use, its limits, its WASI view, its ABI.

Plain data shared by every layer (the store keeps it as JSON, the gateway parses it from query
parameters or a JSON part, the runtime enforces it). Every key is described once, beside its field
(`MANIFEST_KEYS`: type, range, default, help), and that description parses it, documents it in
`/openapi.json` and the CLI, and is checked against SECURITY.md's limit table; a value outside its
range is an `InvalidManifest` naming the key.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from wasminfer.errors import InvalidManifest
from wasminfer.params import Param, ParamError, fields_params, param_field
from wasminfer.syntax import is_name

ABIS = ("auto", "handler", "command", "component", "python")
_ENV_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
# Matched whole (`fullmatch`): `\s` and a `$` that allows a final newline let CR/LF into a header value.
_MEDIA_TYPE = re.compile(r"[A-Za-z0-9!#$&^_.+-]+/[A-Za-z0-9!#$&^_.+-]+([ \t]*;[ -~]*)?")


@dataclass(frozen=True)
class Manifest:
    """What a function may do and how much of the host it may take.

    `models` is the allowlist (deny by default). Limits are per instance (memory) or per invocation.
    Each field is described once (`param_field`: type, range, default, help): `MANIFEST_KEYS`.
    """

    models: tuple[str, ...] = param_field(
        (), "array", "models the function may use (deny by default); a query parameter: comma-separated",
        example=["digits"],
    )
    memory_mb: int = param_field(64, "integer", "memory limit per instance, MiB", minimum=1, maximum=4096)
    timeout_ms: int = param_field(
        10_000, "integer", "time limit per invocation, ms", minimum=1, maximum=15 * 60 * 1000
    )
    min_instances: int = param_field(0, "integer", "instances kept warm", minimum=0, maximum=10_000)
    max_instances: int = param_field(64, "integer", "most instances at once", minimum=1, maximum=100_000)
    # In flight at once across every replica of the server (the router queues the rest, up to
    # max_queue, then answers 429); 0: bounded by max_instances per host only.
    max_concurrency: int = param_field(
        0, "integer", "requests in flight at once across every host replica; past it they queue up to "
        "max_queue, then 429 (0: no limit but max_instances per host; docs/scaling.md)",
        minimum=0, maximum=100_000,
    )
    max_queue: int = param_field(
        256, "integer", "most requests waiting for an instance (past it: 429)", minimum=0, maximum=1_000_000
    )
    max_output_bytes: int = param_field(
        16 << 20, "integer", "largest response a function may write, bytes", minimum=0, maximum=1 << 30
    )
    max_log_bytes: int = param_field(
        64 << 10, "integer", "log bytes per invocation", minimum=0, maximum=16 << 20
    )
    max_infer_calls: int = param_field(
        64, "integer", "infer calls per invocation", minimum=0, maximum=100_000
    )
    max_tensor_bytes: int = param_field(
        64 << 20, "integer", "largest tensor given to a model, bytes", minimum=0, maximum=1 << 30
    )
    idle_timeout_s: int = param_field(
        300, "integer", "seconds an idle instance is kept (down to min_instances)", minimum=0, maximum=86_400
    )
    # Instances made when a host takes the function (deploy, a new replica), ahead of its first
    # requests; a deploy always makes at least one (it proves the module starts). Reaped like any
    # idle instance after idle_timeout_s, down to min_instances.
    prewarm_instances: int = param_field(
        1, "integer", "instances made at deploy, ahead of the first requests (at least one is)",
        minimum=0, maximum=100_000,
    )
    # The instance autoscaler keeps this percentage of warm instances busy (Knative's target
    # utilisation: an instance runs one request at a time, so the rest is headroom for a burst).
    target_utilization_pct: int = param_field(
        70, "integer", "percentage of warm instances the autoscaler keeps busy", minimum=1, maximum=100
    )
    env: tuple[tuple[str, str], ...] = param_field(
        (), "object", "environment of the guest (WASI); a query parameter: KEY=VALUE, repeatable"
    )
    args: tuple[str, ...] = param_field((), "array", "arguments of a command (WASI)")
    mount_body: str | None = param_field(
        None, "string", "command ABI: guest path where the request body appears, read-only", nullable=True
    )
    content_type: str | None = param_field(
        None, "string", "command ABI: the response's content type (default application/octet-stream)",
        nullable=True,
    )
    allow_guest_models: bool = param_field(
        False, "boolean", "wasi-nn `load` may take model bytes from the guest"
    )
    # Running a request twice is harmless: one lost with its replica (a Ray actor or its node died
    # while running it) is sent once more to another replica instead of failing with a 503.
    idempotent: bool = param_field(
        False, "boolean", "running a request twice is harmless: one lost with its replica is sent again"
    )
    abi: str = param_field("auto", "string", "the guest ABI (auto: detected from the module)", choices=ABIS)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Manifest:
        """Builds a manifest from JSON-like data. Raises `InvalidManifest` naming the bad key."""
        if not isinstance(data, Mapping):
            raise InvalidManifest("the manifest must be a JSON object")
        known = MANIFEST_KEYS.keys()
        unknown = sorted(set(data) - known)
        if unknown:
            raise InvalidManifest(
                f"unknown manifest key(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}"
            )
        kw: dict[str, Any] = {}
        for key, value in data.items():
            if MANIFEST_KEYS[key].kind in ("integer", "boolean") or key == "abi":
                kw[key] = _checked(MANIFEST_KEYS[key], value)
            elif key == "models":
                kw[key] = _models(value)
            elif key == "env":
                kw[key] = _env(value)
            elif key == "args":
                if isinstance(value, str):
                    value = [value]
                if not isinstance(value, list | tuple) or not all(isinstance(a, str) for a in value):
                    raise InvalidManifest.for_key("args", "must be a list of strings")
                kw[key] = tuple(value)
            elif key == "mount_body":
                if value is not None and (
                    not isinstance(value, str) or not value.startswith("/") or value.endswith("/")
                    or any(part in (".", "..") for part in value.split("/")) or "\0" in value
                    or len(value) > 1024
                ):
                    raise InvalidManifest.for_key(
                        "mount_body", "must be an absolute guest path of a file, e.g. /input/body"
                    )
                kw[key] = value
            elif key == "content_type":
                if value is not None and (
                    not isinstance(value, str) or len(value) > 256 or not _MEDIA_TYPE.fullmatch(value)
                ):
                    raise InvalidManifest.for_key("content_type", "must be a media type, e.g. text/plain")
                kw[key] = value
        m = cls(**kw)
        if m.min_instances > m.max_instances:
            raise InvalidManifest.for_key("min_instances", "exceeds 'max_instances'")
        if m.prewarm_instances > m.max_instances:
            raise InvalidManifest.for_key("prewarm_instances", "exceeds 'max_instances'")
        return m

    @classmethod
    def from_query(cls, params: Mapping[str, list[str]]) -> Manifest:
        """Builds a manifest from query parameters (`models=a,b&memory_mb=16&env=K=V&args=x`)."""
        data: dict[str, Any] = {}
        for key, values in params.items():
            if key in ("models", "args"):
                data[key] = [p for v in values for p in v.split(",") if p]
            elif key == "env":
                data[key] = [p for v in values for p in v.split(",") if p]
            else:
                data[key] = values[-1]
        return cls.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        # Not `dataclasses.asdict`: it deep-copies every value, and a deploy reads the manifest as a
        # dict several times (its view, its digest): 18 µs a call against 1.3 here.
        d = {f.name: getattr(self, f.name) for f in _FIELDS}
        d["models"] = list(self.models)
        d["env"] = dict(self.env)
        d["args"] = list(self.args)
        return d

    def allows(self, model: str) -> bool:
        return model in self.models

    def replace(self, **changes: Any) -> Manifest:
        return dataclasses.replace(self, **changes)


def _checked(param: Param, value: Any) -> Any:
    """`value` as `param` describes it: a number given as text (query parameters, `--set KEY=VALUE`)
    parses as text."""
    try:
        if isinstance(value, str) and param.kind == "integer":
            return param.parse_text(value)
        return param.parse(value)
    except ParamError as exc:
        raise InvalidManifest.for_key(param.name, exc.problem) from None


def _models(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [v for v in value.split(",") if v]
    if not isinstance(value, list | tuple):
        raise InvalidManifest.for_key("models", "must be a list of model names")
    for name in value:
        if not is_name(name):
            raise InvalidManifest.for_key("models", f"has an invalid model name {name!r}")
    return tuple(dict.fromkeys(value))


def _env(value: Any) -> tuple[tuple[str, str], ...]:
    pairs: list[tuple[str, str]] = []
    if isinstance(value, Mapping):
        items = list(value.items())
    elif isinstance(value, list | tuple):
        items = []
        for item in value:
            if not isinstance(item, str) or "=" not in item:
                raise InvalidManifest.for_key("env", f"entries must be KEY=VALUE, got {item!r}")
            k, v = item.split("=", 1)
            items.append((k, v))
    else:
        raise InvalidManifest.for_key("env", "must be an object or a list of KEY=VALUE")
    for k, v in items:
        if not isinstance(k, str) or not _ENV_KEY.fullmatch(k) or not isinstance(v, str):
            raise InvalidManifest.for_key("env", f"has an invalid entry {k!r}")
        pairs.append((k, v))
    return tuple(pairs)


#: Every manifest key, described once: type, range, default, help.
MANIFEST_KEYS: Mapping[str, Param] = fields_params(Manifest)
_FIELDS = dataclasses.fields(Manifest)

__all__ = ["ABIS", "MANIFEST_KEYS", "Manifest"]
