"""wasminfer: serverless ML inference on WebAssembly.

Small Wasm functions do the pre- and post-processing of a request and call the host's `infer`
import; the host keeps one ONNX Runtime session per model, shared by every instance.
`wasminfer.Client` talks to a server over HTTP (imported lazily: `import wasminfer` stays cheap).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from wasminfer.client import Client, Invocation

__all__ = ["Client", "Invocation", "__version__"]


def __getattr__(name: str) -> Any:
    if name in ("Client", "Invocation"):
        from wasminfer import client

        return getattr(client, name)
    raise AttributeError(f"module 'wasminfer' has no attribute {name!r}")
