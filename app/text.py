"""The text of one sample as it grows word by word, and its stop strings.

Words are turned into text by the model's own `Vocab.detokenize`, after the words that came
before them (the seed, and a session's earlier words), so spacing and punctuation come out as
in a single text. That text only ever grows at its end, which gives each word its *piece*:
the characters it adds (``" sea"``, ``"."``, ``"\\n"``).

The model's incremental `Detokenizer` gives each piece at a constant cost per word.

The engine pushes the model's *tokens* (`push_token`). For a word vocabulary a token is a
word. For a ``subword`` one a word is a start piece and its continuations: a word is complete
when the next start piece comes, and the sample is complete when that start piece would
open one word more than ``max_words``: the piece is refused and the sample ends on a whole
word, never half of one.

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
from dataclasses import dataclass, field
from typing import Literal

from model_store.subword import NEWLINE, starts_word
from model_store.vocab import Detokenizer, Vocab

PIECES_PER_WORD = 8  # a subword sample ends after max_words x this many pieces whatever

FinishReason = Literal["length", "stop"]


# The likeliest alternatives where a word began, (token, natural log-probability), best first.
Alternatives = tuple[tuple[str, float], ...]


@dataclass(frozen=True)
class Piece:
    """One released word, the text it adds to the sample, and (when the job asked for them)
    its log-probability under the model and the alternatives where it began."""

    word: str
    text: str
    log_prob: float | None = None
    top: Alternatives = ()


@dataclass(frozen=True)
class SampleText:
    """A finished sample: the words kept, the text they add, why it ended, and each kept
    word's log-probability and alternatives (None and () unless the job asked for them)."""

    words: list[str]
    text: str
    finish_reason: FinishReason
    pieces: list[str] = field(default_factory=list)  # the text each word adds
    log_probs: list[float | None] = field(default_factory=list)
    tops: list[Alternatives] = field(default_factory=list)


class Continuation:
    """One sample's words after ``context`` (words), with its stop strings and its length."""

    def __init__(
        self,
        vocab: Vocab,
        context: Sequence[str],
        stops: Sequence[str] = (),
        max_words: int | None = None,
        min_words: int = 0,
    ) -> None:
        self._vocab = vocab
        self._subword = vocab.is_subword
        self._detokenizer = Detokenizer(vocab.tokenizer)
        self._detokenizer.feed(context)
        self._stops = tuple(stops)
        self._longest = max((len(s) for s in self._stops), default=0)
        self._max_words = max_words
        self._min_words = min_words  # stop strings count only in the text after these words
        # A word is one token, or up to PIECES_PER_WORD pieces on average (and one word more).
        per_word, spare = (PIECES_PER_WORD, PIECES_PER_WORD) if self._subword else (1, 0)
        self._max_tokens = None if max_words is None else max_words * per_word + spare
        self.words: list[str] = []
        self.tokens = 0  # the model's tokens taken (each one sampling step)
        self._pending: list[str] = []  # the pieces of the word being written (subword)
        self._pending_log_prob: float | None = 0.0  # their log-probabilities, summed
        self._pending_top: Alternatives = ()  # the alternatives to its first piece
        self._log_probs: list[float | None] = []  # each word's: the sum of its pieces'
        self._tops: list[Alternatives] = []
        self._token_ends: list[int] = []  # tokens taken up to the end of each word
        self._ends: list[int] = []  # where each word's piece ends in self._text
        self._text = ""
        self._cut: int | None = None  # where the first stop string begins in self._text
        self._released = 0
        self._full = False

    @property
    def stopped(self) -> bool:
        return self._cut is not None

    @property
    def done(self) -> bool:
        """Whether the sample is complete: a stop string, ``max_words``, or the token cap."""
        return self.stopped or self._full

    @property
    def pending_word(self) -> str | None:
        """The word a subword model is writing (its pieces so far), or None between words."""
        if not self._pending:
            return None
        return self._vocab.tokenizer.subword_model().word(self._pending)

    @property
    def kept_tokens(self) -> int:
        """Tokens up to the end of the last word kept: a session's state is taken there."""
        kept = self._kept()
        return self._token_ends[kept - 1] if kept else 0

    def push_token(self, token: str, log_prob: float | None = None, top: Alternatives = ()) -> bool:
        """Add the model's next token (with its log-probability and the alternatives to it,
        when they were computed); False when it is refused because the sample was already
        complete (a subword start piece past ``max_words``): then ``done`` is set."""
        if self.done:
            return False
        if not self._subword:
            self.tokens += 1
            self.push(token, log_prob, top)
            self._full = self._max_tokens is not None and self.tokens >= self._max_tokens
            return True
        if starts_word(token) and self._pending:
            self._complete()
            if self.done or self._at_max_words():
                self._full = True
                return False
        self.tokens += 1
        if not self._pending:
            self._pending_log_prob, self._pending_top = 0.0, top
        if self._pending_log_prob is not None and log_prob is not None:
            self._pending_log_prob += log_prob
        else:
            self._pending_log_prob = None
        self._pending.append(token)
        if token == NEWLINE:
            self._complete()
        if self._at_max_words() and not self._pending:
            self._full = True
        if self._max_tokens is not None and self.tokens >= self._max_tokens:
            self._complete()
            self._full = True
        return True

    def _at_max_words(self) -> bool:
        return self._max_words is not None and len(self.words) >= self._max_words

    def _complete(self) -> None:
        """The pending pieces make a whole word (a word spelled empty adds none)."""
        if not self._pending:
            return
        word = self._vocab.tokenizer.subword_model().word(self._pending)
        self._pending = []
        if word:
            self.push(word, self._pending_log_prob, self._pending_top)
        elif self._token_ends:
            self._token_ends[-1] = self.tokens

    def push(self, word: str, log_prob: float | None = None, top: Alternatives = ()) -> None:
        """Add one whole word."""
        before = len(self._text)
        self._text += self._detokenizer.push(word)
        self.words.append(word)
        self._log_probs.append(log_prob)
        self._tops.append(top)
        self._token_ends.append(self.tokens)
        self._ends.append(len(self._text))
        # A new match must end past the old text, so it starts at most len(stop) - 1 before it;
        # and it must start after the first min_words words.
        if len(self.words) < self._min_words:
            return
        floor = self._ends[self._min_words - 1] if self._min_words else 0
        found = [
            i
            for stop in self._stops
            if (i := self._text.find(stop, max(floor, before - len(stop) + 1))) >= 0
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
            Piece(
                self.words[j],
                self._text[self._start(j) : min(self._ends[j], limit)],
                self._log_probs[j],
                self._tops[j],
            )
            for j in range(self._released, count)
        ]
        self._released = max(self._released, count)
        return pieces

    def finish(self) -> SampleText:
        if not self.stopped:
            self._complete()  # a sample cut short by the token cap keeps its last word
        kept, end = self._kept(), self._end()
        return SampleText(
            self.words[:kept],
            self._text[:end],
            "stop" if self.stopped else "length",
            [self._text[self._start(j) : min(self._ends[j], end)] for j in range(kept)],
            self._log_probs[:kept],
            self._tops[:kept],
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
