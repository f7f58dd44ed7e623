"""Sessions: continuation equivalence, expiry, eviction, conflicts, and the store itself."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient

from app.main import create_app
from app.sessions import MemorySessionStore
from tests.app_helpers import Replay, settings_for
from tests.conftest import MakeRun


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def store(clock: FakeClock) -> MemorySessionStore:
    return MemorySessionStore(ttl_seconds=60, max_sessions=3, clock=clock)


@pytest.fixture
def client(tiny_run: Path, store: MemorySessionStore) -> Iterator[TestClient]:
    app = create_app(settings_for(tiny_run, session_max_words=60), session_store=store)
    with TestClient(app) as client:
        yield client


def post(client: TestClient, path: str, status: int = 200, **body: Any) -> dict[str, Any]:
    response = client.post(path, json=body)
    assert response.status_code == status, response.text
    return response.json()  # type: ignore[no-any-return]


def next_probs(client: TestClient, **body: Any) -> list[float]:
    """The probability of every word after the seed or session, in word order."""
    ranked = post(client, "/next-words", top_k=22, **body)["words"]
    return [p for _, p in sorted((w["word"], w["probability"]) for w in ranked)]


def new_session(client: TestClient, **body: Any) -> str:
    return post(client, "/sessions", 201, **body)["session_id"]  # type: ignore[no-any-return]


def test_a_session_starts_from_its_seed_words(client: TestClient) -> None:
    created = post(client, "/sessions", 201, seed_words="I can zebra")
    assert len(created["session_id"]) >= 32
    assert created["words"] == ["I", "can", "zebra"]
    assert created["text"] == "I can zebra"
    assert created["unknown_words"] == ["zebra"]
    shown = client.get(f"/sessions/{created['session_id']}")
    assert shown.status_code == 200
    body = shown.json()
    assert body["words"] == ["I", "can", "zebra"]
    assert body["word_count"] == 3
    expires = datetime.fromisoformat(body["expires_at"])
    created_at = datetime.fromisoformat(body["created_at"])
    assert (expires - created_at).total_seconds() == pytest.approx(60)


def test_greedy_20_words_equal_two_calls_of_10_in_a_session(client: TestClient) -> None:
    whole = post(client, "/generate", seed_words="I can", max_words=20, temperature=0)
    session = new_session(client, seed_words="I can")
    first = post(client, "/generate", session_id=session, max_words=10, temperature=0)
    second = post(client, "/generate", session_id=session, max_words=10, temperature=0)
    assert first["words"] + second["words"] == whole["words"]
    assert first["session_id"] == second["session_id"] == session
    assert "I can" + first["generated_text"] + second["generated_text"] == whole["text"]
    shown = client.get(f"/sessions/{session}").json()
    assert shown["words"] == ["I", "can", *whole["words"]]
    assert shown["text"] == whole["text"]
    assert next_probs(client, session_id=session) == pytest.approx(
        next_probs(client, seed_words=shown["words"])
    )


def test_seed_words_sent_to_a_session_are_fed_before_generating(client: TestClient) -> None:
    whole = post(client, "/generate", seed_words="I can see", max_words=8, temperature=0)
    session = new_session(client, seed_words="I")
    out = post(
        client, "/generate", session_id=session, seed_words="can see", max_words=8, temperature=0
    )
    assert out["words"] == whole["words"]
    assert out["seed_words"] == ["can", "see"]
    assert out["text"] == " can see" + out["generated_text"]
    assert client.get(f"/sessions/{session}").json()["text"] == whole["text"]


def test_a_session_without_seed_starts_a_text(client: TestClient, tiny_run: Path) -> None:
    session = new_session(client)
    out = post(client, "/generate", session_id=session, max_words=6, temperature=0)
    assert out["words"] == Replay(tiny_run).greedy([], 6)


def test_after_a_stop_the_session_continues_from_its_last_kept_word(client: TestClient) -> None:
    # Sampled from the whole vocabulary, so that the tiny model's words vary.
    probe = post(client, "/generate", seed_words="I can", max_words=12, top_k=0, random_seed=7)
    words = probe["words"]
    j = next(j for j in range(1, 12) if words[j] not in words[:j])  # its first appearance
    session = new_session(client, seed_words="I can")
    out = post(
        client,
        "/generate",
        session_id=session,
        max_words=12,
        top_k=0,
        random_seed=7,
        stop=" " + words[j],
    )
    assert out["finish_reason"] == "stop"
    assert out["words"] == words[:j]
    assert client.get(f"/sessions/{session}").json()["words"] == ["I", "can", *words[:j]]

    from_session = next_probs(client, session_id=session)
    assert from_session == pytest.approx(next_probs(client, seed_words=["I", "can", *words[:j]]))
    assert from_session != pytest.approx(
        next_probs(client, seed_words=["I", "can", *words[: j + 1]])
    )


def test_session_states_are_kept_on_the_cpu(client: TestClient, store: MemorySessionStore) -> None:
    session = new_session(client, seed_words="I can")
    stored = asyncio.run(store.get(session))
    assert stored is not None
    assert isinstance(stored.hidden, torch.Tensor)
    assert stored.hidden.device.type == "cpu"
    assert stored.hidden.shape == (1, 1, 8)


def test_a_deleted_session_is_gone(client: TestClient) -> None:
    session = new_session(client)
    assert client.delete(f"/sessions/{session}").status_code == 204
    for response in (
        client.get(f"/sessions/{session}"),
        client.delete(f"/sessions/{session}"),
        client.post("/generate", json={"session_id": session}),
        client.post("/next-words", json={"session_id": session}),
    ):
        assert response.status_code == 404
        body = response.json()
        assert "unknown or has expired" in body["detail"]
        assert body["errors"] == [{"field": "session_id", "message": "unknown or expired"}]


def test_an_unknown_id_is_a_404(client: TestClient) -> None:
    response = client.get("/sessions/not-a-session")
    assert response.status_code == 404
    assert "'not-a-session' is unknown or has expired" in response.json()["detail"]


def test_a_session_expires_a_ttl_after_its_last_use(client: TestClient, clock: FakeClock) -> None:
    session = new_session(client, seed_words="I")
    clock.now += 50
    assert client.get(f"/sessions/{session}").status_code == 200  # moves the expiry on
    clock.now += 50
    post(client, "/generate", session_id=session, max_words=2)
    clock.now += 59
    assert client.get(f"/sessions/{session}").status_code == 200
    clock.now += 61
    response = client.post("/generate", json={"session_id": session})
    assert response.status_code == 404
    assert "expired" in response.json()["detail"]


def test_the_least_recently_used_session_is_evicted_first(client: TestClient) -> None:
    a, b, c = (new_session(client) for _ in range(3))
    assert client.get(f"/sessions/{a}").status_code == 200  # a is now used after b and c
    d = new_session(client)
    assert client.get(f"/sessions/{b}").status_code == 404
    for kept in (a, c, d):
        assert client.get(f"/sessions/{kept}").status_code == 200


def test_a_session_cannot_grow_past_its_word_limit(client: TestClient) -> None:
    session = new_session(client, seed_words="I can")
    post(client, "/generate", session_id=session, max_words=50)
    response = client.post("/generate", json={"session_id": session, "max_words": 10})
    assert response.status_code == 422
    (error,) = response.json()["errors"]
    assert error["field"] == "max_words"
    assert "limit of 60" in error["message"]
    assert client.get(f"/sessions/{session}").json()["word_count"] == 52


def test_a_session_continues_one_text_so_n_must_be_1(client: TestClient) -> None:
    session = new_session(client)
    response = client.post("/generate", json={"session_id": session, "n": 2})
    assert response.status_code == 422
    assert response.json()["errors"][0]["field"] == "n"


def test_next_words_from_a_session_leave_it_unchanged(client: TestClient) -> None:
    session = new_session(client, seed_words="I can")
    from_session = post(client, "/next-words", session_id=session, top_k=5)
    from_seed = post(client, "/next-words", seed_words="I can", top_k=5)
    assert from_session["words"] == from_seed["words"]
    assert from_session["session_id"] == session
    assert client.get(f"/sessions/{session}").json()["words"] == ["I", "can"]
    more = post(client, "/next-words", session_id=session, seed_words=["see"], top_k=5)["words"]
    whole = post(client, "/next-words", seed_words="I can see", top_k=5)["words"]
    assert [w["word"] for w in more] == [w["word"] for w in whole]
    # one forward pass or two: the same up to float rounding
    assert [w["probability"] for w in more] == pytest.approx([w["probability"] for w in whole])


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_sessions_continue_every_cell_exactly(make_run: MakeRun, cell: str) -> None:
    run_dir = make_run(cell=cell, layers=2)
    with TestClient(create_app(settings_for(run_dir))) as client:
        whole = post(client, "/generate", seed_words="the sea", max_words=12, temperature=0)
        session = new_session(client, seed_words="the sea")
        first = post(client, "/generate", session_id=session, max_words=5, temperature=0)
        second = post(client, "/generate", session_id=session, max_words=7, temperature=0)
    assert first["words"] + second["words"] == whole["words"]


def test_the_store_refuses_a_stale_replace(store: MemorySessionStore) -> None:
    async def scenario() -> None:
        session = await store.create(torch.zeros(1, 1, 2), ["a"])
        first = session.continued(torch.ones(1, 1, 2), ["b"])
        racing = session.continued(torch.ones(1, 1, 2), ["c"])
        assert await store.replace(first)
        assert not await store.replace(racing)
        stored = await store.get(session.id)
        assert stored is not None
        assert stored.words == ("a", "b")
        assert await store.delete(session.id)
        assert not await store.replace(first.continued(torch.zeros(1, 1, 2), ["d"]))

    asyncio.run(scenario())


def test_the_store_never_holds_more_than_its_maximum(
    store: MemorySessionStore, clock: FakeClock
) -> None:
    async def scenario() -> None:
        for _ in range(10):
            await store.create(torch.zeros(1, 1, 2), [])
            clock.now += 1
        assert len(store) == 3
        clock.now += 60
        assert len(store) == 0

    asyncio.run(scenario())
