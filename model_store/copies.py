"""Verbatim runs of the training text: how long a sample's longest one is, and how to avoid them.

A model trained on a small text recites it. To say how much, the trainer stores the training
text's words in the run folder (``copies.npz``, listed in the manifest like every file): the
64-bit hashes of its distinct words, and the text as their numbers (1-based; 0 where a
document ends, so that no run crosses two documents). Nothing else is stored: loading builds
a suffix array of that text (``pydivsufsort``, a fraction of a second for a million words), on
which a run of any length is found by binary search.

Words are those users see (`TokenizerSpec.words`, the same as a sample's ``words``); line
breaks are not words here, so a run that goes on across a line is one run.

`CopyIndex.longest_copy` measures a text (`longest_copies`, many at once); `CopyGuard` tells
the sampler which next tokens would make a run longer than a limit (for a subword model: which
pieces would end a word that would).
"""

from __future__ import annotations

import functools
import hashlib
import io
from collections import Counter
from collections.abc import Iterable, Sequence

import numpy as np
from numpy.typing import NDArray

from model_store.subword import NEWLINE
from model_store.vocab import Vocab

COPIES_FILE = "copies.npz"
_END = 0  # between documents, and after the last one
_MISSING = -1  # a word the training text does not hold: no run goes through it
_AROUND = np.array([-1, 0])  # where a key would be sorted in: the suffixes before and at it

Ids = NDArray[np.int64]


class CopyIndexError(ValueError):
    """A copy index file that cannot be read."""


def word_hash(word: str) -> int:
    return int.from_bytes(hashlib.blake2b(word.encode("utf-8"), digest_size=8).digest(), "little")


def _words(words: Iterable[str]) -> list[str]:
    return [w for w in words if w != NEWLINE]


class CopyIndex:
    """The training text's words, searchable for any run of them."""

    def __init__(self, hashes: NDArray[np.uint64], text: NDArray[np.unsignedinteger]) -> None:
        if hashes.ndim != 1 or text.ndim != 1 or not len(text) or text[-1] != _END:
            raise CopyIndexError("the copy index must hold its words and a text ending in 0")
        if int(text.max()) > len(hashes):
            raise CopyIndexError("the copy index's text names a word it does not hold")
        self._order = np.argsort(hashes)  # word ids are 1 + positions in ``hashes``
        self._sorted = hashes[self._order]
        if len(hashes) > 1 and not bool((self._sorted[1:] > self._sorted[:-1]).all()):
            raise CopyIndexError("the copy index's word hashes are not distinct")
        self.hashes, self.stored = hashes, text
        self.text: Ids = text.astype(np.int64)
        self._bits = max(1, (len(hashes) + 1).bit_length())
        self._per_key = 64 // self._bits
        self._shifts = np.array(
            [self._bits * (self._per_key - 1 - j) for j in range(self._per_key)], dtype=np.uint64
        )
        self._columns = np.arange(self._per_key)
        # 2 ** (bits x k), k = 0 .. _per_key - 1: two keys that differ first in field j (their
        # xor at least 2 ** (bits x (_per_key - 1 - j))) share j leading words.
        self._steps = np.array(
            [1 << (self._bits * k) for k in range(self._per_key)], dtype=np.uint64
        )
        self.word_id = functools.lru_cache(maxsize=65536)(self._word_id)
        # A generating row asks for the same run at each of its steps.
        self.span = functools.lru_cache(maxsize=65536)(self._span)

    @functools.cached_property
    def sa(self) -> Ids:
        """The suffix array, built when the index is first searched: a trainer that only
        writes the index never loads the library (nor the OpenMP runtime it ships)."""
        from pydivsufsort import divsufsort

        return divsufsort(self.stored.astype(np.uint32)).astype(np.int64)  # type: ignore[no-any-return]

    @functools.cached_property
    def _keys(self) -> NDArray[np.uint64]:
        """The first `_per_key` words of each suffix packed into one sortable integer, so that
        a run of up to that many words is found by one ``searchsorted``."""
        starts = np.minimum(self.sa[:, None] + np.arange(self._per_key), len(self.text) - 1)
        return self._pack(self.text[starts])

    @classmethod
    def build(cls, documents: Iterable[Sequence[str]]) -> CopyIndex:
        """The index of these documents' words (line breaks left out). Words are numbered
        from the most frequent, which makes the stored text compress to about half."""
        texts = [_words(doc) for doc in documents]
        counts = Counter(w for text in texts for w in text)
        ids = {w: i for i, (w, _) in enumerate(counts.most_common(), start=1)}
        stream = [i for text in texts for i in (*(ids[w] for w in text), _END)] or [_END]
        dtype = np.uint16 if len(ids) < 2**16 else np.uint32
        hashes = np.array([word_hash(w) for w in ids], dtype=np.uint64)
        return cls(hashes, np.array(stream, dtype=dtype))

    def to_bytes(self) -> bytes:
        buffer = io.BytesIO()
        np.savez_compressed(buffer, hashes=self.hashes, text=self.stored)
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> CopyIndex:
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as arrays:
                hashes, text = arrays["hashes"], arrays["text"]
        except Exception as exc:  # numpy raises several types for a damaged archive
            raise CopyIndexError(f"the copy index cannot be read: {exc}") from None
        if hashes.dtype != np.uint64 or text.dtype not in (np.uint16, np.uint32):
            raise CopyIndexError("the copy index holds arrays of the wrong types")
        index = cls(hashes, text)
        index._keys  # noqa: B018 (built now, at load, not by a first request)
        return index

    @property
    def words(self) -> int:
        """How many words the training text holds."""
        return int((self.stored != _END).sum())

    def _word_id(self, word: str) -> int:
        h = np.uint64(word_hash(word))
        pos = int(np.searchsorted(self._sorted, h))
        found = pos < len(self._sorted) and self._sorted[pos] == h
        return int(self._order[pos]) + 1 if found else _MISSING

    def word_ids(self, words: Iterable[str]) -> Ids:
        return np.fromiter(map(self.word_id, _words(words)), np.int64)

    def _span(self, ids: tuple[int, ...]) -> tuple[int, int]:
        """The suffix-array range of one run's occurrences (of word ids; empty when one is
        missing)."""
        if _MISSING in ids:
            return 0, 0
        if len(ids) > self._per_key:
            lo, hi = self.span(ids[:-1])
            return self._narrow(lo, hi, len(ids) - 1, ids[-1])
        low = self._pack(np.array([[*ids, *[_END] * (self._per_key - len(ids))]]))[0]
        high = low | np.uint64((1 << (self._bits * (self._per_key - len(ids)))) - 1)
        lo = int(np.searchsorted(self._keys, low, side="left"))
        return lo, int(np.searchsorted(self._keys, high, side="right"))

    def _narrow(self, lo: int, hi: int, k: int, word: int) -> tuple[int, int]:
        """Of the suffixes ``lo:hi``, which share their first k words, those whose next word
        is ``word`` (within the range, word k is sorted)."""
        if hi - lo <= 0:
            return lo, lo
        column = self.text[self.sa[lo:hi] + k]  # sorted: the suffixes share k first words
        return lo + int(np.searchsorted(column, word, "left")), lo + int(
            np.searchsorted(column, word, "right")
        )

    def occurs(self, words: Sequence[str]) -> bool:
        """Whether this run of words (at least one) occurs in the training text."""
        ids = tuple(self.word_ids(words).tolist())
        lo, hi = self.span(ids)
        return bool(ids) and hi > lo

    def followers(self, words: Sequence[str]) -> Ids:
        """The ids of the words that follow this run wherever it occurs in the training text."""
        ids = tuple(self.word_ids(words).tolist())
        lo, hi = self.span(ids) if ids else (0, 0)
        after = np.unique(self.text[self.sa[lo:hi] + len(ids)])
        return after[after != _END]

    def longest_copy(self, words: Sequence[str]) -> int:
        """How many words the longest run of ``words`` that occurs in the training text holds
        (`longest_copies` of one text)."""
        return self.longest_copies([words])[0]

    def longest_copies(self, texts: Sequence[Sequence[str]]) -> list[int]:
        """`longest_copy` of each text, all measured at once: a server measures the samples
        that finish together in one pass, whose few array operations cost about what one
        text's did (and each of them lets go of the interpreter lock, which the inference
        thread then holds until its next operation).

        First, for every start of every text at once, the run of up to `_per_key` words: the
        suffix that shares the longest start with it sits next to where it would be sorted in,
        so one ``searchsorted`` and a comparison with the two neighbours give its length (cut
        at its text's end: what lies past it does not change the length up to there). Starts
        that match that far go on one word at a time, each within the range of suffixes that
        share its run so far (`_narrow`)."""
        ids_of = [self.word_ids(words) for words in texts]
        sizes = np.array([len(ids) for ids in ids_of], np.int64)
        n = int(sizes.sum())
        if not n:
            return [0] * len(texts)
        ids = np.concatenate(ids_of)
        width = self._per_key
        # A missing word becomes a number no word of the text has; past the last text, END.
        padded = np.zeros(n + width, np.int64)
        padded[:n] = ids
        padded[:n][ids == _MISSING] = len(self.hashes) + 1
        queries = self._pack(padded[np.arange(n)[:, None] + self._columns])
        at = np.searchsorted(self._keys, queries)
        neighbours = self._keys.take(at[:, None] + _AROUND, mode="clip")  # (n, 2)
        closest = (neighbours ^ queries[:, None]).min(axis=1)
        shared = width - np.searchsorted(self._steps, closest, side="right")
        ends = np.cumsum(sizes)
        owner = np.repeat(np.arange(len(texts)), sizes)  # each start's text
        left = ends[owner] - np.arange(n)  # words from each start to its text's end
        shared = np.minimum(shared, left)
        best = np.zeros(len(texts), np.int64)
        np.maximum.at(best, owner, shared)
        for start in np.flatnonzero((shared == width) & (left > width)).tolist():
            text = int(owner[start])
            if left[start] <= best[text]:
                continue  # it cannot beat the best
            best[text] = max(best[text], self._extend(ids, start, int(ends[text])))
        return best.tolist()  # type: ignore[no-any-return]

    def _extend(self, ids: Ids, start: int, end: int) -> int:
        """How far the run at ``start`` of ``ids``, whose first `_per_key` words occur, goes on
        (not past ``end``), one word at a time."""
        length = self._per_key
        lo, hi = self.span(tuple(ids[start : start + length].tolist()))
        while start + length < end and (word := int(ids[start + length])) != _MISSING:
            lo, hi = self._narrow(lo, hi, length, word)
            if hi <= lo:
                break
            length += 1
        return length

    def _pack(self, grams: Ids) -> NDArray[np.uint64]:
        """(R, `_per_key`) word ids as the sortable keys of `_keys` (the fields do not
        overlap, so their sum is their bitwise or)."""
        return (grams.astype(np.uint64) << self._shifts).sum(axis=1, dtype=np.uint64)


class CopyGuard:
    """A copy index seen from one vocabulary: the tokens a row may not take next if no run of
    its text is to pass ``limit`` words in the training text."""

    def __init__(self, index: CopyIndex, vocab: Vocab) -> None:
        self.index = index
        self._subword = vocab.is_subword
        self._after = functools.lru_cache(maxsize=4096)(self._followers)
        if self._subword:  # the tokens that end the word being written: the next word's start
            self._enders = [i for i, start in enumerate(vocab.starts_word()) if start]
            return
        self._token_of = np.full(len(index.hashes) + 1, -1, dtype=np.int64)  # word id -> token id
        special = set(vocab.special_ids)
        for token_id, token in enumerate(vocab.tokens):
            if token_id not in special and (word := index.word_id(token)) != _MISSING:
                self._token_of[word] = token_id

    def banned(
        self, before: Sequence[str], words: Sequence[str], pending: str | None, limit: int
    ) -> list[int]:
        """Token ids that would make a run longer than ``limit`` words: ``before`` and
        ``words`` are the text so far (what it continues, then its words), ``pending`` the
        word a subword model is writing (None between words)."""
        tail = _tail(limit, words, before)
        if len(tail) < limit:
            return []
        if self._subword:
            if pending is None or pending == NEWLINE:
                return []
            return self._enders if self.index.occurs([*tail, pending]) else []
        return self._after(tuple(tail))

    def _followers(self, tail: tuple[str, ...]) -> list[int]:
        tokens = self._token_of[self.index.followers(tail)]
        return tokens[tokens >= 0].tolist()  # type: ignore[no-any-return]


def _tail(count: int, words: Sequence[str], before: Sequence[str]) -> list[str]:
    """The last ``count`` words of ``before`` then ``words``, line breaks left out."""
    out: list[str] = []
    for part in (words, before):
        for word in reversed(part):
            if len(out) == count:
                return out[::-1]
            if word != NEWLINE:
                out.append(word)
    return out[::-1]
