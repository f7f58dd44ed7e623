"""Request ids, access logs, errors logged once without the body, and the JSON log format."""

from __future__ import annotations

import hashlib
import json
import logging
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from app.__main__ import build_settings, parse_args
from app.logs import JsonFormatter, RequestIdFilter, TextFormatter
from app.main import create_app
from tests.app_helpers import settings_for
from tests.live_server import run_app, wait_for


@pytest.fixture(scope="module")
def client(tiny_run: Path) -> Iterator[TestClient]:
    with TestClient(create_app(settings_for(tiny_run))) as client:
        yield client


def access_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "app.access"]


def test_a_request_id_is_kept_or_created_and_returned(client: TestClient) -> None:
    given = client.get("/healthz", headers={"X-Request-ID": "req-123.a:b"})
    assert given.headers["x-request-id"] == "req-123.a:b"
    created = client.get("/healthz").headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", created)
    assert client.get("/healthz").headers["x-request-id"] != created
    for unsafe in ("has space", "x" * 129, 'quote"d'):
        replaced = client.get("/healthz", headers={"X-Request-ID": unsafe})
        assert re.fullmatch(r"[0-9a-f]{32}", replaced.headers["x-request-id"])


def test_refusals_carry_the_request_id_too(client: TestClient) -> None:
    response = client.post("/generate", content=b"x" * 100_000, headers={"X-Request-ID": "too-big"})
    assert response.status_code == 413
    assert response.headers["x-request-id"] == "too-big"


def test_each_request_writes_one_access_record(
    client: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="app")
    response = client.post(
        "/generate",
        json={"seed_words": "private words", "max_words": 2},
        headers={"X-Request-ID": "acc-1"},
    )
    assert response.status_code == 200
    [record] = access_records(caplog)
    fields: dict[str, Any] = record.__dict__
    assert fields["request_id"] == "acc-1"
    assert fields["method"] == "POST"
    assert fields["path"] == "/generate"
    assert fields["status"] == 200
    assert fields["bytes"] == len(response.content)
    assert fields["duration_ms"] >= 0
    assert '"POST /generate HTTP/1.1" 200' in record.getMessage()
    assert "private" not in caplog.text


def test_an_unexpected_error_is_logged_once_with_its_id_and_without_the_body(
    client: TestClient, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken(*args: object) -> None:
        raise RuntimeError("the model fell over")

    monkeypatch.setattr(client.app.state.models.default.service, "generate", broken)  # type: ignore[attr-defined]
    caplog.set_level(logging.INFO, logger="app")
    response = client.post(
        "/generate",
        json={"seed_words": "secret seed words", "max_words": 2},
        headers={"X-Request-ID": "err-7"},
    )
    assert response.status_code == 500
    assert response.headers["x-request-id"] == "err-7"
    assert response.json() == {
        "detail": "internal error; the server log has the details",
        "errors": [],
    }
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1
    assert errors[0].__dict__["request_id"] == "err-7"
    assert errors[0].exc_info is not None
    assert "POST /generate" in errors[0].getMessage()
    [access] = access_records(caplog)
    assert access.__dict__["status"] == 500
    assert "secret" not in caplog.text


def test_the_json_format_is_one_object_a_line() -> None:
    record = logging.LogRecord("app.access", logging.INFO, __file__, 1, "hello %s", ("x",), None)
    record.request_id = "r-1"
    record.status = 201
    line = JsonFormatter().format(record)
    assert "\n" not in line
    entry = json.loads(line)
    assert entry["message"] == "hello x"
    assert entry["level"] == "info"
    assert entry["logger"] == "app.access"
    assert entry["request_id"] == "r-1"
    assert entry["status"] == 201
    try:
        raise ValueError("bad")
    except ValueError:
        failed = logging.LogRecord("app", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    assert "ValueError: bad" in json.loads(JsonFormatter().format(failed))["exception"]


def test_the_text_format_adds_the_request_id_to_a_requests_lines() -> None:
    formatter = TextFormatter("%(levelprefix)s %(message)s", use_colors=False)
    record = logging.LogRecord("app", logging.INFO, __file__, 1, "ready", (), None)
    RequestIdFilter().filter(record)
    assert formatter.format(record) == "INFO:     ready"
    record.request_id = "r-2"
    assert formatter.format(record) == "INFO:     ready [request_id=r-2]"


def fingerprint(session_id: str) -> str:
    """What the log writes for a session id, as documented: ``~`` and 8 hex digits of SHA-256."""
    return "~" + hashlib.sha256(session_id.encode()).hexdigest()[:8]


# A line feed and a carriage return, ESC (a terminal's colours), U+0085 and U+2028 (line breaks
# to many readers), DEL, a backslash and a tab, percent-encoded in a path.
FORGED_URL = "/nope%0aERROR:%20forged%20line%0d%1b%5b31m%c2%85%e2%80%a8%7f%5c%09"
FORGED_PATH = "/nope\\nERROR: forged line\\r\\x1b[31m\\x85\\u2028\\x7f\\\\\\t"


@pytest.mark.parametrize(
    ("url", "logged"),
    [
        (FORGED_URL, FORGED_PATH),
        (
            "/sessions/abc%0aERROR:%20forged%20line",
            "/sessions/" + fingerprint("abc\nERROR: forged line"),
        ),
    ],
)
def test_a_forged_line_stays_on_one_line_in_both_formats(
    client: TestClient, caplog: pytest.LogCaptureFixture, url: str, logged: str
) -> None:
    caplog.set_level(logging.INFO, logger="app")
    assert client.get(url).status_code == 404
    [record] = access_records(caplog)
    assert record.__dict__["path"] == logged
    text = TextFormatter("%(levelprefix)s %(message)s", use_colors=False).format(record)
    assert text.splitlines() == [text]
    assert f'"GET {logged} HTTP/1.1" 404' in text
    line = JsonFormatter().format(record)
    assert line.splitlines() == [line]
    assert json.loads(line)["path"] == logged


def test_a_session_id_is_logged_only_as_its_fingerprint(
    client: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="app")
    created = client.post("/sessions", json={"seed_words": "I can"})
    assert created.status_code == 201
    session_id = created.json()["session_id"]
    answers = [
        client.get(f"/sessions/{session_id}"),
        client.post("/generate", json={"session_id": session_id, "max_words": 2}),
        client.post("/next-words", json={"session_id": session_id}),
        client.delete(f"/sessions/{session_id}"),
        client.get(f"/sessions/{session_id}"),
    ]
    assert [a.status_code for a in answers] == [200, 200, 200, 204, 404]
    assert session_id not in caplog.text
    assert all(session_id not in repr(r.__dict__) for r in caplog.records)
    logged = f"/sessions/{fingerprint(session_id)}"
    assert [r.__dict__["path"] for r in access_records(caplog)].count(logged) == 3
    assert caplog.text.count(logged) == 3


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_a_real_servers_log_holds_no_forged_line_and_no_session_id(
    tiny_run: Path, tmp_path: Path, log_format: str
) -> None:
    with run_app(tiny_run, tmp_path / "app.log", "--log-format", log_format) as app:
        with httpx.Client(base_url=app.url) as http:
            session_id = http.post("/sessions", json={"seed_words": "I can"}).json()["session_id"]
            answers = [
                http.get(f"/sessions/{session_id}"),
                http.post("/generate", json={"session_id": session_id, "max_words": 2}),
                http.delete(f"/sessions/{session_id}", headers={"X-Request-ID": "req-deleted"}),
                http.get(FORGED_URL, headers={"X-Request-ID": "req-forged"}),
            ]
        assert [a.status_code for a in answers] == [200, 200, 204, 404]

        def line_of(request_id: str) -> str | None:
            lines = [line for line in app.log().splitlines() if request_id in line]
            return lines[0] if lines else None

        wait_for(lambda: line_of("req-deleted"), "the DELETE's access line")
        forged = wait_for(lambda: line_of("req-forged"), "the forged request's access line")
    log = app.log()
    assert session_id not in log
    assert f"/sessions/{fingerprint(session_id)}" in log
    assert [line for line in log.splitlines() if "forged line" in line] == [forged]
    if log_format == "json":
        assert json.loads(forged)["path"] == FORGED_PATH
    else:
        assert f'"GET {FORGED_PATH} HTTP/1.1" 404' in forged


def test_the_command_line_takes_the_log_format_and_the_trusted_proxies() -> None:
    args = parse_args(
        ["--model-dir", "runs/x", "--log-format", "json", "--forwarded-allow-ips", "10.0.0.0/8"]
    )
    settings = build_settings(args)
    assert settings.log_format == "json"
    assert settings.forwarded_allow_ips == "10.0.0.0/8"


def test_a_real_server_logs_json_with_ids_and_believes_only_its_proxies(
    tiny_run: Path, tmp_path: Path
) -> None:
    with run_app(tiny_run, tmp_path / "app.log", "--log-format", "json") as app:
        spoofed = {"X-Forwarded-For": "203.0.113.9"}
        # 127.0.0.1 is a trusted proxy by default; 127.0.0.2 is not, and cannot pose as one.
        with httpx.Client(base_url=app.url) as trusted:
            trusted.get("/healthz", headers={**spoofed, "X-Request-ID": "via-proxy"})
        outsider = httpx.HTTPTransport(local_address="127.0.0.2")
        with httpx.Client(base_url=app.url, transport=outsider) as direct:
            response = direct.get("/healthz", headers={**spoofed, "X-Request-ID": "direct"})
            assert response.headers["x-request-id"] == "direct"

        def access(request_id: str) -> dict[str, Any] | None:
            lines = [e for e in app.json_log() if e.get("request_id") == request_id]
            return lines[0] if lines else None

        assert wait_for(lambda: access("via-proxy"), "an access line")["client"] == "203.0.113.9"
        line = wait_for(lambda: access("direct"), "an access line")
        assert line["client"] == "127.0.0.2"
        assert line["logger"] == "app.access"
        assert (line["method"], line["path"], line["status"]) == ("GET", "/healthz", 200)
    log = app.log().splitlines()
    assert all(json.loads(entry) for entry in log if entry.strip())
    assert app.process.returncode == 0
    assert any("Uvicorn running" in json.loads(entry)["message"] for entry in log)
