"""What the service takes and gives for a generation, in no wire format.

Every API format (the native ``/generate``, OpenAI's completions) translates its own request
body into a `TextRequest` and encodes the service's `TextResult`, or its stream of
`TextEvent`, in its own shapes. No JSON crosses from the service to a format: a new format,
or a new field of an old one, changes that format's module and what it reads from here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from app.engine.handles import WordEvent
from app.errors import ApiError
from app.text import Alternatives, FinishReason

OnUnknown = Literal["replace", "error"]


@dataclass(frozen=True)
class TextRequest:
    """A generation as the service runs it; the formats have checked types and ranges, the
    service checks what depends on the model and the settings (each problem by its field)."""

    seed_words: Sequence[str] | str | None = None
    max_words: int = 25
    n: int = 1
    top_k: int = 5
    temperature: float = 1.0
    top_p: float = 1.0
    uniform: bool = False
    stop: Sequence[str] = ()
    random_seed: int | None = None  # None: the service picks one (and returns it)
    session_id: str | None = None
    on_unknown: OnUnknown = "replace"
    logprobs: int | None = None  # each word's log-probability, and this many alternatives
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    no_repeat_ngram_size: int = 0
    bad_words: Sequence[str] = ()  # words or phrases never generated
    min_words: int = 0  # no stop string before this many words
    max_copy_words: int = 0  # no longer run of the training text (0: no limit)


@dataclass(frozen=True)
class Seed:
    """Input words: as given (``tokens``), as ids, as the model saw them, and the unknown ones."""

    tokens: list[str]
    ids: list[int]
    seen: list[str]
    unknown: list[str]
    sizes: list[int]  # how many ids each word took (a subword model's pieces)


@dataclass(frozen=True)
class TextSample:
    """One finished sample: its generated words and the text they add after ``prefix``."""

    index: int
    words: list[str]
    generated_text: str
    finish_reason: FinishReason
    pieces: list[str]  # the text each word adds to generated_text
    log_probs: list[float | None]  # each word's, when the request asked for them
    tops: list[Alternatives]  # the alternatives where each word began
    longest_copy: int | None  # words in its longest run of the training text (None: no index)


@dataclass(frozen=True)
class TextResult:
    """A finished generation: its samples, sample 0 first, and what they continued."""

    model_id: str  # the weights' version
    random_seed: int
    seed: Seed
    prefix: str  # the text the seed words add (after the session's words, if any)
    samples: list[TextSample]
    session_id: str | None = None

    @property
    def generated_words(self) -> int:
        return sum(len(s.words) for s in self.samples)


@dataclass(frozen=True)
class TextTokens:
    """A text as the model reads it: its words (``seed``) and each id's token."""

    model_id: str
    tokenizer: str
    seed: Seed
    tokens: list[str]  # the vocabulary's token of each of seed.ids


@dataclass(frozen=True)
class TextScores:
    """How likely a text is: each word's natural log-probability given the words before it
    (a subword model's: the sum of its pieces'), from the start-of-text state."""

    model_id: str
    seed: Seed  # the text's words, as given and as the model saw them
    log_probs: list[float]
    pieces: list[str]  # the text each word adds, as the model's words write the text

    @property
    def characters(self) -> int:
        return sum(len(p) for p in self.pieces)


@dataclass(frozen=True)
class Finished:
    """The last event of a stream that ended well: the whole result."""

    result: TextResult


@dataclass(frozen=True)
class Failed:
    """The last event of a stream cut short after it started (the server stopping, a session
    that changed, a failure): the error a plain request would have got."""

    error: ApiError = field(compare=False)


TextEvent = WordEvent | Finished | Failed
