"""The text of one sample as it grows word by word, and its stop strings.

Words are turned into text by the model's own `Vocab.detokenize`, after the words that came
before them (the seed, and a session's earlier words), so spacing and punctuation come out as
in a single text. That text only ever grows at its end, which gives each word its *piece*:
the characters it adds (``" sea"``, ``"."``, ``"\\n"``).

The model's incremental `Detokenizer` gives each piece at a constant cost per word.

Stop strings are matched on that text, not on word boundaries: a sample stops at the first
place where any stop string has appeared in full, and the text is cut just before it. The
words kept are those with some of their own text (not just a space) before the cut; the last
one may be cut inside its piece (``"sea."`` with the stop ``"."`` keeps ``" sea"``).

While a sample streams, a word is released only once no stop string can still begin inside
its text, so released text is never taken back; without stop strings each word is released
as soon as it is pushed.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from model_store.vocab import Detokenizer, Vocab

FinishReason = Literal["length", "stop"]


@dataclass(frozen=True)
class Piece:
    """One released word and the text it adds to the sample."""

    word: str
    text: str


@dataclass(frozen=True)
class SampleText:
    """A finished sample: the words kept, the text they add, and why it ended."""

    words: list[str]
    text: str
    finish_reason: FinishReason


class Continuation:
    """One sample's words after ``context``, with its stop strings."""

    def __init__(self, vocab: Vocab, context: Sequence[str], stops: Sequence[str] = ()) -> None:
        self._detokenizer = Detokenizer(vocab.tokenizer)
        self._detokenizer.feed(context)
        self._stops = tuple(stops)
        self._longest = max((len(s) for s in self._stops), default=0)
        self.words: list[str] = []
        self._ends: list[int] = []  # where each word's piece ends in self._text
        self._text = ""
        self._cut: int | None = None  # where the first stop string begins in self._text
        self._released = 0

    @property
    def stopped(self) -> bool:
        return self._cut is not None

    def push(self, word: str) -> None:
        before = len(self._text)
        self._text += self._detokenizer.push(word)
        self.words.append(word)
        self._ends.append(len(self._text))
        # A new match must end past the old text, so it starts at most len(stop) - 1 before it.
        found = [
            i
            for stop in self._stops
            if (i := self._text.find(stop, max(0, before - len(stop) + 1))) >= 0
        ]
        if found and self._cut is None:
            self._cut = min(found)

    def release(self, final: bool = False) -> list[Piece]:
        """The words that can be shown now and were not released before."""
        if final or self.stopped:
            count, limit = self._kept(), self._end()
        else:
            count, limit = bisect_right(self._ends, self._safe_end()), len(self._text)
        pieces = [
            Piece(self.words[j], self._text[self._start(j) : min(self._ends[j], limit)])
            for j in range(self._released, count)
        ]
        self._released = max(self._released, count)
        return pieces

    def finish(self) -> SampleText:
        return SampleText(
            self.words[: self._kept()],
            self._text[: self._end()],
            "stop" if self.stopped else "length",
        )

    def _start(self, j: int) -> int:
        return self._ends[j - 1] if j else 0

    def _kept(self) -> int:
        """How many words have some of their own text (not just a space) before the cut."""
        if self._cut is None:
            return len(self.words)
        kept = 0
        for j, end in enumerate(self._ends):
            start = self._start(j)
            own = start + 1 if end - start > 1 and self._text[start] == " " else start
            if own >= self._cut:
                break
            kept = j + 1
        return kept

    def _end(self) -> int:
        """Where the sample's text ends: after its last kept word, and never past the cut."""
        kept = self._kept()
        end = self._ends[kept - 1] if kept else 0
        return end if self._cut is None else min(end, self._cut)

    def _safe_end(self) -> int:
        """The end of the text that no stop string can claim: before a tail that starts one."""
        text = self._text
        for start in range(max(0, len(text) - self._longest + 1), len(text)):
            tail = text[start:]
            if any(stop.startswith(tail) for stop in self._stops):
                return start
        return len(text)
