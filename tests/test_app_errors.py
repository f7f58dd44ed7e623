"""Bad input: every validation error names its field, and no input gets a 500."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.main import create_app
from tests.app_helpers import http_scope, settings_for

MAX_BODY = 4096
ROOT = Path(__file__).resolve().parent.parent
BIG_HEADERS = {f"x-filler-{i}": "y" * 1000 for i in range(20)}  # 20 kB: over 16 kB


@pytest.fixture(scope="module")
def client(tiny_run: Path) -> Iterator[TestClient]:
    app = create_app(
        settings_for(
            tiny_run, max_words=40, max_samples=4, max_seed_words=50, max_body_bytes=MAX_BODY
        )
    )
    with TestClient(app) as client:
        yield client


def assert_error(response: Any, status: int, field: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"detail", "errors"}
    assert field in [e["field"] for e in body["errors"]], body
    assert body["detail"]
    assert "Traceback" not in response.text
    return body  # type: ignore[no-any-return]


def assert_openai_error(response: Any, status: int, kind: str) -> dict[str, Any]:
    """``response`` is OpenAI's error body (``kind`` its type) with ``status``; the error."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == kind
    assert error["message"]
    return error  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"top_k": -1}, "top_k"),
        ({"top_k": 23}, "top_k"),  # the tiny vocabulary has 22 words
        ({"top_k": 5.5}, "top_k"),
        ({"top_k": True}, "top_k"),
        ({"top_k": "5"}, "top_k"),
        ({"n": 1.5}, "n"),
        ({"max_words": 41}, "max_words"),
        ({"max_words": -1}, "max_words"),
        ({"max_words": "10"}, "max_words"),
        ({"temperature": -0.5}, "temperature"),
        ({"temperature": "hot"}, "temperature"),
        ({"temperature": 1e9}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"n": 0}, "n"),
        ({"n": 5}, "n"),
        ({"random_seed": -1}, "random_seed"),
        ({"random_seed": 2**53}, "random_seed"),
        ({"random_seed": 1.5}, "random_seed"),
        ({"stream": 0}, "stream"),
        ({"stream": "true"}, "stream"),
        ({"uniform": 1}, "uniform"),
        ({"seed_words": 5}, "seed_words"),
        ({"seed_words": ["a", 1]}, "seed_words"),
        ({"seed_words": ["two words"]}, "seed_words"),
        ({"seed_words": [""]}, "seed_words"),
        ({"seed_words": ["w"] * 51}, "seed_words"),
        ({"seed_words": " ".join(["the"] * 51)}, "seed_words"),
        ({"stop": [""]}, "stop"),
        ({"stop": ["a"] * 9}, "stop"),
        ({"stop": 3}, "stop"),
        ({"session_id": ""}, "session_id"),
        ({"session_id": 12}, "session_id"),
        ({"on_unknown": "ignore"}, "on_unknown"),
        ({"bogus": 1}, "bogus"),
    ],
)
def test_generate_names_the_bad_field(client: TestClient, body: dict[str, Any], field: str) -> None:
    assert_error(client.post("/generate", json=body), 422, field)


def test_an_integral_float_is_the_integer_it_equals(client: TestClient) -> None:
    """JSON Schema counts 5.0 as an integer, so the API does too (5.5 is refused above)."""
    as_ints = {"max_words": 3, "top_k": 5, "n": 2, "random_seed": 7}
    as_floats = {field: float(value) for field, value in as_ints.items()}
    assert client.post("/generate", json=as_floats).json() == (
        client.post("/generate", json=as_ints).json()
    )
    suggested = client.post("/next-words", json={"top_k": 3.0})
    assert len(suggested.json()["words"]) == 3, suggested.text
    completion = {"prompt": "I", "max_tokens": 2.0, "n": 2.0, "seed": 7.0, "best_of": 2.0}
    response = client.post("/v1/completions", json={**completion, "top_k": 5.0})
    assert len(response.json()["choices"]) == 2, response.text


def test_an_unknown_field_is_named_with_the_accepted_ones(client: TestClient) -> None:
    body = assert_error(client.post("/generate", json={"seed": "I can"}), 422, "seed")
    assert "unknown field" in body["errors"][0]["message"]
    assert "seed_words" in body["errors"][0]["message"]


def test_all_out_of_range_limits_are_reported_together(client: TestClient) -> None:
    body = assert_error(
        client.post("/generate", json={"max_words": 1000, "n": 9, "top_k": 99}), 422, "n"
    )
    assert [e["field"] for e in body["errors"]] == ["max_words", "n", "top_k"]
    assert "at most 40" in body["errors"][0]["message"]


@pytest.mark.parametrize(
    ("content", "status", "message"),
    [
        (b'{"top_k": 5', 400, "not valid JSON"),
        (b"{'top_k': 5}", 400, "not valid JSON"),
        (b"", 422, "a JSON object is required"),
        (b"[]", 422, "must be a JSON object"),
        (b'"text"', 422, "must be a JSON object"),
        (b'{"temperature": NaN}', 422, "finite number"),
        (b'{"temperature": Infinity}', 422, "finite number"),
        (b"\xff\xfe", 400, "not valid JSON"),
    ],
)
def test_a_body_that_is_not_a_json_object_is_refused(
    client: TestClient, content: bytes, status: int, message: str
) -> None:
    response = client.post(
        "/generate", content=content, headers={"content-type": "application/json"}
    )
    assert response.status_code == status, response.text
    assert message in response.text
    assert "Traceback" not in response.text


def test_a_declared_oversized_body_is_refused_unread(client: TestClient) -> None:
    body = json.dumps({"seed_words": "x" * MAX_BODY}).encode()
    response = client.post("/generate", content=body, headers={"content-type": "application/json"})
    error = assert_error(response, 413, "body")
    assert f"larger than {MAX_BODY} bytes" in error["detail"]
    assert response.headers["connection"] == "close"  # the body was left unread


def test_a_chunked_oversized_body_is_refused_while_reading(tiny_run: Path) -> None:
    app = create_app(settings_for(tiny_run, max_body_bytes=MAX_BODY))
    chunk, chunks = b"x" * 512, 100  # no Content-Length: the size shows only while reading
    received = 0
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        nonlocal received
        received += 1
        return {"type": "http.request", "body": chunk, "more_body": received < chunks}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    asyncio.run(app(http_scope("/generate"), receive, send))
    assert sent[0]["status"] == 413
    assert json.loads(sent[1]["body"])["errors"][0]["field"] == "body"
    assert received == MAX_BODY // len(chunk) + 1


@pytest.mark.parametrize("path", ["/healthz", "/generate"])
def test_oversized_headers_are_refused_before_anything_reads_them(
    client: TestClient, path: str
) -> None:
    big = {f"x-filler-{i}": "y" * 1000 for i in range(20)}  # 20 kB, one header line or many
    response = client.post(path, json={"max_words": 1}, headers=big)
    error = assert_error(response, 431, "headers")
    assert "larger than 16384 bytes" in error["detail"]
    assert client.post(path, json={"max_words": 1}, headers={"x-one": "y" * 1000}).status_code in (
        200,
        405,
    )


def test_size_refusals_on_the_openai_api_have_openais_body(client: TestClient) -> None:
    body = json.dumps({"prompt": "x" * MAX_BODY}).encode()
    too_large = client.post(
        "/v1/completions", content=body, headers={"content-type": "application/json"}
    )
    error = assert_openai_error(too_large, 413, "invalid_request_error")
    assert f"larger than {MAX_BODY} bytes" in error["message"]
    assert error["param"] is None
    assert too_large.headers["connection"] == "close"
    too_many = client.post("/v1/completions", json={"prompt": "I"}, headers=BIG_HEADERS)
    error = assert_openai_error(too_many, 431, "invalid_request_error")
    assert "larger than 16384 bytes" in error["message"]
    assert error["param"] is None


def test_under_a_root_path_the_openai_api_still_has_openais_body(tiny_run: Path) -> None:
    app = create_app(settings_for(tiny_run, max_body_bytes=MAX_BODY, root_path="/textgen"))
    client = TestClient(app)  # no lifespan: the body limit answers before any model is needed
    body = json.dumps({"prompt": "x" * MAX_BODY}).encode()
    for path in ("/textgen/v1/completions", "/v1/completions"):  # prefix kept, or stripped
        response = client.post(path, content=body, headers={"content-type": "application/json"})
        assert_openai_error(response, 413, "invalid_request_error")
    response = client.post("/textgen/generate", content=body)
    assert_error(response, 413, "body")


def test_the_middleware_imports_no_model_code() -> None:
    """The middleware answers before any route: it must not load the engine (and torch)."""
    code = (
        "import sys, app.errors, app.keys, app.middleware, app.ratelimit; "
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr


def test_a_body_just_under_the_limit_is_read(client: TestClient) -> None:
    body = json.dumps({"seed_words": "I " * 40, "max_words": 2}).encode()
    body += b" " * (MAX_BODY - len(body))
    response = client.post("/generate", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 200, response.text


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/next-words", {"top_k": 0}, "top_k"),
        ("/next-words", {"top_k": 23}, "top_k"),
        ("/next-words", {"seed_words": "I a", "on_unknown": "error"}, "seed_words"),
        ("/next-words", {"k": 3}, "k"),
        ("/score", {}, "text"),
        ("/score", {"text": ""}, "text"),
        ("/score", {"text": []}, "text"),
        ("/score", {"text": "I see a zebra", "on_unknown": "error"}, "text"),
        ("/score", {"text": ["x"] * 51}, "text"),
        ("/sessions", {"seed_words": 3}, "seed_words"),
        ("/sessions", {"session_id": "x"}, "session_id"),
    ],
)
def test_other_endpoints_name_the_bad_field(
    client: TestClient, path: str, body: dict[str, Any], field: str
) -> None:
    assert_error(client.post(path, json=body), 422, field)


def test_the_schema_says_a_text_to_score_is_not_empty(client: TestClient) -> None:
    """What the server refuses above (an empty string or list), the schema refuses too."""
    schema = client.get("/openapi.json").json()["components"]["schemas"]["ScoreRequest"]
    words, string = schema["properties"]["text"]["anyOf"]
    assert (words["type"], words["minItems"]) == ("array", 1)
    assert (string["type"], string["minLength"]) == ("string", 1)


def post_escaped(client: TestClient, path: str, body: Any) -> Any:
    """POST ``body`` as JSON with ``\\uXXXX`` escapes: a lone surrogate is sent as JSON's
    ``"\\ud800"``, which httpx's own encoder (UTF-8) cannot write."""
    return client.post(
        path, content=json.dumps(body).encode(), headers={"content-type": "application/json"}
    )


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/generate", {"seed_words": "I \ud800", "max_words": 3}, "seed_words"),
        ("/generate", {"seed_words": ["I", "can\udc00"]}, "seed_words"),
        ("/generate", {"seed_words": "I \ud800", "stream": True}, "seed_words"),
        ("/generate", {"stop": "\ud800"}, "stop"),
        ("/generate", {"stop": [".", "\udfff!"]}, "stop"),
        ("/generate", {"session_id": "\ud800"}, "session_id"),
        ("/generate", {"model": "run\ud800"}, "model"),
        ("/sessions", {"seed_words": "I \ud800"}, "seed_words"),
        ("/sessions", {"model": "\ud800"}, "model"),
        ("/next-words", {"seed_words": "\ud800"}, "seed_words"),
        ("/next-words", {"session_id": "x\ud800"}, "session_id"),
        ("/score", {"text": "I can \ud800"}, "text"),
        ("/score", {"text": ["I", "\ud800"]}, "text"),
    ],
)
def test_a_lone_surrogate_is_refused_naming_its_field(
    client: TestClient, path: str, body: dict[str, Any], field: str
) -> None:
    error = assert_error(post_escaped(client, path, body), 422, field)
    message = next(e["message"] for e in error["errors"] if e["field"] == field)
    assert "lone UTF-16 surrogate (\\ud" in message
    assert message.endswith("send valid Unicode")


def test_a_session_with_a_lone_surrogate_is_not_created(client: TestClient) -> None:
    sessions = client.app.state.models.default.service.sessions  # type: ignore[attr-defined]
    before = len(sessions)
    assert_error(
        post_escaped(client, "/sessions", {"seed_words": "I can \ud800"}), 422, "seed_words"
    )
    assert len(sessions) == before


def test_a_session_id_that_is_too_long_is_refused(client: TestClient) -> None:
    assert_error(client.get("/sessions/" + "x" * 65), 422, "session_id")


def test_unknown_paths_and_methods_answer_in_the_same_shape(client: TestClient) -> None:
    missing = client.get("/nope")
    assert missing.status_code == 404
    assert missing.json() == {"detail": "no route GET /nope; GET /docs lists the API", "errors": []}
    wrong = client.get("/generate")
    assert wrong.status_code == 405
    assert wrong.json()["errors"] == []
    # As OpenAI answers a path it does not serve (its SDKs show the message).
    missing = client.post("/v1/chat/nope", json={})
    error = assert_openai_error(missing, 404, "invalid_request_error")
    assert error["message"] == "Invalid URL (POST /v1/chat/nope)"
    assert error["param"] is None
    wrong = client.get("/v1/completions")
    assert_openai_error(wrong, 405, "invalid_request_error")
    assert wrong.headers["allow"] == "POST"


# Every code point, lone surrogates too (JSON's "\ud800" escape sends one).
code_points = st.characters()
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(code_points, max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(code_points, max_size=8), inner)
    ),
    max_leaves=10,
)
fields = st.sampled_from(
    [
        *("seed_words", "top_k", "max_words", "temperature", "top_p", "random_seed", "n"),
        *("stop", "session_id", "stream", "on_unknown", "uniform", "text", "zzz"),
    ]
)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    path=st.sampled_from(["/generate", "/next-words", "/score", "/sessions"]),
    body=st.dictionaries(fields, json_values, max_size=6) | json_values,
)
def test_no_json_body_gets_a_server_error(client: TestClient, path: str, body: Any) -> None:
    response = client.post(
        path,
        content=json.dumps(body).encode(),
        headers={"content-type": "application/json"},
    )
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        assert set(response.json()) == {"detail", "errors"}
