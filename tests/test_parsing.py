"""Bounded parsing (`wasminfer.parsing`) and every HTTP entry point that parses untrusted bytes with
it: batch bodies (JSON Lines, CBOR), job outputs, multipart manifests, model options; and names with
a trailing newline at each entry point. Limits come in pairs: at the limit accepted, past it refused.

The last test is a real server: a CBOR bomb (decimal fractions of big bignums, seconds of cbor2's
default decoding under the GIL before) is refused while `/healthz` keeps answering.
"""

from __future__ import annotations

import json
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cbor2
import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from starlette.testclient import TestClient

from live_server import live_server
from wasminfer.errors import BadRequest, InvalidManifest
from wasminfer.gateway import create_app
from wasminfer.jobs import JobSettings
from wasminfer.jobs.items import MAX_ITEM_DEPTH, output_fields, parse_bulk
from wasminfer.parsing import (
    CBOR2_INTERPRETED_TAGS,
    Limits,
    cbor_array,
    loads_cbor,
    loads_json,
    scan_cbor,
)
from wasminfer.service import Platform

WASM = {"content-type": "application/wasm"}
ONNX = {"content-type": "application/octet-stream"}
CBOR = {"content-type": "application/cbor"}
JSONL = {"content-type": "application/jsonl"}
RFC_8746 = frozenset({40, 41, 1040, *range(64, 88)})
ROOMY = Limits(max_bytes=1 << 30, max_depth=100, max_values=1 << 30)


def refused(fn: Any, *args: Any, expect: type[BadRequest] = BadRequest, **kwargs: Any) -> str:
    with pytest.raises(expect) as info:
        fn(*args, **kwargs)
    assert type(info.value) is expect
    return info.value.message


def nested_json(depth: int) -> str:
    return "[" * depth + "1" + "]" * depth


def nested_cbor(depth: int, inner: bytes = b"\x01") -> bytes:
    return b"\x81" * depth + inner  # depth arrays of one element each


# --- JSON ---------------------------------------------------------------------------------------
def test_json_depth_at_the_limit_is_accepted_and_one_more_is_refused() -> None:
    limits = Limits(max_bytes=1000, max_depth=5, max_values=1000)
    assert loads_json(nested_json(5), "doc", limits) == [[[[[1]]]]]
    assert loads_json('{"a": {"b": [[{"c": 1}]]}}', "doc", limits) == {"a": {"b": [[{"c": 1}]]}}
    assert refused(loads_json, nested_json(6), "doc", limits) == (
        "doc nests arrays and objects deeper than 5 levels"
    )
    assert "deeper than 5" in refused(loads_json, '{"a": {"b": [[{"c": [1]}]]}}', "doc", limits)
    # Many containers side by side are not deep.
    assert loads_json("[" + ",".join(["[[[[1]]]]"] * 50) + "]", "doc", limits)[49] == [[[[1]]]]


def test_json_nested_past_pythons_recursion_is_refused_not_a_recursion_error() -> None:
    message = refused(loads_json, b"[" * 100_000, "line 1 of the batch", ROOMY)
    assert message == "line 1 of the batch nests arrays and objects deeper than 100 levels"


def test_json_values_at_the_limit_are_accepted_and_one_more_is_refused() -> None:
    limits = Limits(max_bytes=1000, max_depth=5, max_values=10)
    # The bound is commas + opening brackets + 1: [1..9] has 8 commas and one bracket.
    assert loads_json(json.dumps(list(range(1, 10))), "doc", limits) == list(range(1, 10))
    message = refused(loads_json, json.dumps(list(range(1, 11))), "doc", limits)
    assert message == (
        "doc may hold up to 11 values (commas and brackets, counted also inside strings); "
        "at most 10 are accepted"
    )


def test_json_size_at_the_limit_is_accepted_and_one_more_byte_is_refused() -> None:
    limits = Limits(max_bytes=7, max_depth=5, max_values=10)
    assert loads_json(b'"abcde"', "doc", limits) == "abcde"
    assert refused(loads_json, b'"abcdef"', "doc", limits) == "doc is 8 bytes long; at most 7 are accepted"


@pytest.mark.parametrize(
    ("text", "fragment"),
    [("NaN", "NaN is not JSON"), ("[1, Infinity]", "Infinity is not JSON"), ("{oops", "Expecting property"),
     (b"\xff\xfe\xfd", "is not JSON")],
)
def test_not_json_is_refused_with_the_callers_error(text: str | bytes, fragment: str) -> None:
    message = refused(loads_json, text, "the 'manifest' part", ROOMY, error=InvalidManifest,
                      expect=InvalidManifest)
    assert message.startswith("the 'manifest' part is not JSON") and fragment in message


# --- CBOR ---------------------------------------------------------------------------------------
def test_cbor_depth_at_the_limit_is_accepted_and_one_more_is_refused() -> None:
    limits = Limits(max_bytes=1000, max_depth=3, max_values=1000)
    assert loads_cbor(nested_cbor(3), "body", limits) == [[[1]]]
    assert refused(loads_cbor, nested_cbor(4), "body", limits) == (
        "body nests CBOR arrays, maps and tags deeper than 3 levels"
    )
    # A tag is a level: 40([[1], 85(h'')]) nests tag, array, then array or tag: 3.
    tensor = cbor2.dumps(cbor2.CBORTag(40, [[0], cbor2.CBORTag(85, b"")]))
    assert loads_cbor(tensor, "body", limits, RFC_8746).tag == 40
    assert "deeper than 3" in refused(loads_cbor, b"\x81" + tensor, "body", limits, RFC_8746)


def test_cbor_far_too_deep_is_refused_without_recursion() -> None:
    assert "deeper than 100 levels" in refused(scan_cbor, nested_cbor(1_000_000), "body", ROOMY, ())


def test_cbor_values_at_the_limit_are_accepted_and_one_more_is_refused() -> None:
    limits = Limits(max_bytes=1000, max_depth=3, max_values=10)
    assert loads_cbor(cbor2.dumps(list(range(9))), "body", limits) == list(range(9))  # 9 + the array
    assert refused(loads_cbor, cbor2.dumps(list(range(10))), "body", limits) == (
        "body holds more than 10 values; at most 10 are accepted"
    )


def test_cbor_size_at_the_limit_is_accepted_and_one_more_byte_is_refused() -> None:
    limits = Limits(max_bytes=4, max_depth=3, max_values=10)
    assert loads_cbor(b"\x43abc", "body", limits) == b"abc"
    assert refused(loads_cbor, b"\x44abcd", "body", limits) == "body is 5 bytes long; at most 4 are accepted"


@pytest.mark.parametrize("tag", CBOR2_INTERPRETED_TAGS)
def test_every_tag_cbor2_would_interpret_is_refused_by_number(tag: int) -> None:
    data = cbor2.dumps([cbor2.CBORTag(tag, 0)])
    message = refused(loads_cbor, data, "the CBOR batch", ROOMY, RFC_8746)
    assert message == (
        f"the CBOR batch: CBOR tag {tag} is not accepted here (accepted: 40-41, 64-87, 1040)"
    )


def test_a_cyclic_shared_reference_is_refused() -> None:
    cyclic = b"\x81\xd8\x1c\x81\xd8\x1d\x00"  # [28([29(0)])]: a list that holds itself
    assert "CBOR tag 28 is not accepted" in refused(loads_cbor, cyclic, "body", ROOMY, RFC_8746)
    assert "CBOR tag 28 is not accepted" in refused(cbor_array, cyclic, "body", ROOMY, RFC_8746)


def test_rfc_8746_tags_come_back_as_tags() -> None:
    value = [cbor2.CBORTag(40, [[2], cbor2.CBORTag(85, b"\0" * 8)]), cbor2.CBORTag(1040, [[1], [b"x"]])]
    decoded = loads_cbor(cbor2.dumps(value), "body", ROOMY, RFC_8746)
    assert [type(v) for v in decoded] == [cbor2.CBORTag] * 2 and cbor2.dumps(decoded) == cbor2.dumps(value)
    assert "tag 999 is not accepted here (accepted: none)" in refused(
        loads_cbor, cbor2.dumps(cbor2.CBORTag(999, 1)), "body", ROOMY
    )
    with pytest.raises(ValueError, match=r"tags \[2\] would be interpreted by cbor2"):
        loads_cbor(b"\x01", "body", ROOMY, {2, 40})


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "body is not well-formed CBOR: it ends in the middle of a value"),
        (b"\x82\x01", "body is not well-formed CBOR: it ends in the middle of a value"),
        (b"\x19\x01", "body is not well-formed CBOR: it ends in the middle of a value"),
        (b"\x45abc", "body is not well-formed CBOR: a string runs past the end"),
        (b"\x01\x02", "body has 1 unexpected bytes after its first CBOR value"),
        (b"\x9f\x01\xff", "body: indefinite-length strings, arrays and maps are not accepted"),
        (b"\x7f\x61a\xff", "body: indefinite-length strings, arrays and maps are not accepted"),
        (b"\x1c", "body is not well-formed CBOR: byte 0x1c at offset 0"),
        (b"\xff", "body is not well-formed CBOR: byte 0xff at offset 0"),
        (b"\xf8\x10", "body is not well-formed CBOR: simple value 16 in two bytes"),
        (b"\x81\x62\xc3\x28", "body has a text string that is not UTF-8 at offset 2"),
        (b"\xa2\x61a\x01\x61a\x02", "body is not well-formed CBOR: "),  # duplicate key: cbor2 refuses
    ],
)
def test_malformed_cbor_is_refused_by_name(data: bytes, message: str) -> None:
    assert refused(loads_cbor, data, "body", ROOMY).startswith(message)


_cbor_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**64), 2**64 - 1) | st.floats() | st.text() | st.binary(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=4)
    | st.builds(cbor2.CBORTag, st.sampled_from(sorted(RFC_8746)), inner),
    max_leaves=20,
)


@settings(max_examples=200, deadline=None, database=None)
@given(items=st.lists(_cbor_values, max_size=6))
def test_cbor_array_finds_each_element_as_cbor2_encodes_it(items: list[Any]) -> None:
    data = cbor2.dumps(items)
    offsets = cbor_array(data, "body", ROOMY, RFC_8746)
    assert [data[a:b] for a, b in zip(offsets, offsets[1:], strict=False)] == [cbor2.dumps(i) for i in items]


# --- batch bodies ---------------------------------------------------------------------------------
def test_cbor_batch_items_pass_through_as_sent() -> None:
    tensor = cbor2.dumps({"x": cbor2.CBORTag(40, [[1, 2], cbor2.CBORTag(85, b"\0" * 8)])})
    # A head longer than needed is legal CBOR: the item is sent with it, not re-encoded.
    long_head = b"\x18\x05"
    body = b"\x84" + cbor2.dumps(b"e1") + cbor2.dumps("t\u00e9") + tensor + long_head
    items = parse_bulk(body, "application/cbor", 10, "image/png")
    assert items == [(b"e1", "image/png"), ("t\u00e9".encode(), "text/plain; charset=utf-8"),
                     (tensor, "application/cbor"), (long_head, "application/cbor")]


def test_cbor_batch_declaring_too_many_items_is_413_before_it_is_walked() -> None:
    from wasminfer.errors import PayloadTooLarge

    body = b"\x9a" + struct.pack(">I", 11) + b"\x00"  # 11 items declared, one present
    message = refused(parse_bulk, body, "application/cbor", 10, expect=PayloadTooLarge)
    assert message == "a batch may have at most 10 items; split it into several batches"


def test_a_json_output_past_the_limits_of_a_line_comes_back_as_base64() -> None:
    inside = nested_json(MAX_ITEM_DEPTH).encode()
    assert output_fields("application/json", inside) == {"output": json.loads(inside)}
    deep = nested_json(5000).encode()  # json.loads: RecursionError, which used to escape
    assert set(output_fields("application/json", deep)) == {"output_b64"}
    assert set(output_fields("application/json", b"[NaN]")) == {"output_b64"}


@pytest.fixture
def client(tmp_path: Path, add_model: bytes, hostile_wasm: bytes) -> Iterator[TestClient]:
    """A server that accepts jobs and runs none; model `add` and function `hostile` deployed."""
    platform = Platform(tmp_path / "data")
    try:
        app = create_app(platform, job_settings=JobSettings(workers=0))
        with TestClient(app, raise_server_exceptions=False) as c:
            for _ in range(500):
                if c.get("/readyz").status_code == 200:
                    break
                time.sleep(0.01)
            assert c.put("/v1/models/add", content=add_model, headers=ONNX).status_code == 201
            r = c.put("/v1/functions/hostile?models=add&memory_mb=4", content=hostile_wasm, headers=WASM)
            assert r.status_code == 201, r.text
            yield c
    finally:
        platform.close()


def error(r: httpx.Response, status: int, code: str) -> str:
    assert r.status_code == status, (r.status_code, r.text)
    assert r.json()["error"]["code"] == code, r.json()
    message: str = r.json()["error"]["message"]
    return message


def batch(client: TestClient, body: bytes, headers: dict[str, str]) -> httpx.Response:
    return client.post("/v1/functions/hostile/batch", content=body, headers=headers)


def no_jobs(client: TestClient) -> bool:
    jobs: list[Any] = client.get("/v1/jobs").json()["jobs"]
    return jobs == []


def test_a_cbor_batch_of_bignums_and_decimal_fractions_is_400_naming_the_tag(client: TestClient) -> None:
    mantissa = cbor2.CBORTag(2, b"\xff" * 1000)
    assert "CBOR tag 4 is not accepted" in error(
        batch(client, cbor2.dumps([b"e", cbor2.CBORTag(4, [0, mantissa])]), CBOR), 400, "bad_request"
    )
    bignums = batch(client, cbor2.dumps([mantissa]), CBOR)
    assert "CBOR tag 2 is not accepted" in error(bignums, 400, "bad_request")
    assert no_jobs(client)


def test_a_cbor_batch_with_a_cyclic_shared_reference_is_400(client: TestClient) -> None:
    message = error(batch(client, b"\x81\xd8\x1c\x81\xd8\x1d\x00", CBOR), 400, "bad_request")
    assert message == "the CBOR batch: CBOR tag 28 is not accepted here (accepted: 40-41, 64-87, 1040)"
    assert no_jobs(client)


def test_a_cbor_batch_item_nested_at_the_limit_is_accepted_and_one_more_is_400(client: TestClient) -> None:
    ok = batch(client, b"\x82\x42e1" + nested_cbor(MAX_ITEM_DEPTH), CBOR)
    assert ok.status_code == 202 and ok.json()["items"]["total"] == 2
    deep = batch(client, b"\x82\x42e1" + nested_cbor(MAX_ITEM_DEPTH + 1), CBOR)
    assert error(deep, 400, "bad_request") == (
        f"the CBOR batch nests CBOR arrays, maps and tags deeper than {MAX_ITEM_DEPTH + 1} levels"
    )


def test_a_json_lines_item_nested_at_the_limit_is_accepted_and_deeper_is_400(client: TestClient) -> None:
    ok = batch(client, b'"e"\n' + nested_json(MAX_ITEM_DEPTH).encode() + b"\n", JSONL)
    assert ok.status_code == 202 and ok.json()["items"]["total"] == 2
    for depth in (MAX_ITEM_DEPTH + 1, 100_000):  # the second was a RecursionError: a 500
        r = batch(client, b'"e"\n' + nested_json(depth).encode() + b"\n", JSONL)
        assert error(r, 400, "bad_request") == (
            f"line 2 of the batch nests arrays and objects deeper than {MAX_ITEM_DEPTH} levels"
        )
    assert error(batch(client, b"[NaN]\n", JSONL), 400, "bad_request") == (
        "line 1 of the batch is not JSON: NaN is not JSON"
    )
    assert len(client.get("/v1/jobs").json()["jobs"]) == 1


# --- manifests, model options ---------------------------------------------------------------------
def put_multipart(client: TestClient, wasm: bytes, manifest: str, name: str = "multi") -> httpx.Response:
    return client.put(f"/v1/functions/{name}",
                      files={"wasm": ("f.wasm", wasm, "application/wasm"), "manifest": (None, manifest)})


def test_a_manifest_part_nested_past_its_limit_is_400(client: TestClient, hostile_wasm: bytes) -> None:
    # Depth 4 parses (and is then refused by the manifest's own check); 5 is refused by the parser.
    at_limit = put_multipart(client, hostile_wasm, '{"env": {"A": [["x"]]}}')
    assert "manifest key 'env' has an invalid entry 'A'" in error(at_limit, 400, "invalid_manifest")
    deep = put_multipart(client, hostile_wasm, '{"env": {"A": [[["x"]]]}}')
    assert error(deep, 400, "invalid_manifest") == (
        "the 'manifest' part nests arrays and objects deeper than 4 levels"
    )
    far = put_multipart(client, hostile_wasm, "[" * 50_000)
    assert "deeper than 4 levels" in error(far, 400, "invalid_manifest")
    assert put_multipart(client, hostile_wasm, '{"env": {"A": "x"}}').status_code == 201


def test_model_options_nested_past_their_limit_are_400(client: TestClient) -> None:
    patch = {"content-type": "application/json"}
    listed = client.patch("/v1/models/add", content=b'{"max_batch_size": [1]}', headers=patch)
    assert "must be an integer or null" in error(listed, 400, "bad_request")
    deep = client.patch("/v1/models/add", content=b'{"max_batch_size": [[1]]}', headers=patch)
    assert error(deep, 400, "bad_request") == "the body nests arrays and objects deeper than 2 levels"
    many = client.patch("/v1/models/add", content=b'{"max_batch_size": 4}' + b" " * 10 + b"," * 300,
                        headers=patch)
    assert "at most 256 are accepted" in error(many, 400, "bad_request")
    assert client.patch("/v1/models/add", content=b'{"max_batch_size": 4}', headers=patch).status_code == 200


# --- names with a trailing newline ----------------------------------------------------------------
def test_a_function_name_with_a_trailing_newline_is_400(client: TestClient, hostile_wasm: bytes) -> None:
    put = client.put("/v1/functions/fn%0A", content=hostile_wasm, headers=WASM)
    assert error(put, 400, "invalid_name").startswith("invalid function name 'fn\\n'")
    assert error(client.get("/v1/functions/hostile%0A"), 400, "invalid_name").startswith(
        "invalid function name 'hostile\\n'")
    # The invoke path looks the name up without checking it: nothing by that name can exist.
    assert error(client.post("/v1/functions/hostile%0A/invoke", content=b"e"), 404, "function_not_found")
    assert client.put("/v1/functions/fn", content=hostile_wasm, headers=WASM).status_code == 201


def test_a_model_name_with_a_trailing_newline_is_400(client: TestClient, add_model: bytes) -> None:
    assert error(client.put("/v1/models/add2%0A", content=add_model, headers=ONNX), 400, "invalid_name") == (
        "invalid model name 'add2\\n': use 1-64 characters of a-z, 0-9, '-', '_', '.', "
        "starting with a letter or digit"
    )
    assert error(client.get("/v1/models/add%0A"), 400, "invalid_name").startswith("invalid model name")
    assert client.put("/v1/models/add2", content=add_model, headers=ONNX).status_code == 201


def test_a_model_name_in_a_manifest_with_a_trailing_newline_is_400(
    client: TestClient, hostile_wasm: bytes
) -> None:
    query = client.put("/v1/functions/f?models=add%0A", content=hostile_wasm, headers=WASM)
    assert error(query, 400, "invalid_manifest") == "manifest key 'models' has an invalid model name 'add\\n'"
    part = put_multipart(client, hostile_wasm, '{"models": ["add\\n"]}')
    assert error(part, 400, "invalid_manifest") == "manifest key 'models' has an invalid model name 'add\\n'"
    env = put_multipart(client, hostile_wasm, '{"env": {"A\\n": "1"}}')
    assert error(env, 400, "invalid_manifest") == "manifest key 'env' has an invalid entry 'A\\n'"
    ctype = put_multipart(client, hostile_wasm, '{"content_type": "text/plain\\n"}')
    assert "manifest key 'content_type' must be a media type" in error(ctype, 400, "invalid_manifest")
    assert error(client.get("/v1/functions/f"), 404, "function_not_found")
    ok = client.put("/v1/functions/f?models=add", content=hostile_wasm, headers=WASM)
    assert ok.status_code == 201 and ok.json()["manifest"]["models"] == ["add"]


# --- a real server --------------------------------------------------------------------------------
def decimal_bomb(size: int) -> bytes:
    """A CBOR array of decimal fractions whose mantissas are 50 KB bignums: cbor2's default decoder
    turns each into a `Decimal`, quadratic in its digits (~0.5 s each here, holding the GIL)."""
    one = cbor2.dumps(cbor2.CBORTag(4, [-2, cbor2.CBORTag(2, b"\x7f" * 50_000)]))
    n = size // len(one)
    return cbor2.dumps([None] * n)[:-n] + one * n  # the array's head, then the items


@pytest.mark.integration
@pytest.mark.serial
def test_a_cbor_bomb_is_refused_while_healthz_keeps_answering(tmp_path: Path, hostile_wasm: bytes) -> None:
    bomb = decimal_bomb(500_000)
    assert len(bomb) > 450_000
    with live_server(tmp_path / "data", tmp_path / "server.log") as (url, _):
        put = httpx.put(f"{url}/v1/functions/hostile", content=hostile_wasm, headers=WASM, timeout=60)
        assert put.status_code == 201, put.text
        answers: list[tuple[int, str, float]] = []

        def send_bombs() -> None:
            with httpx.Client(timeout=60) as http:
                for _ in range(5):
                    t = time.perf_counter()
                    r = http.post(f"{url}/v1/functions/hostile/batch", content=bomb, headers=CBOR)
                    answers.append((r.status_code, r.text, time.perf_counter() - t))

        senders = [threading.Thread(target=send_bombs) for _ in range(4)]
        for s in senders:
            s.start()
        worst = 0.0
        with httpx.Client(timeout=30) as http:
            while any(s.is_alive() for s in senders):
                t = time.perf_counter()
                assert http.get(f"{url}/healthz").status_code == 200
                worst = max(worst, time.perf_counter() - t)
        for s in senders:
            s.join()
        assert len(answers) == 20
        for status, text, took in answers:
            assert status == 400 and json.loads(text)["error"] == {
                "code": "bad_request",
                "message": "the CBOR batch: CBOR tag 4 is not accepted here (accepted: 40-41, 64-87, 1040)",
            }
            assert took < 5.0, answers  # was ~5 s of the server's GIL per bomb before
        assert worst < 1.0, worst
        assert httpx.get(f"{url}/v1/jobs").json()["jobs"] == []
