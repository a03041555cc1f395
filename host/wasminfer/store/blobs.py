"""Content-addressed blob files: the bytes of every uploaded function and model, and derived artefacts.

Layout under `root` (the store puts it at `<data_dir>/blobs`):

    sha256/ab/abcdef…            one file per distinct content, named by its sha256
    derived/<kind>/cd/cdef…      derived artefacts (compiled modules, …), named by sha256(key)
    tmp/                         partial streamed uploads

Every write goes to a temporary file in the target's file system, is fsynced, renamed into place
and the folder fsynced, so a file under its final name is always complete and survives a crash.
A sha256 is checked to be 64 lowercase hex digits before it becomes part of a path, and derived
artefacts are named by a hash of their key: no caller-supplied string ever reaches the file system.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

from wasminfer.errors import BadRequest, InvalidName, NotFound, PayloadTooLarge
from wasminfer.names import is_name

_SHA256 = re.compile(r"[0-9a-f]{64}")
_TMP_PREFIX = ".tmp-"
# Derived files start with the sha256 of their payload: a torn or corrupted compiled module must
# never reach a deserializer (wasmtime trusts what it deserializes).
_DIGEST_LEN = 32


class InvalidDigest(BadRequest):
    """A string used as a blob address is not a sha256 hex digest."""

    code = "invalid_digest"

    def __init__(self, value: object) -> None:
        super().__init__(f"not a sha256 digest (64 lowercase hex characters): {value!r:.80}")


class BlobNotFound(NotFound):
    code = "blob_not_found"

    def __init__(self, sha256: str) -> None:
        super().__init__(f"blob {sha256} does not exist")


def check_sha256(value: object) -> str:
    """Return `value` if it is a sha256 hex digest. Raises `InvalidDigest` otherwise."""
    if not isinstance(value, str) or _SHA256.fullmatch(value) is None:
        raise InvalidDigest(value)
    return value


def _fsync_dir(folder: Path) -> None:
    # Makes a rename/create inside `folder` durable; POSIX only (Windows cannot open folders).
    if os.name != "posix":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def makedirs_durable(folder: Path) -> None:
    """Create `folder` (and parents), fsyncing each parent whose listing changed."""
    if folder.is_dir():
        return
    makedirs_durable(folder.parent)
    try:
        folder.mkdir(mode=0o700)
    except FileExistsError:
        return
    _fsync_dir(folder.parent)


class BlobStore:
    """Content-addressed files under `root`. Thread- and process-safe: files are only ever renamed
    into place whole, and two writers of one content write identical bytes."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self._objects = self.root / "sha256"
        self._derived = self.root / "derived"
        self._tmp = self.root / "tmp"
        for folder in (self._objects, self._derived, self._tmp):
            makedirs_durable(folder)

    # --- content-addressed blobs -----------------------------------------------------------------
    def path(self, sha256: str) -> Path:
        """The file of blob `sha256` (which may not exist). Raises `InvalidDigest`."""
        check_sha256(sha256)
        return self._objects / sha256[:2] / sha256

    def put(self, data: bytes) -> str:
        """Store `data` durably and return its sha256; storing existing content is a no-op that
        refreshes the file's mtime (so `gc`'s grace period protects it). Raises `OSError`."""
        sha256 = hashlib.sha256(data).hexdigest()
        target = self.path(sha256)
        if self._touch(target):
            return sha256
        makedirs_durable(target.parent)
        tmp = self._write_temp(target.parent, (data,), max_size=None)[0]
        self._rename_into_place(tmp, target)
        return sha256

    def put_stream(self, chunks: Iterable[bytes], max_size: int | None = None) -> tuple[str, int]:
        """Store the concatenated `chunks` durably without holding them in memory; returns
        `(sha256, size)`. Raises `PayloadTooLarge` past `max_size` bytes (nothing is kept), `OSError`."""
        tmp, sha256, size = self._write_temp(self._tmp, chunks, max_size)
        target = self.path(sha256)
        if self._touch(target):
            tmp.unlink()
            return sha256, size
        makedirs_durable(target.parent)
        self._rename_into_place(tmp, target)
        return sha256, size

    def get(self, sha256: str) -> bytes:
        """The bytes of blob `sha256`. Raises `InvalidDigest`, `BlobNotFound`."""
        try:
            return self.path(sha256).read_bytes()
        except FileNotFoundError:
            raise BlobNotFound(sha256) from None

    def open(self, sha256: str) -> BinaryIO:
        """Blob `sha256` opened for reading (for large blobs). Raises `InvalidDigest`, `BlobNotFound`."""
        try:
            return self.path(sha256).open("rb")
        except FileNotFoundError:
            raise BlobNotFound(sha256) from None

    def exists(self, sha256: str) -> bool:
        """Whether blob `sha256` is stored. Raises `InvalidDigest`."""
        return self.path(sha256).is_file()

    def size(self, sha256: str) -> int:
        """The size in bytes of blob `sha256`. Raises `InvalidDigest`, `BlobNotFound`."""
        try:
            return self.path(sha256).stat().st_size
        except FileNotFoundError:
            raise BlobNotFound(sha256) from None

    def verify(self, sha256: str) -> bool:
        """Whether blob `sha256` exists and its content still hashes to its name. Raises `InvalidDigest`."""
        h = hashlib.sha256()
        try:
            with self.path(sha256).open("rb") as f:
                while chunk := f.read(1 << 20):
                    h.update(chunk)
        except FileNotFoundError:
            return False
        return h.hexdigest() == sha256

    def delete(self, sha256: str) -> bool:
        """Remove blob `sha256`; returns whether it existed. Raises `InvalidDigest`.
        Only `Store.gc` should call this on blobs the database may reference."""
        try:
            self.path(sha256).unlink()
        except FileNotFoundError:
            return False
        return True

    def iter_shas(self) -> Iterator[str]:
        """Every stored blob's sha256 (in no particular order)."""
        for shard in self._objects.iterdir():
            if not shard.is_dir() or len(shard.name) != 2:
                continue
            for entry in shard.iterdir():
                if _SHA256.fullmatch(entry.name) and entry.name[:2] == shard.name:
                    yield entry.name

    def remove_stale_temp_files(self, older_than: float) -> int:
        """Remove temporary files (left by writers that crashed) last modified before the Unix time
        `older_than`; returns how many. Young ones may belong to a write in progress."""
        removed = 0
        candidates = [*self._tmp.glob(f"{_TMP_PREFIX}*"), *self._objects.glob(f"*/{_TMP_PREFIX}*")]
        candidates += self._derived.glob(f"*/*/{_TMP_PREFIX}*")
        for tmp in candidates:
            try:
                if tmp.stat().st_mtime < older_than:
                    tmp.unlink()
                    removed += 1
            except FileNotFoundError:
                continue
        return removed

    # --- derived artefacts -----------------------------------------------------------------------
    def put_derived(self, kind: str, key: str, data: bytes) -> None:
        """Store `data` as the artefact `kind`/`key` (e.g. `"cwasm"`, `sha256 + "-wasmtime-50.0.1"`),
        replacing any previous one atomically. Raises `InvalidName` for a bad `kind`, `OSError`."""
        target = self._derived_path(kind, key)
        makedirs_durable(target.parent)
        tmp = self._write_temp(target.parent, (hashlib.sha256(data).digest(), data), max_size=None)[0]
        self._rename_into_place(tmp, target)

    def get_derived(self, kind: str, key: str) -> bytes | None:
        """The artefact `kind`/`key`, or None if absent or corrupted (a corrupted one is removed).
        Reading refreshes its mtime, so `prune_derived` removes what has not been used.
        Raises `InvalidName` for a bad `kind`."""
        target = self._derived_path(kind, key)
        try:
            blob = target.read_bytes()
        except FileNotFoundError:
            return None
        digest, data = blob[:_DIGEST_LEN], blob[_DIGEST_LEN:]
        if len(digest) != _DIGEST_LEN or hashlib.sha256(data).digest() != digest:
            target.unlink(missing_ok=True)
            return None
        self._touch(target)
        return data

    def delete_derived(self, kind: str, key: str) -> bool:
        """Remove the artefact `kind`/`key`; returns whether it existed. Raises `InvalidName`."""
        try:
            self._derived_path(kind, key).unlink()
        except FileNotFoundError:
            return False
        return True

    def prune_derived(self, kind: str, unused_for_s: float) -> int:
        """Remove the artefacts of `kind` not written or read for `unused_for_s` seconds; returns how
        many. Raises `InvalidName`."""
        folder = self._derived_folder(kind)
        cutoff = time.time() - unused_for_s
        removed = 0
        for entry in folder.glob("*/*"):
            if _SHA256.fullmatch(entry.name) is None:
                continue
            try:
                if entry.stat().st_mtime < cutoff:
                    entry.unlink()
                    removed += 1
            except FileNotFoundError:
                continue
        return removed

    def _derived_folder(self, kind: str) -> Path:
        if not is_name(kind):
            raise InvalidName("derived artefact kind", str(kind)[:100])
        return self._derived / kind

    def _derived_path(self, kind: str, key: str) -> Path:
        folder = self._derived_folder(kind)
        if not isinstance(key, str):
            raise BadRequest(f"a derived artefact key must be a string, not {type(key).__name__}")
        # Hashing the key makes every string a safe, fixed-length file name.
        digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()
        return folder / digest[:2] / digest

    # --- writing ---------------------------------------------------------------------------------
    @staticmethod
    def _touch(target: Path) -> bool:
        try:
            os.utime(target)
        except FileNotFoundError:
            return False
        return True

    @staticmethod
    def _write_temp(folder: Path, chunks: Iterable[bytes], max_size: int | None) -> tuple[Path, str, int]:
        """Write `chunks` to a new fsynced temp file in `folder`; returns (path, sha256, size)."""
        fd, name = tempfile.mkstemp(prefix=_TMP_PREFIX, dir=folder)
        tmp = Path(name)
        h = hashlib.sha256()
        size = 0
        try:
            with os.fdopen(fd, "wb") as f:
                for chunk in chunks:
                    size += len(chunk)
                    if max_size is not None and size > max_size:
                        raise PayloadTooLarge(f"upload is larger than the limit of {max_size} bytes")
                    h.update(chunk)
                    f.write(chunk)
                f.flush()
                os.fsync(f.fileno())
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return tmp, h.hexdigest(), size

    @staticmethod
    def _rename_into_place(tmp: Path, target: Path) -> None:
        try:
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _fsync_dir(target.parent)
