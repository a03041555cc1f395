"""The express lane (`gateway.express`, taken in `gateway.connections`): the same answers as the
general path, for every request the invoke route can get, and only the requests it may take.

Two real uvicorn servers on loopback, each in a thread of this process with its own platform and
data folder (so the lane's own count, `Express.served`, can be read): one with the lane, one with
`Settings(express=False)`; both run every eligible invocation inline (`inline="always"`), so the
only difference between them is the lane. Each case is sent to both over a raw socket; status,
headers (but the values that differ per request: the date, Server-Timing's figures, the
invocation id) and body must be the same, and the lane must have answered the request exactly when
it should: an invocation, yes, whether it runs inline or later on a thread (a function whose model
batches), and so an unknown function's 404; anything refused before the lane looks for the function
(no key, a wrong key, a body over the limit), anything that may be a job or a stream, and a body sent
in chunks, no (the general path answers).
Guests: tests/guests/hostile.wat, whose first body byte picks a behaviour.
"""

from __future__ import annotations

import contextlib
import re
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import uvicorn

from conftest import comparable_headers
from live_server import free_port
from wasminfer.gateway import Settings, create_app, guarded_protocol
from wasminfer.gateway.express import Express
from wasminfer.runtime.memory import MemorySettings
from wasminfer.service import Platform, parse_keys

pytestmark = pytest.mark.integration

KEYS = {"admin": "admin-secret", "reader": "reader-secret"}
MAX_BODY = 4096
BODY_TIMEOUT_S = 1.0
KEEP_ALIVE_S = 1


@dataclass
class Server:
    port: int
    express: Express
    platform: Platform

    def put(self, path: str, body: bytes, ctype: str) -> None:
        r = httpx.put(f"http://127.0.0.1:{self.port}{path}", content=body, timeout=60,
                      headers={"content-type": ctype, "authorization": f"Bearer {KEYS['admin']}"})
        assert r.status_code in (200, 201), r.text


@contextlib.contextmanager
def server(data: Path, express: bool) -> Iterator[Server]:
    """A uvicorn server as `wasminfer serve` makes it (the guarded protocol with its express lane),
    in a thread, on its own port."""
    keys = parse_keys(f"{KEYS['admin']}:admin,{KEYS['reader']}:read")
    platform = Platform(data, keys=keys, memory=MemorySettings(budget_mb=64, tenant_quota_mb=34))
    platform.start()
    settings = Settings(
        max_invoke_bytes=MAX_BODY, body_timeout_s=BODY_TIMEOUT_S, inline="always", express=express
    )
    app = create_app(platform, settings)
    lane = Express(app.state.wasminfer)
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", access_log=False,
                            http=guarded_protocol(settings, lane), lifespan="on",
                            timeout_keep_alive=KEEP_ALIVE_S)
    uv = uvicorn.Server(config)
    thread = threading.Thread(target=uv.run, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while not uv.started:
            assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.02)
        yield Server(port, lane, platform)
    finally:
        uv.should_exit = True
        thread.join(30)
        platform.close()


@pytest.fixture(scope="module")
def servers(
    tmp_path_factory: pytest.TempPathFactory, hostile_wasm: bytes, add_model: bytes
) -> Iterator[dict[str, Server]]:
    tmp = tmp_path_factory.mktemp("express")
    with server(tmp / "on", True) as on, server(tmp / "off", False) as off:
        for s in (on, off):
            s.put("/v1/models/add", add_model, "application/octet-stream")
            s.put("/v1/models/addb?max_batch_size=4", add_model, "application/octet-stream")
            s.put("/v1/functions/h?models=add&timeout_ms=300&memory_mb=4", hostile_wasm, "application/wasm")
            s.put("/v1/functions/one?max_concurrency=1&memory_mb=4", hostile_wasm, "application/wasm")
            s.put("/v1/functions/batching?models=addb&memory_mb=4", hostile_wasm, "application/wasm")
            # not inline either (its model batches), and it times out: an answer that comes later
            s.put("/v1/functions/slow?models=addb&timeout_ms=400&memory_mb=4", hostile_wasm,
                  "application/wasm")
        yield {"on": on, "off": off}


def exchange(port: int, raw: bytes, pieces_gap_s: float = 0.0, split_at: int = 0) -> bytes:
    """Sends `raw` (in two pieces `pieces_gap_s` apart when `split_at`) and returns everything the
    server answers until it closes the connection (each request asks it to) or 30 s pass."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        if split_at:
            s.sendall(raw[:split_at])
            time.sleep(pieces_gap_s)
            s.sendall(raw[split_at:])
        else:
            s.sendall(raw)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
        return data


def responses(data: bytes) -> list[tuple[int, list[tuple[str, str]], bytes]]:
    """The responses in `data`, each as (status, headers made comparable, body)."""
    found = []
    while data:
        head, _, rest = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ")[1])
        pairs = [(name.lower(), value) for name, _, value in (line.partition(": ") for line in lines[1:])]
        length = next((int(value) for name, value in pairs if name == "content-length"), None)
        rest = re.sub(rb'"invocation_id": "[0-9a-f]+"', b'"invocation_id": "ID"', rest)  # (an SSE end event)
        if length is None:  # chunked (a stream): the rest
            body, data = rest, b""
        else:
            body, data = rest[:length], rest[length:]
        found.append((status, comparable_headers(pairs), body))
    return found


def request(name: str, body: bytes, *headers: str, target: str = "", version: str = "1.1",
            close: bool = True) -> bytes:
    lines = [f"POST {target or f'/v1/functions/{name}/invoke'} HTTP/{version}", "Host: x", *headers]
    if not any(h.lower().startswith(("content-length", "transfer-encoding")) for h in headers):
        lines.append(f"Content-Length: {len(body)}")
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


ADMIN = f"Authorization: Bearer {KEYS['admin']}"
READER = f"Authorization: Bearer {KEYS['reader']}"
JSON = "Content-Type: application/json"

# (what, raw request, status, whether the lane answers it); hostile.wat: e echoes, t traps, s sets an
# error status, l loops (timeout), m grows memory past its limit, o writes too much, n infers with a
# model not in the manifest, i sends malformed tensors, r overflows its stack.
CASES: list[tuple[str, bytes, int, bool]] = [
    ("echo", request("h", b"ehello", ADMIN, JSON), 200, True),
    ("echo without a content type", request("h", b"ehello", ADMIN), 200, True),
    ("empty body", request("h", b"", ADMIN), 500, True),
    ("trap", request("h", b"t", ADMIN), 500, True),
    ("guest error status", request("h", b"s", ADMIN), 500, True),
    ("timeout", request("h", b"l", ADMIN), 504, True),
    ("memory limit", request("h", b"m", ADMIN), 500, True),
    ("output limit", request("h", b"o", ADMIN), 500, True),
    ("model not in the manifest", request("h", b"n", ADMIN), 403, True),
    ("malformed tensors", request("h", b"i\xff\x00", ADMIN), 422, True),
    ("stack overflow", request("h", b"r", ADMIN), 500, True),
    ("max_concurrency with room", request("one", b"eok", ADMIN), 200, True),
    ("HTTP/1.0", request("h", b"ehello", ADMIN, version="1.0", close=False), 200, True),
    ("unknown function", request("nope", b"e", ADMIN), 404, True),
    ("no key", request("h", b"e"), 401, False),
    ("unknown key", request("h", b"e", "Authorization: Bearer wrong"), 401, False),
    ("malformed key", request("h", b"e", "Authorization: Basic x"), 401, False),
    ("read-only key", request("h", b"e", READER), 403, False),
    ("body over the limit", request("h", b"e" * (MAX_BODY + 1), ADMIN), 413, False),
    ("declared length over the limit", request("h", b"e", ADMIN, "Content-Length: 5000")[:-1], 413, False),
    ("bad query parameter", request("h", b"e", ADMIN, target="/v1/functions/h/invoke?async=2"), 400, False),
    ("?async=0", request("h", b"ehi", ADMIN, target="/v1/functions/h/invoke?async=0"), 200, False),
    ("Prefer without respond-async", request("h", b"ehi", ADMIN, "Prefer: return=minimal"), 200, False),
    ("Accept: text/event-stream", request("h", b"ehi", ADMIN, "Accept: text/event-stream"), 200, False),
    ("chunked body", request("h", b"", ADMIN, "Transfer-Encoding: chunked") + b"3\r\nehi\r\n0\r\n\r\n", 200,
     False),
    ("a name in capitals", request("H", b"e", ADMIN), 404, False),
    ("a name with an escape", request("h", b"e", ADMIN, target="/v1/functions/%68/invoke"), 200, False),
    ("a model that batches: later, on a thread", request("batching", b"ehi", ADMIN), 200, True),
]  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_the_lane_answers_as_the_general_path(servers: dict[str, Server], case: tuple) -> None:
    _, raw, status, taken = case
    answers = {}
    for key, s in servers.items():
        before = s.express.served
        answers[key] = responses(exchange(s.port, raw))
        assert [a[0] for a in answers[key]] == [status], (key, answers[key])
        assert s.express.served - before == (1 if taken and key == "on" else 0), key
    assert answers["on"] == answers["off"]


def test_a_body_that_comes_in_pieces_is_held_until_it_is_whole(servers: dict[str, Server]) -> None:
    raw = request("h", b"e" + b"x" * 1000, ADMIN)
    answers = {}
    for key, s in servers.items():
        before = s.express.served
        answers[key] = responses(exchange(s.port, raw, pieces_gap_s=0.2, split_at=len(raw) - 500))
        assert s.express.served - before == (1 if key == "on" else 0), key
    assert answers["on"] == answers["off"] and answers["on"][0][0] == 200


def test_a_body_whose_rest_does_not_come_in_time_gets_the_same_408(servers: dict[str, Server]) -> None:
    """Pairs with the test above: the rest of the body 0.2 s later is served, never is a 408 after
    `body_timeout_s` (1 s here), the same on both paths; the connection is closed after it."""
    raw = request("h", b"e" + b"x" * 1000, ADMIN, close=False)
    answers = {}
    for key, s in servers.items():
        before = s.express.served
        with socket.create_connection(("127.0.0.1", s.port), timeout=30) as conn:
            conn.sendall(raw[:-500])
            started = time.monotonic()
            data = b""
            while chunk := conn.recv(65536):
                data += chunk
            waited = time.monotonic() - started
        assert BODY_TIMEOUT_S * 0.9 <= waited < 20, (key, waited)
        answers[key] = responses(data)
        assert s.express.served == before
    assert answers["on"] == answers["off"] and answers["on"][0][0] == 408
    assert b"came for 1 s (after 501 bytes)" in answers["on"][0][2]  # of the body's 1001


def test_pipelined_requests_are_answered_in_order(servers: dict[str, Server]) -> None:
    """Three requests in one write: an echo, a trap, an echo (the last asks to close)."""
    raw = (request("h", b"eone", ADMIN, close=False) + request("h", b"t", ADMIN, close=False)
           + request("h", b"ethree", ADMIN))
    answers = {}
    for key, s in servers.items():
        answers[key] = responses(exchange(s.port, raw))
        assert [(a[0], a[2][:5]) for a in answers[key]][::2] == [(200, b"eone"), (200, b"ethre")], key
        assert answers[key][1][0] == 500
    assert answers["on"] == answers["off"]


def test_requests_pipelined_behind_one_answered_later_keep_their_order(servers: dict[str, Server]) -> None:
    """A request the lane answers later (on a thread) first, then one it answers inline and one the
    general path answers, in one write: they wait for it, and come back in order."""
    raw = (request("slow", b"l", ADMIN, close=False) + request("h", b"etwo", ADMIN, close=False)
           + request("h", b"ethree", ADMIN, target="/v1/functions/h/invoke?async=0", close=False)
           + request("batching", b"efour", ADMIN))
    answers = {}
    for key, s in servers.items():
        answers[key] = responses(exchange(s.port, raw))
        later = [(a[0], a[2][:5]) for a in answers[key]][1:]
        assert later == [(200, b"etwo"), (200, b"ethre"), (200, b"efour")], key
        assert answers[key][0][0] == 504, key
    assert answers["on"] == answers["off"]


def test_a_request_answered_later_leaves_the_event_loop_free(servers: dict[str, Server]) -> None:
    """Pairs with the inline cases: a guest that runs until its 400 ms timeout on a thread, while
    requests on other connections are answered; its own answer is the lane's, with keep-alive."""
    on = servers["on"]
    before = on.express.served
    with socket.create_connection(("127.0.0.1", on.port), timeout=30) as slow:
        started = time.monotonic()
        slow.sendall(request("slow", b"l", ADMIN, close=False))
        quick = []
        for i in range(5):
            t = time.monotonic()
            assert responses(exchange(on.port, request("h", b"e%d" % i, ADMIN)))[0][0] == 200
            quick.append(time.monotonic() - t)
        answer = read_response(slow)
        waited = time.monotonic() - started
        assert answer.startswith(b"HTTP/1.1 504 ") and b"connection: close" not in answer.lower()
        slow.sendall(request("h", b"eagain", ADMIN))  # the same connection serves on
        assert read_response(slow).endswith(b"eagain")
    assert waited >= 0.35 and max(quick) < waited, (quick, waited)
    assert on.express.served - before == 7


def test_a_client_gone_before_its_later_answer_leaves_the_server_serving(servers: dict[str, Server]) -> None:
    on = servers["on"]
    before = on.express.served
    with socket.create_connection(("127.0.0.1", on.port), timeout=30) as conn:
        conn.sendall(request("slow", b"l", ADMIN, close=False))
        time.sleep(0.05)
    deadline = time.monotonic() + 10
    while on.express.served == before:  # it still runs to its timeout, and is counted
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert responses(exchange(on.port, request("batching", b"estill", ADMIN)))[0][2] == b"estill"


def test_a_request_answered_later_finishes_at_a_graceful_shutdown(tmp_path: Path, hostile_wasm: bytes,
                                                                  add_model: bytes) -> None:
    """The server is told to stop while a request of the lane runs on a thread: it waits for it, and
    the client gets its answer with `connection: close`."""
    got: list[bytes] = []
    with server(tmp_path, True) as s:
        s.put("/v1/models/addb?max_batch_size=4", add_model, "application/octet-stream")
        s.put("/v1/functions/slow?models=addb&timeout_ms=600&memory_mb=4", hostile_wasm, "application/wasm")
        conn = socket.create_connection(("127.0.0.1", s.port), timeout=30)
        conn.sendall(request("slow", b"l", ADMIN, close=False))
        reader = threading.Thread(target=lambda: got.append(read_response(conn)))
        reader.start()
        time.sleep(0.2)  # running on its thread when the server is told to stop
    reader.join(30)
    conn.close()
    assert got and got[0].startswith(b"HTTP/1.1 504 ") and b"connection: close" in got[0].lower()


def test_a_kept_alive_connection_serves_request_after_request(servers: dict[str, Server]) -> None:
    on = servers["on"]
    before = on.express.served
    auth = {"authorization": f"Bearer {KEYS['admin']}"}
    with httpx.Client(base_url=f"http://127.0.0.1:{on.port}", headers=auth) as c:
        for i in range(20):
            r = c.post("/v1/functions/h/invoke", content=b"e%d" % i)
            assert (r.status_code, r.content) == (200, b"e%d" % i)  # (hostile.wat's echo: the body)
            assert "x-invocation-id" in r.headers and r.headers["server-timing"].startswith("queue;dur=")
    assert on.express.served - before == 20


def read_response(conn: socket.socket) -> bytes:
    """One response of a kept-alive connection (its headers, and its body by Content-Length)."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += conn.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(re.search(rb"content-length: (\d+)", head).group(1))  # type: ignore[union-attr]
    while len(body) < length:
        body += conn.recv(65536)
    return head + b"\r\n\r\n" + body


@pytest.mark.parametrize("key", ["on", "off"])
def test_a_kept_alive_connection_is_closed_once_idle_for_the_keep_alive_timeout(
    servers: dict[str, Server], key: str
) -> None:
    """Requests every half timeout keep it open past the timeout; idle for the timeout after the
    last answer, it is closed (uvicorn's `timeout_keep_alive`, here 1 s; the lane times its own)."""
    s = servers[key]
    with socket.create_connection(("127.0.0.1", s.port), timeout=30) as conn:
        started = time.monotonic()
        for i in range(5):
            conn.sendall(request("h", b"e%d" % i, ADMIN, close=False))
            assert read_response(conn).endswith(b"e%d" % i)
            time.sleep(KEEP_ALIVE_S / 2)
        assert time.monotonic() - started > 2 * KEEP_ALIVE_S  # open all along: each request reset it
        last = time.monotonic()
        assert conn.recv(65536) == b""  # closed by the server, idle
        idle = time.monotonic() - last
    assert KEEP_ALIVE_S * 0.4 <= idle < KEEP_ALIVE_S + 5, idle


def test_invocations_the_lane_answers_are_counted_in_the_metrics(servers: dict[str, Server]) -> None:
    on = servers["on"]
    exchange(on.port, request("h", b"ecount", ADMIN))
    exchange(on.port, request("h", b"t", ADMIN))
    auth = {"authorization": f"Bearer {KEYS['admin']}"}
    text = httpx.get(f"http://127.0.0.1:{on.port}/metrics", headers=auth).text
    for outcome in ("ok", "guest_trap"):
        series = f'wasminfer_invocations_total{{function="h",outcome="{outcome}",tenant="default"}}'
        found = re.search(re.escape(series) + r" ([0-9.]+)", text)
        assert found is not None and float(found.group(1)) >= 1, outcome


def test_the_express_setting_is_read_from_the_environment() -> None:
    assert Settings.from_env({"WASMINFER_EXPRESS": "0"}).express is False
    assert Settings.from_env({"WASMINFER_EXPRESS": "1"}).express is True
    assert Settings.from_env({}).express is True
    assert Settings.from_env(Settings(express=False).to_env()).express is False
    with pytest.raises(ValueError, match="WASMINFER_EXPRESS"):
        Settings.from_env({"WASMINFER_EXPRESS": "maybe"})
    assert guarded_protocol(Settings(express=False), object()).express is None  # type: ignore[arg-type]
