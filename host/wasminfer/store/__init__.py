"""The durable embedded store: functions (immutable versions), models, API keys, and the
content-addressed blobs they point at, all under one data folder (default `./.wasminfer`).

Imports nothing of wasminfer but `wasminfer.errors` and `wasminfer.names`.
"""

from __future__ import annotations

from .blobs import BlobNotFound, BlobStore, InvalidDigest, check_sha256
from .db import MIGRATIONS, SCHEMA_VERSION
from .keys import key_id_of
from .records import ApiKey, FunctionVersion, GcResult, ModelRecord
from .store import (
    DEFAULT_DATA_DIR,
    DEFAULT_GC_GRACE_S,
    DEFAULT_TENANT,
    ModelVersionNotFound,
    Store,
    manifest_models,
    validate_name,
)

__all__ = [
    "DEFAULT_DATA_DIR",
    "DEFAULT_GC_GRACE_S",
    "DEFAULT_TENANT",
    "MIGRATIONS",
    "SCHEMA_VERSION",
    "ApiKey",
    "BlobNotFound",
    "BlobStore",
    "FunctionVersion",
    "GcResult",
    "InvalidDigest",
    "ModelRecord",
    "ModelVersionNotFound",
    "Store",
    "check_sha256",
    "key_id_of",
    "manifest_models",
    "validate_name",
]
