"""The HTTP gateway: routes, parsing, auth, the error → status mapping, OpenAPI, metrics.

Talks to the platform (`wasminfer.service`) only; never imports wasmtime or onnxruntime.
"""

from __future__ import annotations

from wasminfer.gateway.app import create_app
from wasminfer.gateway.connections import guarded_protocol
from wasminfer.gateway.settings import Settings

__all__ = ["Settings", "create_app", "guarded_protocol"]
