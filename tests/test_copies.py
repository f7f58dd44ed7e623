"""The copy guard: the training text's index, each sample's ``longest_copy``, ``max_copy_words``."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from hypothesis import given, settings
from hypothesis import strategies as st

from app.main import create_app
from app.serving import CopyMeter
from model_store import checkpoint
from model_store.copies import CopyIndex, CopyIndexError
from model_store.vocab import TokenizerSpec
from tests.app_helpers import longest_copy, parse_sse, settings_for
from tests.conftest import MakeRun
from training.config import TrainConfig
from training.corpus import Corpus, Document
from training.data import build_dataset
from training.trainer import Trainer

# Twelve words in a fixed order, every one of them once per line: a model learns to recite it.
VERSE = "when the north wind blows we will sing of the old grey sea tonight\n"
LETTERS = st.sampled_from(["a", "b", "c", "d", "e", "\u00e9t\u00e9", "<nl>"])


@settings(max_examples=200, deadline=None)
@given(
    documents=st.lists(st.lists(LETTERS, max_size=30), min_size=1, max_size=3),
    words=st.lists(LETTERS, max_size=25),
    copied=st.integers(0, 20),
)
def test_longest_copy_equals_a_brute_force_search(
    documents: list[list[str]], words: list[str], copied: int
) -> None:
    words = words[:3] + documents[0][2 : 2 + copied] + words[3:]  # often a long run
    index = CopyIndex.from_bytes(CopyIndex.build(documents).to_bytes())
    want = max((longest_copy(doc, words) for doc in documents), default=0)
    assert index.longest_copy(words) == want
    for end in range(1, len(words) + 1):  # each run's occurrence, and the words after it
        run = [w for w in words[max(0, end - 3) : end] if w != "<nl>"]
        if not run:
            continue
        in_text = [
            [w for w in doc if w != "<nl>"][k : k + len(run) + 1]
            for doc in documents
            for k in range(len(doc))
        ]
        after = {gram[-1] for gram in in_text if gram[:-1] == run and len(gram) > len(run)}
        assert index.occurs(run) == any(gram[: len(run)] == run for gram in in_text)
        assert sorted(index.followers(run).tolist()) == sorted(index.word_ids(after).tolist())


@settings(max_examples=200, deadline=None)
@given(
    documents=st.lists(st.lists(LETTERS, max_size=30), min_size=1, max_size=3),
    texts=st.lists(st.lists(LETTERS, max_size=25), max_size=6),
    copied=st.integers(0, 20),
)
def test_texts_measured_together_measure_as_each_alone(
    documents: list[list[str]], texts: list[list[str]], copied: int
) -> None:
    """A server measures the samples that finish together at once: a text's runs never reach
    into the next one's words."""
    texts = [text[:2] + documents[0][i : i + copied] + text[2:] for i, text in enumerate(texts)]
    index = CopyIndex.build(documents)
    want = [max((longest_copy(doc, text) for doc in documents), default=0) for text in texts]
    assert index.longest_copies(texts) == want


class _CountingIndex:
    """A copy index's `longest_copies` that records each pass and fails on the word "bad"."""

    def __init__(self) -> None:
        self.passes: list[list[list[str]]] = []

    def longest_copies(self, texts: list[list[str]]) -> list[int]:
        self.passes.append(texts)
        if any("bad" in text for text in texts):
            raise ValueError("a bad text")
        return [len(text) for text in texts]


def test_the_samples_that_finish_together_are_measured_in_one_pass() -> None:
    index = _CountingIndex()
    meter = CopyMeter(index)  # type: ignore[arg-type]

    async def scenario() -> list[Any]:
        asks = [meter.measure([["a"] * i, ["b"]]) for i in range(3)]
        together = await asyncio.gather(*asks)
        alone = await meter.measure([["c", "d"]])
        return [*together, alone]

    assert asyncio.run(scenario()) == [[0, 1], [1, 1], [2, 1], [2]]
    assert [len(texts) for texts in index.passes] == [6, 1]


def test_a_text_that_fails_fails_its_own_request_alone() -> None:
    index = _CountingIndex()
    meter = CopyMeter(index)  # type: ignore[arg-type]

    async def scenario() -> list[Any]:
        cancelled = asyncio.ensure_future(meter.measure([["gone"]]))
        asks = [meter.measure([["a"]]), meter.measure([["x"], ["bad"]]), meter.measure([["b"]])]
        await asyncio.sleep(0)
        cancelled.cancel()
        return await asyncio.gather(*asks, return_exceptions=True)

    first, failed, last = asyncio.run(scenario())
    assert (first, last) == ([1], [1])
    assert isinstance(failed, ValueError)
    assert ["gone"] not in [text for texts in index.passes for text in texts]


def test_a_run_never_crosses_two_documents() -> None:
    index = CopyIndex.build([["a", "b"], ["c", "d"]])
    assert index.longest_copy(["a", "b", "c", "d"]) == 2
    assert not index.occurs(["b", "c"])
    assert index.words == 4


def test_an_index_with_many_words_searches_past_its_packed_keys() -> None:
    words = [f"w{i}" for i in range(70_000)]  # 17 bits a word: three words a key
    index = CopyIndex.build([words])
    assert index.longest_copy(["x", *words[100:140], "w5"]) == 40
    assert index.occurs(words[5:30])
    assert not index.occurs([*words[5:30], "w3"])


@pytest.mark.parametrize(
    "data",
    [b"", b"not an archive", CopyIndex.build([["a"]]).to_bytes()[:-20]],
    ids=["empty", "garbage", "truncated"],
)
def test_a_damaged_index_is_refused(data: bytes) -> None:
    with pytest.raises(CopyIndexError):
        CopyIndex.from_bytes(data)


def test_the_index_is_a_verified_file_of_the_run_folder(make_run: MakeRun) -> None:
    run_dir = make_run()
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["copies"] == "copies.npz"
    assert manifest["files"]["copies.npz"]["bytes"] == (run_dir / "copies.npz").stat().st_size
    assert checkpoint.load(run_dir).copies is not None
    data = bytearray((run_dir / "copies.npz").read_bytes())
    data[-30] ^= 1
    (run_dir / "copies.npz").write_bytes(bytes(data))
    with pytest.raises(checkpoint.CheckpointError, match=r"copies\.npz: corrupt"):
        checkpoint.load(run_dir)


# -- a model that recites its training text ----------------------------------------------------


def recite(run_dir: Path, tokenizer: str) -> Path:
    """Train a small LSTM on VERSE until it recites it."""
    config = TrainConfig(
        tokenizer=tokenizer,  # type: ignore[arg-type]
        cell="lstm",
        embed_dim=24,
        hidden_dim=32,
        epochs=8,
        batch_size=4,
        seq_size=12,
        sample_every=0,
        log_every=50,
    )
    dataset = build_dataset(
        Corpus((Document("verse", VERSE * 60),)),
        TokenizerSpec(config.tokenizer, config.lowercase),  # type: ignore[arg-type]
        batch_size=config.batch_size,
        seq_size=config.seq_size,
        valid_fraction=config.valid_fraction,
        subword_vocab=280,
    )
    trainer = Trainer(config, dataset, run_dir, torch.device("cpu"))
    trainer.start_new()
    trainer.run()
    return run_dir


@pytest.fixture(scope="module", params=["words", "subword"])
def reciter(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TestClient]:
    run_dir = recite(tmp_path_factory.mktemp("reciter") / "run", request.param)
    with TestClient(create_app(settings_for(run_dir))) as client:
        yield client


def samples(client: TestClient, **body: Any) -> list[dict[str, Any]]:
    body = {"seed_words": "the north", "max_words": 30, "n": 6, "random_seed": 1, **body}
    response = client.post("/generate", json=body)
    assert response.status_code == 200, response.text
    return response.json()["samples"]  # type: ignore[no-any-return]


VERSE_WORDS = VERSE.split() * 3  # runs that go on across lines are runs


@pytest.mark.parametrize("sampling", [{"temperature": 0}, {"top_k": 3}, {"top_p": 0.9, "top_k": 0}])
def test_max_copy_words_keeps_every_run_of_the_training_text_short(
    reciter: TestClient, sampling: dict[str, Any]
) -> None:
    free = samples(reciter, **sampling)
    assert max(s["longest_copy"] for s in free) >= 12  # it recites (so the guard has work)
    for s in free + samples(reciter, max_copy_words=4, **sampling):
        words = ["the", "north", *s["words"]]
        assert s["longest_copy"] == longest_copy(VERSE_WORDS, words)
    for s in samples(reciter, max_copy_words=4, **sampling):
        assert s["longest_copy"] <= 4
        assert len(s["words"]) == 30  # a word was skipped for another, never the sample cut


def test_the_guard_counts_the_seed_and_composes_with_streams(reciter: TestClient) -> None:
    body = {"seed_words": "when the north wind", "max_words": 20, "max_copy_words": 4}
    plain = reciter.post("/generate", json={**body, "random_seed": 5}).json()
    assert plain["samples"][0]["longest_copy"] == 4
    assert plain["words"][0] != "blows"  # "when the north wind blows" is 5 words of the text
    streamed = reciter.post("/generate", json={**body, "random_seed": 5, "stream": True})
    (done,) = [data for event, data in parse_sse(streamed.text) if event == "done"]
    assert done["samples"] == plain["samples"]


def test_a_folder_without_an_index_serves_and_refuses_the_guard(make_run: MakeRun) -> None:
    run_dir = make_run(copies=False)
    with TestClient(create_app(settings_for(run_dir))) as client:
        assert client.get("/info").json()["copy_index"] is False
        out = client.post("/generate", json={"seed_words": "I can", "max_words": 5}).json()
        assert out["samples"][0]["longest_copy"] is None
        refused = client.post("/generate", json={"seed_words": "I can", "max_copy_words": 3})
    assert refused.status_code == 422
    (error,) = refused.json()["errors"]
    assert error["field"] == "max_copy_words"
    assert "no index of its training text" in error["message"]


def test_info_says_the_model_has_an_index(reciter: TestClient) -> None:
    assert reciter.get("/info").json()["copy_index"] is True


@pytest.mark.parametrize("value", [-1, 101, 2.5, "4"])
def test_a_bad_max_copy_words_is_refused_by_name(reciter: TestClient, value: object) -> None:
    response = reciter.post("/generate", json={"seed_words": "the", "max_copy_words": value})
    assert response.status_code == 422
    assert "max_copy_words" in json.dumps(response.json())


def test_the_openai_apis_take_the_guard_as_an_extra_field(reciter: TestClient) -> None:
    body = {"prompt": "the north", "max_tokens": 30, "n": 4, "seed": 2, "top_k": 3}
    free = reciter.post("/v1/completions", json=body).json()["choices"]
    guarded = reciter.post("/v1/completions", json={**body, "max_copy_words": 4}).json()
    copies = [longest_copy(VERSE_WORDS, ("the north" + c["text"]).split()) for c in free]
    assert max(copies) >= 12
    for choice in guarded["choices"]:
        assert longest_copy(VERSE_WORDS, ("the north" + choice["text"]).split()) <= 4
    chat = {"messages": [{"role": "user", "content": "sing"}], "max_copy_words": 4}
    assert reciter.post("/v1/chat/completions", json=chat).status_code == 200
    refused = reciter.post("/v1/completions", json={**body, "max_copy_words": -1})
    assert refused.status_code == 400
    assert refused.json()["error"]["param"] == "max_copy_words"


def test_writing_an_index_never_loads_the_suffix_array_library() -> None:
    """Training processes (torchrun's ranks too) keep one OpenMP runtime, torch's: the
    library, which ships its own, is loaded only when an index is searched."""
    code = (
        "import sys\n"
        "from model_store.copies import CopyIndex\n"
        "index = CopyIndex.build([['a', 'b', 'a']])\n"
        "data = index.to_bytes()\n"
        "assert 'pydivsufsort' not in sys.modules\n"
        "assert CopyIndex.from_bytes(data).longest_copy(['a', 'b']) == 2\n"
        "assert 'pydivsufsort' in sys.modules\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
