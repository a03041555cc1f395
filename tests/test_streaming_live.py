"""Streamed invocations over a real server (uvicorn on loopback): parts arrive as HTTP chunks while
the guest still runs, a client that disconnects stops the guest and frees its decoder state, and
`wasminfer invoke --stream` prints the parts."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from live_server import live_server, wasminfer
from wasminfer.examples import tiny_gpt_model

MANIFEST = "models=tiny-gpt&max_infer_calls=100000&timeout_ms=60000"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, build_guest: Callable[..., bytes]) -> Iterator[str]:
    data = tmp_path_factory.mktemp("stream-live")
    with live_server(data / "data", data / "server.log") as (url, _):
        # positions for every token "hold" steps through before the client leaves (no backpressure)
        r = httpx.put(f"{url}/v1/models/tiny-gpt", content=tiny_gpt_model(max_positions=1 << 16),
                      headers={"content-type": "application/octet-stream"}, timeout=60)
        assert r.status_code == 201, r.text
        r = httpx.put(f"{url}/v1/functions/probe?{MANIFEST}", content=build_guest("decoder_probe.c"),
                      headers={"content-type": "application/wasm"}, timeout=120)
        assert r.status_code == 201, r.text
        yield url


def decoders_bytes(url: str) -> int:
    return int(httpx.get(f"{url}/v1/scaling").json()["memory"]["tenant"]["decoders_bytes"])


def cancelled_lines(url: str) -> list[dict[str, object]]:
    lines = httpx.get(f"{url}/v1/functions/probe/logs").json()["lines"]
    return [x for x in lines if "invocation_cancelled" in str(x["message"])]


def test_parts_arrive_as_chunks_while_the_guest_runs(server: str) -> None:
    with httpx.stream("POST", f"{server}/v1/functions/probe/invoke?stream=1", content=b"greedy 30 Hi",
                      timeout=60) as r:
        assert r.status_code == 200 and r.headers["transfer-encoding"] == "chunked"
        parts = list(r.iter_raw())
    assert len(parts) == 30 and all(len(p) == 1 for p in parts)  # one chunk per token


def test_a_client_that_disconnects_stops_the_guest_and_frees_its_state(server: str) -> None:
    before = len(cancelled_lines(server))
    with httpx.stream("POST", f"{server}/v1/functions/probe/invoke", content=b"hold",
                      headers={"accept": "text/event-stream"}, timeout=60) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: handle=")
        for _ in range(20):  # the guest is stepping: its state is held
            next(lines)
        assert decoders_bytes(server) > 0
    deadline = time.monotonic() + 30
    while len(cancelled_lines(server)) == before:  # the guest ended when it wrote its next part
        assert time.monotonic() < deadline, "the guest kept running after the client left"
        time.sleep(0.02)
    assert "the client disconnected" in str(cancelled_lines(server)[-1]["message"])
    assert decoders_bytes(server) == 0


@pytest.mark.serial
def test_a_disconnect_stops_the_guest_within_50_ms_of_its_next_token(server: str) -> None:
    before = len(cancelled_lines(server))
    with httpx.stream("POST", f"{server}/v1/functions/probe/invoke?stream=1", content=b"hold",
                      timeout=60) as r:
        chunks = r.iter_raw()
        for _ in range(10):
            next(chunks)
        left = time.time()
    deadline = time.monotonic() + 10
    while len(cancelled_lines(server)) == before:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    ended = float(cancelled_lines(server)[-1]["ts"])  # type: ignore[arg-type]
    # a step of tiny-gpt takes well under a millisecond: the next token comes at once, and the
    # guest must end at it; generous bound for a loaded machine
    assert ended - left < 0.05 + 0.2


def test_cli_invoke_stream_prints_the_tokens(server: str, tmp_path: Path) -> None:
    out = wasminfer("invoke", "probe", "--stream", url=server, stdin=b"greedy 12 Hello")
    direct = httpx.post(f"{server}/v1/functions/probe/invoke", content=b"greedy 12 Hello", timeout=60)
    assert out.stdout == direct.text and len(out.stdout) == 12


def test_cli_invoke_stream_reports_an_error_event(server: str) -> None:
    out = wasminfer("invoke", "probe", "--stream", url=server, stdin=b"closed", status=1)
    assert "decoder_not_found" in out.stderr or "no decoder state" in out.stderr, out.stderr
