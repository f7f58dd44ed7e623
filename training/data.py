"""From a corpus to training windows: tokens -> ids -> ``batch_size`` rows -> windows.

The lab's layout. The id stream is cut into ``batch_size`` contiguous rows, and the rows are
walked together in windows of ``seq_size`` words; each target is the next word of the stream::

    stream: a b c d e f g h i j k l m      batch_size=2, seq_size=3
    rows:   a b c d e f                    targets: b c d e f g
            g h i j k l                             h i j k l m
    windows: [a b c | d e f] and [g h i | j k l]: window 0 = x[:, 0:3], y[:, 0:3]; ...

Row r of window w+1 continues row r of window w, so the hidden state is carried from one window
to the next (and detached: truncated backpropagation through time).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from model_store.copies import CopyIndex
from model_store.subword import SubwordModel
from model_store.vocab import BOS, NEWLINE, Detokenizer, TokenizerSpec, Vocab
from training.corpus import Corpus


class DataError(ValueError):
    """A corpus too small or otherwise unusable for the chosen hyperparameters."""


@dataclass(frozen=True)
class Dataset:
    vocab: Vocab
    train_ids: Tensor  # (N,) int64
    valid_ids: Tensor  # (M,) int64, may be empty
    corpus_words: int
    valid_chars: int = 0  # characters of the validation text, as its tokens write it
    copies: CopyIndex | None = None  # the training words, for the copy guard

    @property
    def unk_rate(self) -> float:
        total = self.train_ids.numel()
        return float((self.train_ids == self.vocab.unk_id).sum()) / total if total else 0.0

    def bits_per_char(self, loss: float) -> float | None:
        """Bits per character of the validation text from its mean loss per token: the one
        figure that compares models whatever their tokens (every token of the text counts,
        an ``<unk>`` at whatever probability the model gives it)."""
        if not self.valid_chars:
            return None
        return loss * (self.valid_ids.numel() - 1) / math.log(2) / self.valid_chars


def corpus_words(corpus: Corpus, spec: TokenizerSpec) -> list[str]:
    """All documents' words, each document opened by <bos> (the start-of-text state)."""
    words: list[str] = []
    for doc in corpus.documents:
        words.append(BOS)
        words.extend(spec.words(doc.text))
    return words


def text_chars(words: list[str], spec: TokenizerSpec) -> int:
    """Characters of the text that ``words`` (documents opened by <bos>) write."""
    total, start = 0, 0
    for i in [*(i for i, w in enumerate(words) if w == BOS), len(words)]:
        total += len(Detokenizer(spec).feed(words[start:i]))
        start = i + 1
    return total


def to_tokens(words: list[str], spec: TokenizerSpec) -> list[str]:
    """What the model reads: the words themselves, or for ``subword`` their pieces."""
    if spec.name != "subword":
        return words
    model = spec.subword_model()
    tokens: list[str] = []
    for word in words:
        if word == BOS:
            tokens.append(BOS)
        else:
            tokens.extend(model.word_pieces(word))
    return tokens


def min_train_words(batch_size: int, seq_size: int) -> int:
    """One full window in every row, plus the target of the last word."""
    return batch_size * seq_size + 1


def build_dataset(
    corpus: Corpus,
    spec: TokenizerSpec,
    *,
    batch_size: int,
    seq_size: int,
    valid_fraction: float = 0.1,
    valid_corpus: Corpus | None = None,
    min_count: int = 1,
    max_vocab: int | None = None,
    subword_vocab: int = 4000,
) -> Dataset:
    """Tokenize, hold out validation text (the corpus's end, or ``valid_corpus``), learn the
    vocabulary (and for ``subword`` without a model yet, its pieces) on the training part
    only, and encode both parts."""
    words = corpus_words(corpus, spec)
    n_words = sum(1 for word in words if word not in (BOS, NEWLINE))
    if n_words == 0:
        raise DataError("the corpus holds no words (is the file empty?)")
    if valid_corpus is not None:
        train_words, valid_words = words, corpus_words(valid_corpus, spec)
    else:
        n_valid = int(len(words) * valid_fraction)
        if valid_fraction > 0 and n_valid < 2:
            n_valid = 0
        train_words = words[: len(words) - n_valid]
        valid_words = words[len(words) - n_valid :]
    if spec.name == "subword" and spec.model is None:
        spec = replace(spec, model=SubwordModel.train(train_words, subword_vocab))
    train_tokens, valid_tokens = to_tokens(train_words, spec), to_tokens(valid_words, spec)
    needed = min_train_words(batch_size, seq_size)
    if len(train_tokens) < needed:
        raise DataError(
            f"the corpus is too short: {len(train_tokens)} training tokens, but batch_size "
            f"{batch_size} x seq_size {seq_size} needs at least {needed} (after holding out "
            f"{len(valid_tokens)} for validation); use a longer text or smaller "
            "--batch-size/--seq-size"
        )
    vocab = Vocab.build(train_tokens, tokenizer=spec, min_count=min_count, max_vocab=max_vocab)
    return Dataset(
        vocab=vocab,
        train_ids=torch.tensor(vocab.encode(train_tokens), dtype=torch.long),
        valid_ids=torch.tensor(vocab.encode(valid_tokens), dtype=torch.long),
        corpus_words=n_words,
        valid_chars=text_chars(valid_words, spec) if len(valid_tokens) >= 2 else 0,
        copies=CopyIndex.build(_documents(train_words)),
    )


def _documents(words: list[str]) -> list[list[str]]:
    """``words`` cut where each document opens (its <bos>)."""
    documents: list[list[str]] = [[]]
    for word in words:
        if word == BOS:
            documents.append([])
        else:
            documents[-1].append(word)
    return documents


def batchify(ids: Tensor, batch_size: int, seq_size: int) -> tuple[Tensor, Tensor]:
    """(N,) ids -> inputs and targets, each (batch_size, windows * seq_size)."""
    windows = (ids.numel() - 1) // (batch_size * seq_size)
    if windows < 1:
        raise DataError(f"need at least {min_train_words(batch_size, seq_size)} tokens")
    n = windows * batch_size * seq_size
    x = ids[:n].view(batch_size, -1)
    y = ids[1 : n + 1].view(batch_size, -1)
    return x, y


def windows(
    x: Tensor, y: Tensor, seq_size: int, start: int = 0
) -> Iterator[tuple[int, Tensor, Tensor]]:
    """Yield (index, x window, y window) from window ``start`` on; windows may end short."""
    total = x.shape[1]
    for index, i in enumerate(range(start * seq_size, total, seq_size), start=start):
        yield index, x[:, i : i + seq_size], y[:, i : i + seq_size]


def eval_rows(ids: Tensor, batch_size: int) -> tuple[Tensor, Tensor]:
    """Validation layout: up to ``batch_size`` rows covering every token (no full windows
    needed), so a short validation text still gives a perplexity."""
    if ids.numel() < 2:
        raise DataError("the validation text needs at least 2 tokens")
    rows = max(1, min(batch_size, (ids.numel() - 1) // 2))
    per_row = (ids.numel() - 1) // rows
    n = rows * per_row
    return ids[:n].view(rows, per_row), ids[1 : n + 1].view(rows, per_row)
