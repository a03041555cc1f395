"""A Python function's files as one canonical zip, what the store keeps and the runtime runs.

Uploads come as one `.py` (it becomes `app.py`), a zip or a tar (optionally gzipped) of the
function's folder; `bundle` turns each into the same zip: members sorted, fixed timestamps, no
folders, one common top folder removed (a zip of `myfn/` holds `myfn/app.py`), nothing outside
the folder. Plain data: the gateway and the CLI use it, and it imports nothing of the runtime.
"""

from __future__ import annotations

import io
import posixpath
import tarfile
import zipfile
from pathlib import Path

from wasminfer.errors import BadRequest

PYTHON = "text/x-python"
ZIP = "application/zip"
TAR = "application/x-tar"
GZIP = "application/gzip"
MEDIA_TYPES = (PYTHON, ZIP, TAR, GZIP)
ZIP_MAGIC = b"PK\x03\x04"  # what the runtime tells a Python function by (a Wasm binary has \0asm)
MAX_FILES = 1000
#: The most bytes a function's files may hold once unpacked (an archive's members are counted by
#: their declared sizes before any is read, so a zip bomb is refused unread).
MAX_UNPACKED_BYTES = 256 << 20
SKIP = ("__pycache__/", ".git/")


def _clean(path: str) -> str | None:
    """The member's path inside the function, or None for what is not kept. Raises `BadRequest`
    for a path that leaves the folder."""
    norm = posixpath.normpath(path.replace("\\", "/").lstrip("/"))
    if norm in (".", "") or path.endswith("/"):
        return None
    if norm.startswith("../") or norm == ".." or posixpath.isabs(norm):
        raise BadRequest(f"the upload has a file outside its folder: {path!r}")
    if any(norm.startswith(s) or f"/{s}" in norm for s in SKIP) or norm.endswith(".pyc"):
        return None
    return norm


def _check_sizes(sizes: list[int]) -> None:
    if len(sizes) > MAX_FILES:
        raise BadRequest(f"the upload holds {len(sizes)} files, more than {MAX_FILES}")
    if sum(sizes) > MAX_UNPACKED_BYTES:
        raise BadRequest(f"the upload unpacks to {sum(sizes)} bytes, more than {MAX_UNPACKED_BYTES}")


def _zip(files: dict[str, bytes]) -> bytes:
    if not files:
        raise BadRequest("the upload holds no files")
    if len(files) > MAX_FILES:
        raise BadRequest(f"the upload holds {len(files)} files, more than {MAX_FILES}")
    tops = {p.split("/", 1)[0] for p in files}
    if len(tops) == 1 and all("/" in p for p in files):  # one folder around everything
        top = tops.pop() + "/"
        files = {p[len(top):]: data for p, data in files.items()}
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
        for path in sorted(files):
            info = zipfile.ZipInfo(path, (1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED  # a ZipInfo's own default is stored
            z.writestr(info, files[path])
    return out.getvalue()


def bundle(data: bytes, media_type: str) -> bytes:
    """The canonical zip of an upload of `media_type` (one of `MEDIA_TYPES`). Raises `BadRequest`
    for an archive that cannot be read, a path outside the folder, or a file that is not one."""
    files: dict[str, bytes] = {}
    if media_type == PYTHON:
        return _zip({"app.py": data})
    try:
        if media_type == ZIP:
            with zipfile.ZipFile(io.BytesIO(data)) as z:
                _check_sizes([i.file_size for i in z.infolist()])
                for info in z.infolist():
                    path = _clean(info.filename)
                    if path is not None and not info.is_dir():
                        files[path] = z.read(info)
        else:
            with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as t:
                _check_sizes([m.size for m in t.getmembers()])
                for member in t.getmembers():
                    if member.isdir():
                        continue
                    path = _clean(member.name)
                    if path is None:
                        continue
                    if not member.isfile():
                        raise BadRequest(f"the upload's {member.name!r} is a link or device, not a file")
                    f = t.extractfile(member)
                    files[path] = f.read() if f is not None else b""
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError) as exc:
        raise BadRequest(f"the upload is not a readable {media_type} archive: {exc}") from None
    return _zip(files)


def bundle_folder(folder: Path) -> bytes:
    """The canonical zip of a function's folder (what `wasminfer deploy function myfn/` sends),
    without its `.onnx` files: models are deployed on their own and shared (a folder made by
    `wasminfer new` keeps its model beside its code), a function reaches them only through `infer`."""
    kept = {}
    for p in sorted(folder.rglob("*")):
        clean = _clean(p.relative_to(folder).as_posix()) if p.is_file() and p.suffix != ".onnx" else None
        if clean is not None:
            kept[clean] = p.read_bytes()
    return _zip(kept)
