"""OpenAI's completion request and response bodies, its model card and its error body.

Names map to the service's as ``prompt`` -> ``seed_words`` (split by the model's tokenizer),
``max_tokens`` -> ``max_words``, ``seed`` -> ``random_seed``; ``temperature``, ``top_p``, ``n``
and ``stop`` keep their names, and ``top_k`` is an extra field (0, the default, samples from
the whole vocabulary as OpenAI does), as is ``max_copy_words`` (``/generate``'s copy guard).
A token here is a word of the model's vocabulary.
Parameters a word model cannot honour accept only their neutral value.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PlainValidator

from app.chat import Message
from app.errors import OpenAIError
from app.schemas import (
    MAX_RANDOM_SEED,
    OptionalInteger,
    OptionalText,
    StopStrings,
    ValidUnicode,
    unsupported,
)

# -- request and response bodies --------------------------------------------------------------


def _prompt(value: object) -> str | list[str]:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(isinstance(p, str) for p in value):
        return value
    if isinstance(value, list) and value and all(isinstance(p, int | list) for p in value):
        raise ValueError("token-id prompts are not supported; send the text")
    raise ValueError("expected a string or a non-empty list of strings")


Prompt = Annotated[
    str | list[str],
    PlainValidator(_prompt, json_schema_input_type=str | Annotated[list[str], Field(min_length=1)]),
    ValidUnicode,
]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    include_usage: bool = Field(
        False, description="Send one more chunk before [DONE] with the usage of the request."
    )


class _SamplingRequest(BaseModel):
    """The fields OpenAI's completion and chat completion requests share. ``null`` means the
    default, as in OpenAI's API."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    model: OptionalText = Field(None, description="The id from GET /v1/models (or the run name).")
    temperature: float | None = Field(1.0, ge=0, le=2, description="0 means greedy.")
    top_p: float | None = Field(1.0, gt=0, le=1)
    seed: OptionalInteger = Field(
        None, ge=0, le=MAX_RANDOM_SEED, description="The same request and seed give the same text."
    )
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: OptionalText = Field(None, description="Accepted and ignored.")
    logit_bias: Annotated[
        dict[str, int] | None,
        unsupported(
            "not supported; send {} or leave it out",
            ({},),
            Annotated[dict[str, int], Field(max_length=0)] | None,
        ),
    ] = Field(None, description="Only an empty map is accepted.")
    frequency_penalty: float | None = Field(
        0.0, ge=-2, le=2, description="Subtracted from each word generated so far, times its count."
    )
    presence_penalty: float | None = Field(
        0.0, ge=-2, le=2, description="Subtracted once from each word generated so far."
    )
    top_k: OptionalInteger = Field(
        0,
        ge=0,
        description="An extra field: sample among the k most likely words; 0 means all.",
    )
    max_copy_words: OptionalInteger = Field(
        0,
        ge=0,
        le=100,
        description="An extra field: no run of more than this many words of the text occurs "
        "verbatim in the training text (as /generate's); 0 means no limit.",
    )


class CompletionRequest(_SamplingRequest):
    """OpenAI's completion request."""

    prompt: Prompt = Field(
        "",
        description="The text to continue, split by the model's tokenizer; a list of texts "
        "gives n completions for each. Token-id prompts are not supported.",
    )
    max_tokens: OptionalInteger = Field(16, ge=0, description="Words to generate per completion.")
    n: OptionalInteger = Field(1, ge=1, description="Completions per prompt.")
    stop: StopStrings | None = Field(None, description="Strings that end a completion.")
    echo: bool | None = Field(False, description="Return the prompt before each completion.")
    best_of: OptionalInteger = Field(None, ge=1, description="Only 1 (or equal to n) is supported.")
    suffix: Annotated[None, unsupported("insertion is not supported; leave suffix out")] = None
    logprobs: OptionalInteger = Field(
        None,
        ge=0,
        le=5,
        description="Return each word's log-probability (as POST /score gives it) and this "
        "many likeliest alternatives where it began; with echo, the prompt's words too (the "
        "first one's is null).",
    )

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

    def check_supported(self) -> None:
        if self.best_of is not None and self.best_of not in (1, self.n or 1):
            raise OpenAIError(400, "best_of: only 1 (or n) is supported", "best_of")


class ChatContentPart(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    type: Literal["text"] = Field(description="Only text parts are supported.")
    text: Annotated[str, ValidUnicode]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    role: Literal["system", "developer", "user", "assistant"] = Field(
        description="A developer message counts as a system one; tools are not supported."
    )
    content: Annotated[str, ValidUnicode] | list[ChatContentPart]
    name: OptionalText = Field(None, description="Accepted and ignored.")

    def message(self) -> Message:
        text = (
            self.content
            if isinstance(self.content, str)
            else " ".join(part.text for part in self.content)
        )
        return Message("system" if self.role == "developer" else self.role, text)


class ChatCompletionRequest(_SamplingRequest):
    """OpenAI's chat completion request, on the chat template of ``app/chat.py``."""

    messages: list[ChatMessage] = Field(min_length=1, max_length=256)
    max_completion_tokens: OptionalInteger = Field(
        None, ge=0, description="Words to generate per reply (default 64, or the server's limit)."
    )
    max_tokens: OptionalInteger = Field(None, ge=0, description="The old name of the above.")
    n: OptionalInteger = Field(1, ge=1, description="Replies to the conversation.")
    stop: StopStrings | None = Field(
        None, description="Strings that end a reply, besides the turn marker."
    )
    logprobs: bool | None = Field(
        False, description="Return each word's log-probability (as POST /score gives it)."
    )
    top_logprobs: OptionalInteger = Field(
        None,
        ge=0,
        le=5,
        description="This many likeliest alternatives of each word too (implies logprobs).",
    )


class ChatTopLogprob(BaseModel):
    token: str
    logprob: float | None
    bytes: list[int]


class ChatTokenLogprob(ChatTopLogprob):
    top_logprobs: list[ChatTopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob]


class ChatReply(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: ChatReply
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["length", "stop"]


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[ChatChoice]
    usage: CompletionUsage


class CompletionLogprobs(BaseModel):
    """Per generated word (a token here): the text it adds, its natural log-probability, the
    likeliest alternatives where it began, and where it starts in the choice's text."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["length", "stop"] | None


class CompletionUsage(BaseModel):
    prompt_tokens: int = Field(description="Words of the prompts, as the model read them.")
    completion_tokens: int = Field(description="Words generated.")
    total_tokens: int


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[CompletionChoice]
    usage: CompletionUsage | None = None


# What training had done when the served weights were committed (from the run's manifest).
TRAINING_FIGURES = ("epochs", "iterations", "train_words_seen", "train_seconds", "stop_reason")


class ModelCard(BaseModel):
    """OpenAI's model object, with this model's card after OpenAI's three fields."""

    id: str = Field(description="What to send as `model` (so is `name`).")
    object: Literal["model"] = "model"
    created: int = Field(description="When the run folder was created, in seconds since 1970.")
    owned_by: str = "wordrnn"
    name: str = Field(description="The model's name: its folder.")
    version: str = Field(description="The id of the weights served; it changes with a reload.")
    loaded_at: int = Field(description="When this version was loaded, in seconds since 1970.")
    default: bool = Field(description="Whether a request without `model` gets this model.")
    cell: str
    layers: int
    embed_dim: int
    hidden_dim: int
    vocab_size: int
    parameters: int
    best_valid_perplexity: float | None
    training: dict[str, Any] = Field(
        description="What training had done when these weights were committed: "
        + ", ".join(TRAINING_FIGURES)
        + "."
    )
    corpus: dict[str, Any] | None = Field(description="The training corpus' digest and counts.")
    chat_template: dict[str, str] = Field(
        description="How /v1/chat/completions renders a conversation for the model."
    )


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class OpenAIErrorResponse(BaseModel):
    error: OpenAIErrorDetail
