"""`Settings`: the gateway's knobs (body size limits, worker threads), with their defaults."""

from __future__ import annotations

from dataclasses import dataclass

MiB = 1 << 20


@dataclass(frozen=True)
class Settings:
    """Limits are checked against `Content-Length` before a body is read, and again while it streams
    in (a body without a length, or one that lies about it, stops at the limit)."""

    max_wasm_bytes: int = 64 * MiB  # PUT /v1/functions/{name}
    max_model_bytes: int = 512 * MiB  # PUT /v1/models/{name}
    max_invoke_bytes: int = 16 * MiB  # POST /v1/functions/{name}/invoke
    max_batch_bytes: int = 256 * MiB  # POST /v1/functions/{name}/batch (read whole, then parsed)
    # Invocations run on worker threads (Wasm and ONNX Runtime release the GIL); more than this many
    # at once wait for a thread. Sized for a host, not for a function (functions have max_instances).
    invoke_threads: int = 64
    # Deploys, deletes and reads (SQLite, compiling, loading models) get their own, smaller pool so a
    # burst of them never takes threads from invocations.
    admin_threads: int = 8

    def __post_init__(self) -> None:
        for name in (
            "max_wasm_bytes",
            "max_model_bytes",
            "max_invoke_bytes",
            "max_batch_bytes",
            "invoke_threads",
            "admin_threads",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"Settings.{name} must be at least 1")
