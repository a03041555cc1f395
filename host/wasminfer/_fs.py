"""Durable file writes, the one way every layer writes a file that must never be seen half-written.

A file is written under a temporary name in its own folder (so the rename stays on one file
system), fsynced, renamed over its final name, and the folder fsynced: under its final name a file
is always whole, and survives a crash once the call returns. Imports nothing of wasminfer, so the
store (the lowest layer) may use it.
"""

from __future__ import annotations

import mmap
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

TEMP_PREFIX = ".tmp-"


def fsync_dir(folder: Path) -> None:
    """Makes a rename or create inside `folder` durable. POSIX only (Windows cannot open folders)."""
    if os.name != "posix":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def makedirs_durable(folder: Path) -> None:
    """Creates `folder` (and its parents) with mode 0700, fsyncing each parent whose listing changed."""
    if folder.is_dir():
        return
    makedirs_durable(folder.parent)
    try:
        folder.mkdir(mode=0o700)
    except FileExistsError:
        return
    fsync_dir(folder.parent)


def write_temp(folder: Path, chunks: Iterable[bytes]) -> Path:
    """Writes `chunks` to a new temporary file in `folder`, fsynced, and returns its path. Whatever
    `chunks` raises propagates, and the file is removed. Raises `OSError`."""
    fd, name = tempfile.mkstemp(prefix=TEMP_PREFIX, dir=folder)
    tmp = Path(name)
    try:
        with os.fdopen(fd, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def rename_into_place(tmp: Path, target: Path, *, sync_dir: bool = True) -> None:
    """Renames the written `tmp` over `target` and (with `sync_dir`) fsyncs `target`'s folder; `tmp`
    is removed if the rename fails. Raises `OSError`."""
    try:
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if sync_dir:
        fsync_dir(target.parent)


def atomic_write(path: Path, data: bytes, *, sync_dir: bool = True) -> None:
    """Replaces `path` with `data` whole: written under a temporary name in its folder, fsynced,
    renamed, and (with `sync_dir`; without, the caller fsyncs the folder once for several files)
    the folder fsynced. Raises `OSError`."""
    rename_into_place(write_temp(path.parent, (data,)), path, sync_dir=sync_dir)


def map_shared(path: Path, size: int) -> mmap.mmap:
    """The first `size` bytes of the file at `path` (created if needed, mode 0600, and extended to
    `size` with zeros), mapped shared: what processes on one data folder exchange small counters
    through. Raises `OSError`."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        if os.fstat(fd).st_size < size:
            os.ftruncate(fd, size)
        return mmap.mmap(fd, size)
    finally:
        os.close(fd)
