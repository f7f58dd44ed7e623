"""A subword model served: words in, whole words out, every text scored, nothing unknown."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient

from app.main import create_app
from app.text import PIECES_PER_WORD, Continuation
from model_store import checkpoint
from model_store.scoring import token_log_probs
from model_store.vocab import TokenizerSpec
from tests.app_helpers import parse_sse, settings_for
from tests.conftest import TINY_TEXT
from training.config import TrainConfig
from training.corpus import Corpus, Document
from training.data import build_dataset
from training.trainer import Trainer


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A subword model trained on the tiny text: random weights would write one endless
    word of bytes, a trained one writes words."""
    out = tmp_path_factory.mktemp("subword") / "run"
    config = TrainConfig(
        tokenizer="subword", subword_vocab=300, cell="lstm", embed_dim=32, hidden_dim=32,
        epochs=40, batch_size=4, seq_size=10, lr=0.01, valid_fraction=0.1, sample_every=0,
    )  # fmt: skip
    dataset = build_dataset(
        Corpus((Document("tiny", TINY_TEXT),)),
        TokenizerSpec("subword"),
        batch_size=config.batch_size,
        seq_size=config.seq_size,
        subword_vocab=config.subword_vocab,
    )
    trainer = Trainer(config, dataset, out, torch.device("cpu"))
    trainer.start_new()
    trainer.run()
    return out


@pytest.fixture(scope="module")
def client(run: Path) -> Iterator[TestClient]:
    with TestClient(create_app(settings_for(run))) as client:
        yield client


def post(client: TestClient, path: str, **body: Any) -> dict[str, Any]:
    response = client.post(path, json=body)
    assert response.status_code in (200, 201), response.text
    return response.json()  # type: ignore[no-any-return]


def generate(client: TestClient, **body: Any) -> dict[str, Any]:
    return post(client, "/generate", **{"seed_words": "I can", "random_seed": 7, **body})


def test_unseen_seed_words_are_not_unknown(client: TestClient) -> None:
    out = generate(client, seed_words="Zyxwv quixotically 日本", max_words=5)
    assert out["unknown_words"] == []
    assert out["seed_words"] == ["Zyxwv", "quixotically", "日本"]
    assert out["text"].startswith("Zyxwv quixotically 日本 ")


@pytest.mark.parametrize("max_words", [1, 4, 12])
def test_generation_gives_max_words_whole_words(client: TestClient, max_words: int) -> None:
    out = generate(client, max_words=max_words, top_k=0, n=3)
    for sample in out["samples"]:
        assert len(sample["words"]) == max_words
        assert "<unk>" not in sample["text"]
        assert all(w and not any(c.isspace() for c in w) for w in sample["words"])
    # One draw per piece: a longer sample begins with the shorter one, word for word, so the
    # shorter one ended on a whole word, not inside one.
    longer = generate(client, max_words=max_words + 3, top_k=0, n=3)
    for short, long in zip(out["samples"], longer["samples"], strict=True):
        assert long["words"][:max_words] == short["words"]


def test_a_stream_sends_the_same_whole_words(client: TestClient) -> None:
    body = {"seed_words": "I can", "random_seed": 3, "max_words": 9, "top_k": 0}
    with client.stream("POST", "/generate", json={**body, "stream": True}) as response:
        events = parse_sse(response.read().decode())
    words = [data["word"] for name, data in events if name == "word"]
    done = next(data for name, data in events if name == "done")
    assert words == done["words"] == post(client, "/generate", **body)["words"]
    assert (
        "".join(data["text"] for name, data in events if name == "word") == (done["generated_text"])
    )


def test_a_session_continues_exactly_where_it_stopped(client: TestClient) -> None:
    whole = generate(client, max_words=14, temperature=0)
    session = post(client, "/sessions", seed_words="I can")["session_id"]
    first = post(client, "/generate", session_id=session, max_words=7, temperature=0)
    second = post(client, "/generate", session_id=session, max_words=7, temperature=0)
    assert first["words"] + second["words"] == whole["words"]
    assert post(client, "/next-words", session_id=session, top_k=3)["words"]


def test_score_is_finite_for_words_never_seen(client: TestClient, run: Path) -> None:
    text = "I can see a xylophone, ünïcödé and 💥!"
    out = post(client, "/score", text=text)
    assert [w["word"] for w in out["words"]] == text.split()
    assert all(w["known"] and math.isfinite(w["log_prob"]) for w in out["words"])
    assert out["unknown_words"] == []
    # A word's log-probability is the sum of its pieces'; the text's, of all its pieces'.
    loaded = checkpoint.load(run, torch.device("cpu"))
    ids, _, sizes = loaded.vocab.encode_words(text.split())
    pieces = token_log_probs(loaded.model, loaded.vocab, ids).tolist()
    assert out["log_prob"] == pytest.approx(math.fsum(pieces), abs=1e-4)
    assert out["words"][4]["log_prob"] == pytest.approx(
        math.fsum(pieces[sum(sizes[:4]) : sum(sizes[:5])]), abs=1e-4
    )
    assert out["characters"] == len(text)
    assert out["bits_per_char"] == pytest.approx(-out["log_prob"] / math.log(2) / len(text))


def test_next_words_are_whole_words(client: TestClient) -> None:
    out = post(client, "/next-words", seed_words="the", top_k=8)
    words = [w["word"] for w in out["words"]]
    assert len(words) == 8
    assert all(not w.startswith("Ġ") and w != "<unk>" for w in words)
    assert sum(w["probability"] for w in out["words"]) <= 1 + 1e-6


def test_info_names_the_tokenizer_without_its_merges(client: TestClient) -> None:
    info = client.get("/info").json()
    assert info["tokenizer"]["name"] == "subword"
    assert info["tokenizer"]["pieces"] > 256
    assert "model" not in info["tokenizer"]
    assert "best_valid_bits_per_char" in info


def test_a_sample_of_one_endless_word_ends_at_the_piece_cap(run: Path) -> None:
    vocab = checkpoint.load(run, torch.device("cpu")).vocab
    start = next(t for t in vocab.tokens if t.startswith("Ġ"))
    more = next(t for i, t in enumerate(vocab.tokens) if not vocab.starts_word()[i])
    text = Continuation(vocab, ["I"], max_words=3)
    pushed = 0
    for token in [start, *[more] * 1000]:
        if not text.push_token(token):
            break
        pushed += 1
        if text.done:
            break
    assert pushed == 3 * PIECES_PER_WORD + PIECES_PER_WORD
    assert text.finish().words == [vocab.spell(vocab.encode([start, *[more] * (pushed - 1)]))]


def test_openai_logprobs_of_a_subword_model_are_whole_words(client: TestClient) -> None:
    body = {"prompt": "I can", "max_tokens": 8, "seed": 5, "logprobs": 2, "top_k": 5}
    choice = post(client, "/v1/completions", **body)["choices"][0]
    scores = choice["logprobs"]
    words = post(client, "/generate", seed_words="I can", max_words=8, random_seed=5)["words"]
    assert len(scores["tokens"]) == len(words)  # one entry per word, not per piece
    assert "".join(scores["tokens"]) == choice["text"]
    scored = post(client, "/score", text=["I", "can", *words])["words"][2:]
    for got, want in zip(scores["token_logprobs"], scored, strict=True):
        assert got == pytest.approx(want["log_prob"], abs=1e-5)
    for top in scores["top_logprobs"]:  # the likeliest pieces that open a word
        assert 1 <= len(top) <= 2
        assert all(math.isfinite(v) and v <= 0 for v in top.values())


def test_tokenize_spells_a_new_word_in_pieces(client: TestClient) -> None:
    answer = post(client, "/tokenize", text="Quixotically the")
    first, second = answer["words"]
    assert first["word"] == "Quixotically"
    assert first["known"]
    assert len(first["tokens"]) > 1  # a word no vocabulary holds, spelled in pieces
    assert answer["ids"] == first["ids"] + second["ids"]
    assert answer["tokenizer"] == "subword"
