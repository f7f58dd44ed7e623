"""Request and response bodies of the API.

Requests are strict (``"stream": 0`` is not a boolean, ``"5"`` is not a number; ``5.0`` is
an integer, as JSON Schema counts it, but ``5.5`` is not), reject unknown fields and refuse
strings that are not valid Unicode. Bounds that do not depend on the deployment are declared
here; limits that do (``max_words``, ``n``, seed length from the settings, ``top_k`` up to the
vocabulary size) are checked against the loaded model in ``app/serving.py`` and listed by
``GET /info``.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, PlainValidator

from app.generation import OnUnknown
from app.text import FinishReason

MAX_RANDOM_SEED = 2**53 - 1  # exact in JavaScript numbers too
MAX_WORD_CHARS = 100
MAX_STOPS = 8
MAX_STOP_CHARS = 100
SESSION_ID_MAX_CHARS = 64
MODEL_NAME_MAX_CHARS = 200


_LONE_SURROGATE = re.compile(r"[\ud800-\udfff]")


def _valid_unicode(value: object) -> object:
    """Refuse a string, or a list's string, that holds a lone UTF-16 surrogate.

    JSON's ``"\\ud800"`` escape decodes to one, and no UTF-8 text can hold it: let through, it
    failed only when an answer echoing it was written, as a 500 after a session had been
    created or a stream had begun. It runs before the field's own checks (whose length check
    refuses it as "unable to parse raw data"); other types are left to those.
    """
    texts = [value] if isinstance(value, str) else value if isinstance(value, list) else []
    for i, text in enumerate(texts):
        if isinstance(text, str) and (found := _LONE_SURROGATE.search(text)):
            where = "" if isinstance(value, str) else f"item {i} "
            raise ValueError(
                f"{where}holds a lone UTF-16 surrogate (\\u{ord(found[0]):04x}); send valid Unicode"
            )
    return value


# Every string field of a request takes it: in the aliases below (after a PlainValidator,
# so that it runs first), or as `OptionalText`.
ValidUnicode = BeforeValidator(_valid_unicode)
OptionalText = Annotated[str | None, ValidUnicode]


def _integral(value: object) -> object:
    """A float with an integral value as that int; anything else as it is, for the strict int.

    JSON Schema counts ``5.0`` as an integer, so a client (or a schema-driven fuzzer) may send
    one where the schema says ``integer``; ``5.5``, ``"5"`` and ``true`` are still refused.
    """
    return int(value) if isinstance(value, float) and value.is_integer() else value


# Every integer field of a request takes one of these. An optional one converts before the
# None check, so that the field's bounds stay on the integer (as JSON Schema's ``minimum``).
Integer = Annotated[int, BeforeValidator(_integral)]
OptionalInteger = Annotated[int | None, BeforeValidator(_integral)]


def _words_or_text(value: object) -> list[str] | str:
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise ValueError("expected a list of words or a string")
    for i, word in enumerate(value):
        if not isinstance(word, str):
            raise ValueError(f"item {i} is not a string")
        if not word or len(word) > MAX_WORD_CHARS:
            raise ValueError(f"item {i} must have 1 to {MAX_WORD_CHARS} characters")
        if any(ch.isspace() for ch in word):
            raise ValueError(
                f"item {i} ({word!r}) holds whitespace; send one word per item, or a string "
                "to have it split"
            )
    return value


def _stop_strings(value: object) -> list[str]:
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise ValueError("expected a string or a list of strings")
    if len(stops) > MAX_STOPS:
        raise ValueError(f"at most {MAX_STOPS} stop strings")
    if not all(1 <= len(s) <= MAX_STOP_CHARS for s in stops):
        raise ValueError(f"each stop string must have 1 to {MAX_STOP_CHARS} characters")
    return stops


# What the validators above accept, as the API schema states it. A JSON Schema's ``\s`` is
# not Python's: the class lists every character for which ``str.isspace()`` is true.
NOT_WHITESPACE = r"[^\t-\r\x1c-\x20\x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]"
_Word = Annotated[
    str, Field(min_length=1, max_length=MAX_WORD_CHARS, pattern=f"^{NOT_WHITESPACE}+$")
]
_Stop = Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]

WordsOrText = Annotated[
    list[str] | str,
    PlainValidator(_words_or_text, json_schema_input_type=list[_Word] | str),
    ValidUnicode,
]
# The text to score: the server refuses one that holds no words, an empty one among them.
TextToScore = Annotated[
    list[str] | str,
    PlainValidator(
        _words_or_text,
        json_schema_input_type=Annotated[list[_Word], Field(min_length=1)]
        | Annotated[str, Field(min_length=1)],
    ),
    ValidUnicode,
]
MAX_BAD_WORDS = 32
BadWords = Annotated[
    list[Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]],
    Field(max_length=MAX_BAD_WORDS),
    ValidUnicode,
]
StopStrings = Annotated[
    list[str],
    PlainValidator(
        _stop_strings,
        json_schema_input_type=Annotated[list[_Stop], Field(max_length=MAX_STOPS)] | _Stop,
    ),
    ValidUnicode,
]

_SEED_WORDS = Field(
    None,
    description=(
        "A list of words (used as given), or a string that the model's own tokenizer splits. "
        "Without it generation starts from the start-of-text state."
    ),
)
_ON_UNKNOWN = Field(
    "replace",
    description=(
        "Seed words outside the vocabulary fall back to a case-insensitive match, then to "
        "<unk>, and are listed in unknown_words; 'error' rejects them with a 422 instead."
    ),
)
_MODEL = Field(
    None,
    min_length=1,
    max_length=MODEL_NAME_MAX_CHARS,
    description="The model to use: a name (or id) from GET /v1/models. Absent: the default "
    "model. A session continues only on the model that created it.",
)


def unsupported(message: str, accepted: tuple[object, ...] = (), schema: Any = None) -> Any:
    """A parameter of another API that this model cannot honour: null, or one of ``accepted``
    (of the same JSON type), passes; anything else is refused with ``message``. ``schema`` is
    the type that states the accepted values in the API schema."""

    def check(value: object) -> object:
        if value is None or any(type(value) is type(a) and value == a for a in accepted):
            return value
        raise ValueError(message)

    return PlainValidator(check, json_schema_input_type=schema)


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class GenerateRequest(_Request):
    seed_words: WordsOrText | None = _SEED_WORDS
    max_words: Integer = Field(25, ge=0, description="Words to generate per sample.")
    top_k: Integer = Field(
        5, ge=0, description="Sample among the k most likely words; 0 means the whole vocabulary."
    )
    temperature: float = Field(
        1.0, ge=0, le=100, description="Divides the scores before sampling; 0 means greedy."
    )
    top_p: float = Field(
        1.0, gt=0, le=1, description="Then keep the smallest set of words reaching this mass."
    )
    uniform: bool = Field(
        False, description="Pick uniformly among the kept words, as the lab's sampler does."
    )
    repetition_penalty: float = Field(
        1.0,
        ge=1,
        le=10,
        description="Divides the positive score and multiplies the negative one of every word "
        "already in the text (CTRL's penalty); 1 means none. A subword model's are its pieces.",
    )
    presence_penalty: float = Field(
        0.0, ge=-2, le=2, description="OpenAI's: subtracted once from each word generated so far."
    )
    frequency_penalty: float = Field(
        0.0,
        ge=-2,
        le=2,
        description="OpenAI's: subtracted from each word generated so far, times its count.",
    )
    bad_words: BadWords | None = Field(
        None,
        description="Words or phrases never generated (a phrase is blocked at its last word), "
        "split by the model's tokenizer; a word the vocabulary lacks cannot be generated anyway.",
    )
    min_words: Integer = Field(
        0, ge=0, description="No stop string ends a sample before this many words."
    )
    no_repeat_ngram_size: Integer = Field(
        0,
        ge=0,
        le=32,
        description="No n-gram of this many words (a subword model's: pieces) occurs twice in "
        "the text; 0 means no limit.",
    )
    max_copy_words: Integer = Field(
        0,
        ge=0,
        le=100,
        description="No run of more than this many words of the text (seed included) occurs "
        "verbatim in the training text: a word that would make one is skipped for the next "
        "allowed one. 0 means no limit; needs a model with a copy index (see /info).",
    )
    random_seed: OptionalInteger = Field(
        None,
        ge=0,
        le=MAX_RANDOM_SEED,
        description="The same request and seed give the same text; absent: the server picks "
        "one and returns it.",
    )
    n: Integer = Field(1, ge=1, description="Independent samples, generated as one batch.")
    stop: StopStrings | None = Field(
        None,
        description="Strings that end a sample where they first appear in its text, matched on "
        "the text (not only at word boundaries) and left out of it. A session continues after "
        "the last word kept.",
    )
    session_id: OptionalText = Field(
        None,
        min_length=1,
        max_length=SESSION_ID_MAX_CHARS,
        description="Continue this session from its state, then store the new state in it.",
    )
    stream: bool = Field(False, description="Send each word as a server-sent event.")
    on_unknown: OnUnknown = _ON_UNKNOWN
    model: OptionalText = _MODEL


class Usage(BaseModel):
    seed_words: int = Field(description="Words fed before generating.")
    generated_words: int = Field(description="Words generated, all samples together.")
    total_words: int


class Sample(BaseModel):
    index: int
    text: str = Field(description="The seed followed by the continuation.")
    generated_text: str = Field(description="The continuation alone, as it attaches to the seed.")
    words: list[str]
    finish_reason: FinishReason
    longest_copy: int | None = Field(
        description="Words in the longest run of this text (seed included) that occurs verbatim "
        "in the training text; null when the model has no index of it (see /info)."
    )


class GenerateResponse(BaseModel):
    model: str = Field(description="The id of the model that wrote this.")
    random_seed: int
    session_id: str | None = None
    seed_words: list[str] = Field(description="The seed words as the model saw them.")
    unknown_words: list[str]
    text: str = Field(description="Sample 0: the seed words followed by the generated words.")
    generated_text: str = Field(description="Sample 0's continuation alone.")
    words: list[str] = Field(description="Sample 0's generated words.")
    finish_reason: FinishReason
    usage: Usage
    samples: list[Sample] = Field(description="Every sample, sample 0 first.")


class WordEventData(BaseModel):
    """The data of a streamed ``word`` event."""

    index: int
    word: str
    text: str = Field(description="What this word adds to the sample's generated_text.")


class SessionCreate(_Request):
    seed_words: WordsOrText | None = _SEED_WORDS
    on_unknown: OnUnknown = _ON_UNKNOWN
    model: OptionalText = _MODEL


class SessionPublic(BaseModel):
    session_id: str
    model: str
    words: list[str] = Field(description="Every word of the session so far.")
    text: str
    word_count: int
    created_at: datetime
    expires_at: datetime = Field(description="When the session ends unless it is used again.")
    unknown_words: list[str] = Field(
        default_factory=list, description="Seed words outside the vocabulary (on creation)."
    )


class NextWordsRequest(_Request):
    seed_words: WordsOrText | None = _SEED_WORDS
    session_id: OptionalText = Field(
        None,
        min_length=1,
        max_length=SESSION_ID_MAX_CHARS,
        description="Start from this session's state (the session is not changed).",
    )
    top_k: Integer = Field(10, ge=1, description="How many words to suggest.")
    on_unknown: OnUnknown = _ON_UNKNOWN
    model: OptionalText = _MODEL


class WordProbability(BaseModel):
    word: str
    probability: float


class NextWordsResponse(BaseModel):
    model: str
    session_id: str | None = None
    seed_words: list[str]
    unknown_words: list[str]
    words: list[WordProbability] = Field(description="The most likely next words, best first.")


class ScoreRequest(_Request):
    text: TextToScore = Field(description="A list of words, or a string the tokenizer splits.")
    on_unknown: OnUnknown = _ON_UNKNOWN
    model: OptionalText = _MODEL


class TokenizeRequest(_Request):
    text: TextToScore = Field(description="A list of words, or a string the tokenizer splits.")
    model: OptionalText = _MODEL


class TokenizedWord(BaseModel):
    word: str = Field(description="The word as given.")
    tokens: list[str] = Field(description="Its tokens: one word, or a subword model's pieces.")
    ids: list[int] = Field(description="Their ids in the model's vocabulary.")
    known: bool = Field(
        description="False when the vocabulary lacks it (<unk>, or a case-"
        "insensitive match); always true for a subword model."
    )


class TokenizeResponse(BaseModel):
    model: str
    tokenizer: str = Field(description="The tokenizer's name, as GET /info describes it.")
    words: list[TokenizedWord]
    ids: list[int] = Field(description="Every id, in order: what the model reads.")
    count: int = Field(description="How many ids.")


class ScoredWord(BaseModel):
    word: str = Field(description="The word as given.")
    token: str = Field(description="The word as the model saw it.")
    known: bool = Field(description="False when the word is not in the vocabulary as given.")
    probability: float = Field(description="For a subword model, the product of its pieces'.")
    log_prob: float


class ScoreResponse(BaseModel):
    model: str
    words: list[ScoredWord]
    unknown_words: list[str]
    log_prob: float = Field(description="Natural log-probability of the whole text.")
    perplexity: float = Field(description="exp(-log_prob / words).")
    bits_per_char: float = Field(
        description="-log2 of the text's probability over its characters: compares any two "
        "models, whatever their tokens."
    )
    characters: int = Field(description="Characters of the text as the model's words write it.")


class Status(BaseModel):
    status: str
    model: str | None = None


class Limits(BaseModel):
    max_words: int
    max_samples: int
    max_seed_words: int
    max_top_k: int
    max_body_bytes: int
    session_ttl_seconds: float
    max_sessions: int
    session_max_words: int


class Served(BaseModel):
    """What the engine has done since the process started."""

    generations: int
    words: int
    cancelled: int
    failed: int
    pending: int = Field(description="Model jobs queued or running now.")


class InfoResponse(BaseModel):
    """The model card, the limits of this deployment, and what it has served."""

    model: str = Field(description="The id of the weights served: it changes with each reload.")
    name: str = Field(description="The name requests choose the model by.")
    loaded_at: datetime = Field(description="When this version of the model was loaded.")
    run: str
    device: str
    quantize: str = Field(description="off, or int8: the weights served (WORDRNN_QUANTIZE).")
    created: str | None
    updated: str | None
    architecture: dict[str, Any]
    parameters: int
    vocab_size: int
    tokenizer: dict[str, Any]
    chat_template: dict[str, str] = Field(
        description="How /v1/chat/completions renders a conversation for the model to continue."
    )
    corpus: dict[str, Any] | None
    best_valid_perplexity: float | None
    best_valid_bits_per_char: float | None = Field(
        description="Bits per character of the validation text (compares any two models)."
    )
    copy_index: bool = Field(
        description="Whether the model has an index of its training text: each sample's "
        "longest_copy and the max_copy_words control need it."
    )
    training: dict[str, Any]
    versions: dict[str, str]
    limits: Limits
    served: Served


class FieldError(BaseModel):
    field: str
    message: str


class ErrorResponse(BaseModel):
    detail: str
    errors: list[FieldError]
