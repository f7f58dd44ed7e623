"""Streaming: events equal the plain response, framing and headers, errors, disconnects."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from asgi_lifespan import LifespanManager
from fastapi.testclient import TestClient

from app.engine import batch as batch_module
from app.main import create_app
from app.serving import TextService
from model_store.network import Hidden
from tests.app_helpers import http_scope, parse_sse, settings_for


@pytest.fixture(scope="module")
def client(tiny_run: Path) -> Iterator[TestClient]:
    with TestClient(create_app(settings_for(tiny_run))) as client:
        yield client


def stream(client: TestClient, **body: Any) -> list[tuple[str, Any]]:
    response = client.post("/generate", json={**body, "stream": True})
    assert response.status_code == 200, response.text
    return parse_sse(response.text)


def test_stream_events_equal_the_plain_response(client: TestClient) -> None:
    body = {"seed_words": "I can see", "max_words": 30, "random_seed": 21}
    plain = client.post("/generate", json=body).json()
    events = stream(client, **body)
    names = [name for name, _ in events]
    assert names == ["word"] * 30 + ["done"]
    words = [data for name, data in events if name == "word"]
    assert [w["word"] for w in words] == plain["words"]
    assert {w["index"] for w in words} == {0}
    assert "".join(w["text"] for w in words) == plain["generated_text"]
    assert events[-1][1] == plain


def test_stream_frames_are_plain_newline_events_and_not_buffered(client: TestClient) -> None:
    response = client.post(
        "/generate", json={"seed_words": "I", "max_words": 3, "stream": True, "random_seed": 1}
    )
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["x-accel-buffering"] == "no"
    assert response.headers["cache-control"] == "no-cache"
    assert "\r" not in response.text
    assert response.text.startswith("event: word\ndata: {")
    assert response.text.endswith("}\n\n")
    assert response.text.count("\n\n") == 4


def test_stream_of_several_samples_tags_each_word(client: TestClient) -> None:
    body = {"seed_words": "the sea", "max_words": 12, "random_seed": 5, "n": 3, "stop": "!"}
    events = stream(client, **body)
    done = events[-1][1]
    assert events[-1][0] == "done"
    assert done == client.post("/generate", json=body).json()
    for sample in done["samples"]:
        mine = [d for name, d in events if name == "word" and d["index"] == sample["index"]]
        assert [d["word"] for d in mine] == sample["words"]
        assert "".join(d["text"] for d in mine) == sample["generated_text"]


def test_stop_strings_never_stream_text_they_take_back(client: TestClient) -> None:
    body = {"seed_words": "I can", "max_words": 40, "random_seed": 11}
    text = client.post("/generate", json=body).json()["generated_text"]
    stop = text[len(text) // 2 : len(text) // 2 + 7]
    events = stream(client, **body, stop=[stop])
    done = events[-1][1]
    assert done["finish_reason"] == "stop"
    streamed = "".join(d["text"] for name, d in events if name == "word")
    assert streamed == done["generated_text"]
    assert stop not in streamed


def test_a_stream_request_that_fails_validation_gets_a_plain_422(client: TestClient) -> None:
    response = client.post("/generate", json={"stream": True, "top_k": -1})
    assert response.status_code == 422
    assert response.headers["content-type"] == "application/json"
    assert response.json()["errors"][0]["field"] == "top_k"


def test_a_failure_after_the_stream_started_is_an_error_event(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_advance = batch_module.advance
    calls = 0

    def advance_then_fail(model: Any, hidden: Hidden, ids: Any) -> Hidden:
        nonlocal calls
        calls += 1
        if calls > 3:
            raise RuntimeError("the device fell over")
        return real_advance(model, hidden, ids)

    monkeypatch.setattr(batch_module, "advance", advance_then_fail)
    events = stream(client, seed_words="I can", max_words=10)
    assert [name for name, _ in events] == ["word", "word", "word", "error"]
    error = events[-1][1]
    assert "internal error" in error["detail"]
    assert "Traceback" not in json.dumps(error)


def test_a_client_that_disconnects_stops_its_generation(tiny_run: Path) -> None:
    words = 1_000_000  # far more than can run before the disconnect is noticed
    app = create_app(settings_for(tiny_run, max_words=words))
    body = json.dumps({"max_words": words, "stream": True}).encode()

    async def scenario() -> None:
        async with LifespanManager(app):
            service: TextService = app.state.models.default.service
            cancelled_before = service.engine.counters.cancelled
            first_word = asyncio.Event()
            read = False

            async def receive() -> dict[str, Any]:
                nonlocal read
                if not read:
                    read = True
                    return {"type": "http.request", "body": body, "more_body": False}
                await first_word.wait()
                return {"type": "http.disconnect"}

            async def send(message: dict[str, Any]) -> None:
                if b"event: word" in message.get("body", b""):
                    first_word.set()

            scope = http_scope("/generate", [(b"content-length", str(len(body)).encode())])
            await asyncio.wait_for(app(scope, receive, send), timeout=30)
            # One inference thread runs jobs in order: this one ends after the stream's.
            await asyncio.wait_for(service.engine.prime([], None), timeout=20)
            assert service.engine.counters.cancelled == cancelled_before + 1
            assert service.engine.pending == 0

    asyncio.run(scenario())
