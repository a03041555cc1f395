"""`Store`: the durable record of functions, models and API keys under one data folder.

    <data_dir>/store.db        SQLite (WAL): rows, versions, keys      — see `db.py`
    <data_dir>/blobs/…         content-addressed bytes                 — see `blobs.py`
    <data_dir>/store.changes   a mark every function or model write changes — see `changes.py`

Write order for every upload: blob (temp file, fsync, rename, fsync folder), then the rows in one
transaction. A crash before the commit leaves at most an unreferenced blob, which `gc()` removes;
a row is never visible before its blob is whole on disk.

Every method takes `tenant` as a keyword (default `"default"`); names are unique per tenant.

Over 500 lines and one concept: `Store`, whose every operation (functions, versions, models, keys,
gc, check) keeps that same write order over the same rows and blobs.
"""

from __future__ import annotations

import hmac
import json
import os
import re
import sqlite3
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from wasminfer._fs import makedirs_durable
from wasminfer.errors import (
    BadRequest,
    Conflict,
    FunctionNotFound,
    InvalidManifest,
    ModelNotFound,
    ModelVersionNotFound,
    NotFound,
)
from wasminfer.syntax import is_name, validate_name

from .blobs import BlobStore
from .changes import ChangeMark
from .db import Database
from .keys import check_scopes, hash_key, key_id_of, new_key
from .records import ApiKey, FunctionVersion, GcResult, ModelRecord

DEFAULT_DATA_DIR = Path(".wasminfer")
DEFAULT_TENANT = "default"
# A blob younger than this is never collected, referenced or not: an upload may have written it and
# not committed its row yet (and `put` refreshes the mtime of content it finds already stored).
DEFAULT_GC_GRACE_S = 3600.0
# A temp file is a write in progress until it has not grown for this long, whatever `grace_s` says:
# removing one under a live writer would fail that upload.
TEMP_FILE_MIN_AGE_S = 900.0
_ABI_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/+-]{0,63}")
# Compared against when a key's id is unknown, so that path costs a comparison too.
_DUMMY_HASH = "0" * 64


def manifest_models(manifest: Mapping[str, Any]) -> tuple[str, ...]:
    """The model names a manifest's `models` key allows (a list of names, or one comma-separated
    string), sorted and deduplicated. Raises `InvalidManifest`."""
    value = manifest.get("models", [])
    if isinstance(value, str):
        value = [part.strip() for part in value.split(",") if part.strip()]
    if not isinstance(value, list | tuple) or not all(isinstance(m, str) for m in value):
        raise InvalidManifest.for_key("models", "must be a list of model names")
    for model in value:
        if not is_name(model):
            raise InvalidManifest.for_key("models", f"has an invalid model name {model!r:.80}")
    return tuple(sorted(set(value)))


def _to_json(what: str, value: object, error: type[BadRequest] = BadRequest) -> str:
    """Canonical JSON (sorted keys, no spaces): equal documents give equal strings."""
    if not isinstance(value, Mapping):
        raise error(f"{what} must be a JSON object, not {type(value).__name__}")
    try:
        return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise error(f"{what} is not JSON-serialisable: {exc}") from None


def _check_version(version: object) -> int:
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise BadRequest(f"a version is a positive integer, not {version!r:.40}")
    return version


def _function_version(row: sqlite3.Row, current: int, created: bool = False) -> FunctionVersion:
    return FunctionVersion(
        tenant=row["tenant"],
        name=row["name"],
        version=row["version"],
        sha256=row["sha256"],
        manifest=json.loads(row["manifest"]),
        abi=row["abi"],
        created_at=row["created_at"],
        size=row["size"],
        is_current=row["version"] == current,
        info=json.loads(row["info"]),
        created=created,
    )


def _model_record(row: sqlite3.Row, created: bool = False) -> ModelRecord:
    return ModelRecord(
        tenant=row["tenant"],
        name=row["name"],
        version=row["version"],
        sha256=row["sha256"],
        size=row["size"],
        info=json.loads(row["info"]),
        created_at=row["created_at"],
        created=created,
    )


def _next_version(conn: sqlite3.Connection, tenant: str, kind: str, name: str) -> int:
    conn.execute(
        "INSERT INTO version_counters (tenant, kind, name, last_version) VALUES (?, ?, ?, 1) "
        "ON CONFLICT (tenant, kind, name) DO UPDATE SET last_version = last_version + 1",
        (tenant, kind, name),
    )
    row = conn.execute(
        "SELECT last_version FROM version_counters WHERE tenant = ? AND kind = ? AND name = ?",
        (tenant, kind, name),
    ).fetchone()
    return int(row[0])


_FUNCTION_COLUMNS = "tenant, name, version, sha256, size, manifest, abi, info, created_at"
_MODEL_COLUMNS = "tenant, name, version, sha256, size, info, created_at"


class Store:
    """Functions, models and API keys, durable under `data_dir`.

    Thread-safe (call it from any worker thread) and safe to share a data folder between processes.
    A context manager; `close()` is idempotent, and methods called after it raise `Unavailable`.
    Every method may also raise `Unavailable` when the database stays locked past the busy timeout,
    and `OSError` when the disk fails.
    """

    def __init__(self, data_dir: str | os.PathLike[str] = DEFAULT_DATA_DIR) -> None:
        """Open (creating if needed) the store in `data_dir` and migrate its schema. Raises
        `WasminferError` if the folder was written by a newer wasminfer, `OSError`, `sqlite3.Error`."""
        self.data_dir = Path(data_dir)
        makedirs_durable(self.data_dir)
        self.blobs = BlobStore(self.data_dir / "blobs")
        self._db = Database(self.data_dir / "store.db")
        #: Changed after every committed write of functions or models (replica processes watch it).
        self.changes = ChangeMark(self.data_dir / "store.changes")

    def close(self) -> None:
        """Close the database. Idempotent."""
        self._db.close()
        self.changes.close()

    @property
    def closed(self) -> bool:
        return self._db.closed

    @property
    def db(self) -> Database:
        """The SQLite database, for the modules that keep tables of their own in it (`wasminfer.jobs`)."""
        return self._db

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def schema_version(self) -> int:
        """The schema version of the database file."""
        return self._db.schema_version()

    def tenants(self) -> list[str]:
        """Every tenant that has a function or a model, sorted: what a host loads at start."""
        with self._db.read() as conn:
            rows = conn.execute("SELECT tenant FROM functions UNION SELECT tenant FROM models ORDER BY 1")
            return [row[0] for row in rows]

    def has_keys(self) -> bool:
        """Whether any API key was ever created, revoked ones included (a gateway with none allows
        everything; revoking the last key must lock the server, not open it)."""
        with self._db.read() as conn:
            return conn.execute("SELECT 1 FROM api_keys LIMIT 1").fetchone() is not None

    # --- functions -------------------------------------------------------------------------------
    def put_function(
        self,
        name: str,
        wasm: bytes,
        manifest: Mapping[str, Any],
        abi: str,
        info: Mapping[str, Any] | None = None,
        *,
        tenant: str = DEFAULT_TENANT,
    ) -> FunctionVersion:
        """Deploy `wasm` with `manifest` as function `name` and make it current.

        A new version (the next number for this name, never reused) is created unless the current
        version already has the same wasm, manifest, abi and info; then that one is returned with
        `created=False`. Uploading the content of an older, non-current version creates a new
        version (a deploy moves forward; `rollback` moves back).
        Raises `InvalidName`, `InvalidManifest` (not a JSON object, bad `models`), `BadRequest`
        (bad `abi` or `info`)."""
        tenant = validate_name("tenant", tenant)
        validate_name("function", name)
        manifest_json = _to_json("manifest", manifest, InvalidManifest)
        models = manifest_models(manifest)
        info_json = _to_json("info", {} if info is None else info)
        if not isinstance(abi, str) or _ABI_PATTERN.fullmatch(abi) is None:
            raise BadRequest(f"invalid abi {abi!r:.80}")

        sha256 = self.blobs.put(wasm)
        now = time.time()
        with self._db.write() as conn:
            self._ensure_blob(sha256, wasm)
            head = conn.execute(
                "SELECT current_version FROM functions WHERE tenant = ? AND name = ?", (tenant, name)
            ).fetchone()
            if head is not None:
                current = conn.execute(
                    f"SELECT {_FUNCTION_COLUMNS} FROM function_versions "
                    "WHERE tenant = ? AND name = ? AND version = ?",
                    (tenant, name, head[0]),
                ).fetchone()
                same = (current["sha256"], current["manifest"], current["abi"], current["info"])
                if same == (sha256, manifest_json, abi, info_json):
                    return _function_version(current, head[0], created=False)
            version = _next_version(conn, tenant, "function", name)
            if head is None:
                conn.execute(
                    "INSERT INTO functions (tenant, name, current_version, created_at, updated_at) "
                    "VALUES (?, ?, ?, ?, ?)",
                    (tenant, name, version, now, now),
                )
            else:
                conn.execute(
                    "UPDATE functions SET current_version = ?, updated_at = ? WHERE tenant = ? AND name = ?",
                    (version, now, tenant, name),
                )
            conn.execute(
                f"INSERT INTO function_versions ({_FUNCTION_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (tenant, name, version, sha256, len(wasm), manifest_json, abi, info_json, now),
            )
            self._set_function_models(conn, tenant, name, models)
        self.changes.bump()
        return FunctionVersion(
            tenant=tenant,
            name=name,
            version=version,
            sha256=sha256,
            manifest=json.loads(manifest_json),
            abi=abi,
            created_at=now,
            size=len(wasm),
            is_current=True,
            info=json.loads(info_json),
            created=True,
        )

    def get_function(
        self, name: str, version: int | None = None, *, tenant: str = DEFAULT_TENANT
    ) -> FunctionVersion:
        """Version `version` of function `name`, or its current version if None.
        Raises `InvalidName`, `BadRequest` (version not a positive int), `FunctionNotFound`."""
        tenant = validate_name("tenant", tenant)
        validate_name("function", name)
        if version is not None:
            _check_version(version)
        with self._db.read() as conn:
            row = conn.execute(
                "SELECT v.*, f.current_version FROM function_versions v "
                "JOIN functions f ON f.tenant = v.tenant AND f.name = v.name "
                "WHERE v.tenant = ? AND v.name = ? AND v.version = coalesce(?, f.current_version)",
                (tenant, name, version),
            ).fetchone()
        if row is None:
            raise FunctionNotFound(name, None if version is None else str(version))
        return _function_version(row, row["current_version"])

    def list_functions(self, *, tenant: str = DEFAULT_TENANT) -> list[FunctionVersion]:
        """The current version of every function of `tenant`, by name. Raises `InvalidName`."""
        tenant = validate_name("tenant", tenant)
        with self._db.read() as conn:
            rows = conn.execute(
                "SELECT v.*, f.current_version FROM functions f "
                "JOIN function_versions v "
                "ON v.tenant = f.tenant AND v.name = f.name AND v.version = f.current_version "
                "WHERE f.tenant = ? ORDER BY f.name",
                (tenant,),
            ).fetchall()
        return [_function_version(row, row["current_version"]) for row in rows]

    def list_versions(self, name: str, *, tenant: str = DEFAULT_TENANT) -> list[FunctionVersion]:
        """Every version of function `name`, oldest first. Raises `InvalidName`, `FunctionNotFound`."""
        tenant = validate_name("tenant", tenant)
        validate_name("function", name)
        with self._db.read() as conn:
            rows = conn.execute(
                "SELECT v.*, f.current_version FROM function_versions v "
                "JOIN functions f ON f.tenant = v.tenant AND f.name = v.name "
                "WHERE v.tenant = ? AND v.name = ? ORDER BY v.version",
                (tenant, name),
            ).fetchall()
        if not rows:
            raise FunctionNotFound(name)
        return [_function_version(row, row["current_version"]) for row in rows]

    def rollback(
        self, name: str, version: int | None = None, *, tenant: str = DEFAULT_TENANT
    ) -> FunctionVersion:
        """Make `version` of function `name` current (the latest version before the current one if
        None) and return it. Rolling back to the current version is a no-op.
        Raises `InvalidName`, `BadRequest`, `FunctionNotFound` (no such function or version),
        `Conflict` (version None and no earlier version exists)."""
        tenant = validate_name("tenant", tenant)
        validate_name("function", name)
        if version is not None:
            _check_version(version)
        with self._db.write() as conn:
            head = conn.execute(
                "SELECT current_version FROM functions WHERE tenant = ? AND name = ?", (tenant, name)
            ).fetchone()
            if head is None:
                raise FunctionNotFound(name)
            current = int(head[0])
            if version is None:
                row = conn.execute(
                    f"SELECT {_FUNCTION_COLUMNS} FROM function_versions "
                    "WHERE tenant = ? AND name = ? AND version < ? ORDER BY version DESC LIMIT 1",
                    (tenant, name, current),
                ).fetchone()
                if row is None:
                    raise Conflict(f"function {name!r} has no version before {current} to roll back to")
            else:
                row = conn.execute(
                    f"SELECT {_FUNCTION_COLUMNS} FROM function_versions "
                    "WHERE tenant = ? AND name = ? AND version = ?",
                    (tenant, name, version),
                ).fetchone()
                if row is None:
                    raise FunctionNotFound(name, str(version))
            target = int(row["version"])
            if target != current:
                conn.execute(
                    "UPDATE functions SET current_version = ?, updated_at = ? WHERE tenant = ? AND name = ?",
                    (target, time.time(), tenant, name),
                )
                models = manifest_models(json.loads(row["manifest"]))
                self._set_function_models(conn, tenant, name, models)
        self.changes.bump()
        return _function_version(row, target)

    def delete_function(self, name: str, *, tenant: str = DEFAULT_TENANT) -> None:
        """Delete function `name` and all its versions; their blobs are left for `gc()`.
        Its version numbers are not reused by a later upload of the same name.
        Raises `InvalidName`, `FunctionNotFound`."""
        tenant = validate_name("tenant", tenant)
        validate_name("function", name)
        with self._db.write() as conn:
            deleted = conn.execute(
                "DELETE FROM functions WHERE tenant = ? AND name = ?", (tenant, name)
            ).rowcount
        if not deleted:
            raise FunctionNotFound(name)
        self.changes.bump()

    @staticmethod
    def _set_function_models(
        conn: sqlite3.Connection, tenant: str, function: str, models: Iterable[str]
    ) -> None:
        conn.execute("DELETE FROM function_models WHERE tenant = ? AND function = ?", (tenant, function))
        conn.executemany(
            "INSERT INTO function_models (tenant, function, model) VALUES (?, ?, ?)",
            [(tenant, function, model) for model in models],
        )

    # --- models ----------------------------------------------------------------------------------
    def put_model(
        self,
        name: str,
        data: bytes,
        info: Mapping[str, Any],
        *,
        tenant: str = DEFAULT_TENANT,
    ) -> ModelRecord:
        """Store `data` as a new version of model `name` with the caller-computed `info` (inputs,
        outputs, …). As for functions, uploading the same bytes and info as the latest version
        returns it with `created=False` instead of making a copy.
        Raises `InvalidName`, `BadRequest` (`info` not a JSON object)."""
        tenant = validate_name("tenant", tenant)
        validate_name("model", name)
        info_json = _to_json("model info", info)

        sha256 = self.blobs.put(data)
        now = time.time()
        with self._db.write() as conn:
            self._ensure_blob(sha256, data)
            latest = conn.execute(
                f"SELECT {_MODEL_COLUMNS} FROM models WHERE tenant = ? AND name = ? "
                "ORDER BY version DESC LIMIT 1",
                (tenant, name),
            ).fetchone()
            if latest is not None and (latest["sha256"], latest["info"]) == (sha256, info_json):
                return _model_record(latest, created=False)
            version = _next_version(conn, tenant, "model", name)
            conn.execute(
                f"INSERT INTO models ({_MODEL_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (tenant, name, version, sha256, len(data), info_json, now),
            )
        self.changes.bump()
        return ModelRecord(
            tenant=tenant,
            name=name,
            version=version,
            sha256=sha256,
            size=len(data),
            info=json.loads(info_json),
            created_at=now,
            created=True,
        )

    def get_model(
        self, name: str, version: int | None = None, *, tenant: str = DEFAULT_TENANT
    ) -> ModelRecord:
        """Version `version` of model `name`, or its latest if None.
        Raises `InvalidName`, `BadRequest`, `ModelNotFound` (`ModelVersionNotFound` for a version)."""
        tenant = validate_name("tenant", tenant)
        validate_name("model", name)
        if version is not None:
            _check_version(version)
        with self._db.read() as conn:
            row = conn.execute(
                f"SELECT {_MODEL_COLUMNS} FROM models WHERE tenant = ? AND name = ? "
                "AND (? IS NULL OR version = ?) ORDER BY version DESC LIMIT 1",
                (tenant, name, version, version),
            ).fetchone()
            if row is None and version is not None:
                exists = conn.execute(
                    "SELECT 1 FROM models WHERE tenant = ? AND name = ?", (tenant, name)
                ).fetchone()
                if exists:
                    raise ModelVersionNotFound(name, version)
        if row is None:
            raise ModelNotFound(name)
        return _model_record(row)

    def list_models(self, *, tenant: str = DEFAULT_TENANT) -> list[ModelRecord]:
        """The latest version of every model of `tenant`, by name. Raises `InvalidName`."""
        tenant = validate_name("tenant", tenant)
        with self._db.read() as conn:
            rows = conn.execute(
                f"SELECT {_MODEL_COLUMNS} FROM models m WHERE tenant = ? AND version = "
                "(SELECT max(version) FROM models WHERE tenant = m.tenant AND name = m.name) "
                "ORDER BY name",
                (tenant,),
            ).fetchall()
        return [_model_record(row) for row in rows]

    def list_model_versions(self, name: str, *, tenant: str = DEFAULT_TENANT) -> list[ModelRecord]:
        """Every version of model `name`, oldest first. Raises `InvalidName`, `ModelNotFound`."""
        tenant = validate_name("tenant", tenant)
        validate_name("model", name)
        with self._db.read() as conn:
            rows = conn.execute(
                f"SELECT {_MODEL_COLUMNS} FROM models WHERE tenant = ? AND name = ? ORDER BY version",
                (tenant, name),
            ).fetchall()
        if not rows:
            raise ModelNotFound(name)
        return [_model_record(row) for row in rows]

    def delete_model(self, name: str, *, tenant: str = DEFAULT_TENANT) -> None:
        """Delete model `name` and all its versions; their blobs are left for `gc()`.
        Raises `InvalidName`, `ModelNotFound`, `Conflict` if the current manifest of any function
        names the model (nothing is deleted then)."""
        tenant = validate_name("tenant", tenant)
        validate_name("model", name)
        with self._db.write() as conn:
            exists = conn.execute("SELECT 1 FROM models WHERE tenant = ? AND name = ?", (tenant, name))
            if exists.fetchone() is None:
                raise ModelNotFound(name)
            users = [
                row[0]
                for row in conn.execute(
                    "SELECT function FROM function_models WHERE tenant = ? AND model = ? ORDER BY function",
                    (tenant, name),
                )
            ]
            if users:
                listed = ", ".join(repr(u) for u in users)
                raise Conflict(
                    f"model {name!r} is used by function(s) {listed}: deploy them without it in "
                    "their manifest key 'models', or delete them, first"
                )
            conn.execute("DELETE FROM models WHERE tenant = ? AND name = ?", (tenant, name))
        self.changes.bump()

    # --- API keys --------------------------------------------------------------------------------
    def add_key(self, scopes: Iterable[str] = (), *, tenant: str = DEFAULT_TENANT) -> str:
        """Create an API key for `tenant` with `scopes` and return it in plaintext: this is the only
        time it can be seen (only its sha256 is stored). Raises `InvalidName`, `BadRequest` (scopes)."""
        tenant = validate_name("tenant", tenant)
        checked = check_scopes(scopes)
        key_id, plaintext = new_key()
        with self._db.write() as conn:
            conn.execute(
                "INSERT INTO api_keys (id, tenant, key_hash, scopes, created_at) VALUES (?, ?, ?, ?, ?)",
                (key_id, tenant, hash_key(plaintext), json.dumps(list(checked)), time.time()),
            )
        return plaintext

    def verify_key(self, plaintext: str) -> tuple[str, tuple[str, ...]] | None:
        """`(tenant, scopes)` of a valid, unrevoked key, else None (never raises for a bad key).
        The hash comparison is constant-time."""
        key_id = key_id_of(plaintext)
        row = None
        if key_id is not None:
            with self._db.read() as conn:
                row = conn.execute(
                    "SELECT tenant, key_hash, scopes, revoked FROM api_keys WHERE id = ?", (key_id,)
                ).fetchone()
        given = hash_key(plaintext) if isinstance(plaintext, str) else _DUMMY_HASH
        stored = row["key_hash"] if row is not None else _DUMMY_HASH
        if not hmac.compare_digest(given, stored) or row is None or row["revoked"]:
            return None
        return row["tenant"], tuple(json.loads(row["scopes"]))

    def list_keys(self, *, tenant: str = DEFAULT_TENANT) -> list[ApiKey]:
        """The keys of `tenant` (revoked ones too), oldest first, without secrets. Raises `InvalidName`."""
        tenant = validate_name("tenant", tenant)
        with self._db.read() as conn:
            rows = conn.execute(
                "SELECT id, tenant, scopes, created_at, revoked FROM api_keys "
                "WHERE tenant = ? ORDER BY created_at, id",
                (tenant,),
            ).fetchall()
        return [
            ApiKey(
                id=row["id"],
                tenant=row["tenant"],
                scopes=tuple(json.loads(row["scopes"])),
                created_at=row["created_at"],
                revoked=bool(row["revoked"]),
            )
            for row in rows
        ]

    def revoke_key(self, key_id: str, *, tenant: str = DEFAULT_TENANT) -> None:
        """Revoke key `key_id` of `tenant` (idempotent). Raises `InvalidName`, `NotFound` if `tenant`
        has no such key."""
        tenant = validate_name("tenant", tenant)
        with self._db.write() as conn:
            changed = conn.execute(
                "UPDATE api_keys SET revoked = 1 WHERE id = ? AND tenant = ?", (key_id, tenant)
            ).rowcount
        if not changed:
            raise NotFound(f"API key {key_id!r:.40} does not exist")

    # --- maintenance -----------------------------------------------------------------------------
    def gc(self, grace_s: float = DEFAULT_GC_GRACE_S) -> GcResult:
        """Remove blobs no function version or model references and that are older than `grace_s`
        seconds (by mtime), and temp files left by crashed writers (untouched for `grace_s`, and at
        least `TEMP_FILE_MIN_AGE_S`). Safe to run while uploads go on, whatever `grace_s`.

        Why it is safe: it decides and deletes while holding the database's write lock, and every
        upload checks (and rewrites if needed) its blob inside its own write transaction, after
        which its row protects the blob. The grace period spares an upload that has written its blob
        but not reached its transaction yet from having to write it twice."""
        cutoff = time.time() - grace_s
        # Walk the file system before taking the lock (uploads wait while gc holds it).
        mtimes = {sha: self._stat(sha)[0] for sha in self.blobs.iter_shas()}
        kept_recent = removed = freed = 0
        with self._db.write() as conn:
            referenced = {
                row[0]
                for row in conn.execute(
                    "SELECT sha256 FROM function_versions UNION SELECT sha256 FROM models"
                )
            }
            for sha, mtime in mtimes.items():
                if sha in referenced:
                    continue
                # An old blob may have been refreshed by an upload since the walk: stat it again.
                mtime_now, size = self._stat(sha)
                if mtime >= cutoff or mtime_now >= cutoff:
                    if size >= 0:
                        kept_recent += 1
                    continue
                if self.blobs.delete(sha):
                    removed += 1
                    freed += size
        removed_temp = self.blobs.remove_stale_temp_files(time.time() - max(grace_s, TEMP_FILE_MIN_AGE_S))
        return GcResult(
            removed_blobs=removed, freed_bytes=freed, kept_recent=kept_recent, removed_temp_files=removed_temp
        )

    def check(self, verify_hashes: bool = False) -> list[str]:
        """Problems found in the store, empty if none: SQLite's integrity and foreign-key checks, and
        a referenced blob that is missing (or, with `verify_hashes`, whose content does not hash to
        its name)."""
        problems: list[str] = []
        with self._db.read() as conn:
            problems += [f"sqlite: {r[0]}" for r in conn.execute("PRAGMA integrity_check") if r[0] != "ok"]
            problems += [f"foreign key: {tuple(r)}" for r in conn.execute("PRAGMA foreign_key_check")]
            referenced = conn.execute(
                "SELECT 'function', tenant, name, version, sha256 FROM function_versions "
                "UNION ALL SELECT 'model', tenant, name, version, sha256 FROM models"
            ).fetchall()
        for kind, tenant, name, version, sha in referenced:
            ok = self.blobs.verify(sha) if verify_hashes else self.blobs.exists(sha)
            if not ok:
                problems.append(f"{kind} {tenant}/{name} v{version}: blob {sha} missing or corrupt")
        return problems

    def discard_blob(self, sha256: str) -> bool:
        """Removes blob `sha256` unless a function version or model references it: what an upload
        wrote ahead of its validation (`Platform.put_function`) and was then refused. Returns whether
        it was removed. Safe beside uploads of the same bytes for the reason `gc` is: decided under the
        write lock, and an upload rewrites its blob in its own transaction if it is gone."""
        with self._db.write() as conn:
            for table in ("function_versions", "models"):
                if conn.execute(f"SELECT 1 FROM {table} WHERE sha256 = ? LIMIT 1", (sha256,)).fetchone():
                    return False
            return self.blobs.delete(sha256)

    def _ensure_blob(self, sha256: str, data: bytes) -> None:
        # Runs inside the write transaction: a gc() that ran between our blob write and this lock
        # may have removed the blob; once our row commits, no gc() can.
        if not self.blobs.exists(sha256):
            self.blobs.put(data)

    def _stat(self, sha256: str) -> tuple[float, int]:
        """(mtime, size) of a blob; (inf, -1) if it is gone (so it is neither old nor counted)."""
        try:
            st = self.blobs.path(sha256).stat()
        except FileNotFoundError:
            return float("inf"), -1
        return st.st_mtime, st.st_size
