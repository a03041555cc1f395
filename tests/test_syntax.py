"""Tests of `wasminfer.syntax`: one name rule and one header-value rule, checked whole at every
site that uses them (a trailing newline, which `$` lets through, is refused everywhere)."""

from __future__ import annotations

from pathlib import Path

import pytest

from wasminfer.errors import InvalidManifest, InvalidName
from wasminfer.gateway import create_app
from wasminfer.gateway.openapi import openapi_document
from wasminfer.manifest import Manifest
from wasminfer.service import Platform
from wasminfer.store import BlobStore, manifest_models, validate_name
from wasminfer.syntax import NAME_REGEX, is_header_value, is_name


@pytest.mark.parametrize("name", ["a", "digits", "m-1.2_x", "0" * 64])
def test_names_obeyed(name: str) -> None:
    assert is_name(name) and validate_name("model", name) == name
    assert Manifest.from_dict({"models": [name]}).models == (name,)
    assert manifest_models({"models": [name]}) == (name,)


@pytest.mark.parametrize("name", ["", "A", "-a", ".a", "a b", "a/b", "a" * 65, "abc\n", "\nabc", 7])
def test_names_violated(name: object, tmp_path: Path) -> None:
    assert not is_name(name)
    with pytest.raises(InvalidName, match="invalid model name") as info:
        validate_name("model", name)
    assert info.value.status == 400 and info.value.code == "invalid_name"
    with pytest.raises(InvalidManifest, match="manifest key 'models' has an invalid model name"):
        Manifest.from_dict({"models": [name]})
    with pytest.raises(InvalidManifest, match="manifest key 'models'"):
        manifest_models({"models": [name]})
    with pytest.raises(InvalidName, match="invalid derived artefact kind name"):
        BlobStore(tmp_path / "blobs").put_derived(name, "key", b"x")  # type: ignore[arg-type]


def test_the_openapi_document_states_the_same_name_rule(tmp_path: Path) -> None:
    with Platform(tmp_path / "data") as platform:
        spec = openapi_document(create_app(platform).routes)
    patterns = {
        p["schema"]["pattern"]
        for op in spec["paths"].values()
        for method in op.values()
        if isinstance(method, dict)
        for p in method.get("parameters", [])
        if p.get("in") == "path" and p["name"] == "name"
    }
    assert patterns == {f"^{NAME_REGEX}$"}


@pytest.mark.parametrize("value", ["text/plain", "application/json; charset=utf-8", "x", "~" * 256])
def test_header_values_obeyed(value: str) -> None:
    assert is_header_value(value)


@pytest.mark.parametrize("value", ["", " text/plain", "a\r\nx-evil: 1", "a\n", "é", "a\x7f", "~" * 257])
def test_header_values_violated(value: str) -> None:
    assert not is_header_value(value)


def test_header_value_length_is_the_callers() -> None:
    assert is_header_value("k" * 255, 255) and not is_header_value("k" * 256, 255)
