"""Shared fixtures: a tiny corpus and tiny run folders built in temporary folders in seconds."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from model_store import checkpoint
from model_store.copies import CopyIndex
from model_store.network import ModelConfig, WordRNN
from model_store.subword import SubwordModel
from model_store.vocab import TokenizerSpec, Vocab, tokenize
from tests.live_server import App, run_app

TINY_TEXT = (
    "I can see the sea.\n"
    "I can hear the wind, and the wind can hear me.\n"
    "\n"
    "The sea is blue; the sky is blue.\n"
    "You can see me, I can see you!\n"
) * 4

MakeRun = Callable[..., Path]

# Tiny models gain nothing from a second thread, and several test processes (servers, CLIs)
# share two cores: one thread each keeps the suite fast and its timing steady.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_text() -> str:
    return TINY_TEXT


@pytest.fixture
def tiny_corpus(tmp_path: Path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text(TINY_TEXT, encoding="utf-8")
    return path


def build_run(
    run_dir: Path,
    *,
    text: str = TINY_TEXT,
    tokenizer: str = "words",
    seed: int = 0,
    copies: bool = True,
    training: dict[str, object] | None = None,
    **model_kwargs: object,
) -> Path:
    """A run folder with seeded random weights, written by the real ``checkpoint.commit``;
    with an index of ``text`` as its training text unless ``copies`` is False (a folder
    written before copy indexes)."""
    spec = TokenizerSpec(name=tokenizer)  # type: ignore[arg-type]
    if tokenizer == "subword":  # 256 bytes and 44 pieces learned from the text
        spec = replace(spec, model=SubwordModel.train(spec.words(text), 300))
    vocab = Vocab.build(tokenize(text, spec), tokenizer=spec)
    kwargs: dict[str, object] = {"embed_dim": 8, "hidden_dim": 8}
    kwargs.update(model_kwargs)
    config = ModelConfig(vocab_size=len(vocab), **kwargs)  # type: ignore[arg-type]
    torch.manual_seed(seed)
    model = WordRNN(config)
    checkpoint.commit(
        run_dir,
        config=config,
        training=training if training is not None else {"seed": seed},
        vocab=vocab,
        weights=checkpoint.weights_state(model),
        iteration=1,
        info={"best_valid_perplexity": None},
        copies=CopyIndex.build([spec.words(text)]) if copies else None,
    )
    return run_dir


def commit_non_finite_weights(run_dir: Path, value: float = math.nan) -> Path:
    """Commit, with the real ``checkpoint.commit``, weights of ``run_dir`` whose embedding holds
    ``value``, as a diverged run trains them; return the weights file."""
    state = checkpoint.weights_state(checkpoint.load(run_dir).model)
    state["embedding.weight"][0, 0] = value
    manifest = checkpoint.commit(run_dir, weights=state, iteration=2)
    return run_dir / manifest["weights"]


@pytest.fixture
def make_run(tmp_path: Path) -> MakeRun:
    counter = iter(range(1_000_000))

    def make(**kwargs: object) -> Path:
        return build_run(tmp_path / f"run{next(counter)}", **kwargs)  # type: ignore[arg-type]

    return make


@pytest.fixture(scope="session")
def served_tiny(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[App]:
    """``python -m app`` serving the tiny run, shared by the tests that drive it with a real
    client library (one server for them all)."""
    with run_app(tiny_run, tmp_path_factory.mktemp("served") / "app.log") as app:
        yield app


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_run(tmp_path_factory.mktemp("tiny") / "run")
