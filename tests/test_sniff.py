"""`sniff.media_type`: what an upload's bytes are when its client did not say, each format named
and anything uncertain left unnamed; the ONNX walk bounded."""

from __future__ import annotations

import gzip
import io
import os
import tarfile
import zipfile

import pytest
import wasmtime

from wasminfer import sniff
from wasminfer.examples import digits_model

PY = b"import numpy as np\nfrom wasminfer_guest import Request, handler\n"


def zipped(files: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        for name, data in files.items():
            # a fixed date: the bytes are a test parameter, and pytest-xdist's workers must collect
            # the same ones (a second boundary crossed between two collections broke a run)
            z.writestr(zipfile.ZipInfo(name, date_time=(2026, 1, 1, 0, 0, 0)), data)
    return out.getvalue()


def tarred(files: dict[str, bytes], mode: str) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as t:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    if mode == "w":
        return out.getvalue()
    assert mode == "w:gz", mode
    return gzip.compress(out.getvalue(), mtime=0)  # no time in the header: see `zipped`


@pytest.mark.parametrize(("data", "kind"), [
    (bytes(wasmtime.wat2wasm("(module)")), sniff.WASM),
    (bytes(wasmtime.wat2wasm("(component)")), sniff.WASM),
    (PY, sniff.PYTHON),
    (b"# a comment first\n\nfrom wasminfer_guest import handler\n", sniff.PYTHON),
    (zipped({"app.py": PY}), sniff.ZIP),
    (tarred({"app.py": PY}, "w"), sniff.TAR),
    (tarred({"app.py": PY}, "w:gz"), sniff.GZIP),
])  # fmt: skip
def test_each_format_is_named(data: bytes, kind: str) -> None:
    assert sniff.media_type(data) == kind


def test_onnx_models_are_named(add_model: bytes) -> None:
    assert sniff.media_type(add_model) == sniff.ONNX
    assert sniff.media_type(digits_model()) == sniff.ONNX


@pytest.mark.parametrize("data", [
    b"",
    b"hello",
    b"print('a script that is no function')\n",  # Python, but without the SDK: no handler
    b"\0asm\x02\x00\x00\x00" + bytes(8),  # a Wasm version this runtime does not know
    b"x = 1\n# import wasminfer_guest\n\0",  # a NUL: not text
    b"\xff\xfe" + "from wasminfer_guest import handler\n".encode("utf-16-le"),
])  # fmt: skip
def test_what_is_uncertain_is_unnamed(data: bytes) -> None:
    assert sniff.media_type(data) is None


def test_a_damaged_onnx_model_is_unnamed(add_model: bytes) -> None:
    assert sniff.media_type(add_model[:-1]) is None  # its graph's length runs past the end
    assert sniff.media_type(add_model + b"\x00") is None  # field 0 does not exist
    assert sniff.media_type(b"\x08\x08") is None  # an ir_version without a graph
    assert sniff.media_type(b"\x08\xc8\x01\x3a\x00") is None  # ir_version 200, out of range
    assert sniff.media_type(b"\x08\x08\x3a\x00") == sniff.ONNX  # the least that passes


def test_random_bytes_are_never_named() -> None:
    named = [d for d in (os.urandom(n) for n in (16, 300, 4096) for _ in range(2000))
             if sniff.media_type(d) is not None]
    assert named == []


def test_the_onnx_walk_is_bounded_obeyed_and_violated() -> None:
    head = b"\x08\x08\x3a\x00"
    prop = b"\x72\x00"  # an empty metadata_props entry: one field of two bytes
    assert sniff.media_type(head + prop * (sniff.MAX_ONNX_FIELDS - 2)) == sniff.ONNX
    assert sniff.media_type(head + prop * (sniff.MAX_ONNX_FIELDS - 1)) is None


def test_a_long_python_source_is_named_by_its_beginning() -> None:
    long = PY + b"#" * (sniff.PYTHON_PREFIX - len(PY) - 1) + "é\n".encode() * 10
    assert long[sniff.PYTHON_PREFIX - 1:sniff.PYTHON_PREFIX + 1] == "é".encode()  # cut inside it
    assert sniff.media_type(long) == sniff.PYTHON
    assert sniff.media_type(long.replace(b"\xc3\xa9", b"\xff", 1)) is None  # not UTF-8 before the cut
