"""What host replicas compare to know that they serve the same thing as the gateway: a deployed
function (its module, manifest and models) and a model (its bytes and load options)."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

from wasminfer.errors import ModelNotFound
from wasminfer.models import ModelInfo
from wasminfer.models.options import ADDED_LATER, DEFAULT_INTER_OP_THREADS
from wasminfer.runtime import DeployedFunction

__all__ = ["deployment_digest", "model_digest"]


def deployment_digest(fn: DeployedFunction) -> str:
    """What a host replica compares to know that its copy of a function is the one the gateway
    serves: the module and manifest (`DeployedFunction.digest`) and the sha256 of every model the
    manifest names (a model replaced under the same name changes it too)."""
    models = fn.host.models
    parts = [fn.digest]
    for model in fn.manifest.models:
        try:
            parts.append(model_digest(models.get(model)))
        except ModelNotFound:
            parts.append("-")
    return ".".join(parts)


# intra_op_threads and max_concurrent_runs have no default value: None (chosen at load) is their default.
_DEFAULT_OPTIONS = {
    "inter_op_threads": DEFAULT_INTER_OP_THREADS,
    "max_batch_size": 0,
    **ADDED_LATER,
}


def model_digest(model: ModelInfo | str, options: Mapping[str, int | None] | None = None) -> str:
    """A loaded model (or a stored version: sha256 and options) as host replicas compare it: its
    bytes and the load options that differ from the defaults (a version stored before options were
    kept has none: the defaults)."""
    if isinstance(model, ModelInfo):
        sha256, options = model.sha256, model.options()
    else:
        sha256 = model
    given = sorted(
        (k, v) for k, v in (options or {}).items() if v is not None and _DEFAULT_OPTIONS.get(k) != v
    )
    if not given:
        return sha256[:12]
    return f"{sha256[:12]}+{hashlib.sha256(repr(given).encode()).hexdigest()[:8]}"
