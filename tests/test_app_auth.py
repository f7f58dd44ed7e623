"""API keys: sessions belong to the key that made them, and keys come from a file too."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from pydantic import ValidationError

from app.__main__ import build_settings, main, parse_args
from app.main import create_app
from app.sessions import MemorySessionStore
from tests.app_helpers import settings_for

ALPHA = {"Authorization": "Bearer alpha-key"}
BETA = {"X-API-Key": "beta-key"}


@pytest.fixture
def store() -> MemorySessionStore:
    return MemorySessionStore(ttl_seconds=60, max_sessions=10)


@pytest.fixture
def client(tiny_run: Path, store: MemorySessionStore) -> Iterator[TestClient]:
    settings = settings_for(tiny_run, api_keys=["alpha-key", "beta-key"])
    with TestClient(create_app(settings, session_store=store)) as client:
        yield client


def alpha_session(client: TestClient) -> str:
    response = client.post("/sessions", json={"seed_words": "I can"}, headers=ALPHA)
    assert response.status_code == 201, response.text
    return str(response.json()["session_id"])


def test_a_session_is_shown_only_to_the_key_that_made_it(client: TestClient) -> None:
    session = alpha_session(client)
    assert client.get(f"/sessions/{session}", headers=ALPHA).status_code == 200
    foreign = client.get(f"/sessions/{session}", headers=BETA)
    unknown = client.get("/sessions/no-such-session", headers=BETA)
    assert foreign.status_code == unknown.status_code == 404
    assert foreign.json()["errors"] == unknown.json()["errors"]


def test_another_key_can_neither_continue_nor_end_a_session(client: TestClient) -> None:
    session = alpha_session(client)
    refused = [
        client.post("/generate", json={"session_id": session, "max_words": 2}, headers=BETA),
        client.post(
            "/generate",
            json={"session_id": session, "max_words": 2, "stream": True},
            headers=BETA,
        ),
        client.post("/next-words", json={"session_id": session}, headers=BETA),
        client.delete(f"/sessions/{session}", headers=BETA),
    ]
    assert [r.status_code for r in refused] == [404] * 4
    shown = client.get(f"/sessions/{session}", headers=ALPHA).json()
    assert shown["words"] == ["I", "can"]  # nothing was added, nothing ended


def test_the_owner_continues_and_ends_its_session(client: TestClient) -> None:
    session = alpha_session(client)
    body = {"session_id": session, "max_words": 2}
    assert client.post("/generate", json=body, headers=ALPHA).status_code == 200
    assert client.post("/next-words", json={"session_id": session}, headers=ALPHA).is_success
    assert client.delete(f"/sessions/{session}", headers=ALPHA).status_code == 204
    assert client.get(f"/sessions/{session}", headers=ALPHA).status_code == 404


def test_a_session_keeps_a_fingerprint_of_its_key_not_the_key(
    client: TestClient, store: MemorySessionStore
) -> None:
    session = alpha_session(client)
    stored = asyncio.run(store.get(session, hashlib.sha256(b"alpha-key").hexdigest()))
    assert stored is not None
    assert stored.owner is not None
    assert "alpha-key" not in stored.owner


def test_without_keys_any_caller_sees_every_session(tiny_run: Path) -> None:
    with TestClient(create_app(settings_for(tiny_run))) as client:
        made = client.post("/sessions", json={}, headers={"X-API-Key": "anything"})
        assert made.status_code == 201
        session = made.json()["session_id"]
        assert client.get(f"/sessions/{session}").status_code == 200
        assert client.delete(f"/sessions/{session}", headers=BETA).status_code == 204


def test_the_store_hides_a_session_from_other_owners(store: MemorySessionStore) -> None:
    async def scenario() -> None:
        session = await store.create(torch.zeros(1, 1, 2), ["a"], owner="one")
        assert await store.get(session.id) is None
        assert await store.get(session.id, "two") is None
        assert not await store.delete(session.id, "two")
        assert (await store.get(session.id, "one")) is not None
        assert await store.delete(session.id, "one")

    asyncio.run(scenario())


# -- keys from a file ------------------------------------------------------------------------


def key_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "keys.txt"
    path.write_text(text, encoding="utf-8")
    return path


def test_keys_from_the_environment_the_flags_and_a_file_add_up(
    tiny_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WORDRNN_API_KEYS", "env-key")
    path = key_file(tmp_path, "# the partners\nfile-key-1\n\n  file-key-2  \n#file-key-3\n")
    args = parse_args(
        ["--model-dir", str(tiny_run), "--api-key", "flag-key", "--api-key-file", str(path)]
    )
    keys = [key.get_secret_value() for key in build_settings(args).api_keys]
    assert sorted(keys) == ["env-key", "file-key-1", "file-key-2", "flag-key"]


def test_a_key_from_the_file_opens_the_api(tiny_run: Path, tmp_path: Path) -> None:
    settings = settings_for(tiny_run, api_keys_file=key_file(tmp_path, "file-key\n"))
    with TestClient(create_app(settings)) as client:
        assert client.get("/info", headers={"X-API-Key": "file-key"}).status_code == 200
        assert client.get("/info", headers={"X-API-Key": "other"}).status_code == 401
        assert client.get("/info").status_code == 401


def test_a_key_with_a_space_is_refused(tiny_run: Path) -> None:
    with pytest.raises(ValidationError, match="must not be empty or hold spaces"):
        settings_for(tiny_run, api_keys=["two words"])


@pytest.mark.parametrize(
    ("name", "text", "reason"),
    [
        ("missing.txt", None, "cannot read"),
        ("comments.txt", "# no key yet\n\n", "holds no key"),
        ("spaced.txt", "# first\ntwo words\n", "line 2: a key holds a space"),
    ],
)
def test_a_bad_key_file_stops_start_up_naming_the_file(
    tiny_run: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    name: str,
    text: str | None,
    reason: str,
) -> None:
    path = tmp_path / name
    if text is not None:
        path.write_text(text, encoding="utf-8")
    with pytest.raises(ValidationError, match=reason):
        settings_for(tiny_run, api_keys_file=path)
    assert main(["--model-dir", str(tiny_run), "--api-key-file", str(path)]) == 2
    err = capsys.readouterr().err
    assert reason in err
    assert str(path) in err
