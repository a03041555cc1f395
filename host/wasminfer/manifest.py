"""A function's manifest: which models it may use, its limits, its WASI view, its ABI.

Plain data shared by every layer (the store keeps it as JSON, the gateway parses it from query
parameters or a JSON part, the runtime enforces it). Every field has a default and a range; a value
outside it is an `InvalidManifest` naming the key.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from wasminfer.errors import InvalidManifest
from wasminfer.syntax import is_name

ABIS = ("auto", "handler", "command", "component", "python")
_ENV_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
# Always fullmatch: `$` also matches before a final newline.
_MEDIA_TYPE = re.compile(r"[A-Za-z0-9!#$&^_.+-]+/[A-Za-z0-9!#$&^_.+-]+(\s*;[ -~]*)?")

# key: (min, max) for the integer limits
_INT_RANGES: dict[str, tuple[int, int]] = {
    "memory_mb": (1, 4096),
    "timeout_ms": (1, 15 * 60 * 1000),
    "min_instances": (0, 10_000),
    "max_instances": (1, 100_000),
    "max_concurrency": (0, 100_000),
    "max_queue": (0, 1_000_000),
    "max_output_bytes": (0, 1 << 30),
    "max_log_bytes": (0, 16 << 20),
    "max_infer_calls": (0, 100_000),
    "max_tensor_bytes": (0, 1 << 30),
    "idle_timeout_s": (0, 86_400),
    "prewarm_instances": (0, 100_000),
    "target_utilization_pct": (1, 100),
}


@dataclass(frozen=True)
class Manifest:
    """What a function may do and how much of the host it may take.

    `models` is the allowlist (deny by default). Limits are per instance (memory) or per invocation.
    """

    models: tuple[str, ...] = ()
    memory_mb: int = 64
    timeout_ms: int = 10_000
    min_instances: int = 0
    max_instances: int = 64
    # In flight at once across every replica of the server (the router queues the rest, up to
    # max_queue, then answers 429); 0: bounded by max_instances per host only.
    max_concurrency: int = 0
    max_queue: int = 256
    max_output_bytes: int = 16 << 20
    max_log_bytes: int = 64 << 10
    max_infer_calls: int = 64
    max_tensor_bytes: int = 64 << 20
    idle_timeout_s: int = 300
    # Instances made when a host takes the function (deploy, a new replica), ahead of its first
    # requests; a deploy always makes at least one (it proves the module starts). Reaped like any
    # idle instance after idle_timeout_s, down to min_instances.
    prewarm_instances: int = 1
    # The instance autoscaler keeps this percentage of warm instances busy (Knative's target
    # utilisation: an instance runs one request at a time, so the rest is headroom for a burst).
    target_utilization_pct: int = 70
    env: tuple[tuple[str, str], ...] = ()
    args: tuple[str, ...] = ()
    mount_body: str | None = None  # command ABI: guest path where the body appears read-only
    content_type: str | None = None  # command ABI: the response's content type (else octet-stream)
    allow_guest_models: bool = False  # wasi-nn `load` with model bytes from the guest
    # Running a request twice is harmless: one lost with its replica (a Ray actor or its node died
    # while running it) is sent once more to another replica instead of failing with a 503.
    idempotent: bool = False
    abi: str = "auto"

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Manifest:
        """Builds a manifest from JSON-like data. Raises `InvalidManifest` naming the bad key."""
        if not isinstance(data, Mapping):
            raise InvalidManifest("the manifest must be a JSON object")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InvalidManifest(
                f"unknown manifest key(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}"
            )
        kw: dict[str, Any] = {}
        for key, value in data.items():
            if key in _INT_RANGES:
                kw[key] = _int(key, value)
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
            elif key in ("allow_guest_models", "idempotent"):
                kw[key] = _bool(key, value)
            elif key == "abi":
                if value not in ABIS:
                    raise InvalidManifest.for_key("abi", f"must be one of {', '.join(ABIS)}")
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
        d = dataclasses.asdict(self)
        d["models"] = list(self.models)
        d["env"] = dict(self.env)
        d["args"] = list(self.args)
        return d

    def allows(self, model: str) -> bool:
        return model in self.models

    def replace(self, **changes: Any) -> Manifest:
        return dataclasses.replace(self, **changes)


def _int(key: str, value: Any) -> int:
    if isinstance(value, bool):
        raise InvalidManifest.for_key(key, "must be an integer")
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise InvalidManifest.for_key(key, f"must be an integer, got {value!r}") from None
    if isinstance(value, float) and value != n:
        raise InvalidManifest.for_key(key, f"must be an integer, got {value!r}")
    lo, hi = _INT_RANGES[key]
    if not lo <= n <= hi:
        raise InvalidManifest.out_of_range(key, n, lo, hi)
    return n


def _bool(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("1", "true", "yes", "0", "false", "no"):
        return value.lower() in ("1", "true", "yes")
    raise InvalidManifest.for_key(key, "must be true or false")


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


__all__ = ["ABIS", "Manifest"]
