"""`Settings`: the gateway's knobs (body size limits, read timeouts, connections per client, worker
threads), with their defaults; `Settings.from_env()` reads the `WASMINFER_*` overrides."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from wasminfer.params import Param
from wasminfer.replicas.inline import MODES as INLINE_MODES
from wasminfer.shares import cores

MiB = 1 << 20
# A boolean setting as the API's query parameters take one (1, true, yes; 0, false, no).
_FLAG = Param("flag", "boolean", "on or off")

# name -> (environment variable, parser)
_ENV: dict[str, tuple[str, Any]] = {
    "header_timeout_s": ("WASMINFER_HEADER_TIMEOUT_S", float),
    "body_timeout_s": ("WASMINFER_BODY_TIMEOUT_S", float),
    "max_connections_per_client": ("WASMINFER_MAX_CONNECTIONS_PER_CLIENT", int),
    "connection_cap_exempt": (
        "WASMINFER_CONNECTION_CAP_EXEMPT",
        lambda v: tuple(a.strip() for a in v.split(",") if a.strip()),
    ),
    "contended_invoke_threads": ("WASMINFER_CONTENDED_INVOKE_THREADS", int),
    "inline": ("WASMINFER_INLINE", str),
    "inline_max_us": ("WASMINFER_INLINE_MAX_US", float),
    "express": ("WASMINFER_EXPRESS", _FLAG.parse),
}


@dataclass(frozen=True)
class Settings:
    """Limits are checked against `Content-Length` before a body is read, and again while it streams
    in (a body without a length, or one that lies about it, stops at the limit)."""

    max_wasm_bytes: int = 64 * MiB  # PUT /v1/functions/{name}
    max_model_bytes: int = 512 * MiB  # PUT /v1/models/{name}
    max_invoke_bytes: int = 16 * MiB  # POST /v1/functions/{name}/invoke
    max_batch_bytes: int = 256 * MiB  # POST /v1/functions/{name}/batch (read whole, then parsed)
    # A request's line and headers must be in within this time of its first byte's turn (the
    # connection opening, or the previous response on a kept-alive connection): 408, then closed.
    # A few hundred bytes take well under a second on any link; 10 s covers three lost packets'
    # retransmits (1 + 2 + 4 s). A connection that sends them a byte at a time is cut here.
    header_timeout_s: float = 10.0
    # The longest wait for the next piece of a body: 408 and closed. 30 s without a byte is no
    # upload, only a held connection; it covers five retransmits' backoff (1 + 2 + 4 + 8 + 16 s).
    body_timeout_s: float = 30.0
    # Connections one client address may hold open at once; the next is refused (a 429 written, then
    # closed). 64 is more than a browser (6), an HTTP client library's pool (10-100, mostly idle
    # ones closed after 5 s of keep-alive) or a load tester needs, and ~1/16 of a default 1024
    # file-descriptor limit. 0: no cap. Behind a reverse proxy every client is the proxy's address:
    # exempt it (below) or raise the cap.
    max_connections_per_client: int = 64
    # Addresses the cap does not apply to. Loopback by default: a proxy on the same machine, and
    # open access (which listens on loopback only).
    connection_cap_exempt: tuple[str, ...] = ("127.0.0.1", "::1")
    # Invocations run on worker threads (Wasm and ONNX Runtime release the GIL); more than this many
    # at once wait for a thread. Sized for a host, not for a function (functions have max_instances).
    # They are shared between tenants (`replicas.fairness`): a tenant alone may hold all but an
    # eighth; with others active, each may hold its share of `contended_invoke_threads`.
    invoke_threads: int = 64
    # Two per core: enough to keep the cores busy while calls also wait on ONNX Runtime, few enough
    # that another tenant's call runs beside a handful of a flood's calls rather than dozens (each
    # running call takes its slice of the cores and the GIL from every other).
    contended_invoke_threads: int = 2 * cores()
    # Deploys, deletes and reads (SQLite, compiling, loading models) get their own, smaller pool so a
    # burst of them never takes threads from invocations. Shared between tenants the same way.
    admin_threads: int = 8
    # Short invocations run on the event loop instead of a worker thread, whose hand-off costs more
    # than a small model's whole invocation (`replicas.inline`): "auto" for a function whose recent
    # invocations cost at most `inline_max_us` each; "never"; "always" (when the function's models
    # allow it: tests, benchmarks). 1 ms: the loop held that long delays the other requests' reads
    # and answers by as much, a small part of what their own invocation and HTTP take under load.
    inline: str = "auto"
    inline_max_us: float = 1000.0
    # Synchronous invocations that run inline answered by the server's protocol itself, without the
    # ASGI machinery (`gateway.express`): the same answers, 13-14% less CPU per digits invocation in
    # paired runs. Off: every request goes through uvicorn's ASGI cycle.
    express: bool = True

    def __post_init__(self) -> None:
        for name in (
            "max_wasm_bytes",
            "max_model_bytes",
            "max_invoke_bytes",
            "max_batch_bytes",
            "invoke_threads",
            "contended_invoke_threads",
            "admin_threads",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"Settings.{name} must be at least 1")
        for name in ("header_timeout_s", "body_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"Settings.{name} must be positive")
        if self.inline not in INLINE_MODES:
            raise ValueError(f"Settings.inline must be one of {', '.join(INLINE_MODES)}")
        if not self.inline_max_us >= 0:
            raise ValueError("Settings.inline_max_us must be 0 or more")
        if self.max_connections_per_client < 0:
            raise ValueError("Settings.max_connections_per_client must be 0 (no cap) or more")

    def to_env(self) -> dict[str, str]:
        """The settings `from_env` reads, as environment variables (what a replica process of this
        server is started with, so that it applies the same limits)."""
        env = {}
        for name, (var, _) in _ENV.items():
            value = getattr(self, name)
            if isinstance(value, tuple):
                env[var] = ",".join(value)
            else:  # repr keeps a float's every digit; a string goes as it is
                env[var] = value if isinstance(value, str) else repr(value)
        return env

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Defaults, then `WASMINFER_HEADER_TIMEOUT_S`, `WASMINFER_BODY_TIMEOUT_S`,
        `WASMINFER_MAX_CONNECTIONS_PER_CLIENT`, `WASMINFER_CONNECTION_CAP_EXEMPT` (comma-separated
        addresses, empty for none), `WASMINFER_CONTENDED_INVOKE_THREADS`, `WASMINFER_INLINE` (auto,
        always, never), `WASMINFER_INLINE_MAX_US` and `WASMINFER_EXPRESS` (1 or 0), then the `overrides`
        that are not None. Raises `ValueError` for a malformed or out-of-range value."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for name, (var, parse) in _ENV.items():
            if var in env and (env[var] or name == "connection_cap_exempt"):
                try:
                    values[name] = parse(env[var])
                except ValueError:
                    raise ValueError(f"{var}={env[var]!r:.40} is not a valid value") from None
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)
