"""Tests of `wasminfer.store`: blobs, functions and versions, models, keys, gc, concurrency, restart."""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from wasminfer.errors import (
    BadRequest,
    BlobNotFound,
    Conflict,
    FunctionNotFound,
    InvalidDigest,
    InvalidManifest,
    InvalidName,
    ModelNotFound,
    ModelVersionNotFound,
    NotFound,
    PayloadTooLarge,
    Unavailable,
    WasminferError,
)
from wasminfer.store import (
    MIGRATIONS,
    SCHEMA_VERSION,
    BlobStore,
    Store,
    key_id_of,
    manifest_models,
)
from wasminfer.store.db import Database

WASM = b"\0asm\x01\0\0\0"
ONNX = b"fake onnx bytes"


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with Store(tmp_path / "data") as s:
        yield s


@pytest.fixture
def blobs(tmp_path: Path) -> BlobStore:
    return BlobStore(tmp_path / "blobs")


def make_old(path: Path, age_s: float = 7200) -> None:
    old = time.time() - age_s
    os.utime(path, (old, old))


# --- opening, schema, durability settings ---------------------------------------------------------
def test_open_creates_layout_wal_and_full_sync(store: Store) -> None:
    assert (store.data_dir / "store.db").is_file()
    assert (store.data_dir / "blobs" / "sha256").is_dir()
    with store._db.read() as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
        assert conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    assert store.schema_version() == SCHEMA_VERSION == len(MIGRATIONS)


def test_default_data_dir_is_dot_wasminfer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with Store() as s:
        assert s.data_dir == Path(".wasminfer")
    assert (tmp_path / ".wasminfer" / "store.db").is_file()


def test_a_new_migration_adds_a_table_and_keeps_data(tmp_path: Path) -> None:
    with Store(tmp_path) as s:
        s.put_function("f", WASM, {}, "handler")
    later = ("CREATE TABLE later_things (id TEXT PRIMARY KEY, state TEXT NOT NULL)",)
    db = Database(tmp_path / "store.db", (*MIGRATIONS, later))
    try:
        assert db.schema_version() == SCHEMA_VERSION + 1
        with db.write() as conn:
            conn.execute("INSERT INTO later_things VALUES ('j1', 'queued')")
    finally:
        db.close()
    # Code that knows only the older migrations refuses the newer file rather than misreading it.
    with pytest.raises(WasminferError, match="newer"):
        Store(tmp_path)


def test_reopening_does_not_migrate_again(tmp_path: Path) -> None:
    Store(tmp_path).close()
    with Store(tmp_path) as s:
        assert s.schema_version() == SCHEMA_VERSION


def test_close_is_idempotent_and_later_calls_raise_unavailable(tmp_path: Path) -> None:
    s = Store(tmp_path)
    s.close()
    s.close()
    assert s.closed
    with pytest.raises(Unavailable):
        s.list_functions()
    with Store(tmp_path) as s2:
        pass
    assert s2.closed


# --- functions ------------------------------------------------------------------------------------
def test_put_and_get_function(store: Store) -> None:
    manifest = {"models": ["digits"], "timeout_ms": 500}
    fv = store.put_function("hello", WASM, manifest, "handler", {"exports": ["handle"]})
    assert (fv.tenant, fv.name, fv.version, fv.abi) == ("default", "hello", 1, "handler")
    assert fv.sha256 == hashlib.sha256(WASM).hexdigest() and fv.size == len(WASM)
    assert fv.manifest == manifest and fv.info == {"exports": ["handle"]}
    assert fv.is_current and fv.created
    got = store.get_function("hello")
    assert got.to_dict() == fv.to_dict() and not got.created
    assert store.blobs.get(got.sha256) == WASM
    assert json.loads(json.dumps(got.to_dict()))["created_at"].endswith("Z")


def test_each_changed_upload_is_a_new_current_version(store: Store) -> None:
    v1 = store.put_function("f", WASM, {}, "handler")
    v2 = store.put_function("f", WASM + b"2", {}, "handler")
    v3 = store.put_function("f", WASM + b"2", {"timeout_ms": 5}, "handler")
    v4 = store.put_function("f", WASM + b"2", {"timeout_ms": 5}, "wasi-command")
    assert [v.version for v in (v1, v2, v3, v4)] == [1, 2, 3, 4]
    assert store.get_function("f").version == 4
    assert store.get_function("f", 2).sha256 == v2.sha256
    assert not store.get_function("f", 2).is_current
    with pytest.raises(FunctionNotFound, match="version '9'"):
        store.get_function("f", 9)
    with pytest.raises(FunctionNotFound):
        store.get_function("nope")


def test_identical_upload_returns_the_current_version(store: Store) -> None:
    v1 = store.put_function("f", WASM, {"a": 1, "b": [1, 2]}, "handler", {"x": 1})
    again = store.put_function("f", WASM, {"b": [1, 2], "a": 1}, "handler", {"x": 1})  # key order
    assert again.version == 1 and not again.created and again.is_current
    assert again.to_dict() == v1.to_dict()
    assert [v.version for v in store.list_versions("f")] == [1]


def test_uploading_an_older_versions_content_moves_forward(store: Store) -> None:
    store.put_function("f", WASM, {}, "handler")
    store.put_function("f", WASM + b"2", {}, "handler")
    v3 = store.put_function("f", WASM, {}, "handler")
    assert v3.version == 3 and v3.created


def test_list_functions_and_versions(store: Store) -> None:
    store.put_function("b", WASM, {}, "handler")
    store.put_function("a", WASM, {}, "handler")
    store.put_function("a", WASM + b"2", {}, "handler")
    assert [(f.name, f.version) for f in store.list_functions()] == [("a", 2), ("b", 1)]
    versions = store.list_versions("a")
    assert [(v.version, v.is_current) for v in versions] == [(1, False), (2, True)]
    with pytest.raises(FunctionNotFound):
        store.list_versions("c")
    assert store.list_functions(tenant="other") == []


def test_rollback(store: Store) -> None:
    for i in range(3):
        store.put_function("f", WASM + bytes([i]), {}, "handler")
    assert store.rollback("f").version == 2
    assert store.get_function("f").version == 2
    assert store.rollback("f").version == 1
    with pytest.raises(Conflict, match="no version before 1"):
        store.rollback("f")
    assert store.rollback("f", 3).version == 3
    assert store.rollback("f", 3).is_current  # to the current one: a no-op
    with pytest.raises(FunctionNotFound, match="version '7'"):
        store.rollback("f", 7)
    with pytest.raises(FunctionNotFound):
        store.rollback("nope")
    store.rollback("f", 1)
    # A deploy after a rollback takes the next number, not current + 1.
    assert store.put_function("f", WASM + b"new", {}, "handler").version == 4
    assert [v.version for v in store.list_versions("f") if v.is_current] == [4]


def test_rollback_skips_missing_numbers(store: Store) -> None:
    store.put_function("f", WASM, {}, "handler")
    store.delete_function("f")
    store.put_function("f", WASM + b"2", {}, "handler")  # version 2: 1 is gone
    with pytest.raises(Conflict):
        store.rollback("f")


def test_delete_function_removes_every_version_and_never_reuses_numbers(store: Store) -> None:
    store.put_function("f", WASM, {}, "handler")
    store.put_function("f", WASM + b"2", {}, "handler")
    store.delete_function("f")
    with pytest.raises(FunctionNotFound):
        store.get_function("f")
    with pytest.raises(FunctionNotFound):
        store.list_versions("f")
    with pytest.raises(FunctionNotFound):
        store.delete_function("f")
    assert store.put_function("f", WASM, {}, "handler").version == 3


# --- models ---------------------------------------------------------------------------------------
def test_models_versions_list_get_delete(store: Store) -> None:
    info = {"inputs": [{"name": "x", "dtype": "float32", "shape": [None, 64]}]}
    m1 = store.put_model("digits", ONNX, info)
    assert (m1.version, m1.created, m1.size) == (1, True, len(ONNX))
    assert store.blobs.get(m1.sha256) == ONNX
    same = store.put_model("digits", ONNX, info)
    assert (same.version, same.created) == (1, False)
    m2 = store.put_model("digits", ONNX + b"2", info)
    m3 = store.put_model("digits", ONNX + b"2", {"inputs": []})  # only info changed
    assert (m2.version, m3.version) == (2, 3)
    store.put_model("alpha", ONNX, {})
    assert store.get_model("digits").to_dict() == m3.to_dict()
    assert store.get_model("digits", 1).sha256 == m1.sha256
    assert [(m.name, m.version) for m in store.list_models()] == [("alpha", 1), ("digits", 3)]
    assert [m.version for m in store.list_model_versions("digits")] == [1, 2, 3]
    with pytest.raises(ModelVersionNotFound, match="version 9"):
        store.get_model("digits", 9)
    store.delete_model("digits")
    for call in (store.get_model, store.list_model_versions, store.delete_model):
        with pytest.raises(ModelNotFound):
            call("digits")
    assert store.put_model("digits", ONNX, info).version == 4
    assert json.dumps(m1.to_dict())


def test_deleting_a_model_in_use_is_a_409(store: Store) -> None:
    store.put_model("digits", ONNX, {})
    store.put_model("other", ONNX, {})
    store.put_function("classify", WASM, {"models": ["digits", "other"]}, "handler")
    store.put_function("also", WASM, {"models": "digits"}, "handler")
    with pytest.raises(Conflict) as info:
        store.delete_model("digits")
    assert info.value.status == 409
    assert "'also', 'classify'" in info.value.message and "'models'" in info.value.message
    assert store.get_model("digits").version == 1  # nothing deleted
    # Only *current* manifests count; rollback and delete keep the index in step.
    store.put_function("classify", WASM + b"2", {"models": ["other"]}, "handler")
    store.delete_function("also")
    store.rollback("classify")
    with pytest.raises(Conflict):
        store.delete_model("digits")
    store.rollback("classify", 2)
    store.delete_model("digits")
    with pytest.raises(Conflict):
        store.delete_model("other")


def test_manifest_models_parsing() -> None:
    assert manifest_models({}) == ()
    assert manifest_models({"models": ["b", "a", "b"]}) == ("a", "b")
    assert manifest_models({"models": "a, b"}) == ("a", "b")
    for bad in ({"models": 3}, {"models": [1]}, {"models": ["../x"]}, {"models": {"a": 1}}):
        with pytest.raises(InvalidManifest):
            manifest_models(bad)


# --- tenants --------------------------------------------------------------------------------------
def test_names_are_unique_per_tenant(store: Store) -> None:
    a = store.put_function("f", WASM, {"models": ["m"]}, "handler", tenant="acme")
    b = store.put_function("f", WASM + b"b", {}, "handler", tenant="globex")
    assert (a.version, b.version, a.tenant, b.tenant) == (1, 1, "acme", "globex")
    store.put_model("m", ONNX, {}, tenant="acme")
    store.put_model("m", ONNX, {}, tenant="globex")
    store.delete_model("m", tenant="globex")  # acme's function does not hold globex's model
    with pytest.raises(Conflict):
        store.delete_model("m", tenant="acme")
    store.delete_function("f", tenant="acme")
    assert store.get_function("f", tenant="globex").sha256 == b.sha256
    with pytest.raises(FunctionNotFound):
        store.get_function("f")  # the default tenant has none
    assert [f.tenant for f in store.list_functions(tenant="globex")] == ["globex"]


# --- validation -----------------------------------------------------------------------------------
BAD_NAMES = ["", "A", "Hello", "-a", ".a", "_a", "a" * 65, "a/b", "a b", "..", "a\n", "é", "a\\b", "a:b"]
GOOD_NAMES = ["a", "0", "a" * 64, "resnet-50.v2_int8"]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_invalid_names_are_refused(store: Store, name: str) -> None:
    calls: list[Any] = [
        lambda: store.put_function(name, WASM, {}, "handler"),
        lambda: store.put_model(name, ONNX, {}),
        lambda: store.get_function(name),
        lambda: store.delete_model(name),
        lambda: store.put_function("f", WASM, {}, "handler", tenant=name),
        lambda: store.list_models(tenant=name),
        lambda: store.add_key([], tenant=name),
    ]
    for call in calls:
        with pytest.raises(InvalidName) as info:
            call()
        assert info.value.status == 400
    assert store.list_functions() == [] and store.list_models() == []


@pytest.mark.parametrize("name", GOOD_NAMES)
def test_valid_names_are_accepted(store: Store, name: str) -> None:
    assert store.put_function(name, WASM, {}, "handler", tenant=name).name == name
    assert store.put_model(name, ONNX, {}, tenant=name).name == name


def test_invalid_manifest_abi_info_and_version(store: Store) -> None:
    with pytest.raises(InvalidManifest):
        store.put_function("f", WASM, [], "handler")  # type: ignore[arg-type]
    with pytest.raises(InvalidManifest):
        store.put_function("f", WASM, {"x": float("nan")}, "handler")
    with pytest.raises(InvalidManifest):
        store.put_function("f", WASM, {"x": object()}, "handler")
    with pytest.raises(InvalidManifest, match="'models'"):
        store.put_function("f", WASM, {"models": ["UPPER"]}, "handler")
    with pytest.raises(BadRequest):
        store.put_function("f", WASM, {}, "")
    with pytest.raises(BadRequest):
        store.put_function("f", WASM, {}, "handler", info=[])  # type: ignore[arg-type]
    with pytest.raises(BadRequest):
        store.put_model("m", ONNX, {"bad": {1, 2}})
    store.put_function("f", WASM, {}, "handler")
    for version in (0, -1, True, "1", 1.0):
        with pytest.raises(BadRequest):
            store.get_function("f", version)  # type: ignore[arg-type]
        with pytest.raises(BadRequest):
            store.rollback("f", version)  # type: ignore[arg-type]
    assert [v.version for v in store.list_versions("f")] == [1]  # nothing half-written


# --- API keys -------------------------------------------------------------------------------------
def test_api_keys(store: Store) -> None:
    key = store.add_key(["invoke", "deploy", "invoke"], tenant="acme")
    assert key.startswith("wik_")
    assert store.verify_key(key) == ("acme", ("deploy", "invoke"))
    other = store.add_key()
    assert store.verify_key(other) == ("default", ())
    [listed] = store.list_keys(tenant="acme")
    assert listed.id == key_id_of(key) and listed.scopes == ("deploy", "invoke") and not listed.revoked
    assert "key_hash" not in listed.to_dict() and json.dumps(listed.to_dict())
    with pytest.raises(NotFound):
        store.revoke_key(listed.id)  # another tenant's key
    assert store.verify_key(key) is not None
    store.revoke_key(listed.id, tenant="acme")
    store.revoke_key(listed.id, tenant="acme")  # idempotent
    assert store.verify_key(key) is None
    assert store.list_keys(tenant="acme")[0].revoked
    assert store.verify_key(other) is not None
    with pytest.raises(NotFound):
        store.revoke_key("0" * 16)


def test_wrong_or_malformed_keys_do_not_verify(store: Store) -> None:
    key = store.add_key(["invoke"])
    last = key[-1]
    tampered = key[:-1] + ("A" if last != "A" else "B")
    unknown_id = "wik_" + "0" * 16 + key[20:]
    for bad in (
        tampered,
        unknown_id,
        key + "x",
        key[:-1],
        "",
        "wik_",
        "Bearer " + key,
        key.upper(),
        None,
        42,
    ):
        assert store.verify_key(bad) is None  # type: ignore[arg-type]


def test_only_a_hash_of_the_key_is_stored(store: Store) -> None:
    key = store.add_key(["invoke"])
    store.close()
    raw = b"".join(p.read_bytes() for p in store.data_dir.glob("store.db*"))
    assert key.encode() not in raw and key.split("_", 2)[2].encode() not in raw
    assert hashlib.sha256(key.encode()).hexdigest().encode() in raw


@pytest.mark.parametrize("scopes", ["invoke", ["has space"], [""], [1], ["x" * 65]])
def test_invalid_scopes(store: Store, scopes: Any) -> None:
    with pytest.raises(BadRequest):
        store.add_key(scopes)


# --- blobs ----------------------------------------------------------------------------------------
def test_blob_put_get_exists_size_delete(blobs: BlobStore) -> None:
    sha = blobs.put(b"hello")
    assert sha == hashlib.sha256(b"hello").hexdigest()
    assert blobs.path(sha) == blobs.root / "sha256" / sha[:2] / sha
    assert blobs.get(sha) == b"hello" and blobs.exists(sha) and blobs.size(sha) == 5
    with blobs.open(sha) as f:
        assert f.read() == b"hello"
    assert blobs.verify(sha)
    assert list(blobs.iter_shas()) == [sha]
    assert blobs.delete(sha) and not blobs.delete(sha)
    assert not blobs.exists(sha)
    for call in (blobs.get, blobs.size, blobs.open):
        with pytest.raises(BlobNotFound):
            call(sha)


def test_blob_put_is_idempotent_and_refreshes_mtime(blobs: BlobStore) -> None:
    sha = blobs.put(b"x")
    make_old(blobs.path(sha))
    assert blobs.put(b"x") == sha
    assert time.time() - blobs.path(sha).stat().st_mtime < 60
    assert list(blobs.iter_shas()) == [sha]
    assert not list(blobs.root.rglob(".tmp-*"))


def test_put_stream(blobs: BlobStore) -> None:
    chunks = [os.urandom(1000) for _ in range(50)]
    sha, size = blobs.put_stream(iter(chunks))
    assert (sha, size) == (hashlib.sha256(b"".join(chunks)).hexdigest(), 50_000)
    assert blobs.get(sha) == b"".join(chunks)
    assert blobs.put_stream(chunks) == (sha, size)  # again: already stored
    with pytest.raises(PayloadTooLarge):
        blobs.put_stream(iter(chunks), max_size=49_999)
    assert blobs.put_stream([], max_size=0) == (hashlib.sha256(b"").hexdigest(), 0)
    assert not list(blobs.root.rglob(".tmp-*"))


def test_verify_detects_corruption(blobs: BlobStore) -> None:
    sha = blobs.put(b"data")
    blobs.path(sha).chmod(0o600)
    blobs.path(sha).write_bytes(b"evil")
    assert not blobs.verify(sha)
    assert not blobs.verify("0" * 64)


BAD_SHAS = [
    "../../store.db",
    "../" * 21 + "a",
    "a" * 63,
    "a" * 65,
    "A" * 64,
    "g" * 64,
    "a" * 64 + "\n",
    "/" + "a" * 63,
    "aa/" + "a" * 61,
    "..",
    "",
    None,
    123,
]


@pytest.mark.parametrize("sha", BAD_SHAS)
def test_blob_addresses_are_validated(blobs: BlobStore, sha: Any) -> None:
    for call in (blobs.path, blobs.get, blobs.exists, blobs.size, blobs.delete, blobs.open, blobs.verify):
        with pytest.raises(InvalidDigest) as info:
            call(sha)
        assert info.value.status == 400


def test_store_paths_never_leave_the_blob_folder(store: Store) -> None:
    (store.data_dir / "secret").write_bytes(b"x")
    with pytest.raises(InvalidDigest):
        store.blobs.get("../../secret")
    with pytest.raises(InvalidDigest):
        store.blobs.delete("../../store.db")
    assert (store.data_dir / "store.db").exists()


# --- derived artefacts ----------------------------------------------------------------------------
def test_derived_roundtrip_overwrite_delete(blobs: BlobStore) -> None:
    key = "ab" * 32 + "+wasmtime-50.0.1"
    assert blobs.get_derived("cwasm", key) is None
    blobs.put_derived("cwasm", key, b"compiled")
    assert blobs.get_derived("cwasm", key) == b"compiled"
    assert blobs.get_derived("cwasm", key + "x") is None
    assert blobs.get_derived("other-kind", key) is None
    blobs.put_derived("cwasm", key, b"recompiled")
    assert blobs.get_derived("cwasm", key) == b"recompiled"
    blobs.put_derived("cwasm", "", b"")  # any string is a key, even the empty one
    assert blobs.get_derived("cwasm", "") == b""
    assert blobs.delete_derived("cwasm", key) and not blobs.delete_derived("cwasm", key)
    assert blobs.get_derived("cwasm", key) is None


def test_corrupted_derived_artefacts_are_dropped(blobs: BlobStore) -> None:
    blobs.put_derived("cwasm", "k", b"compiled module")
    [path] = [p for p in (blobs.root / "derived" / "cwasm").rglob("*") if p.is_file()]
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    assert blobs.get_derived("cwasm", "k") is None
    assert not path.exists()
    path.write_bytes(b"short")
    assert blobs.get_derived("cwasm", "k") is None


def test_prune_derived_removes_unused(blobs: BlobStore) -> None:
    blobs.put_derived("cwasm", "old", b"1")
    blobs.put_derived("cwasm", "new", b"2")
    for p in (blobs.root / "derived" / "cwasm").rglob("*"):
        if p.is_file():
            make_old(p)
    assert blobs.get_derived("cwasm", "new") == b"2"  # a read counts as use
    assert blobs.prune_derived("cwasm", 3600) == 1
    assert blobs.get_derived("cwasm", "old") is None and blobs.get_derived("cwasm", "new") == b"2"


@pytest.mark.parametrize("kind", ["../x", "a/b", "", ".hidden", "X", "..", "a" * 65, None])
def test_derived_kinds_are_validated(blobs: BlobStore, kind: Any) -> None:
    for call in (
        lambda: blobs.put_derived(kind, "k", b"x"),
        lambda: blobs.get_derived(kind, "k"),
        lambda: blobs.delete_derived(kind, "k"),
        lambda: blobs.prune_derived(kind, 0),
    ):
        with pytest.raises(InvalidName):
            call()


@pytest.mark.parametrize("key", ["../../../store.db", "/etc/passwd", "a\0b", "..", "x/" * 300, "\udcff"])
def test_derived_keys_cannot_escape(tmp_path: Path, key: str) -> None:
    blobs = BlobStore(tmp_path / "blobs")
    blobs.put_derived("cwasm", key, b"payload")
    assert blobs.get_derived("cwasm", key) == b"payload"
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(files) == 1
    assert files[0].resolve().is_relative_to((tmp_path / "blobs" / "derived" / "cwasm").resolve())
    with pytest.raises(BadRequest):
        blobs.get_derived("cwasm", b"bytes")  # type: ignore[arg-type]


# --- gc -------------------------------------------------------------------------------------------
def test_gc_removes_only_old_unreferenced_blobs(store: Store) -> None:
    kept_fn = store.put_function("keep", WASM, {}, "handler")
    gone = store.put_function("gone", WASM + b"gone", {}, "handler")
    shared = store.put_function("shared1", WASM + b"shared", {}, "handler")
    store.put_function("shared2", WASM + b"shared", {}, "handler")
    model = store.put_model("m", ONNX, {})
    old_model = store.put_model("m", ONNX + b"v2", {})  # v1 stays referenced: versions are kept
    store.delete_function("gone")
    store.delete_function("shared1")
    young = store.blobs.put(b"just uploaded, row not committed yet")
    orphan = store.blobs.put(b"an old orphan")
    for sha in store.blobs.iter_shas():
        if sha != young:
            make_old(store.blobs.path(sha))
    stale_tmp = store.blobs.root / "tmp" / ".tmp-crashed"
    fresh_tmp = store.blobs.root / "tmp" / ".tmp-in-progress"
    stale_tmp.write_bytes(b"x")
    fresh_tmp.write_bytes(b"x")
    make_old(stale_tmp)

    result = store.gc()
    assert (result.removed_blobs, result.kept_recent, result.removed_temp_files) == (2, 1, 1)
    assert result.freed_bytes == len(WASM + b"gone") + len(b"an old orphan")
    assert not store.blobs.exists(gone.sha256) and not store.blobs.exists(orphan)
    for sha in (kept_fn.sha256, shared.sha256, model.sha256, old_model.sha256, young):
        assert store.blobs.exists(sha)
    assert not stale_tmp.exists() and fresh_tmp.exists()
    assert store.check() == []
    assert json.dumps(result.to_dict())


def test_gc_between_blob_write_and_commit_cannot_lose_the_upload(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worst interleaving, forced: gc(grace 0) deletes the blob after the upload wrote it and
    before its transaction; the upload notices inside its transaction and writes it again."""
    real_put = store.blobs.put
    calls = []

    def put_then_gc(data: bytes) -> str:
        sha = real_put(data)
        calls.append(sha)
        if len(calls) == 1:
            assert store.gc(grace_s=0).removed_blobs == 1
            assert not store.blobs.exists(sha)
        return sha

    monkeypatch.setattr(store.blobs, "put", put_then_gc)
    fv = store.put_function("f", WASM, {}, "handler")
    assert len(calls) == 2  # rewritten inside the transaction
    assert store.blobs.get(fv.sha256) == WASM
    assert store.check(verify_hashes=True) == []


def test_gc_running_continuously_during_uploads(store: Store) -> None:
    stop = threading.Event()
    errors: list[BaseException] = []

    def collect() -> None:
        try:
            while not stop.is_set():
                store.gc(grace_s=0)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    gc_thread = threading.Thread(target=collect)
    gc_thread.start()
    try:
        for i in range(60):
            store.put_function(f"f{i % 3}", os.urandom(512), {}, "handler")
            store.put_model(f"m{i % 3}", os.urandom(512), {"i": i})
            if i % 10 == 9:
                store.delete_function(f"f{i % 3}")
    finally:
        stop.set()
        gc_thread.join()
    assert errors == []
    assert store.check(verify_hashes=True) == []


# --- concurrency ----------------------------------------------------------------------------------
def run_threads(n: int, target: Any) -> None:
    errors: list[BaseException] = []

    def wrapped(i: int) -> None:
        try:
            target(i)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=wrapped, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def test_concurrent_writers_and_readers_from_threads(store: Store) -> None:
    results: dict[int, list[int]] = {}
    per_thread = 15

    def work(i: int) -> None:
        mine = results.setdefault(i, [])
        for j in range(per_thread):
            mine.append(store.put_function("shared", f"{i}-{j}".encode(), {}, "handler").version)
            store.put_function(f"own-{i}", f"{i}-{j}".encode(), {}, "handler")
            store.put_model("model", f"{i}-{j}".encode(), {})
            store.get_function("shared")
            store.list_functions()

    run_threads(8, work)
    total = 8 * per_thread
    versions = [v.version for v in store.list_versions("shared")]
    assert versions == list(range(1, total + 1))
    assert sorted(v for vs in results.values() for v in vs) == versions
    for vs in results.values():
        assert vs == sorted(vs)  # one thread's deploys are ordered
    assert [m.version for m in store.list_model_versions("model")][-1] == total
    assert len(store.list_functions()) == 9
    assert store.check(verify_hashes=True) == []


def test_two_stores_on_one_folder_like_two_processes(tmp_path: Path) -> None:
    with Store(tmp_path) as a, Store(tmp_path) as b:

        def work(i: int) -> None:
            s = a if i % 2 else b
            for j in range(20):
                s.put_function("f", f"{i}-{j}".encode(), {}, "handler")
                s.add_key(["invoke"])

        run_threads(4, work)
        assert [v.version for v in a.list_versions("f")] == list(range(1, 81))
        assert len(b.list_keys()) == 80


# --- restart and self-check -----------------------------------------------------------------------
def test_reopened_store_sees_everything(tmp_path: Path) -> None:
    with Store(tmp_path) as s:
        for i in range(3):
            s.put_function("f", WASM + bytes([i]), {"models": ["m"], "i": i}, "handler", {"i": i})
        s.rollback("f")
        s.put_function("g", WASM, {}, "component", tenant="acme")
        s.put_model("m", ONNX, {"inputs": ["x"]})
        s.put_model("m", ONNX + b"2", {"inputs": ["x"]})
        key = s.add_key(["invoke"], tenant="acme")
        revoked = s.add_key(["deploy"])
        s.revoke_key(key_id_of(revoked) or "")
        before = (
            [v.to_dict() for v in s.list_versions("f")],
            [f.to_dict() for f in s.list_functions(tenant="acme")],
            [m.to_dict() for m in s.list_model_versions("m")],
            [k.to_dict() for k in s.list_keys()],
        )
    with Store(tmp_path) as s:
        after = (
            [v.to_dict() for v in s.list_versions("f")],
            [f.to_dict() for f in s.list_functions(tenant="acme")],
            [m.to_dict() for m in s.list_model_versions("m")],
            [k.to_dict() for k in s.list_keys()],
        )
        assert after == before
        assert s.get_function("f").version == 2
        assert s.verify_key(key) == ("acme", ("invoke",)) and s.verify_key(revoked) is None
        with pytest.raises(Conflict):
            s.delete_model("m")
        assert s.put_function("f", WASM + b"new", {}, "handler").version == 4
        assert s.check(verify_hashes=True) == []


def test_check_reports_missing_and_corrupt_blobs(store: Store) -> None:
    fv = store.put_function("f", WASM, {}, "handler")
    m = store.put_model("m", ONNX, {})
    store.blobs.path(fv.sha256).unlink()
    path = store.blobs.path(m.sha256)
    path.write_bytes(b"tampered")
    assert store.check() == [f"function default/f v1: blob {fv.sha256} missing or corrupt"]
    assert len(store.check(verify_hashes=True)) == 2


def test_integrity_of_the_file_after_use(store: Store) -> None:
    store.put_function("f", WASM, {"models": ["m"]}, "handler")
    store.put_model("m", ONNX, {})
    path = store.data_dir / "store.db"
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert conn.execute("PRAGMA foreign_key_check").fetchall() == []
    finally:
        conn.close()


def test_the_current_pointer_cannot_dangle(store: Store) -> None:
    store.put_function("f", WASM, {}, "handler")
    with pytest.raises(sqlite3.IntegrityError), store._db.write() as conn:
        conn.execute("UPDATE functions SET current_version = 7")
    assert store.get_function("f").version == 1 and store.check() == []


def test_discard_blob_removes_an_unreferenced_blob_only(store: Store) -> None:
    fv = store.put_function("f", WASM, {}, "handler")
    model = store.put_model("m", ONNX, {})
    ahead = store.blobs.put(WASM + b"refused")
    assert store.discard_blob(ahead) is True and not store.blobs.exists(ahead)
    assert store.discard_blob(ahead) is False  # gone already
    assert store.discard_blob(fv.sha256) is False and store.blobs.get(fv.sha256) == WASM
    assert store.discard_blob(model.sha256) is False and store.blobs.exists(model.sha256)
    assert store.check(verify_hashes=True) == []
