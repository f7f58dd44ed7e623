"""POST /generate: determinism, top-k against the model, greedy, samples, stop strings, seeds."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from hypothesis import given, settings
from hypothesis import strategies as st

from app.main import create_app
from app.schemas import MAX_RANDOM_SEED
from app.serving import RandomSeeds
from model_store.vocab import tokenize
from tests.app_helpers import Replay, longest_copy, settings_for
from tests.conftest import TINY_TEXT, MakeRun


@pytest.fixture(scope="module")
def client(tiny_run: Path) -> Iterator[TestClient]:
    with TestClient(create_app(settings_for(tiny_run))) as client:
        yield client


@pytest.fixture(scope="module")
def replay(tiny_run: Path) -> Replay:
    return Replay(tiny_run)


def generate(client: TestClient, **body: Any) -> dict[str, Any]:
    response = client.post("/generate", json=body)
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


def test_same_request_and_seed_give_the_same_text(client: TestClient) -> None:
    body = {"seed_words": "I can see", "max_words": 30, "random_seed": 7}
    first, again = generate(client, **body), generate(client, **body)
    other = generate(client, **{**body, "random_seed": 8})
    assert first == again
    assert first["random_seed"] == 7
    assert other["words"] != first["words"]


def test_server_picks_a_seed_that_reproduces_the_text(client: TestClient) -> None:
    first = generate(client, seed_words="the sea", max_words=30)
    seed = first["random_seed"]
    assert isinstance(seed, int)
    assert 0 <= seed < 2**53
    again = generate(client, seed_words="the sea", max_words=30, random_seed=seed)
    assert again["text"] == first["text"]
    assert generate(client, seed_words="the sea", max_words=30)["random_seed"] != seed


def test_server_seeds_cover_the_whole_range_and_cost_one_system_call_a_block(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    draws: list[int] = []
    real = os.urandom

    def urandom(size: int) -> bytes:
        draws.append(size)
        return b"\xff" * 8 + real(size - 8)

    monkeypatch.setattr("app.serving.os.urandom", urandom)
    seeds = RandomSeeds()
    taken = [seeds() for _ in range(RandomSeeds.BLOCK + 1)]
    assert len(draws) == 2  # one block, then the next
    assert MAX_RANDOM_SEED in taken  # all 53 bits used, none past the limit
    assert all(0 <= s <= MAX_RANDOM_SEED for s in taken)
    assert len(set(taken)) == len(taken)


@settings(max_examples=25, deadline=None)
@given(
    random_seed=st.integers(0, 2**53 - 1),
    top_k=st.integers(1, 6),
    temperature=st.sampled_from([0.3, 1.0, 2.5]),
    top_p=st.sampled_from([0.5, 1.0]),
    uniform=st.booleans(),
)
def test_every_sampled_word_lies_in_the_models_top_k(
    client: TestClient,
    replay: Replay,
    random_seed: int,
    top_k: int,
    temperature: float,
    top_p: float,
    uniform: bool,
) -> None:
    out = generate(
        client,
        seed_words=["I", "can"],
        max_words=15,
        top_k=top_k,
        temperature=temperature,
        top_p=top_p,
        uniform=uniform,
        random_seed=random_seed,
    )
    assert len(out["words"]) == 15
    assert max(replay.ranks(["I", "can"], out["words"])) < top_k


def test_top_k_1_is_greedy_and_temperature_0_is_greedy(client: TestClient, replay: Replay) -> None:
    expected = replay.greedy(["the", "wind"], 20)
    top_1 = generate(client, seed_words="the wind", max_words=20, top_k=1, random_seed=1)
    cold = generate(client, seed_words="the wind", max_words=20, temperature=0, random_seed=2)
    assert top_1["words"] == expected
    assert cold["words"] == expected


def test_no_seed_starts_from_the_start_of_a_text(client: TestClient, replay: Replay) -> None:
    out = generate(client, max_words=12, temperature=0)
    assert out["seed_words"] == []
    assert out["words"] == replay.greedy([], 12)
    assert out["text"] == out["generated_text"] == replay.vocab.detokenize(out["words"])
    assert out["usage"] == {"seed_words": 0, "generated_words": 12, "total_words": 12}


def test_text_is_the_seed_followed_by_the_generated_words(
    client: TestClient, replay: Replay
) -> None:
    out = generate(client, seed_words="I can see the sea.", max_words=20, random_seed=3)
    seed = tokenize("I can see the sea.")
    vocab = replay.vocab
    assert out["seed_words"] == seed
    assert out["text"] == vocab.detokenize(seed + out["words"])
    assert out["text"] == vocab.detokenize(seed) + out["generated_text"]
    assert out["finish_reason"] == "length"
    assert out["usage"] == {"seed_words": 6, "generated_words": 20, "total_words": 26}
    assert out["samples"] == [
        {
            "index": 0,
            "text": out["text"],
            "generated_text": out["generated_text"],
            "words": out["words"],
            "finish_reason": "length",
            "longest_copy": longest_copy(tokenize(TINY_TEXT), seed + out["words"]),
        }
    ]
    assert out["samples"][0]["longest_copy"] >= 6  # the seed is a line of the training text
    assert out["model"] == client.get("/info").json()["model"]


def test_max_words_0_returns_the_seed_alone(client: TestClient) -> None:
    out = generate(client, seed_words="I can", max_words=0)
    assert out["words"] == []
    assert out["generated_text"] == ""
    assert out["text"] == "I can"


def test_n_samples_are_rows_seeded_from_random_seed_plus_i(client: TestClient) -> None:
    body = {"seed_words": "you can", "max_words": 25, "top_k": 8}
    batch = generate(client, n=3, random_seed=100, **body)
    assert [s["index"] for s in batch["samples"]] == [0, 1, 2]
    for i, got in enumerate(batch["samples"]):
        alone = generate(client, random_seed=100 + i, **body)
        assert got["words"] == alone["words"]
        assert got["text"] == alone["text"]
    assert batch["words"] == batch["samples"][0]["words"]
    assert batch["usage"]["generated_words"] == 75
    assert len({tuple(s["words"]) for s in batch["samples"]}) == 3


def _long_sample(client: TestClient) -> dict[str, Any]:
    return generate(client, seed_words="I can", max_words=60, random_seed=11)


def _piece_starts(replay: Replay, words: list[str]) -> list[int]:
    """Where each generated word's text starts in generated_text (seed "I can")."""
    detok, seed = replay.vocab.detokenize, ["I", "can"]
    return [len(detok(seed + words[:k])) - len(detok(seed)) for k in range(len(words))]


def test_stop_at_a_word_cuts_the_text_before_it(client: TestClient, replay: Replay) -> None:
    full = _long_sample(client)
    text, words = full["generated_text"], full["words"]
    starts = _piece_starts(replay, words)
    # A word, past the third, that comes after a space and appears there for the first time.
    j = next(
        j
        for j in range(3, len(words))
        if text[starts[j]] == " " and text.index(" " + words[j]) == starts[j]
    )
    out = generate(
        client, seed_words="I can", max_words=60, random_seed=11, stop=[" " + words[j], "@@"]
    )
    assert out["finish_reason"] == "stop"
    assert out["generated_text"] == text[: starts[j]]
    assert out["words"] == words[:j]
    assert out["text"] == "I can" + out["generated_text"]


def test_stop_inside_a_word_keeps_that_words_start(client: TestClient, replay: Replay) -> None:
    full = _long_sample(client)
    text, words = full["generated_text"], full["words"]
    starts = _piece_starts(replay, words)
    # The tail of a word, whose first appearance in the text is inside a word.
    stop = next(
        w[1:]
        for w in words[2:]
        if len(w) >= 3 and w.isalpha() and text[text.index(w[1:]) - 1].isalpha()
    )
    cut = text.index(stop)
    out = generate(client, seed_words="I can", max_words=60, random_seed=11, stop=stop)
    assert out["finish_reason"] == "stop"
    assert out["generated_text"] == text[:cut]
    assert out["words"] == words[: sum(1 for s in starts if s < cut)]


def test_stop_spanning_words_is_matched_on_the_text(client: TestClient) -> None:
    full = _long_sample(client)
    text = full["generated_text"]
    start = len(text) // 2
    stop = text[start : start + 6]  # crosses word boundaries: spaces, punctuation, lines
    out = generate(client, seed_words="I can", max_words=60, random_seed=11, stop=[stop])
    kept = out["generated_text"]
    assert out["finish_reason"] == "stop"
    assert text.startswith(kept)
    assert stop not in kept
    assert text[len(kept) : text.index(stop)].strip(" ") == ""


def test_a_stop_that_never_appears_changes_nothing(client: TestClient) -> None:
    full = _long_sample(client)
    out = generate(client, seed_words="I can", max_words=60, random_seed=11, stop="zzz")
    assert out == full


def test_unknown_seed_words_fall_back_and_are_listed(client: TestClient) -> None:
    out = generate(client, seed_words=["i", "zebra", "SEA", "can"], max_words=3, random_seed=1)
    assert out["seed_words"] == ["I", "<unk>", "sea", "can"]
    assert out["unknown_words"] == ["i", "zebra", "SEA"]
    assert out["text"].startswith("i zebra SEA can")


def test_on_unknown_error_names_the_words(client: TestClient) -> None:
    response = client.post(
        "/generate", json={"seed_words": "I can see a zebra", "on_unknown": "error"}
    )
    assert response.status_code == 422
    (error,) = response.json()["errors"]
    assert error["field"] == "seed_words"
    assert "'a'" in error["message"]
    assert "'zebra'" in error["message"]
    assert "'see'" not in error["message"]


def test_case_only_unknowns_say_what_they_match(client: TestClient) -> None:
    response = client.post("/generate", json={"seed_words": ["SEA"], "on_unknown": "error"})
    assert response.status_code == 422
    assert "'SEA' (only as 'sea')" in response.json()["detail"]


@pytest.mark.parametrize(
    "model",
    [
        {"cell": "lstm"},
        {"cell": "gru", "layers": 2},
        {"cell": "rnn_relu", "tie_weights": True},
        {"softmax": "adaptive", "cutoffs": (8,)},
    ],
    ids=["lstm", "gru-2-layers", "relu-tied", "adaptive"],
)
def test_every_architecture_generates_within_top_k(
    make_run: MakeRun, model: dict[str, Any]
) -> None:
    run_dir = make_run(**model)
    replay = Replay(run_dir)
    with TestClient(create_app(settings_for(run_dir))) as client:
        out = generate(client, seed_words="I can", max_words=20, top_k=3, random_seed=5, n=2)
        greedy = generate(client, seed_words="I can", max_words=10, temperature=0)
    for sample in out["samples"]:
        assert max(replay.ranks(["I", "can"], sample["words"])) < 3
    assert greedy["words"] == replay.greedy(["I", "can"], 10)


def test_a_tiny_temperature_is_greedy(client: TestClient) -> None:
    greedy = generate(client, seed_words="I can", max_words=8, temperature=0)
    tiny = generate(client, seed_words="I can", max_words=8, temperature=1e-30, random_seed=3)
    assert tiny["words"] == greedy["words"]


def test_repetition_controls_apply_and_bad_ones_are_named(client: TestClient) -> None:
    body = {"seed_words": "I can see", "max_words": 40, "temperature": 0, "top_k": 0}
    looping = client.post("/generate", json=body).json()["words"]
    controlled = client.post("/generate", json={**body, "no_repeat_ngram_size": 2}).json()
    words = ["I", "can", "see", *controlled["words"]]
    pairs = [tuple(words[i : i + 2]) for i in range(len(words) - 1)]
    assert len(pairs) == len(set(pairs))
    assert controlled["words"] != looping
    for field, value in [
        ("repetition_penalty", 0.5),
        ("presence_penalty", 3),
        ("frequency_penalty", -2.5),
        ("no_repeat_ngram_size", -1),
    ]:
        response = client.post("/generate", json={**body, field: value})
        assert response.status_code == 422
        assert response.json()["errors"][0]["field"] == field


def test_bad_words_never_appear(client: TestClient) -> None:
    body = {"seed_words": "I can", "max_words": 40, "n": 6, "top_k": 0, "random_seed": 1}
    free = client.post("/generate", json=body).json()
    assert any("the" in s["words"] for s in free["samples"])  # the control has work to do
    blocked = client.post("/generate", json={**body, "bad_words": ["the", "I can"]}).json()
    for sample in blocked["samples"]:
        words = ["I", "can", *sample["words"]]
        assert "the" not in sample["words"]
        assert all(words[i : i + 2] != ["I", "can"] for i in range(1, len(words) - 1))


def test_min_words_holds_stop_strings_back(client: TestClient) -> None:
    body = {"seed_words": "I can", "max_words": 30, "stop": ["e"], "random_seed": 2}
    early = client.post("/generate", json=body).json()
    assert len(early["words"]) < 10
    held = client.post("/generate", json={**body, "min_words": 10}).json()
    assert len(held["words"]) >= 10
    # The same draws: the words that stopped the early sample are there, and went on.
    assert held["words"][: len(early["words"])] == early["words"]
    assert held["finish_reason"] == "stop" or len(held["words"]) == 30
    refused = client.post("/generate", json={**body, "min_words": 31})
    assert refused.status_code == 422
    assert refused.json()["errors"][0]["field"] == "min_words"
