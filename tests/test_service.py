"""`Platform`: the store and the host kept in step — restarts, failed writes, rollbacks, tenants."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from wasminfer.errors import BadRequest, Conflict, FunctionNotFound, ModelNotFound, Unavailable
from wasminfer.manifest import Manifest
from wasminfer.service import Platform, parse_keys

MANIFEST = Manifest(models=("add",), memory_mb=4, timeout_ms=500)


@pytest.fixture
def platform(tmp_path: Path) -> Iterator[Platform]:
    p = Platform(tmp_path / "data")
    p.start()
    yield p
    p.close()


def test_restart_serves_everything_again_from_the_compile_cache(
    tmp_path: Path, add_model: bytes, hostile_wasm: bytes
) -> None:
    data = tmp_path / "data"
    with Platform(data) as p:
        p.start()
        p.put_model("add", add_model)
        p.put_function("hostile", hostile_wasm, MANIFEST)
        p.put_function("other", hostile_wasm, Manifest(memory_mb=8), tenant="acme")
        assert p.host().function("hostile").compiled.from_cache is False
    with Platform(data) as p:
        with pytest.raises(Unavailable):
            p.invoke("hostile", b"e")
        report = p.start()
        assert (report.models, report.functions, report.from_cache, report.failures) == (1, 2, 2, [])
        assert p.invoke("hostile", b"eback").body == b"eback"
        assert p.invoke("other", b"eacme", tenant="acme").body == b"eacme"
        assert p.host().function("hostile").compiled.from_cache is True
        assert p.host().function("hostile").manifest == MANIFEST
        assert p.get_model("add")["loaded"] is True
        assert p.start() is report  # idempotent


def test_a_failed_store_write_restores_the_previous_version(
    platform: Platform, add_model: bytes, hostile_wasm: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    platform.put_model("add", add_model)
    platform.put_function("hostile", hostile_wasm, MANIFEST)

    def disk_full(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(platform.store, "put_function", disk_full)
    with pytest.raises(OSError):
        platform.put_function("hostile", hostile_wasm, MANIFEST.replace(memory_mb=8))
    assert platform.host().function("hostile").manifest.memory_mb == 4  # back to what the store holds
    with pytest.raises(OSError):
        platform.put_function("fresh", hostile_wasm, MANIFEST)
    with pytest.raises(FunctionNotFound):
        platform.host().function("fresh")  # never stored, so not served either


def test_a_failed_model_write_unloads_a_new_model(
    platform: Platform, add_model: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    def disk_full(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(platform.store, "put_model", disk_full)
    with pytest.raises(OSError):
        platform.put_model("add", add_model)
    assert "add" not in platform.host().models


def test_rollback_to_a_version_whose_model_is_gone_changes_nothing(
    platform: Platform, add_model: bytes, hostile_wasm: bytes
) -> None:
    platform.put_model("add", add_model)
    platform.put_function("f", hostile_wasm, MANIFEST)  # v1 uses "add"
    platform.put_function("f", hostile_wasm, Manifest(memory_mb=4))  # v2 does not
    platform.delete_model("add")
    with pytest.raises(ModelNotFound):
        platform.rollback("f")
    assert platform.get_function("f")["version"] == 2
    assert platform.host().function("f").manifest.models == ()
    assert platform.invoke("f", b"estill").body == b"estill"


def test_delete_model_checks_the_host_as_well_as_the_store(
    platform: Platform, add_model: bytes, hostile_wasm: bytes
) -> None:
    platform.put_model("add", add_model)
    platform.host().deploy_function("unstored", hostile_wasm, MANIFEST)  # in the host only
    with pytest.raises(Conflict, match="used by function\\(s\\) 'unstored'"):
        platform.delete_model("add")
    assert platform.get_model("add")["name"] == "add"


def test_close_is_idempotent_and_later_calls_are_unavailable(tmp_path: Path) -> None:
    p = Platform(tmp_path / "d")
    p.start()
    p.close()
    p.close()
    with pytest.raises(Unavailable):
        p.list_functions()


def test_open_access_only_while_no_key_was_ever_made(tmp_path: Path) -> None:
    data = tmp_path / "d"
    with Platform(data) as p:
        assert p.open_access
        key = p.add_key(["admin"])
        assert not p.open_access and p.authenticate(key) is not None
        p.store.revoke_key(key.split("_")[1])
    with Platform(data) as p:  # the only key is revoked: still closed, never open again
        assert not p.open_access and p.authenticate(key) is None
    with Platform(tmp_path / "e", keys=[]) as p, Platform(tmp_path / "f", keys=parse_keys("k:read")) as q:
        assert p.open_access and not q.open_access


def test_scopes_are_checked_the_same_way_for_configured_and_stored_keys(platform: Platform) -> None:
    assert parse_keys("k1:read+invoke:acme")[0].scopes == frozenset({"read", "invoke"})
    known = "known: admin, invoke, read"
    with pytest.raises(BadRequest, match=f"^API key entry 2: unknown scope\\(s\\) root; {known}$"):
        parse_keys("k1:read,k2:read+root")
    with pytest.raises(BadRequest, match=f"^API key entry 1: no scope given; {known}$"):
        parse_keys("k1:+")
    assert platform.add_key(["read"]).startswith("wik_")
    with pytest.raises(BadRequest, match=f"^unknown scope\\(s\\) root; {known}$"):
        platform.add_key(["read", "root"])
    with pytest.raises(BadRequest, match=f"^no scope given; {known}$"):
        platform.add_key([])
    assert len(platform.store.list_keys()) == 1  # nothing refused was stored


def test_an_upload_refused_after_its_blob_was_written_ahead_leaves_no_blob_but_keeps_a_shared_one(
    platform: Platform, add_model: bytes, hostile_wasm: bytes
) -> None:
    """The blob is written while the upload compiles (`_BlobAhead`): a refusal after that removes
    it, unless a stored version holds the same bytes."""
    import hashlib

    platform.put_model("add", add_model)
    blobs = platform.store.blobs
    before = sorted(blobs.iter_shas())
    other = hostile_wasm + b"\x00\x06\x05other"  # a custom section: the same code, other bytes
    with pytest.raises(ModelNotFound, match="missing"):  # refused after its compile (prepare_function)
        platform.put_function("refused", other, Manifest(models=("missing",)))
    assert sorted(blobs.iter_shas()) == before
    assert not blobs.exists(hashlib.sha256(other).hexdigest())
    stored = platform.put_function("kept", hostile_wasm, MANIFEST)
    with pytest.raises(ModelNotFound, match="missing"):  # the same bytes, refused
        platform.put_function("refused", hostile_wasm, Manifest(models=("missing",)))
    assert blobs.get(stored["sha256"]) == hostile_wasm  # still held for "kept"
    assert platform.invoke("kept", b"estill").body == b"estill"
    assert platform.store.check(verify_hashes=True) == []
