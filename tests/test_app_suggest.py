"""POST /next-words and POST /score, checked against the model itself."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient

from app.main import create_app
from tests.app_helpers import Replay, settings_for


@pytest.fixture(scope="module")
def client(tiny_run: Path) -> Iterator[TestClient]:
    with TestClient(create_app(settings_for(tiny_run))) as client:
        yield client


@pytest.fixture(scope="module")
def replay(tiny_run: Path) -> Replay:
    return Replay(tiny_run)


def post(client: TestClient, path: str, **body: Any) -> dict[str, Any]:
    response = client.post(path, json=body)
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


def test_next_words_are_the_models_most_likely_with_their_probabilities(
    client: TestClient, replay: Replay
) -> None:
    out = post(client, "/next-words", seed_words="I can see", top_k=5)
    log_probs = replay.log_probs(replay.state(["I", "can", "see"])).clone()
    log_probs[replay.banned] = -torch.inf
    values, ids = log_probs.topk(5)
    assert [w["word"] for w in out["words"]] == replay.vocab.decode(ids.tolist())
    assert [w["probability"] for w in out["words"]] == pytest.approx(values.exp().tolist())
    assert out["seed_words"] == ["I", "can", "see"]
    assert out["unknown_words"] == []


def test_next_words_cover_the_vocabulary_without_its_special_tokens(
    client: TestClient, replay: Replay
) -> None:
    out = post(client, "/next-words", top_k=len(replay.vocab))
    words = [w["word"] for w in out["words"]]
    assert sorted(words) == sorted(set(replay.vocab.tokens) - {"<unk>", "<bos>"})
    probs = [w["probability"] for w in out["words"]]
    assert probs == sorted(probs, reverse=True)
    special = replay.log_probs(replay.state([]))[replay.banned].exp().sum().item()
    assert sum(probs) + special == pytest.approx(1.0)


def test_next_words_at_the_start_of_a_text_agree_with_score(client: TestClient) -> None:
    suggested = post(client, "/next-words", top_k=3)["words"]
    for word in suggested:
        scored = post(client, "/score", text=[word["word"], "sea"])["words"][0]
        assert scored["probability"] == pytest.approx(word["probability"])


def test_score_gives_each_words_probability_and_the_perplexity(
    client: TestClient, replay: Replay
) -> None:
    out = post(client, "/score", text="I can see the zebra.")
    words = ["I", "can", "see", "the", "zebra", "."]
    assert [w["word"] for w in out["words"]] == words
    assert [w["token"] for w in out["words"]] == ["I", "can", "see", "the", "<unk>", "."]
    assert [w["known"] for w in out["words"]] == [True, True, True, True, False, True]
    assert out["unknown_words"] == ["zebra"]
    # Step by step from the start of a text, as generation walks it.
    hidden, expected = replay.state([]), []
    for word in ["I", "can", "see", "the", "<unk>", "."]:
        expected.append(replay.log_probs(hidden)[replay.vocab.id_of(word)].item())
        hidden = replay.step(hidden, word)
    assert [w["log_prob"] for w in out["words"]] == pytest.approx(expected, abs=1e-5)
    assert [w["probability"] for w in out["words"]] == pytest.approx(
        [math.exp(lp) for lp in expected]
    )
    assert out["log_prob"] == pytest.approx(sum(expected), abs=1e-4)
    assert out["perplexity"] == pytest.approx(math.exp(-sum(expected) / 6), rel=1e-4)


def test_a_likelier_text_has_a_lower_perplexity(client: TestClient, replay: Replay) -> None:
    greedy = replay.greedy([], 8)
    likely = post(client, "/score", text=greedy)["perplexity"]
    unlikely = post(client, "/score", text=[*reversed(greedy), "!", "!", "!"])["perplexity"]
    assert likely < unlikely


def test_long_texts_are_scored_in_chunks_exactly(client: TestClient) -> None:
    words = ("I can see the sea . " * 70).split()  # 420 words: two chunks
    out = post(client, "/score", text=words)
    head = post(client, "/score", text=words[:300])
    assert len(out["words"]) == 420
    assert [w["log_prob"] for w in out["words"][:300]] == pytest.approx(
        [w["log_prob"] for w in head["words"]], abs=1e-5
    )


def test_tokenize_gives_the_ids_the_model_reads(client: TestClient, replay: Replay) -> None:
    answer = post(client, "/tokenize", text="I can see zzyzx")
    vocab = replay.loaded.vocab
    assert [w["word"] for w in answer["words"]] == ["I", "can", "see", "zzyzx"]
    assert answer["ids"] == vocab.encode_words(["I", "can", "see", "zzyzx"])[0]
    assert answer["count"] == len(answer["ids"])
    assert [w["known"] for w in answer["words"]] == [True, True, True, False]
    assert answer["words"][3]["tokens"] == ["<unk>"]
    assert answer["words"][0]["tokens"] == [vocab.tokens[answer["ids"][0]]]
    assert answer["tokenizer"] == vocab.tokenizer.name
    # The same words as /score reads.
    scored = post(client, "/score", text="I can see zzyzx")["words"]
    assert [w["token"] for w in scored] == [t for w in answer["words"] for t in w["tokens"]]


def test_tokenize_refuses_a_text_without_words(client: TestClient) -> None:
    response = client.post("/tokenize", json={"text": "   "})
    assert response.status_code == 422
    assert response.json()["errors"][0]["field"] == "text"
