"""``bench/generation_quality.py``: its measures by hand, and a tiny run end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import generation_quality as bench
from tests.conftest import MakeRun


def test_the_measures_by_hand() -> None:
    texts = [["a", "b", "a", "b", "a"], ["c", "d", "e"]]
    assert bench.distinct(texts, 1) == pytest.approx(5 / 8)  # a b c d e of 8 words
    assert bench.distinct(texts, 2) == pytest.approx(4 / 6)  # ab ba cd de of 6 bigrams
    # "a b a" then "b a b" then "a b a" again: 1 of 3; "c d e": 0 of 1.
    assert bench.repeated_trigrams(texts) == pytest.approx((1 / 3 + 0) / 2)


def test_a_tiny_run_reports_every_control(tiny_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "quality.json"
    args = ["--run-dir", str(tiny_run), "--samples", "4", "--words", "6", "--out", str(out)]
    assert bench.main(args) == 0
    report = json.loads(out.read_text())
    assert set(report["results"]) == set(bench.CONTROLS)
    for row in report["results"].values():
        assert 0 < row["distinct_1"] <= 1
        assert 0 <= row["repeated_trigrams"] <= 1
        assert row["words_per_second"] > 0
    assert report["results"]["no_repeat_ngram_size 3"]["repeated_trigrams"] == 0
    assert report["results"]["max_copy_words 4"]["longest_copy_max"] <= 4
    assert report["copy_index_bytes"] == (tiny_run / "copies.npz").stat().st_size
    assert report["results"]["none"]["longest_copy_max"] >= 2  # "I can" opens the text


def test_a_run_without_a_copy_index_is_named(make_run: MakeRun, tmp_path: Path) -> None:
    args = ["--run-dir", str(make_run(copies=False)), "--samples", "2", "--out", str(tmp_path)]
    assert bench.main(args) == 1
