"""The C guest SDK (guest-sdk/c/wasminfer.h). Compiled natively with gcc: its CBOR tensor codec
against cbor2, hostile inputs under AddressSanitizer, its JSON helpers. Compiled to Wasm: a test guest
that round-trips tensors through the real host (decode, infer with a result larger than the SDK's
first buffer, encode). The example functions in test_examples.py use the rest of it."""

from __future__ import annotations

import io
import json
import math
import os
import random
import shutil
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

import cbor2
import numpy as np
import pytest
from cbor2 import CBORTag

from wasminfer import toolchain
from wasminfer.errors import GuestError, InvalidTensor, ModelNotAllowed
from wasminfer.models.codec import decode_tensors, encode_tensors
from wasminfer.runtime import Host, Manifest

ROOT = Path(__file__).resolve().parents[1]
TOOL_SOURCE = Path(__file__).resolve().parent / "guest_sdk_c_tool.c"
GUESTS = Path(__file__).resolve().parent / "guests"

# dtype tag (RFC 8746, little-endian) → numpy dtype
DTYPES = {
    64: "<u1", 69: "<u2", 70: "<u4", 71: "<u8", 72: "<i1", 77: "<i2", 78: "<i4", 79: "<i8",
    84: "<f2", 85: "<f4", 86: "<f8",
}  # fmt: skip


def _sanitizers_work(gcc: str, tmp: Path) -> bool:
    probe = tmp / "probe.c"
    probe.write_text("int main(void) { return 0; }\n")
    flags = ["-fsanitize=address,undefined"]
    done = subprocess.run(
        [gcc, *flags, str(probe), "-o", str(tmp / "probe")], capture_output=True, check=False
    )
    return done.returncode == 0 and subprocess.run([str(tmp / "probe")], check=False).returncode == 0


@pytest.fixture(scope="module")
def tool(tmp_path_factory: pytest.TempPathFactory) -> Path:
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("gcc is not installed")
    tmp = tmp_path_factory.mktemp("sdk-c")
    sanitize = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all"]
    if not _sanitizers_work(gcc, tmp):
        # Without AddressSanitizer the SDK's memory errors go unseen: CI must have it (gcc brings it).
        assert not os.environ.get("CI"), "gcc cannot build with -fsanitize=address,undefined here"
        sanitize = []
    exe = tmp / "tool"
    cmd = [gcc, "-std=c11", "-O1", "-g", "-Wall", "-Wextra", "-Werror", *sanitize,
           "-I", str(ROOT / "guest-sdk" / "c"), str(TOOL_SOURCE), "-o", str(exe)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    return exe


def run(tool: Path, mode: str, data: bytes) -> str:
    done = subprocess.run([str(tool), mode], input=data, capture_output=True, check=False, timeout=120)
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    return done.stdout.decode()


def records(*items: bytes) -> bytes:
    return b"".join(struct.pack("<I", len(b)) + b for b in items)


def tensor(a: np.ndarray, tag: int) -> CBORTag:
    return CBORTag(40, [list(a.shape), CBORTag(tag, a.astype(DTYPES[tag]).tobytes())])


def decode(tool: Path, *encoded: bytes) -> list[list[str] | str]:
    """Per input: the tensor lines printed by the C decoder, or "error <why>"."""
    lines = run(tool, "decode", records(*encoded)).splitlines()
    results: list[list[str] | str] = []
    while lines:
        head = lines.pop(0)
        if head.startswith("error "):
            results.append(head)
        else:
            n = int(head.split()[1])
            results.append(lines[:n])
            del lines[:n]
    return results


def expected_lines(arrays: dict[str, tuple[np.ndarray, int]]) -> list[str]:
    out = []
    for name, (a, tag) in arrays.items():
        dims = ",".join(map(str, a.shape)) or "-"
        data = a.astype(DTYPES[tag]).tobytes().hex() or "-"
        out.append(
            f"{name.encode().hex() or '-'} {tag} {dims} {data} 1"
        )  # 1: the data pointer is aligned for its dtype
    return out


# --- cbor2 → C ------------------------------------------------------------------------------------
def sample_arrays() -> list[dict[str, tuple[np.ndarray, int]]]:
    rng = np.random.default_rng(7)
    cases: list[dict[str, tuple[np.ndarray, int]]] = []
    for tag, dt in DTYPES.items():
        if dt[1] == "f":
            values = rng.uniform(-1000, 1000, (2, 3)).astype(dt)
        else:
            info = np.iinfo(dt)
            values = rng.integers(info.min, info.max, (2, 3), dtype=dt, endpoint=True)
        cases.append({"x": (values, tag)})
        cases.append({"scalar": (np.asarray(values[0, 0]), tag)})  # dims []
    cases.append({"empty": (np.zeros((0, 5), "<f4"), 85)})
    cases.append({"n" * 30: (np.arange(30, dtype="<u1"), 64), "m" * 300: (np.arange(300, dtype="<i8"), 79)})
    cases.append({"big": (rng.standard_normal((3, 224, 224)).astype("<f4"), 85)})  # 4-byte length head
    cases.append({f"t{i}": (np.full((i + 1,), i, "<f8"), 86) for i in range(16)})  # WASMINFER_MAX_TENSORS
    cases.append({"rank8": (np.ones((1, 2, 1, 2, 1, 2, 1, 2), "<i2"), 77)})  # WASMINFER_MAX_DIMS
    cases.append({"caf\u00e9": (np.ones((1,), "<u2"), 69)})  # UTF-8 name
    return cases


def test_decode_tensors_encoded_by_cbor2(tool: Path) -> None:
    cases = sample_arrays()
    encoded = [cbor2.dumps({k: tensor(a, tag) for k, (a, tag) in case.items()}) for case in cases]
    for case, got in zip(cases, decode(tool, *encoded), strict=True):
        assert got == expected_lines(case)


@pytest.mark.parametrize("shift", range(8))
def test_decode_aligns_data_in_place(tool: Path, shift: int) -> None:
    # Names of different lengths put each payload at every offset modulo 8.
    arrays = {
        "x" * (1 + shift): (np.arange(3, dtype="<f8"), 86),
        "y" * (7 - shift): (np.arange(5, dtype="<i4"), 78),
    }
    (got,) = decode(tool, cbor2.dumps({k: tensor(a, t) for k, (a, t) in arrays.items()}))
    assert got == expected_lines(arrays)


def test_decode_accepts_non_minimal_heads(tool: Path) -> None:
    data = np.arange(2, dtype="<f4").tobytes()
    encoded = (
        b"\xb8\x01"  # map, 1-byte length
        + b"\x79\x00\x01x"  # text, 2-byte length
        + b"\xd9\x00\x28"  # tag 40, 2-byte
        + b"\x82"
        + b"\x9a\x00\x00\x00\x02"  # array, 4-byte length
        + b"\x1b" + (1).to_bytes(8, "big") + b"\x18\x02"  # dims 1 and 2, 8- and 1-byte
        + b"\xd8\x55"
        + b"\x5a\x00\x00\x00\x08" + data
    )  # fmt: skip
    assert decode(tool, encoded) == [[f"{b'x'.hex()} 85 1,2 {data.hex()} 1"]]


# --- C → cbor2 ------------------------------------------------------------------------------------
def test_encode_matches_cbor2(tool: Path) -> None:
    cases = [
        c
        for c in sample_arrays()
        if all(a.nbytes <= 4096 and len(k) < 64 and k.isascii() for k, (a, _) in c.items())
    ]
    spec = b""
    for case in cases:
        for name, (a, tag) in case.items():
            dims = ",".join(map(str, a.shape)) or "-"
            spec += f"{name} {tag} {dims} {a.astype(DTYPES[tag]).tobytes().hex() or '-'}\n".encode()
        spec += b"end\n"
    out = subprocess.run([str(tool), "encode"], input=spec, capture_output=True, check=True).stdout
    stream = cbor2.CBORDecoder(io.BytesIO(out))
    for case in cases:
        got = stream.decode()
        assert list(got) == list(case)
        for name, (a, tag) in case.items():
            t = got[name]
            assert t.tag == 40 and list(t.value[0]) == list(a.shape)
            assert t.value[1].tag == tag and t.value[1].value == a.astype(DTYPES[tag]).tobytes()
    # Canonical: the same bytes as cbor2 writes for the same map.
    assert out == b"".join(cbor2.dumps({k: tensor(a, t) for k, (a, t) in c.items()}) for c in cases)


def test_encode_rejects_a_shape_that_does_not_match(tool: Path) -> None:
    done = subprocess.run(
        [str(tool), "encode"], input=b"x 85 2,2 00000000\nend\n", capture_output=True, check=False
    )
    assert done.returncode == 1 and b"byte length does not match the shape" in done.stderr


# --- hostile input --------------------------------------------------------------------------------
def _valid() -> bytes:
    return cbor2.dumps({"input": tensor(np.arange(6, dtype="<f4").reshape(2, 3), 85),
                        "label": tensor(np.asarray(3), 79)})  # fmt: skip


def one(dims: object, data: object, tag: int = 40) -> bytes:
    """A map holding one (possibly malformed) tensor `x`."""
    return cbor2.dumps({"x": CBORTag(tag, [dims, data])})


B0 = CBORTag(64, b"\0")  # one uint8
HOSTILE = {
    "empty": (b"", "expected a definite-length map"),
    "not a map": (cbor2.dumps([1, 2]), "expected a definite-length map"),
    "indefinite map": (b"\xbf\xff", "expected a definite-length map"),
    "reserved head": (b"\xbc", "expected a definite-length map"),
    "huge map": (b"\xbb" + (1 << 62).to_bytes(8, "big"), "too many tensors"),
    "17 tensors": (cbor2.dumps({f"t{i}": CBORTag(40, [[1], B0]) for i in range(17)}), "too many tensors"),
    "integer key": (cbor2.dumps({1: CBORTag(40, [[1], B0])}), "expected a text tensor name"),
    "name past the end": (b"\xa1\x7a\xff\xff\xff\xffab", "truncated tensor name"),
    "no tag 40": (cbor2.dumps({"x": [[1], B0]}), "expected tag 40"),
    "tag 41": (one([1], B0, tag=41), "expected tag 40"),
    "three elements": (cbor2.dumps({"x": CBORTag(40, [[1], B0, 0])}), "expected [dims, data]"),
    "dims not an array": (one(1, B0), "expected an array of dims"),
    "negative dim": (one([-1], B0), "expected an unsigned dim"),
    "dim over int64": (one([1 << 63], CBORTag(64, b"")), "expected an unsigned dim"),
    "rank 9": (one([1] * 9, B0), "too many dimensions"),
    "text tensor": (one([2], ["a", "b"]), "text tensors are not supported"),
    "big-endian float32": (one([1], CBORTag(81, b"\0" * 4)), "typed-array tag"),
    "uint8 clamped": (one([1], CBORTag(68, b"\0")), "typed-array tag"),
    "untagged bytes": (one([1], b"\0"), "typed-array tag"),
    "text data": (one([1], CBORTag(64, "a")), "expected a byte string"),
    "indefinite bytes": (bytes.fromhex("a16178d828828101d8405f4100ff"), "expected a byte string"),
    "data past the end": (bytes.fromhex("a16178d828828101d8405a7fffffff00"), "truncated tensor data"),
    "short data": (one([2], CBORTag(85, b"\0" * 4)), "does not match the shape"),
    "long data": (one([1], CBORTag(85, b"\0" * 8)), "does not match the shape"),
    "overflowing shape": (one([(1 << 63) - 1] * 3, CBORTag(86, b"\0" * 8)), "does not match the shape"),
    "zero dim, data": (one([0, 1 << 40], B0), "does not match the shape"),
    "trailing bytes": (_valid() + b"\0", "trailing bytes"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_decode_rejects_hostile_input(tool: Path, case: str) -> None:
    data, reason = HOSTILE[case]
    (got,) = decode(tool, data)
    assert isinstance(got, str) and got.startswith("error ") and reason in got, got


def test_decode_rejects_every_truncation(tool: Path) -> None:
    valid = _valid()
    results = decode(tool, valid, *(valid[:n] for n in range(len(valid))))
    assert isinstance(results[0], list) and len(results[0]) == 2
    assert all(isinstance(r, str) and r.startswith("error ") for r in results[1:])


def test_decode_survives_random_mutations(tool: Path) -> None:
    # Under AddressSanitizer any read outside the exactly-sized input buffer aborts the tool.
    rng = random.Random(1234)
    seeds = [
        _valid(),
        cbor2.dumps({"a": tensor(np.ones((2, 2), "<f8"), 86), "bb": tensor(np.ones(3, "<i2"), 77)}),
    ]
    inputs = []
    for _ in range(3000):
        data = bytearray(rng.choice(seeds))
        for _ in range(rng.randint(1, 4)):
            if not data:
                break
            i = rng.randrange(len(data))
            op = rng.random()
            if op < 0.6:
                data[i] = rng.randrange(256)
            elif op < 0.8:
                del data[i:]
            else:
                data[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 9)))
        inputs.append(bytes(data))
    results = decode(tool, *inputs)
    assert len(results) == len(inputs)
    for data, got in zip(inputs, results, strict=True):
        if isinstance(got, list):  # accepted: it must then be what cbor2 sees too
            m = cbor2.loads(data, str_errors="replace")  # the SDK does not check names for UTF-8
            assert len(m) == len(got)


# --- JSON helpers ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (b"[1, 2.5, -3e2, 0, 16]", [1, 2.5, -300, 0, 16]),
        (b"  [ ]  ", []),
        (b"\n[0.1,1E+1,-0.0]\t", [0.1, 10, -0.0]),
        (b"[" + b",".join(b"7" for _ in range(128)) + b"]", [7] * 128),
    ],
)
def test_json_numbers_parses(tool: Path, text: bytes, expected: list[float]) -> None:
    out = run(tool, "numbers", records(text)).split()
    assert out[:2] == ["ok", str(len(expected))]
    assert [float(x) for x in out[2:]] == expected


def test_json_numbers_are_exact_where_promised_and_close_elsewhere(tool: Path) -> None:
    """The SDK parses numbers itself (not with strtod, see `wasminfer__decimal`): correctly rounded
    for up to 15 significant digits within 1e+-22; Python's 17-digit reprs of doubles within one ulp
    between 1e-22 and 1e22, and within 2e-15 (relative) anywhere in range."""
    rng = random.Random(18)
    exact = [f"{rng.randint(-10**15, 10**15)}e{rng.randint(-22 + 15, 22 - 15)}" for _ in range(300)]
    exact += [f"{rng.uniform(-255, 255):.6f}" for _ in range(300)] + ["0.1", "0.3", "1e22", "1e-22", "-0"]
    near = [repr(rng.uniform(-1, 1) * 10.0 ** rng.randint(-21, 21)) for _ in range(500)]
    near += [repr(rng.random()) for _ in range(300)]
    wide = [repr(rng.uniform(-1, 1) * 10.0 ** rng.randint(-300, 300)) for _ in range(500)]
    wide += ["1e-400", "123456789012345678901234567890"]
    texts = exact + near + wide
    out = run(tool, "numbers", records(*(f"[{t}]".encode() for t in texts))).splitlines()
    assert [line.split()[:2] for line in out] == [["ok", "1"]] * len(texts)
    got = dict(zip(texts, (float(line.split()[2]) for line in out), strict=True))
    assert [got[t] for t in exact] == [float(t) for t in exact]
    assert [t for t in near if abs(got[t] - float(t)) > math.ulp(float(t))] == []
    assert [t for t in wide if abs(got[t] - float(t)) > 2e-15 * abs(float(t))] == []


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        (b"", "expected a JSON array"),
        (b"{}", "expected a JSON array"),
        (b"[1,]", "expected a JSON array"),
        (b"[1 2]", "expected ',' or ']'"),
        (b"[01]", "expected ',' or ']'"),
        (b"[1.]", "expected a JSON array"),
        (b"[.5]", "expected a JSON array"),
        (b"[+1]", "expected a JSON array"),
        (b"[NaN]", "expected a JSON array"),
        (b"[1e999]", "expected a JSON array"),  # overflows to infinity
        (b'["1"]', "expected a JSON array"),
        (b"[1", "expected ',' or ']'"),
        (b"[1] x", "trailing text"),
        (b"[1, 2", "expected ',' or ']'"),
        (b"[" + b"1" * 80 + b"]", "expected a JSON array"),  # longer than the parser's 63 characters
        (b"[" + b",".join(b"7" for _ in range(129)) + b"]", "too many numbers"),
    ],
)
def test_json_numbers_rejects(tool: Path, text: bytes, reason: str) -> None:
    out = run(tool, "numbers", records(text)).strip()
    assert out.startswith("error ") and reason in out, out


@pytest.mark.parametrize(
    ("key", "text", "expected"),
    [
        ("pixels", b'{"pixels": [1, 2]}', "1 [1, 2]"),
        ("pixels", b'{"a": {"pixels": [9]}, "s": "},\\"", "pixels" : [3] }', "1 [3]"),
        ("pixels", b'{"a": 1}', "0 "),
        ("pixels", b"{}", "0 "),
        ("pixels", b"[1, 2]", "-1 "),
        ("pixels", b'{"pixels": }', "-1 "),
        ("pixels", b'{"pixels": [1, 2}', "-1 "),
        ("pixels", b'{"pixels": "abc', "-1 "),
        ("pixels", b'{"pixels" [1]}', "-1 "),
    ],
)
def test_json_member(tool: Path, key: str, text: bytes, expected: str) -> None:
    assert run(tool, "member", records(key.encode() + b"\0" + text)).rstrip("\n") == expected


def test_json_writer_escapes_strings(tool: Path) -> None:
    out = run(tool, "jsonstr", records(b'a"b\\c\n\x01\xc3\xa9'))
    assert out == '"a\\"b\\\\c\\u000a\\u0001\u00e9" 0.100000001\n'


# --- formatting: wasminfer_snprintf against the C library's snprintf -----------------------------
def fmt_record(kind: str, fmt: str, arg: bytes = b"") -> bytes:
    return kind.encode() + fmt.encode() + b"\0" + arg


def f64(x: float) -> bytes:
    return struct.pack("<d", x)


def compare_formats(tool: Path, cases: list[bytes]) -> list[str]:
    """The cases where the SDK's snprintf differs from libc's (result, text, truncated texts)."""
    lines = run(tool, "format", records(*cases)).splitlines()
    assert len(lines) == 2 * len(cases)
    sdk, libc = lines[::2], lines[1::2]
    assert all(a.startswith("sdk ") and b.startswith("libc ") for a, b in zip(sdk, libc, strict=True))
    return [f"{case!r}: {a} != {b}" for case, a, b in zip(cases, sdk, libc, strict=True)
            if a.removeprefix("sdk ") != b.removeprefix("libc ")]  # fmt: skip


def sdk_format(tool: Path, case: bytes) -> tuple[int, str]:
    """The SDK's result and text for one record, in a buffer of 4096 bytes."""
    sdk = run(tool, "format-sdk", records(case)).split()
    return int(sdk[1]), "" if sdk[2] == "-" else bytes.fromhex(sdk[2]).decode()


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        (fmt_record("f", "%.9g", f64(float(np.float32(0.1)))), "0.100000001"),
        (fmt_record("f", "%g", f64(-0.0)), "-0"),
        (fmt_record("f", "<%.0f>", f64(2.5)), "<2>"),  # ties to even
        (fmt_record("f", "<%.0f>", f64(3.5)), "<4>"),
        (fmt_record("f", "%.3g", f64(999.96)), "1e+03"),
        (fmt_record("f", "%010.2f", f64(-3.14159)), "-000003.14"),
        (fmt_record("f", "%-9.1e|", f64(1234.5)), "1.2e+03  |"),
        (fmt_record("f", "%+G", f64(1e-5)), "+1E-05"),
        (fmt_record("f", "%05F", f64(-math.inf)), " -INF"),
        (fmt_record("f", "%e", f64(math.nan)), "nan"),
        (fmt_record("f", "%.17g", f64(5e-324)), "4.9406564584124654e-324"),
        (fmt_record("q", "%lld", struct.pack("<q", -(2**63))), "-9223372036854775808"),
        (fmt_record("q", "%#llx", struct.pack("<q", 255)), "0xff"),
        (fmt_record("p", "[%.*s|%%]", struct.pack("<i", 3) + b"abcdef\0"), "[abc|%]"),
        (fmt_record("s", "[%-4s]", b"ab\0"), "[ab  ]"),
    ],
)
def test_sdk_snprintf_formats(tool: Path, case: bytes, expected: str) -> None:
    """A few results written out (the rest are compared with libc's below)."""
    assert sdk_format(tool, case) == (len(expected), expected)


@pytest.mark.parametrize(
    "fmt", ["ab%a", "ab%p", "ab%n", "ab%Lf", "ab%ls", "ab%lc", "ab%1$d", "ab%k", "ab%.999999999f"]
)
def test_sdk_snprintf_refuses_what_it_does_not_format(tool: Path, fmt: str) -> None:
    """Conversions outside the SDK's set return -1 (the text before them is kept), never read an argument."""
    assert sdk_format(tool, fmt_record("n", fmt)) == (-1, "ab")


def integer_and_string_cases(rng: random.Random, n: int, long_bits: int = 64) -> list[bytes]:
    """Every integer conversion, flag, width, precision and size, %s with widths and precisions, and
    * for both; `long_bits`: the size of long, size_t and ptrdiff_t (32 on wasm32)."""
    cases = []
    edges = [0, 1, -1, 7, 10, 255, 256, 2**31 - 1, -(2**31), 2**32 - 1, 2**63 - 1, -(2**63)]
    word = {"": 32, "hh": 32, "h": 32, "l": long_bits, "ll": 64, "z": long_bits, "j": 64, "t": long_bits}
    for _ in range(n):
        flags = "".join(rng.sample("-+ #0", rng.randint(0, 3)))
        width = rng.choice(["", "", "1", "5", "22"])
        prec = rng.choice(["", "", ".0", ".1", ".5", ".25"])
        conv = rng.choice("diuxXoc")
        size = "" if conv == "c" else rng.choice(list(word))
        if flags.count("#") and conv in "dic" or conv == "c" and (prec or "0" in flags):
            flags = flags.replace("#", "").replace("0", "")  # undefined behaviour in C: libcs differ
            prec = "" if conv == "c" else prec
        value = rng.choice([*edges, rng.randint(-(2**63), 2**63 - 1), rng.randint(-999, 999)])
        fmt = f"<%{flags}{width}{prec}{size}{conv}>"
        if word[size] == 32:
            cases.append(fmt_record("i", fmt, struct.pack("<i", (value + 2**31) % 2**32 - 2**31)))
        else:
            cases.append(fmt_record("q", fmt, struct.pack("<q", value)))
    for _ in range(n // 4):
        text = "".join(rng.choice("abc xyz\t") for _ in range(rng.randint(0, 12))).encode() + b"\0"
        fmt = f"%{rng.choice(['', '-'])}{rng.choice(['', '3', '15'])}{rng.choice(['', '.0', '.4', '.20'])}s!"
        cases.append(fmt_record("s", fmt, text))
        star = rng.randint(-20, 20)
        cases.append(fmt_record("p", rng.choice(["%.*s|", "%*s|"]), struct.pack("<i", star) + text))
        w, p = rng.randint(-12, 12), rng.randint(-3, 8)
        cases.append(fmt_record("W", "%*.*d|%%", struct.pack("<iiq", w, p, rng.randint(-(10**6), 10**6))))
    cases.append(fmt_record("n", "plain text, no conversions"))
    cases.append(fmt_record("n", ""))
    return cases


def float_cases(rng: random.Random, n: int) -> list[bytes]:
    """Every kind of double (random bit patterns: subnormals, huge, NaN payloads; exact ties; float32
    values; ordinary numbers), n of each, in every float conversion with every flag."""
    values = [0.0, -0.0, 1.0, 0.1, 0.5, 1.5, 2.5, 9.5, 99.5, 0.125, 999.9999, 1e21, 1e22, 1e23, 5e-324,
              2.2250738585072014e-308, 2.225073858507201e-308, 1.7976931348623157e308, math.inf, -math.inf,
              math.nan, -math.nan, 1 / 3, 2 / 3, 123456789.0, 0.000123456]  # fmt: skip
    values += [struct.unpack("<d", struct.pack("<Q", rng.getrandbits(64)))[0] for _ in range(n)]
    values += [rng.randint(-(10**9), 10**9) / 2 ** rng.randint(1, 12) for _ in range(n)]  # ties
    values += [float(np.float32(rng.uniform(-1, 1) * 10.0 ** rng.randint(-45, 38))) for _ in range(n)]
    values += [rng.uniform(-1, 1) * 10.0 ** rng.randint(-12, 12) for _ in range(n)]
    cases = []
    for x in values:
        flags = "".join(rng.sample("-+ #0", rng.randint(0, 2)))
        width = rng.choice(["", "", "1", "12", "30"])
        prec = rng.choice(["", ".0", ".1", ".3", ".6", ".9", ".17", ".30"])
        conv = rng.choice("eEfFgG")
        if conv in "fF" and abs(x) > 1e30 and prec == ".30":
            prec = ".3"
        cases.append(fmt_record("f", f"%{flags}{width}{prec}{conv}", f64(x)))
    cases += [fmt_record("w", "%*.*g", struct.pack("<ii", rng.randint(-15, 15), rng.randint(-2, 20)) + f64(x))
              for x in values[:n]]  # fmt: skip
    cases += [fmt_record("f", "%f", f64(x)) for x in (1e308, -5e-324)]  # all 309 digits; all zeros
    return cases


def test_sdk_snprintf_matches_libc_on_integers_and_strings(tool: Path) -> None:
    assert compare_formats(tool, integer_and_string_cases(random.Random(18), 4000)) == []


def test_sdk_snprintf_matches_libc_on_floats(tool: Path) -> None:
    """Exact digits rounded half to even, as glibc prints them."""
    assert compare_formats(tool, float_cases(random.Random(18), 2000)) == []


@pytest.mark.slow
def test_sdk_snprintf_matches_musl_in_wasm(tmp_path_factory: pytest.TempPathFactory) -> None:
    """The same comparison built for wasm32-wasi (tests/guest_sdk_c_tool.c as a WASI command, run by
    the host): against musl's snprintf, where long, size_t and ptrdiff_t are 32 bits."""
    wasm = toolchain.build(TOOL_SOURCE, cache_dir=tmp_path_factory.mktemp("build"), exec_model="command")
    rng = random.Random(18)
    cases = integer_and_string_cases(rng, 1000, long_bits=32) + float_cases(rng, 300)
    with Host(cache_dir=tmp_path_factory.mktemp("host")) as host:
        host.deploy_function("format", wasm.read_bytes(), Manifest(args=("format",)))
        lines = host.invoke("format", records(*cases), "application/octet-stream").body.decode().splitlines()
    assert len(lines) == 2 * len(cases)
    sdk, libc = lines[::2], lines[1::2]
    assert all(a.startswith("sdk ") and b.startswith("libc ") for a, b in zip(sdk, libc, strict=True))
    assert [f"{case!r}: {a} != {b}" for case, a, b in zip(cases, sdk, libc, strict=True)
            if a.removeprefix("sdk ") != b.removeprefix("libc ")] == []  # fmt: skip


def test_json_floats_round_trip_float32(tool: Path) -> None:
    """wasminfer_json_num (%.9g) on float32 values: parses back to the same float32, bit for bit
    (subnormals, -0, the extremes), is Python's '%.9g' of the value, and writes NaN and inf as null."""
    rng = np.random.default_rng(18)
    bits = rng.integers(0, 2**32, 60000, dtype=np.uint64).astype(np.uint32)
    edges = [0, 0x80000000, 1, 0x807FFFFF, 0x00800000, 0x7F7FFFFF, 0xFF7FFFFF, 0x3F800000,
             0x7F800000, 0xFF800000, 0x7FC00000, 0xFFC00001]  # fmt: skip
    bits = np.concatenate([np.array(edges, np.uint32), bits, np.arange(1, 5000, dtype=np.uint32)])
    x = bits.view(np.float32)
    out = run(tool, "floats", records(x.astype("<f4").tobytes())).strip()
    parsed = json.loads(out, parse_int=float)  # "-0" is -0.0, not the int 0
    assert len(parsed) == len(x)
    finite = np.isfinite(x)
    assert [i for i in np.flatnonzero(~finite) if parsed[i] is not None] == []
    got = np.array([p if p is not None else 0.0 for p in parsed], np.float64).astype(np.float32)
    assert [i for i in np.flatnonzero(finite) if got.view(np.uint32)[i] != bits[i]] == []
    texts = out[1:-1].split(", ")
    assert [i for i in np.flatnonzero(finite) if texts[i] != f"{float(x[i]):.9g}"] == []


# --- the SDK in Wasm, against the real host -------------------------------------------------------
@pytest.fixture(scope="module")
def echo_host(tmp_path_factory: pytest.TempPathFactory, add_model: bytes) -> Iterator[Host]:
    """tests/guests/sdk_echo.c: decodes the body with the SDK, infers, re-encodes the outputs."""
    wasm = toolchain.build(GUESTS / "sdk_echo.c", cache_dir=tmp_path_factory.mktemp("build")).read_bytes()
    with Host(cache_dir=tmp_path_factory.mktemp("host")) as host:
        host.deploy_model("add", add_model)
        host.deploy_function("echo", wasm, Manifest.from_dict({"models": ["add"], "memory_mb": 4}))
        yield host


ADD = "application/cbor; model=add"


@pytest.mark.slow
# 340 rows encode to exactly the 4096 bytes of the SDK's first output buffer; 341 need infer_result.
@pytest.mark.parametrize("rows", [1, 3, 340, 341, 5000])
def test_sdk_round_trips_tensors_through_the_host(echo_host: Host, rows: int) -> None:
    rng = np.random.default_rng(rows)
    a, b = (rng.standard_normal((rows, 3)).astype(np.float32) for _ in range(2))
    for _ in range(2):  # the second time the SDK's buffer is already large enough
        r = echo_host.invoke("echo", encode_tensors({"a": a, "b": b}), ADD)
        assert r.content_type == "application/cbor"
        out = decode_tensors(r.body)
        assert list(out) == ["y"]
        np.testing.assert_array_equal(out["y"], a + b)
    lines = [line.message for line in echo_host.logs("echo")]
    assert "2 input tensor(s) for add" in lines


def test_requests_in_and_past_the_inbox_alternate_on_one_instance(echo_host: Host) -> None:
    """A request that fits the SDK's inbox (4096 bytes with its content type) is written there with
    no `wasminfer_alloc` call (tests/test_runtime_host.py shows the host's side), a bigger one is
    allocated and freed: requests just inside, just past and far past it, alternating on the same
    instance, all answer right. (Whether the SDK wrongly freed the inbox is not seen here: zig's
    malloc takes such a free without a fault or a wrong answer.)"""
    fn = echo_host.function("echo")
    rng = np.random.default_rng(7)
    rows = {"small": 3, "edge": 0, "past": 0, "big": 2000}
    # the largest request that still fits: rows of 24 bytes (a and b) plus the map's heads and the type
    head = len(encode_tensors({"a": np.zeros((0, 3), np.float32), "b": np.zeros((0, 3), np.float32)}))
    rows["edge"] = (4096 - len(ADD) - head - 8) // 24
    rows["past"] = rows["edge"] + 1
    for _ in range(20):
        for name, n in rows.items():
            a, b = (rng.standard_normal((n, 3)).astype(np.float32) for _ in range(2))
            body = encode_tensors({"a": a, "b": b})
            assert (len(body) + len(ADD) <= 4096) == (name in ("small", "edge"))
            out = decode_tensors(echo_host.invoke("echo", body, ADD).body)
            np.testing.assert_array_equal(out["y"], a + b)
    idle = [inst for inst, _ in fn.pool._idle]
    assert idle and all(inst.wasm.inbox is not None and inst.wasm.inbox[1] == 4096 for inst in idle)


@pytest.mark.slow
def test_sdk_passes_infer_errors_on(echo_host: Host) -> None:
    wrong = np.zeros((2, 4), np.float32)
    with pytest.raises(InvalidTensor, match=r"input 'a' has shape \[2,4\], the model expects \[N,3\]"):
        echo_host.invoke("echo", encode_tensors({"a": wrong, "b": wrong}), ADD)
    with pytest.raises(ModelNotAllowed):
        echo_host.invoke("echo", encode_tensors({"a": wrong}), "application/cbor; model=other")
    with pytest.raises(GuestError, match="bad request body: trailing bytes"):
        echo_host.invoke("echo", encode_tensors({"a": wrong}) + b"\0", ADD)
