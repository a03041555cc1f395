"""The tensor codec (wasminfer/models/codec.py): the format of guest-sdk/ABI.md, and hostile input."""

from __future__ import annotations

import struct

import cbor2
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from wasminfer.errors import InvalidTensor, TensorTooLarge
from wasminfer.models import decode_tensors, encode_tensors, tensors_from_json, tensors_to_json
from wasminfer.models.codec import MAX_RANK, MAX_TENSORS, TYPED_ARRAY_TAGS

DTYPES = [*TYPED_ARRAY_TAGS, "bool"]
SHAPES = [(), (0,), (1,), (5,), (2, 3), (3, 0, 2), (1, 3, 4, 4), (300,), (2, 70000 // 2)]


def sample(dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    rng = np.random.default_rng(abs(hash((dtype, shape))) % 2**32)
    size = int(np.prod(shape))
    if dtype == "bool":
        return rng.integers(0, 2, size).astype(bool).reshape(shape)
    if dtype.startswith("float"):
        return (rng.standard_normal(size) * 100).astype(dtype).reshape(shape)
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max, size, dtype=dtype, endpoint=True).reshape(shape)


def tensor(dims: object, data: object, tag: int = 40) -> cbor2.CBORTag:
    return cbor2.CBORTag(tag, [dims, data])


def typed(dtype: str, raw: bytes) -> cbor2.CBORTag:
    return cbor2.CBORTag(TYPED_ARRAY_TAGS[dtype], raw)


def invalid(data: bytes, match: str, **kwargs: int) -> None:
    with pytest.raises(InvalidTensor, match=match) as info:
        decode_tensors(data, **kwargs)
    assert type(info.value) is InvalidTensor


# --- the format ---------------------------------------------------------------------------------
def test_abi_example_bytes() -> None:
    """The example of ABI.md, "Tensor encoding", byte for byte."""
    x = np.array([[1.0, 2.0, 3.0]], dtype=np.float32)
    data = encode_tensors({"x": x})
    assert data.hex().startswith("a16178d82882820103d8554c")
    assert data[12:] == x.tobytes()
    np.testing.assert_array_equal(decode_tensors(data)["x"], x)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_round_trip(dtype: str, shape: tuple[int, ...]) -> None:
    array = sample(dtype, shape)
    decoded = decode_tensors(encode_tensors({"t": array}))["t"]
    assert decoded.shape == shape
    # bool travels as uint8, tag 64 (the registry casts it back for bool inputs)
    assert decoded.dtype == (np.uint8 if dtype == "bool" else np.dtype(dtype))
    np.testing.assert_array_equal(decoded.astype(array.dtype), array)


@pytest.mark.parametrize("dtype", list(TYPED_ARRAY_TAGS))
def test_encoding_is_what_cbor2_writes(dtype: str) -> None:
    """Definite lengths, shortest heads, little-endian: byte-identical to cbor2's own encoding."""
    tensors = {
        name: sample(dtype, shape)
        for name, shape in zip(("a", "é" * 30, "c" * 300), [(2, 3), (3, 0, 2), (300,)], strict=True)
    }
    expected = cbor2.dumps(
        {
            name: tensor(list(a.shape), typed(dtype, a.astype(a.dtype.newbyteorder("<")).tobytes()))
            for name, a in tensors.items()
        }
    )
    assert encode_tensors(tensors) == expected


def test_text_tensors() -> None:
    words = np.array([["a", "bé"], ["", "漢字" * 20]], dtype=object)
    data = encode_tensors({"w": words, "u": np.array(["x", "yz"]), "s": np.array("scalar", dtype=object)})
    assert data == cbor2.dumps(
        {
            "w": tensor([2, 2], ["a", "bé", "", "漢字" * 20]),
            "u": tensor([2], ["x", "yz"]),
            "s": tensor([], ["scalar"]),
        }
    )
    decoded = decode_tensors(data)
    assert decoded["w"].dtype == object and decoded["w"].tolist() == words.tolist()
    assert decoded["u"].tolist() == ["x", "yz"]
    assert decoded["s"].shape == () and decoded["s"].item() == "scalar"


def test_many_tensors_and_empty_map() -> None:
    tensors = {f"t{i}": np.full((2,), i, dtype=np.int32) for i in range(50)}
    decoded = decode_tensors(encode_tensors(tensors))
    assert list(decoded) == list(tensors)
    assert all((decoded[k] == v).all() for k, v in tensors.items())
    assert decode_tensors(encode_tensors({})) == {}


def test_decode_is_zero_copy_and_read_only() -> None:
    decoded = decode_tensors(encode_tensors({"x": np.arange(1000, dtype=np.float32)}))["x"]
    assert not decoded.flags.writeable
    root: object = decoded
    while isinstance(root, np.ndarray):
        root = root.base
    assert isinstance(root, bytes)  # a view of the byte string cbor2 decoded, not a copy of it


def test_encode_normalises_layout_and_byte_order() -> None:
    base = np.arange(24, dtype=np.float64).reshape(4, 6)
    for array in (base.T, base[::2, ::3], base.astype(">f8"), np.asfortranarray(base)):
        decoded = decode_tensors(encode_tensors({"x": array}))["x"]
        assert decoded.dtype == np.float64
        np.testing.assert_array_equal(decoded, array)
    flags = np.array([[True, False], [False, True]]).T
    np.testing.assert_array_equal(decode_tensors(encode_tensors({"b": flags}))["b"], flags.astype(np.uint8))
    scalar = {"n": np.float32(2.5)}  # a numpy scalar, not an array: accepted too
    assert decode_tensors(encode_tensors(scalar))["n"].shape == ()  # type: ignore[arg-type]


def test_longer_heads_than_needed_are_accepted() -> None:
    """RFC 8949 allows non-shortest heads; the fast no-trailing-bytes proof must not refuse them."""
    raw = np.arange(3, dtype=np.float32).tobytes()
    data = (
        b"\xb8\x01"  # map, count in a 1-byte argument
        + b"\x79\x00\x01x"  # text "x", length in a 2-byte argument
        + b"\xd9\x00\x28"  # tag 40 in a 2-byte argument
        + b"\x98\x02"  # array(2)
        + b"\x82\x18\x01\x1a\x00\x00\x00\x03"  # dims [1, 3]
        + b"\xd8\x55\x5a"
        + struct.pack(">I", 12)
        + raw
    )
    np.testing.assert_array_equal(decode_tensors(data)["x"], [[0.0, 1.0, 2.0]])
    invalid(data + b"\x00", "unexpected bytes after the tensor map")


def test_encode_refuses_what_the_format_cannot_carry() -> None:
    with pytest.raises(InvalidTensor, match="'c' has dtype complex64"):
        encode_tensors({"c": np.zeros(2, dtype=np.complex64)})
    with pytest.raises(InvalidTensor, match="'o' is an object array holding a byte string"):
        encode_tensors({"o": np.array([b"x"], dtype=object)})
    with pytest.raises(InvalidTensor, match="'l' is an array, not a numpy array"):
        encode_tensors({"l": [1, 2]})  # type: ignore[dict-item]
    with pytest.raises(InvalidTensor, match="non-empty strings"):
        encode_tensors({"": np.zeros(1)})


# --- limits -------------------------------------------------------------------------------------
def test_max_tensor_bytes_obeyed() -> None:
    data = encode_tensors({"x": np.zeros(256, dtype=np.float32), "t": np.array(["a" * 1024], dtype=object)})
    assert decode_tensors(data, max_tensor_bytes=1024)["x"].nbytes == 1024


def test_max_tensor_bytes_violated() -> None:
    with pytest.raises(TensorTooLarge, match="tensor 'x' has 1028 bytes of data; the limit is 1024"):
        decode_tensors(encode_tensors({"x": np.zeros(257, dtype=np.float32)}), max_tensor_bytes=1024)
    with pytest.raises(TensorTooLarge, match="tensor 't' has 1025 bytes of text; the limit is 1024"):
        decode_tensors(
            encode_tensors({"t": np.array(["é" + "a" * 1023], dtype=object)}), max_tensor_bytes=1024
        )


def test_max_tensors() -> None:
    ok = {f"t{i}": np.zeros(0, dtype=np.uint8) for i in range(MAX_TENSORS)}
    assert len(decode_tensors(encode_tensors(ok))) == MAX_TENSORS
    ok["one-more"] = np.zeros(0, dtype=np.uint8)
    invalid(encode_tensors(ok), f"{MAX_TENSORS + 1} tensors in one map; at most {MAX_TENSORS}")


# --- hostile input, case by case ----------------------------------------------------------------
F32 = typed("float32", b"\x00" * 12)


@pytest.mark.parametrize(
    ("obj", "match"),
    [
        ([1, 2], "must be a CBOR map of name to tensor, not an array"),
        (7, "not an integer"),
        ({b"x": tensor([3], F32)}, "names must be text strings, not a byte string"),
        ({"": tensor([3], F32)}, "names must not be empty"),
        ({"x": [[3], F32]}, "tensor 'x' must be tag 40 \\[dims, data\\], not an array"),
        ({"x": tensor([3], F32, tag=41)}, "tensor 'x' must be tag 40 \\[dims, data\\], not tag 41"),
        ({"x": cbor2.CBORTag(40, [[3]])}, "tensor 'x': tag 40 must hold a two-element array"),
        ({"x": cbor2.CBORTag(40, {"dims": [3]})}, "tensor 'x': tag 40 must hold a two-element array"),
        ({"x": tensor(3, F32)}, "tensor 'x': dims must be an array of unsigned integers, not an integer"),
        ({"x": tensor([-3], F32)}, r"tensor 'x': dims must be unsigned integers, got \[-3\]"),
        ({"x": tensor([True, 3], F32)}, r"tensor 'x': dims must be unsigned integers, got \[True,3\]"),
        ({"x": tensor([3.0], F32)}, r"tensor 'x': dims must be unsigned integers, got \[3.0\]"),
        ({"x": tensor(["3"], F32)}, r"dims must be unsigned integers"),
        ({"x": tensor([None], F32)}, r"dims must be unsigned integers"),
        ({"x": tensor([1] * (MAX_RANK + 1), F32)}, f"tensor 'x' has rank {MAX_RANK + 1}; at most {MAX_RANK}"),
        ({"x": tensor([4], F32)}, r"tensor 'x' has 12 bytes of data; shape \[4\] of float32 needs 16"),
        ({"x": tensor([2], F32)}, r"tensor 'x' has 12 bytes of data; shape \[2\] of float32 needs 8"),
        ({"x": tensor([2**32, 2**32], F32)}, "has 12 bytes of data; shape .* needs 73786976294838206464"),
        ({"x": tensor([2**64 - 1] * 8, F32)}, "has 12 bytes of data"),
        ({"x": tensor([0, 2**62], typed("float32", b""))}, r"tensor 'x' has dims \[0,4611686018427387904\]"),
        ({"x": tensor([3], cbor2.CBORTag(65, b"\0" * 6))}, "tensor 'x' has typed-array tag 65; supported"),
        ({"x": tensor([3], cbor2.CBORTag(68, b"\0" * 3))}, "typed-array tag 68"),
        ({"x": tensor([3], cbor2.CBORTag(87, b"\0" * 48))}, "typed-array tag 87"),
        ({"x": tensor([3], cbor2.CBORTag(85, "text"))}, "tag 85 must hold a byte string"),
        ({"x": tensor([3], cbor2.CBORTag(85, [1, 2, 3]))}, "nesting depth"),  # deeper than the format
        ({"x": tensor([3], b"\0" * 12)}, "data must be a typed array .* not a byte string"),
        ({"x": tensor([3], 1.5)}, "data must be a typed array .* not a float"),
        ({"x": tensor([3], None)}, "not null"),
        ({"x": tensor([2], ["a"])}, r"text tensor 'x' has 1 strings; shape \[2\] needs 2"),
        ({"x": tensor([2], ["a", b"b"])}, "text tensor 'x' holds a byte string; only text strings"),
        ({"x": tensor([1], [1])}, "text tensor 'x' holds an integer"),
        ({"x": tensor([2**40], [])}, "text tensor 'x' has 0 strings"),
    ],
)
def test_hostile_structures(obj: object, match: str) -> None:
    invalid(cbor2.dumps(obj), match)


@pytest.mark.parametrize(
    ("hex_data", "match"),
    [
        ("", "do not decode as CBOR"),
        ("a1", "do not decode as CBOR"),
        ("a16178d82882820103d8554c0000", "do not decode as CBOR"),  # truncated bytes
        ("a2617880617880", "do not decode as CBOR.*[Dd]uplicate"),  # {"x": [], "x": []}
        ("bf6178a0ff", "do not decode as CBOR.*indefinite"),  # indefinite map
        ("a16178d8289f8100d8484101ff", "indefinite"),  # indefinite array
        ("a16178d82882810 1d8485f4101ff".replace(" ", ""), "indefinite"),  # indefinite bytes
        ("a1017f", "do not decode as CBOR"),  # integer key
        ("a1627866ff", "do not decode as CBOR"),  # invalid UTF-8 in the key... and truncated
        ("a16278ff00", "do not decode as CBOR"),  # invalid UTF-8 key
        ("a0a0", "unexpected bytes after the tensor map"),
        ("a000", "unexpected bytes after the tensor map"),
        ("5bffffffffffffffff", "do not decode as CBOR"),  # a 2**64-byte string, announced
        ("bbffffffffffffffff", "do not decode as CBOR"),  # a 2**64-entry map, announced
        ("a16178" + "81" * 10 + "00", "maximum container nesting depth|do not decode"),
        ("d9d9f7a0", "not tag 55799"),  # self-described CBOR: not part of the format
    ],
)
def test_hostile_bytes(hex_data: str, match: str) -> None:
    invalid(bytes.fromhex(hex_data), match)


FOREIGN_TAGS = [
    cbor2.CBORTag(0, "2013-03-21T20:04:00Z"),
    cbor2.CBORTag(1, 1363896240),
    cbor2.CBORTag(2, b"\x01" + b"\x00" * 8),
    cbor2.CBORTag(4, [-2, 27315]),
    cbor2.CBORTag(5, [2**63 - 1, 3]),  # a bigfloat cbor2 would compute as 3 * 2**(2**63-1)
    cbor2.CBORTag(30, [1, 3]),
    cbor2.CBORTag(35, "(a+)+$"),
    cbor2.CBORTag(37, b"\0" * 16),
    cbor2.CBORTag(258, [1, 2]),
    cbor2.CBORTag(55799, {}),
]


@pytest.mark.parametrize("value", FOREIGN_TAGS, ids=lambda tag: f"tag{tag.tag}")
def test_tags_cbor2_would_interpret_are_refused(value: cbor2.CBORTag) -> None:
    invalid(cbor2.dumps({"x": value}), f"tensor 'x' must be tag 40 .*, not tag {value.tag}$")
    # deeper in, a tag around an array also exceeds the format's nesting depth: refused either way
    invalid(
        cbor2.dumps({"x": tensor([3], value)}),
        f"(tensor 'x': data must be .*, not tag {value.tag}$)|(nesting depth)",
    )


def test_shared_reference_cycle_is_refused() -> None:
    # {"x": tag28([tag29(0)])}: a list containing itself, if cbor2 were allowed to resolve it
    invalid(bytes.fromhex("a16178d81c81d81d00"), "not tag 28")


def test_non_bytes_input() -> None:
    invalid("text", "do not decode as CBOR")  # type: ignore[arg-type]


# --- hostile input, generated -------------------------------------------------------------------
def decodes_or_refuses(data: bytes) -> None:
    try:
        tensors = decode_tensors(data, max_tensor_bytes=1 << 20)
    except InvalidTensor:  # TensorTooLarge included
        return
    assert isinstance(tensors, dict)
    for name, array in tensors.items():
        assert isinstance(name, str) and name
        assert isinstance(array, np.ndarray)


VALID = [
    encode_tensors({"x": np.arange(6, dtype=np.float32).reshape(2, 3)}),
    encode_tensors({"ids": np.array([[1, 2, 3]], dtype=np.int64), "mask": np.array([[True, False, True]])}),
    encode_tensors({"t": np.array(["ab", "cdé"], dtype=object), "s": np.array(1.5)}),
    encode_tensors({"e": np.zeros((0, 4), dtype=np.int8)}),
]


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=256))
def test_random_bytes(data: bytes) -> None:
    decodes_or_refuses(data)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(VALID),
    st.lists(
        st.tuples(
            st.sampled_from(["flip", "set", "cut", "insert", "delete"]),
            st.integers(0, 2**16),
            st.binary(min_size=1, max_size=9),
        ),
        min_size=1,
        max_size=4,
    ),
)
def test_mutated_valid_encodings(base: bytes, edits: list[tuple[str, int, bytes]]) -> None:
    data = bytearray(base)
    for op, where, blob in edits:
        i = where % (len(data) + 1)
        if op == "flip" and i < len(data):
            data[i] ^= blob[0] or 1
        elif op == "set" and i < len(data):
            data[i] = blob[0]
        elif op == "cut":
            del data[i:]
        elif op == "insert":
            data[i:i] = blob
        elif op == "delete":
            del data[i : i + len(blob)]
    decodes_or_refuses(bytes(data))


cbor_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**64), 2**64 - 1)
    | st.floats()
    | st.text(max_size=8)
    | st.binary(max_size=24),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.text(max_size=4) | st.binary(max_size=4), children, max_size=3)
        | st.builds(
            cbor2.CBORTag,
            st.sampled_from(
                [0, 1, 2, 3, 4, 5, 25, 28, 29, 30, 35, 37, 40, 64, 65, 72, 84, 85, 86, 256, 258, 55799]
            )
            | st.integers(0, 2**64 - 1),
            children,
        )
    ),
    max_leaves=12,
)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cbor_values)
def test_arbitrary_cbor(value: object) -> None:
    try:
        data = cbor2.dumps(value)
    except Exception:  # cbor2 cannot write every structure (e.g. a tag 2 around a text)
        return
    decodes_or_refuses(data)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.dictionaries(
        st.text(min_size=1, max_size=4),
        st.builds(
            tensor,
            st.lists(st.integers(0, 2**64 - 1) | st.booleans() | st.integers(-5, -1), max_size=5),
            st.builds(cbor2.CBORTag, st.integers(60, 90), st.binary(max_size=64))
            | st.lists(st.text(max_size=3) | st.integers(), max_size=5),
        ),
        max_size=3,
    )
)
def test_near_valid_structures(value: dict[str, cbor2.CBORTag]) -> None:
    decodes_or_refuses(cbor2.dumps(value))


# --- JSON form ----------------------------------------------------------------------------------
def test_json_round_trip() -> None:
    tensors: dict[str, np.ndarray] = {
        "f": np.arange(6, dtype=np.float32).reshape(1, 2, 3),
        "i": np.array([[-1, 2**62]], dtype=np.int64),
        "u": np.array([255], dtype=np.uint8),
        "b": np.array([True, False]),
        "s": np.array([["a", "b"]], dtype=object),
        "h": np.array(1.5, dtype=np.float16),
        "z": np.zeros((0, 3), dtype=np.int32),
    }
    json_form = tensors_to_json(tensors)
    assert json_form["f"] == {"dtype": "float32", "shape": [1, 2, 3], "data": [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]}
    assert json_form["s"] == {"dtype": "string", "shape": [1, 2], "data": ["a", "b"]}
    back = tensors_from_json(json_form)
    for name, array in tensors.items():
        assert back[name].dtype == array.dtype and back[name].shape == array.shape
        assert back[name].tolist() == array.tolist()


def test_json_nested_data_without_shape() -> None:
    x = tensors_from_json({"x": {"dtype": "float32", "data": [[1, 2], [3, 4]]}})["x"]
    assert x.shape == (2, 2) and x.dtype == np.float32


@pytest.mark.parametrize(
    ("obj", "match"),
    [
        ([1], "must be a JSON object of name to tensor, not an array"),
        ({"x": [1, 2]}, "tensor 'x' must be an object with dtype, shape and data"),
        ({"x": {"dtype": "float32", "data": [1], "extra": 1}}, r"tensor 'x' has unknown keys \['extra'\]"),
        ({"x": {"dtype": "complex64", "data": [1]}}, "tensor 'x' has dtype 'complex64'; supported: bool"),
        ({"x": {"dtype": "float32"}}, "tensor 'x' has no data"),
        ({"x": {"dtype": "float32", "data": ["1.5"]}}, "tensor 'x' of dtype float32 must hold numbers only"),
        ({"x": {"dtype": "int8", "data": [1.5]}}, "tensor 'x' of dtype int8 must hold integers only"),
        ({"x": {"dtype": "int8", "data": [300]}}, "tensor 'x': values do not fit int8"),
        ({"x": {"dtype": "uint8", "data": [-1]}}, "tensor 'x': values do not fit uint8"),
        ({"x": {"dtype": "float32", "data": [1e39]}}, "tensor 'x': values do not fit float32"),
        (
            {"x": {"dtype": "bool", "data": [1, 0]}},
            "tensor 'x' of dtype bool must hold true/false values only",
        ),
        ({"x": {"dtype": "string", "data": [1]}}, "tensor 'x' of dtype string must hold strings only"),
        ({"x": {"dtype": "float32", "data": [[1], [1, 2]]}}, "tensor 'x': data is not a rectangular array"),
        (
            {"x": {"dtype": "float32", "shape": [3], "data": [1, 2]}},
            r"tensor 'x' has 2 values; shape \[3\] needs 3",
        ),
        (
            {"x": {"dtype": "float32", "shape": [-1], "data": [1]}},
            "shape must be a list of non-negative integers",
        ),
        ({"x": {"dtype": "float32", "shape": [0, 2**62], "data": []}}, "which are too large"),
        ({"": {"dtype": "float32", "data": [1]}}, "non-empty strings"),
    ],
)
def test_json_refusals(obj: object, match: str) -> None:
    with pytest.raises(InvalidTensor, match=match):
        tensors_from_json(obj)


def test_json_has_no_form_for_complex() -> None:
    with pytest.raises(InvalidTensor, match="has dtype complex128, which has no JSON form"):
        tensors_to_json({"c": np.zeros(1, dtype=np.complex128)})


def test_every_tag_cbor2_interprets_is_disabled() -> None:
    """The codec (and `parsing.loads_cbor`) disable cbor2's built-in tags by number; a cbor2
    upgrade that adds one fails here."""
    from wasminfer.parsing import CBOR2_INTERPRETED_TAGS

    def interpreted(tag: int) -> bool:
        seen: list[int] = []

        def hook(t: cbor2.CBORTag, _immutable: bool) -> cbor2.CBORTag:
            seen.append(t.tag)
            return t

        for value in (0, b"\0" * 4, [0, 0]):
            try:
                cbor2.loads(cbor2.dumps(cbor2.CBORTag(tag, value)), tag_hook=hook)
            except cbor2.CBORDecodeError:
                pass
            if not seen:
                return True
            seen.clear()
        return False

    candidates = [*range(70000), 2**32 - 1, 2**32, 2**63, 2**64 - 1]
    assert [tag for tag in candidates if interpreted(tag)] == list(CBOR2_INTERPRETED_TAGS)
