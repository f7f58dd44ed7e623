"""Slow and oversized requests against a real server: `app.protocol` drops them early.

The app runs as ``python -m app`` with timeouts of 1 s; each test speaks raw HTTP over a
socket, so that it controls the pace and sees when the server closes the connection.
"""

from __future__ import annotations

import json
import select
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.live_server import App, run_app

TIMEOUT = 1.0
SLACK = 2.0  # the server's timer, on a loaded test machine
MAX_HEADER_BYTES = 16_384
READ_SIZE = 256 * 1024  # what asyncio reads at once: the most a head may pass the limit by


@pytest.fixture(scope="module")
def app(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[App]:
    log = tmp_path_factory.mktemp("connections") / "app.log"
    with run_app(
        tiny_run,
        log,
        WORDRNN_HEADER_TIMEOUT_SECONDS=str(TIMEOUT),
        WORDRNN_BODY_TIMEOUT_SECONDS=str(TIMEOUT),
        WORDRNN_MAX_HEADER_BYTES=str(MAX_HEADER_BYTES),
    ) as app:
        yield app


def connect(app: App) -> socket.socket:
    return socket.create_connection(("127.0.0.1", app.port), timeout=10)


def closed_by_server(sock: socket.socket, wait: float) -> bytes | None:
    """What the server sent before closing, if it closed within ``wait`` s; else None."""
    if not select.select([sock], [], [], wait)[0]:
        return None
    received = b""
    try:
        while chunk := sock.recv(65_536):
            received += chunk
    except ConnectionResetError:  # it closed with our bytes unread: the answer may be lost
        pass
    return received


def trickle(sock: socket.socket, data: bytes, interval: float, limit: float) -> tuple[bytes, float]:
    """Send ``data`` a byte every ``interval`` s until the server closes the connection;
    return what it sent and when it closed. Fails if it is still open after ``limit`` s."""
    start = time.monotonic()
    for byte in data:
        sock.sendall(bytes([byte]))
        received = closed_by_server(sock, interval)
        if received is not None:
            return received, time.monotonic() - start
        if time.monotonic() - start > limit:
            break
    pytest.fail(f"the server kept the connection open for {time.monotonic() - start:.1f} s")


def test_headers_trickling_past_the_header_timeout_are_dropped_with_408(app: App) -> None:
    with connect(app) as sock:
        head = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100
        received, elapsed = trickle(sock, head, interval=0.2, limit=TIMEOUT + SLACK)
    assert elapsed < TIMEOUT + SLACK
    assert received.startswith(b"HTTP/1.1 408 "), received
    assert b"connection: close" in received.lower()


def test_a_connection_that_sends_nothing_is_closed_silently(app: App) -> None:
    start = time.monotonic()
    with connect(app) as sock:
        received = closed_by_server(sock, TIMEOUT + SLACK)
    assert received == b"", "the server kept the connection open (None) or answered"
    assert time.monotonic() - start < TIMEOUT + SLACK


def test_a_growing_header_is_refused_before_it_is_read_whole(app: App) -> None:
    """1 MB of header, 4 KiB at a time: the server must stop reading soon after the limit."""
    chunk = b"a" * 4096
    sent = 0
    received = None
    with connect(app) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: ")
        try:
            while sent < 1_000_000 and received is None:
                sock.sendall(chunk)
                sent += len(chunk)
                received = closed_by_server(sock, 0.02)
            if received is None:
                received = closed_by_server(sock, SLACK)
        except (BrokenPipeError, ConnectionResetError):
            received = b""  # closed with our bytes unread: the 431 was lost on the way
    assert received is not None, "the server read the whole megabyte and kept waiting"
    assert sent < MAX_HEADER_BYTES + READ_SIZE, f"the server read {sent} bytes of header"
    assert received == b"" or received.startswith(b"HTTP/1.1 431 "), received


def test_a_body_stalling_past_the_body_timeout_is_dropped_with_408(app: App) -> None:
    body = b'{"seed": "the", "max_words": 1}'
    head = b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    with connect(app) as sock:
        sock.sendall(head + b"Content-Length: %d\r\n\r\n" % len(body) + body[:1])
        start = time.monotonic()
        received, elapsed = trickle(sock, body[1:], interval=TIMEOUT * 1.5, limit=TIMEOUT + SLACK)
    assert elapsed < TIMEOUT + SLACK, time.monotonic() - start
    assert received.startswith(b"HTTP/1.1 408 "), received
    assert b'"body"' in received


def test_a_body_arriving_steadily_outlives_the_body_timeout(app: App) -> None:
    """The body timeout bounds a stall, not the whole body: 3 s of a byte every 0.1 s pass."""
    body = b'{"seed": "the", "max_words": 1}'
    head = b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    with connect(app) as sock:
        sock.sendall(head + b"Content-Length: %d\r\n\r\n" % len(body))
        for byte in body[:-1]:
            sock.sendall(bytes([byte]))
            assert not select.select([sock], [], [], 0.1)[0], "dropped while the body arrived"
        sock.sendall(body[-1:])
        status_line = sock.recv(65_536).split(b"\r\n", 1)[0]
    assert status_line.startswith(b"HTTP/1.1 "), status_line
    assert b" 408 " not in status_line


@pytest.mark.parametrize(
    ("path", "framing"),
    [
        ("/generate", b"Content-Length: -1\r\n"),
        ("/v1/completions", b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n"),
    ],
)
def test_malformed_http_is_refused_in_the_json_body_of_its_path(
    app: App, path: str, framing: bytes
) -> None:
    with connect(app) as sock:
        sock.sendall(b"POST " + path.encode() + b" HTTP/1.1\r\nHost: x\r\n" + framing + b"\r\n")
        received = closed_by_server(sock, 10)
    assert received is not None
    head, _, body = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 ")
    assert b"content-type: application/json" in head.lower()
    answer = json.loads(body)
    if path.startswith("/v1/"):
        assert answer["error"]["message"].startswith("malformed HTTP request")
        assert answer["error"]["type"] == "invalid_request_error"
    else:
        assert answer["detail"].startswith("malformed HTTP request")
