"""The app behind a real nginx, configured by the shipped ``deploy/nginx.conf``, on loopback.

The client connects from 127.0.0.2, nginx and the app talk over 127.0.0.1: the logs must show
the client's own address, not nginx's, and not one the client made up. The model is larger
than the other tests' so that a long generation takes a visible time: through the proxy,
its words must arrive one by one while it runs, not all together at its end.
"""

from __future__ import annotations

import re
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import build_run
from tests.live_server import (
    App,
    Nginx,
    deploy_site,
    nginx_binary,
    run_app,
    run_nginx,
    wait_for,
)

pytestmark = pytest.mark.skipif(
    nginx_binary() is None,
    reason="nginx is not installed (apt-get install nginx; .ci/run installs it)",
)

CLIENT = "127.0.0.2"  # the client's address; nginx reaches the app from 127.0.0.1
PREFIX = "/textgen"


def site(app_port: int, access_log: Path) -> Callable[[int], str]:
    """``deploy/nginx.conf`` with the addresses of this test."""
    replacements = {
        "server app:8000;": f"server 127.0.0.1:{app_port};",
        "/var/log/nginx/access.log": str(access_log),
    }
    return deploy_site("nginx.conf", replacements)


@dataclass
class Stack:
    app: App
    nginx: Nginx
    access_log: Path

    @property
    def url(self) -> str:
        return self.nginx.url + PREFIX

    def client(self) -> httpx.Client:
        transport = httpx.HTTPTransport(local_address=CLIENT)
        return httpx.Client(base_url=self.url, transport=transport, timeout=60)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("nginx")
    # An LSTM of 512 units: a few hundred words take a few tenths of a second.
    run = build_run(root / "run", cell="lstm", hidden_dim=512)
    args = ("--root-path", PREFIX, "--log-format", "json")
    with run_app(run, root / "app.log", *args, WORDRNN_MAX_WORDS="2000") as app:
        access_log = root / "nginx" / "site-access.log"
        with run_nginx(site(app.port, access_log), root / "nginx") as nginx:
            yield Stack(app, nginx, access_log)


def app_access(stack: Stack, request_id: str) -> dict[str, Any]:
    def find() -> dict[str, Any] | None:
        lines = [e for e in stack.app.json_log() if e.get("request_id") == request_id]
        return next((e for e in lines if e.get("logger") == "app.access"), None)

    return wait_for(find, f"the app's access line for {request_id}")


def test_generate_through_the_prefix_with_the_clients_address_logged(stack: Stack) -> None:
    body = {"seed_words": "I can see", "max_words": 12, "random_seed": 5}
    with stack.client() as http:
        # A client's X-Forwarded-For is replaced by nginx, never believed.
        response = http.post("/generate", json=body, headers={"X-Forwarded-For": "203.0.113.9"})
    assert response.status_code == 200, response.text
    direct = httpx.post(f"{stack.app.url}/generate", json=body, timeout=60)
    assert response.json() == direct.json()

    request_id = response.headers["x-request-id"]  # nginx's id, passed on to the app
    assert re.fullmatch(r"[0-9a-f]{32}", request_id)
    line = app_access(stack, request_id)
    assert line["client"] == CLIENT
    assert line["path"] == f"{PREFIX}/generate"  # the path as the client asked for it
    assert line["status"] == 200
    nginx_line = wait_for(
        lambda: next(
            (x for x in stack.access_log.read_text().splitlines() if request_id in x), None
        ),
        "nginx's access line",
    )
    assert nginx_line.startswith(f"{CLIENT} - ")
    assert f'"POST {PREFIX}/generate HTTP/1.1" 200' in nginx_line


def test_a_clients_request_id_goes_through(stack: Stack) -> None:
    with stack.client() as http:
        response = http.get("/healthz", headers={"X-Request-ID": "from-the-client-1"})
    assert response.headers["x-request-id"] == "from-the-client-1"
    assert app_access(stack, "from-the-client-1")["client"] == CLIENT


def test_docs_openapi_and_the_playground_under_the_prefix(stack: Stack) -> None:
    with stack.client() as http:
        docs = http.get("/docs")
        assert docs.status_code == 200
        assert f"{PREFIX}/openapi.json" in docs.text
        document = http.get("/openapi.json")
        assert document.status_code == 200
        assert "/v1/completions" in document.json()["paths"]

        page = http.get("/")
        assert page.status_code == 200
        assert "default-src 'none'" in page.headers["content-security-policy"]
        for asset in re.findall(r'(?:src|href)="([^"]+)"', page.text):
            assert not asset.startswith(("/", "http")), f"{asset} is not relative"
            assert http.get(f"/{asset}").status_code == 200, asset

        bare = http.get(stack.nginx.url + PREFIX, follow_redirects=False)
        assert bare.status_code == 308
        assert bare.headers["location"] == f"{PREFIX}/"
        assert http.get("/metrics").status_code == 404  # scraped inside, not through nginx


def test_server_sent_events_arrive_word_by_word(stack: Stack) -> None:
    body = {"seed_words": "I can", "max_words": 400, "random_seed": 1, "stream": True}
    arrivals: list[tuple[float, int]] = []  # (time, word events completed by this read)
    received = b""
    with stack.client() as http:
        started = time.perf_counter()
        with http.stream("POST", "/generate", json=body) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            for chunk in response.iter_raw():
                before = received.count(b"event: word")
                received += chunk
                arrivals.append((time.perf_counter(), received.count(b"event: word") - before))
    ended = arrivals[-1][0]
    assert sum(words for _, words in arrivals) == 400
    first_word = next(t for t, words in arrivals if words)
    reads_with_words = sum(1 for _, words in arrivals if words)
    # Buffered, every word would come in the last reads, at the end of the generation.
    assert first_word - started < 0.25 * (ended - started), (first_word - started, ended - started)
    assert reads_with_words >= 20, reads_with_words


def test_the_openai_sdk_streams_through_the_proxy(stack: Stack) -> None:
    transport = httpx.HTTPTransport(local_address=CLIENT)
    sdk = openai.OpenAI(
        base_url=f"{stack.url}/v1",
        api_key="unused",
        max_retries=0,
        http_client=httpx.Client(transport=transport, timeout=60),
    )
    model = sdk.models.list().data[0].id
    params: dict[str, Any] = {"model": model, "prompt": "the sea", "max_tokens": 50, "seed": 3}
    chunks = list(
        sdk.completions.create(**params, stream=True, stream_options={"include_usage": True})
    )
    whole = sdk.completions.create(**params)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert len(chunks) == 50 + 2  # a chunk per word, the finish_reason, the usage
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].usage == whole.usage


def test_a_client_with_too_many_requests_in_flight_is_refused_by_nginx(stack: Stack) -> None:
    """The 33rd request in flight from one address gets nginx's 429, in the app's body for
    its path and with Retry-After; another address and /healthz still get through."""
    held: list[socket.socket] = []
    try:
        for _ in range(32):  # requests whose body never comes: in flight until we close
            address = ("127.0.0.1", stack.nginx.port)
            held.append(socket.create_connection(address, source_address=(CLIENT, 0)))
            held[-1].sendall(
                f"POST {PREFIX}/generate HTTP/1.1\r\nHost: x\r\n"
                "Content-Type: application/json\r\nContent-Length: 20\r\n\r\n".encode()
            )
        with stack.client() as http:

            def refused() -> httpx.Response | None:
                response = http.post("/generate", json={"max_words": 1})
                return response if response.status_code == 429 else None

            native = wait_for(refused, "nginx to count the requests in flight", timeout=10)
            openai = http.post("/v1/completions", json={"prompt": "I", "max_tokens": 1})
            health = http.get("/healthz")
        elsewhere = httpx.HTTPTransport(local_address="127.0.0.3")
        with httpx.Client(base_url=stack.url, transport=elsewhere, timeout=30) as http:
            other = http.post("/generate", json={"max_words": 1})
    finally:
        for sock in held:
            sock.close()
    assert native.headers["retry-after"] == "1"
    assert native.json() == {"detail": "too many requests; retry shortly", "errors": []}
    assert openai.status_code == 429
    assert openai.headers["retry-after"] == "1"
    assert openai.json()["error"]["code"] == "rate_limit_exceeded"
    assert health.status_code == 200
    assert other.status_code == 200


def test_a_client_over_its_request_rate_is_refused_by_nginx(stack: Stack) -> None:
    """Past 20 requests a second (after a burst of 40) one address gets nginx's 429s; the
    first 40 of a burst all pass."""
    burst = httpx.HTTPTransport(local_address="127.0.0.4")
    with httpx.Client(base_url=stack.url, transport=burst, timeout=30) as http:
        answers = [http.get("/info") for _ in range(80)]
    assert [a.status_code for a in answers[:40]] == [200] * 40
    refused = [a for a in answers[40:] if a.status_code == 429]
    assert refused
    assert all(a.headers["retry-after"] == "1" for a in refused)
    assert refused[0].json()["detail"] == "too many requests; retry shortly"


def test_nginx_logs_no_session_id(stack: Stack) -> None:
    with stack.client() as http:
        session = http.post("/sessions", json={"seed_words": "I can"}).json()["session_id"]
        assert http.get(f"/sessions/{session}", headers={"X-Request-ID": "session-log"}).is_success
        http.delete(f"/sessions/{session}")

    def logged() -> str | None:
        log = stack.access_log.read_text()
        return log if "session-log" in log else None

    log = wait_for(logged, "nginx to log the request")
    assert session not in log
    assert f'"GET {PREFIX}/sessions/~ HTTP/1.1" 200' in log
