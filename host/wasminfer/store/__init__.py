"""The durable embedded store: functions (immutable versions), models, API keys, and the
content-addressed blobs they point at, all under one data folder (default `./.wasminfer`).

Imports nothing of wasminfer but `wasminfer.errors`, `wasminfer.syntax` and `wasminfer._fs`.
"""

from __future__ import annotations

from wasminfer.syntax import validate_name

from .blobs import BlobStore, check_sha256
from .db import MIGRATIONS, SCHEMA_VERSION
from .keys import key_id_of
from .records import ApiKey, FunctionVersion, GcResult, ModelRecord
from .store import (
    DEFAULT_DATA_DIR,
    DEFAULT_GC_GRACE_S,
    DEFAULT_TENANT,
    Store,
    manifest_models,
)

__all__ = [
    "DEFAULT_DATA_DIR",
    "DEFAULT_GC_GRACE_S",
    "DEFAULT_TENANT",
    "MIGRATIONS",
    "SCHEMA_VERSION",
    "ApiKey",
    "BlobStore",
    "FunctionVersion",
    "GcResult",
    "ModelRecord",
    "Store",
    "check_sha256",
    "key_id_of",
    "manifest_models",
    "validate_name",
]
