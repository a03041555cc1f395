"""Streamed invocations through the gateway in-process (Starlette's TestClient, real guests): the
chunked and SSE framing, the final `output` as the last part, limits that end a stream with an error
event, errors before the first part as plain JSON errors, the time-to-first-byte histogram.
(A client that disconnects, over a real server: tests/test_streaming_live.py.)"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from starlette.testclient import TestClient

from wasminfer.gateway import create_app
from wasminfer.gateway.streaming import sse_event
from wasminfer.runtime import Host, OutputStream
from wasminfer.service import Platform

WASM = {"content-type": "application/wasm"}
SSE = {"accept": "text/event-stream"}


def parse_sse(raw: bytes) -> list[tuple[str, str]]:
    """(event, data) of each event of an SSE body (a `message` event when it names none)."""
    events = []
    for block in raw.decode().split("\n\n"):
        if not block:
            continue
        event, data = "message", []
        for line in block.split("\n"):
            field, _, value = line.partition(": ")
            if field == "event":
                event = value
            elif field == "data":
                data.append(value)
        events.append((event, "\n".join(data)))
    return events


@pytest.fixture
def client(tmp_path: Path, build_guest: Callable[..., bytes]) -> Iterator[TestClient]:
    platform = Platform(tmp_path / "data")
    with TestClient(create_app(platform), raise_server_exceptions=False) as c:
        for _ in range(200):
            if c.get("/readyz").status_code == 200:
                break
            time.sleep(0.01)
        wasm = build_guest("stream_parts.c")
        r = c.put("/v1/functions/parts?max_output_bytes=200&timeout_ms=1000", content=wasm, headers=WASM)
        assert r.status_code == 201, r.text
        yield c
    platform.close()


def stream(client: TestClient, body: bytes, query: str = "?stream=1", **headers: str) -> httpx.Response:
    return client.post(f"/v1/functions/parts/invoke{query}", content=body, headers=headers)


def test_chunked_stream_sends_each_part_then_the_final_output(client: TestClient) -> None:
    with client.stream("POST", "/v1/functions/parts/invoke?stream=1", content=b"3 final") as r:
        assert r.status_code == 200
        assert r.headers["content-type"] == "text/plain; charset=utf-8"
        assert "content-length" not in r.headers  # uvicorn sends it chunked (test_streaming_live.py)
        assert r.headers["x-invocation-id"]
        assert r.read() == b"part 0\npart 1\npart 2\nfinal\n"


def test_the_same_function_without_streaming_answers_once_with_every_part(client: TestClient) -> None:
    r = stream(client, b"3 final", query="")
    assert r.status_code == 200
    assert r.content == b"part 0\npart 1\npart 2\nfinal\n"
    assert r.headers["content-length"] == str(len(r.content))


def test_sse_sends_one_event_per_part_and_an_end_event(client: TestClient) -> None:
    r = stream(client, b"2", query="", **SSE)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    events = parse_sse(r.content)
    # "part 0\n" is two lines: "part 0" and "" (SSE joins a message's data lines with \n)
    assert events[:2] == [("message", "part 0\n"), ("message", "part 1\n")]
    assert events[2][0] == "end"
    end = json.loads(events[2][1])
    assert end == {"invocation_id": r.headers["x-invocation-id"], "bytes": 14}
    assert len(events) == 3


def test_sse_event_splits_every_line_break() -> None:
    assert sse_event(b"a\r\nb\rc\nd") == b"data: a\ndata: b\ndata: c\ndata: d\n\n"
    assert sse_event(b"{}", "error") == b"event: error\ndata: {}\n\n"


def test_output_limit_obeyed_streams_to_the_end(client: TestClient) -> None:
    r = stream(client, b"20")  # 20 parts of 7-8 bytes: 150 bytes, the limit is 200
    assert r.status_code == 200
    assert r.content.count(b"part") == 20 and b"error" not in r.content


def test_output_limit_violated_ends_the_chunked_stream_with_an_error_line(client: TestClient) -> None:
    r = stream(client, b"forever")
    assert r.status_code == 200  # the first parts were sent before the limit
    body, _, last = r.content.rstrip(b"\n").rpartition(b"\n")
    assert len(body) <= 200 and body.startswith(b"part 0\npart 1\n")
    error = json.loads(last)["error"]
    assert error["code"] == "output_limit_exceeded" and error["status"] == 500
    assert "max_output_bytes" in error["message"]


def test_output_limit_violated_ends_the_sse_stream_with_an_error_event(client: TestClient) -> None:
    r = stream(client, b"forever", query="", **SSE)
    events = parse_sse(r.content)
    assert events[0] == ("message", "part 0\n")
    assert events[-1][0] == "error" and all(e == "message" for e, _ in events[:-1])
    assert json.loads(events[-1][1])["error"]["code"] == "output_limit_exceeded"


def test_timeout_bounds_the_whole_stream_and_ends_it_with_an_error_event(
    client: TestClient, build_guest: Callable[..., bytes]
) -> None:
    r = client.put("/v1/functions/slow?max_output_bytes=100000000&timeout_ms=300",
                   content=build_guest("stream_parts.c"), headers=WASM)
    assert r.status_code == 201, r.text
    r = client.post("/v1/functions/slow/invoke", content=b"forever", headers=SSE)
    events = parse_sse(r.content)
    assert len(events) > 2 and events[0] == ("message", "part 0\n")
    assert events[-1][0] == "error"
    error = json.loads(events[-1][1])["error"]
    assert error["code"] == "timeout" and error["status"] == 504 and "timeout_ms" in error["message"]


def test_a_failure_after_the_first_part_is_an_error_event(client: TestClient) -> None:
    events = parse_sse(stream(client, b"fail 2", query="", **SSE).content)
    assert [e for e, _ in events] == ["message", "message", "error"]
    error = json.loads(events[-1][1])["error"]
    assert error == {"code": "guest_error", "message": "gave up", "status": 500}


def test_a_failure_before_the_first_part_is_a_plain_json_error(client: TestClient) -> None:
    r = stream(client, b"fail 0", query="", **SSE)
    assert r.status_code == 500
    assert r.json() == {"error": {"code": "guest_error", "message": "gave up"}}
    r = client.post("/v1/functions/nope/invoke?stream=1", content=b"1")
    assert r.status_code == 404 and r.json()["error"]["code"] == "function_not_found"


def test_a_stream_cannot_be_a_job(client: TestClient) -> None:
    r = stream(client, b"1", query="?stream=1&async=1")
    assert r.status_code == 400 and "cannot run as a job" in r.json()["error"]["message"]


def test_time_to_first_byte_is_its_own_histogram(client: TestClient) -> None:
    assert stream(client, b"2").status_code == 200
    metrics = client.get("/metrics").text
    line = [x for x in metrics.splitlines()
            if x.startswith("wasminfer_stream_first_byte_seconds_count") and 'function="parts"' in x]
    assert line and float(line[0].rsplit(" ", 1)[1]) == 1.0


def test_a_cancelled_stream_stops_the_guest_at_its_next_part(build_guest: Callable[..., bytes]) -> None:
    with Host() as host:
        host.deploy_function("parts", build_guest("stream_parts.c"), {"timeout_ms": 10_000})
        seen: list[bytes] = []

        def deliver(chunk: bytes, _ctype: str) -> None:
            seen.append(chunk)
            if len(seen) == 5:
                out.cancel(RuntimeError("the client left"))

        out = OutputStream(deliver)
        with pytest.raises(Exception) as info:
            host.invoke("parts", b"forever", stream=out)
        assert type(info.value).__name__ == "InvocationCancelled"
        assert len(seen) == 5 and out.chunks == 5  # the 6th part trapped the guest



def test_client_invoke_stream_yields_the_parts_then_raises_the_error_event(
    tmp_path: Path, build_guest: Callable[..., bytes]
) -> None:
    """Over a real server: the parts as they come, the error event raised as its type; a stream
    left before its end (the error, a caller that stops reading) does not spoil the next call."""
    from live_server import app_server
    from wasminfer.client import Client
    from wasminfer.errors import FunctionNotFound, GuestError

    with Platform(tmp_path / "data") as platform:
        platform.start()
        with app_server(platform) as url, Client(url) as api:
            manifest = {"max_output_bytes": 200, "timeout_ms": 1000}
            api.put_function("parts", build_guest("stream_parts.c"), manifest)
            got: list[str] = []
            with pytest.raises(GuestError, match="gave up"):
                for part in api.invoke_stream("parts", b"fail 2"):
                    got.append(part)
            assert got == ["part 0\n", "part 1\n"]
            assert list(api.invoke_stream("parts", b"2 final")) == ["part 0\n", "part 1\n", "final\n"]
            stream = api.invoke_stream("parts", b"5 final")
            assert next(stream) == "part 0\n"
            stream.close()  # stopped reading after the first part
            assert list(api.invoke_stream("parts", b"1 final")) == ["part 0\n", "final\n"]
            with pytest.raises(FunctionNotFound, match="'nope' does not exist"):  # refused before streaming
                next(api.invoke_stream("nope", b"1"))
            assert list(api.invoke_stream("parts", b"0 final")) == ["final\n"]
