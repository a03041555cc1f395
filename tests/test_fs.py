"""Tests of `wasminfer._fs`: a file written with `atomic_write` is whole under its name or not there."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from wasminfer._fs import TEMP_PREFIX, atomic_write, makedirs_durable, write_temp


def test_atomic_write_replaces_the_file_whole_and_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "artefact"
    atomic_write(target, b"first")
    atomic_write(target, b"second, longer")
    assert target.read_bytes() == b"second, longer"
    assert [p.name for p in tmp_path.iterdir()] == ["artefact"]


def test_a_failed_write_leaves_the_old_file_and_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "artefact"
    atomic_write(target, b"kept")

    def chunks() -> Iterator[bytes]:
        yield b"half"
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        write_temp(tmp_path, chunks())
    assert target.read_bytes() == b"kept"
    assert not list(tmp_path.glob(f"{TEMP_PREFIX}*"))


def test_a_write_into_a_missing_folder_fails_and_creates_nothing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        atomic_write(tmp_path / "missing" / "f", b"x")
    assert not (tmp_path / "missing").exists()


def test_makedirs_durable_makes_private_folders(tmp_path: Path) -> None:
    folder = tmp_path / "a" / "b"
    makedirs_durable(folder)
    makedirs_durable(folder)  # idempotent
    assert folder.is_dir() and (folder.stat().st_mode & 0o777) == 0o700
