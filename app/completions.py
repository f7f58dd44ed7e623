"""OpenAI-compatible completions: OpenAI's request and response shapes, on `TextService`.

``POST /v1/completions`` is translated into one `GenerateRequest` per prompt and run by the
same service (and engine) as ``POST /generate``; the answers are translated back into
OpenAI's shapes, so clients built on the ``openai`` SDK work unchanged. Names map as
``prompt`` -> ``seed_words`` (split by the model's tokenizer), ``max_tokens`` -> ``max_words``,
``seed`` -> ``random_seed``; ``temperature``, ``top_p``, ``n`` and ``stop`` keep their names,
and ``top_k`` is an extra field (0, the default, samples from the whole vocabulary as OpenAI
does). A token here is a word of the model's vocabulary.

Errors on these routes use OpenAI's body, ``{"error": {"message", "type", "param", "code"}}``
(``app/errors.py`` builds it, for every path under ``/v1/``); a request the service refuses
(a 422 on ``/generate``) is a 400 here, as OpenAI answers it, and an unknown ``model`` is a
404 with code ``model_not_found``.

``GET /v1/models`` lists every served model (the default first) with its card: OpenAI's
``id``, ``created`` and ``owned_by``, then the model's name, the version (weights id) and
load time, its architecture, size and training figures.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing
from datetime import datetime
from typing import TYPE_CHECKING, Annotated, Any, Literal

import anyio
from pydantic import BaseModel, ConfigDict, Field, PlainValidator

from app.errors import ApiError, OpenAIError, from_api_error
from app.schemas import (
    MAX_RANDOM_SEED,
    GenerateRequest,
    GenerateResponse,
    OptionalInteger,
    OptionalText,
    StopStrings,
    ValidUnicode,
)
from app.serving import TextService

if TYPE_CHECKING:
    from app.models import ModelRegistry

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


def _unsupported(message: str, accepted: tuple[object, ...] = (), schema: Any = None) -> Any:
    """A parameter of OpenAI's that a word model cannot honour: null, or one of ``accepted``
    (of the same JSON type), passes; anything else is refused with ``message``. ``schema`` is
    the type that states the accepted values in the API schema."""

    def check(value: object) -> object:
        if value is None or any(type(value) is type(a) and value == a for a in accepted):
            return value
        raise ValueError(message)

    return PlainValidator(check, json_schema_input_type=schema)


Penalty = Annotated[
    float | None,
    _unsupported(
        "penalties are not supported; leave it out or send 0", (0, 0.0), Literal[0] | None
    ),
]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    include_usage: bool = Field(
        False, description="Send one more chunk before [DONE] with the usage of the request."
    )


class CompletionRequest(BaseModel):
    """OpenAI's completion request. ``null`` means the default, as in OpenAI's API."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    model: OptionalText = Field(None, description="The id from GET /v1/models (or the run name).")
    prompt: Prompt = Field(
        "",
        description="The text to continue, split by the model's tokenizer; a list of texts "
        "gives n completions for each. Token-id prompts are not supported.",
    )
    max_tokens: OptionalInteger = Field(16, ge=0, description="Words to generate per completion.")
    temperature: float | None = Field(1.0, ge=0, le=2, description="0 means greedy.")
    top_p: float | None = Field(1.0, gt=0, le=1)
    n: OptionalInteger = Field(1, ge=1, description="Completions per prompt.")
    stop: StopStrings | None = Field(None, description="Strings that end a completion.")
    seed: OptionalInteger = Field(
        None, ge=0, le=MAX_RANDOM_SEED, description="The same request and seed give the same text."
    )
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    echo: bool | None = Field(False, description="Return the prompt before each completion.")
    best_of: OptionalInteger = Field(None, ge=1, description="Only 1 (or equal to n) is supported.")
    user: OptionalText = Field(None, description="Accepted and ignored.")
    logit_bias: Annotated[
        dict[str, int] | None,
        _unsupported(
            "not supported; send {} or leave it out",
            ({},),
            Annotated[dict[str, int], Field(max_length=0)] | None,
        ),
    ] = Field(None, description="Only an empty map is accepted.")
    suffix: Annotated[None, _unsupported("insertion is not supported; leave suffix out")] = None
    logprobs: Annotated[
        None, _unsupported("log-probabilities are not returned; use POST /score")
    ] = None
    frequency_penalty: Penalty = None
    presence_penalty: Penalty = None
    top_k: OptionalInteger = Field(
        0,
        ge=0,
        description="An extra field: sample among the k most likely words; 0 means all.",
    )

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

    def check_supported(self) -> None:
        if self.best_of is not None and self.best_of not in (1, self.n or 1):
            raise OpenAIError(400, "best_of: only 1 (or n) is supported", "best_of")

    def generate_request(self, prompt: str, stream: bool) -> GenerateRequest:
        return GenerateRequest.model_validate(
            {
                "seed_words": prompt,
                "max_words": 16 if self.max_tokens is None else self.max_tokens,
                "top_k": self.top_k or 0,
                "temperature": 1.0 if self.temperature is None else self.temperature,
                "top_p": self.top_p or 1.0,
                "n": self.n or 1,
                "stop": self.stop,
                "random_seed": self.seed,
                "stream": stream,
            }
        )


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: None = None
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


class Model(BaseModel):
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


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Model]


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class OpenAIErrorResponse(BaseModel):
    error: OpenAIErrorDetail


# -- the translation --------------------------------------------------------------------------


def _timestamp(iso: object) -> int:
    try:
        return int(datetime.fromisoformat(iso).timestamp()) if isinstance(iso, str) else 0
    except ValueError:
        return 0


def model_card(service: TextService, models: ModelRegistry) -> Model:
    info = service.info()
    architecture = info.architecture
    manifest = service.engine.checkpoint.manifest
    return Model(
        id=models.card_id(service),
        created=_timestamp(info.created),
        name=info.name,
        version=info.model,
        loaded_at=int(info.loaded_at.timestamp()),
        default=info.name == models.default_name,
        cell=architecture["cell"],
        layers=architecture["layers"],
        embed_dim=architecture["embed_dim"],
        hidden_dim=architecture["hidden_dim"],
        vocab_size=info.vocab_size,
        parameters=info.parameters,
        best_valid_perplexity=info.best_valid_perplexity,
        training={k: manifest[k] for k in TRAINING_FIGURES if k in manifest},
        corpus=info.corpus,
    )


class Completions:
    """One completion request: its prompts as `GenerateRequest`s, their answers as OpenAI's.

    ``model_id`` is the model's id in ``/v1/models``, which the answers carry as ``model``.
    """

    def __init__(self, service: TextService, req: CompletionRequest, model_id: str) -> None:
        req.check_supported()
        prompts = req.prompts
        limit = service.settings.max_samples
        if len(prompts) > limit:
            raise OpenAIError(400, f"prompt: at most {limit} prompts in one request", "prompt")
        self.service = service
        self.req = req
        self.model_id = model_id
        self.prompts = prompts
        self.n = req.n or 1
        self.id = "cmpl-" + secrets.token_hex(12)
        self.created = int(time.time())
        self.echo = bool(req.echo)

    def _head(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "text_completion",
            "created": self.created,
            "model": self.model_id,
            "system_fingerprint": self.service.model_id,  # the weights' version
        }

    def _refused(self, i: int, exc: ApiError) -> OpenAIError:
        """The service's refusal of prompt ``i``, in OpenAI's terms."""
        return from_api_error(exc, None if isinstance(self.req.prompt, str) else i)

    async def _call(self, i: int, work: Any) -> Any:
        try:
            return await work
        except ApiError as exc:
            raise self._refused(i, exc) from None

    async def create(self) -> Completion:
        requests = [self.req.generate_request(p, stream=False) for p in self.prompts]
        try:
            async with asyncio.TaskGroup() as group:
                tasks = [
                    group.create_task(self._call(i, self.service.generate(r)))
                    for i, r in enumerate(requests)
                ]
        except BaseExceptionGroup as group_error:
            raise _first(group_error) from None
        answers: list[GenerateResponse] = [task.result() for task in tasks]
        choices = []
        for p, (prompt, answer) in enumerate(zip(self.prompts, answers, strict=True)):
            for sample in answer.samples:
                text = (prompt if self.echo else "") + sample.generated_text
                choices.append(
                    CompletionChoice(
                        index=p * self.n + sample.index,
                        text=text,
                        finish_reason=sample.finish_reason,
                    )
                )
        return Completion(**self._head(), choices=choices, usage=_usage(answers))

    async def stream(self, stopping: anyio.Event) -> AsyncIterator[dict[str, str]]:
        """Start every prompt's stream (refusals raise before any byte is sent), then chunks."""
        # Check every prompt before submitting any, so that a refusal of a later prompt does
        # not leave the earlier ones generating for no one.
        for i, prompt in enumerate(self.prompts):
            try:
                self.service.encode(prompt, "replace")
            except ApiError as exc:
                raise self._refused(i, exc) from None
        streams = []
        for i, prompt in enumerate(self.prompts):
            req = self.req.generate_request(prompt, stream=True)
            streams.append(await self._call(i, self.service.stream(req, stopping)))
        return self._chunks(streams)

    async def _chunks(
        self, streams: list[AsyncIterator[dict[str, str]]]
    ) -> AsyncIterator[dict[str, str]]:
        include_usage = bool(self.req.stream_options and self.req.stream_options.include_usage)
        answers: list[GenerateResponse] = []
        if self.echo:
            for p, prompt in enumerate(self.prompts):
                for j in range(self.n):
                    yield self._chunk(p * self.n + j, prompt, None)
        # Closed on the way out, so an early end stops the other prompts' generations too.
        async with aclosing(_merge(streams)) as events:
            async for p, event in events:
                name, data = event.get("event"), json.loads(event["data"])
                if name == "word":
                    yield self._chunk(p * self.n + data["index"], data["text"], None)
                elif name == "done":
                    answer = GenerateResponse.model_validate(data)
                    answers.append(answer)
                    for sample in answer.samples:
                        yield self._chunk(p * self.n + sample.index, "", sample.finish_reason)
                elif name == "error":
                    # The request was accepted; what ends a stream early is the server's doing
                    # (it is stopping, or failed), so the error is a server error.
                    detail = data.get("detail") if isinstance(data, dict) else None
                    error = OpenAIError(500, str(detail or "the generation failed"))
                    yield {"data": json.dumps(error.openai_body())}
                    yield {"data": "[DONE]"}
                    return
        if include_usage:
            usage = _usage(answers).model_dump()
            yield {"data": json.dumps({**self._head(), "choices": [], "usage": usage})}
        yield {"data": "[DONE]"}

    def _chunk(self, index: int, text: str, finish: str | None) -> dict[str, str]:
        choice = {"index": index, "text": text, "logprobs": None, "finish_reason": finish}
        return {"data": json.dumps({**self._head(), "choices": [choice]})}


def _usage(answers: Sequence[GenerateResponse]) -> CompletionUsage:
    prompt = sum(a.usage.seed_words for a in answers)
    completion = sum(a.usage.generated_words for a in answers)
    return CompletionUsage(
        prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
    )


def _first(group: BaseExceptionGroup[Any]) -> BaseException:
    """The error a task group ended with: a refusal before anything unexpected."""
    leaves: list[BaseException] = []

    def walk(error: BaseException) -> None:
        if isinstance(error, BaseExceptionGroup):
            for inner in error.exceptions:
                walk(inner)
        else:
            leaves.append(error)

    walk(group)
    refusals = [e for e in leaves if isinstance(e, OpenAIError)]
    return (refusals or leaves)[0]


async def _merge(
    streams: Sequence[AsyncIterator[dict[str, str]]],
) -> AsyncIterator[tuple[int, dict[str, str]]]:
    """The events of several streams as they come, each tagged with its stream's position."""
    if len(streams) == 1:
        async with aclosing(streams[0]) as only:  # type: ignore[type-var]
            async for event in only:
                yield 0, event
        return
    queue: asyncio.Queue[tuple[int, dict[str, str]] | None] = asyncio.Queue()

    async def pump(i: int, stream: AsyncIterator[dict[str, str]]) -> None:
        try:
            async with aclosing(stream) as events:  # type: ignore[type-var]
                async for event in events:
                    await queue.put((i, event))
        finally:
            await queue.put(None)

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        running = len(tasks)
        while running:
            item = await queue.get()
            if item is None:
                running -= 1
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
