"""Read timeouts and the connection cap per client address, against a real `wasminfer serve` on
127.0.0.1 (uvicorn, httptools) with short limits: headers 1 s, body 1 s, 3 connections per address
(loopback not exempt). Raw sockets: the point is what a slow or greedy client sees on the wire.
Every wait is for the server's answer or its close, not for a time."""

from __future__ import annotations

import contextlib
import json
import socket
from collections.abc import Iterator

import httpx
import pytest

from live_server import live_server

pytestmark = pytest.mark.integration

LIMITS = ("--header-timeout", "1", "--body-timeout", "1", "--max-connections-per-client", "3")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, hostile_wasm: bytes) -> Iterator[tuple[str, int]]:
    tmp = tmp_path_factory.mktemp("connections")
    env = {"WASMINFER_CONNECTION_CAP_EXEMPT": ""}  # loopback counts like any address here
    with live_server(tmp / "data", tmp / "server.log", *LIMITS, env=env) as (url, _):
        r = httpx.put(f"{url}/v1/functions/echo?memory_mb=4", content=hostile_wasm,
                      headers={"content-type": "application/wasm"}, timeout=60)
        assert r.status_code == 201, r.text
        yield url, int(url.rsplit(":", 1)[1])


def connect(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    return s


def served(port: int) -> socket.socket:
    """A connection that was served a request and stays open. (The closes of earlier tests'
    connections reach the server shortly after they are made: until then it may refuse.)"""
    for _ in range(200):
        s = connect(port)
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        first = s.recv(65536)
        if first.startswith(b"HTTP/1.1 200"):
            return s
        s.close()
    raise AssertionError("no connection was served")


def read_until_closed(s: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection."""
    data = b""
    while True:
        try:
            chunk = s.recv(65536)
        except ConnectionResetError:
            return data
        if not chunk:
            return data
        data += chunk


def response(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split(" ")[1]), {k.lower(): v for k, v in headers.items()}, body


def trickle(s: socket.socket, pieces: list[bytes], gap_s: float) -> bytes:
    """Sends `pieces` `gap_s` apart (a wait for the server's answer between them); returns the answer
    as soon as one comes. After the last piece it waits for the answer (30 s at most: a loaded
    machine may take longer than one gap to answer a complete request); b"" if none comes."""
    s.settimeout(gap_s)
    for piece in pieces:
        try:
            s.sendall(piece)
        except (BrokenPipeError, ConnectionResetError):
            break
        try:
            first = s.recv(65536)
        except TimeoutError:
            continue
        s.settimeout(30)
        return first + read_until_closed(s)
    s.settimeout(30)
    try:
        return read_until_closed(s)
    except TimeoutError:
        return b""


def invoke_head(length: int) -> bytes:
    return (
        b"POST /v1/functions/echo/invoke HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n"
        + f"Content-Length: {length}\r\n\r\n".encode()
    )


# --- headers ------------------------------------------------------------------------------------------
def test_headers_sent_slower_than_the_header_timeout_get_408_and_the_connection_is_closed(
    server: tuple[str, int],
) -> None:
    with connect(server[1]) as s:
        # a header line every 0.3 s, for up to 30 s: a slowloris; the limit is 1 s
        raw = trickle(s, [b"GET /healthz HTTP/1.1\r\n"] + [b"X-Slow: 1\r\n"] * 100, 0.3)
    status, headers, body = response(raw)
    assert status == 408 and headers["connection"] == "close", raw
    error = json.loads(body)["error"]
    assert error["code"] == "request_timeout"
    assert "did not come within 1 s" in error["message"]


def test_headers_sent_in_time_are_served(server: tuple[str, int]) -> None:
    with connect(server[1]) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        status, _, body = response(read_until_closed(s))
    assert status == 200 and json.loads(body)["status"] == "ok"


def test_a_slow_second_request_on_a_kept_alive_connection_is_timed_out_too(server: tuple[str, int]) -> None:
    with connect(server[1]) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        first = s.recv(65536)
        assert first.startswith(b"HTTP/1.1 200"), first
        raw = trickle(s, [b"GET /healthz HTTP/1.1\r\n"] + [b"X-Slow: 1\r\n"] * 100, 0.3)
    assert response(raw)[0] == 408, raw


def test_a_connection_that_never_sends_a_byte_is_closed_without_an_answer(server: tuple[str, int]) -> None:
    with connect(server[1]) as s:
        assert read_until_closed(s) == b""


# --- bodies -------------------------------------------------------------------------------------------
def test_a_body_trickled_slower_than_the_body_timeout_gets_408(server: tuple[str, int]) -> None:
    with connect(server[1]) as s:
        # 10 bytes of 100, then one more every 2 s: each pause is longer than the 1 s limit
        raw = trickle(s, [invoke_head(100) + b"e" * 10] + [b"e"] * 15, 2.0)
    status, headers, body = response(raw)
    assert status == 408 and headers["connection"] == "close", raw
    error = json.loads(body)["error"]
    assert error["code"] == "request_timeout"
    assert "no bytes of the request body came for 1 s (after 10 bytes)" in error["message"]


def test_a_body_sent_in_time_is_served(server: tuple[str, int]) -> None:
    with connect(server[1]) as s:
        # in pieces, each well within the limit of the one before
        raw = trickle(s, [invoke_head(30)] + [b"e" * 10] * 3, 0.1)
    status, _, body = response(raw)
    assert (status, body) == (200, b"e" * 30), raw


# --- connections per address --------------------------------------------------------------------------
def test_connections_up_to_the_cap_are_served_and_the_next_is_refused(server: tuple[str, int]) -> None:
    url, port = server
    held = [served(port) for _ in range(3)]  # each served and kept open: 3 connections counted
    try:
        with connect(port) as extra:
            raw = read_until_closed(extra)
        status, headers, body = response(raw)
        assert status == 429 and headers["retry-after"] == "1" and headers["connection"] == "close", raw
        error = json.loads(body)["error"]
        assert error["code"] == "too_many_requests"
        assert "already has 3 connections open" in error["message"]
    finally:
        for s in held:
            s.close()
    # the closed ones no longer count (the server sees the closes shortly: retry until it has)
    for _ in range(200):
        try:
            if httpx.get(f"{url}/healthz", timeout=5).status_code == 200:
                break
        except httpx.TransportError:
            pass
    else:
        raise AssertionError("the address stayed at its cap after its connections closed")


def test_writes_of_one_loop_turn_reach_the_socket_together_and_close_sends_them_first() -> None:
    """`CoalescingTransport` over a real socket: nothing is sent during the turn that writes, all of
    it at its end; `close()` sends what is pending before closing; `abort()` drops it."""
    import asyncio

    from wasminfer.gateway.connections import CoalescingTransport

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for ending in ("turn", "close", "abort"):
            ours, theirs = socket.socketpair()
            theirs.setblocking(False)
            transport, _ = await loop.connect_accepted_socket(asyncio.Protocol, ours)
            out = CoalescingTransport(transport, loop)
            out.write(b"HTTP/1.1 200 OK\r\n\r\n")
            out.write(bytearray(b"body"))
            assert out.get_write_buffer_size() == 23
            with pytest.raises(BlockingIOError):
                theirs.recv(100)  # nothing yet: the turn has not ended
            if ending == "turn":
                await asyncio.sleep(0)
                await asyncio.sleep(0)
                assert theirs.recv(100) == b"HTTP/1.1 200 OK\r\n\r\nbody"
                out.close()
            elif ending == "close":
                out.close()
                await asyncio.sleep(0)  # the socket closes on the loop's next turn
                await asyncio.sleep(0)
                assert theirs.recv(100) == b"HTTP/1.1 200 OK\r\n\r\nbody"
            else:
                out.abort()
                await asyncio.sleep(0)
                await asyncio.sleep(0)
                assert theirs.recv(100) == b""  # closed, and what was pending never sent
            assert out.is_closing()
            theirs.close()
        # A part larger than FLUSH_BYTES goes out at once (flow control sees it), one under it waits.
        ours, theirs = socket.socketpair()
        theirs.setblocking(False)
        transport, _ = await loop.connect_accepted_socket(asyncio.Protocol, ours)
        out = CoalescingTransport(transport, loop)
        out.write(b"x" * CoalescingTransport.FLUSH_BYTES)
        with pytest.raises(BlockingIOError):
            theirs.recv(100)
        out.write(b"y")
        assert out.get_write_buffer_size() == transport.get_write_buffer_size()  # none pending here
        got = b""
        for _ in range(1000):  # the transport writes what the socket takes at once, the rest on turns
            if len(got) > CoalescingTransport.FLUSH_BYTES:
                break
            await asyncio.sleep(0)
            with contextlib.suppress(BlockingIOError):
                got += theirs.recv(1 << 20)
        assert got == b"x" * CoalescingTransport.FLUSH_BYTES + b"y"
        out.close()
        theirs.close()

    asyncio.run(main())
