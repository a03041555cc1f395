"""The values the store hands out: immutable snapshots of rows, with their API (JSON) form."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any


def iso_time(ts: float) -> str:
    """A Unix time as ISO 8601 UTC with milliseconds, e.g. `2024-05-01T12:00:00.000Z`."""
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True, slots=True)
class FunctionVersion:
    """One immutable version of a function. `is_current` says whether the function's current
    pointer was at this version when it was read; `created` (set only by `put_function`) whether
    that upload made a new version rather than finding the current one identical."""

    tenant: str
    name: str
    version: int
    sha256: str
    manifest: dict[str, Any]
    abi: str
    created_at: float
    size: int
    is_current: bool
    info: dict[str, Any] = field(default_factory=dict)
    created: bool = False

    def to_dict(self) -> dict[str, Any]:
        """The API form (JSON-ready; `created_at` as ISO 8601; without `created`)."""
        return {
            "tenant": self.tenant,
            "name": self.name,
            "version": self.version,
            "sha256": self.sha256,
            "size": self.size,
            "abi": self.abi,
            "manifest": self.manifest,
            "info": self.info,
            "created_at": iso_time(self.created_at),
            "is_current": self.is_current,
        }


@dataclass(frozen=True, slots=True)
class ModelRecord:
    """One immutable version of a model. `info` is what the caller computed at upload (inputs,
    outputs, …); `created` as in `FunctionVersion`."""

    tenant: str
    name: str
    version: int
    sha256: str
    size: int
    info: dict[str, Any]
    created_at: float
    created: bool = False

    def to_dict(self) -> dict[str, Any]:
        """The API form (JSON-ready; `created_at` as ISO 8601; without `created`)."""
        return {
            "tenant": self.tenant,
            "name": self.name,
            "version": self.version,
            "sha256": self.sha256,
            "size": self.size,
            "info": self.info,
            "created_at": iso_time(self.created_at),
        }


@dataclass(frozen=True, slots=True)
class ApiKey:
    """An API key as listed: never its secret or hash."""

    id: str
    tenant: str
    scopes: tuple[str, ...]
    created_at: float
    revoked: bool

    def to_dict(self) -> dict[str, Any]:
        """The API form (JSON-ready)."""
        return {
            "id": self.id,
            "tenant": self.tenant,
            "scopes": list(self.scopes),
            "created_at": iso_time(self.created_at),
            "revoked": self.revoked,
        }


@dataclass(frozen=True, slots=True)
class GcResult:
    """What one `Store.gc()` did."""

    removed_blobs: int
    freed_bytes: int
    kept_recent: int
    removed_temp_files: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "removed_blobs": self.removed_blobs,
            "freed_bytes": self.freed_bytes,
            "kept_recent": self.kept_recent,
            "removed_temp_files": self.removed_temp_files,
        }
