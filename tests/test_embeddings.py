"""`python -m training.embeddings`: a 2-D map of the most frequent words."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from model_store import checkpoint
from tests.conftest import MakeRun
from training.embeddings import frequent_words, main, project

PNG = b"\x89PNG\r\n\x1a\n"


def test_frequent_words_skip_specials_and_punctuation(make_run: MakeRun) -> None:
    vocab = checkpoint.load(make_run()).vocab
    words = [vocab.tokens[i] for i in frequent_words(vocab, 5)]
    assert words[0] == "can"  # the most frequent word of the tiny corpus
    assert all(w.isalpha() for w in words)
    assert len(words) == 5


def test_pca_keeps_the_main_direction() -> None:
    rng = np.random.default_rng(0)
    points = np.outer(rng.normal(size=50), [3.0, 4.0, 0.0]) + rng.normal(scale=0.01, size=(50, 3))
    flat = project(points, "pca")
    assert flat.shape == (50, 2)
    assert np.var(flat[:, 0]) > 100 * np.var(flat[:, 1])


@pytest.mark.parametrize(
    "method",
    [
        "pca",
        pytest.param(
            "tsne",
            marks=pytest.mark.skipif(
                importlib.util.find_spec("sklearn") is None, reason="tsne extra missing"
            ),
        ),
    ],
)
def test_cli_writes_a_png(make_run: MakeRun, tmp_path: Path, method: str) -> None:
    out = tmp_path / "map.png"
    assert main([str(make_run()), "--method", method, "--top", "10", "--out", str(out)]) == 0
    assert out.read_bytes().startswith(PNG)


def test_cli_refuses_a_folder_that_is_not_a_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "manifest.json" in err
    assert "Traceback" not in err
