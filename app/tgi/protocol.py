"""The bodies of Hugging Face's text-generation protocol: ``{"inputs", "parameters",
"stream"}`` in; a list with ``generated_text`` (and ``details``) out, or one server-sent
event per word. A token here is a word of the model's vocabulary."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from app.schemas import (
    MAX_RANDOM_SEED,
    OptionalInteger,
    StopStrings,
    ValidUnicode,
    unsupported,
)


class Parameters(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    max_new_tokens: OptionalInteger = Field(
        None, ge=0, description="Words to generate (default 20, or the server's limit)."
    )
    do_sample: bool | None = Field(
        None,
        description="Sample; without it (and without temperature, top_k or top_p) the "
        "likeliest word is taken each time, as Text Generation Inference does.",
    )
    temperature: float | None = Field(None, gt=0, le=100)
    top_k: OptionalInteger = Field(None, ge=1)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: OptionalInteger = Field(None, ge=0, le=MAX_RANDOM_SEED)
    stop: StopStrings | None = Field(None, description="Strings that end the text.")
    return_full_text: bool | None = Field(None, description="Put the inputs before the text.")
    details: bool | None = Field(
        None, description="Each word's id, text and log-probability, the finish reason, the seed."
    )
    top_n_tokens: OptionalInteger = Field(
        None, ge=0, le=5, description="With details: this many likeliest alternatives a word."
    )
    decoder_input_details: Annotated[
        bool | None, unsupported("not supported; leave it out", (False,), Literal[False] | None)
    ] = None
    watermark: Annotated[
        bool | None, unsupported("not supported; leave it out", (False,), Literal[False] | None)
    ] = None
    best_of: Annotated[int | None, unsupported("only 1 is supported", (1,), Literal[1] | None)] = (
        None
    )
    repetition_penalty: float | None = Field(
        None, ge=1, le=10, description="CTRL's penalty of every word already in the text."
    )
    frequency_penalty: float | None = Field(
        None, ge=-2, le=2, description="Subtracted from each generated word, times its count."
    )
    truncate: Annotated[int | None, unsupported("truncation is not supported; leave it out")] = None
    typical_p: Annotated[
        float | None, unsupported("typical sampling is not supported; leave it out")
    ] = None


class TextGenerationRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    inputs: Annotated[str, ValidUnicode] = Field(description="The text to continue.")
    parameters: Parameters = Field(default_factory=Parameters)
    stream: bool = Field(False, description="Server-sent events, one a word.")


FinishReason = Literal["length", "stop_sequence"]


class Token(BaseModel):
    id: int = Field(description="The word's id (a subword model's: its first piece's).")
    text: str
    logprob: float | None
    special: bool = False


class Details(BaseModel):
    finish_reason: FinishReason
    generated_tokens: int
    seed: int | None
    prefill: list[Token] = Field(default_factory=list)
    tokens: list[Token]
    top_tokens: list[list[Token]] | None = None


class Generated(BaseModel):
    generated_text: str
    details: Details | None = None


class StreamDetails(BaseModel):
    finish_reason: FinishReason
    generated_tokens: int
    seed: int | None


class StreamFrame(BaseModel):
    index: int
    token: Token
    top_tokens: list[Token] | None = None
    generated_text: str | None = None
    details: StreamDetails | None = None
