"""OpenAI's completions on `TextService`: each prompt becomes a `TextRequest`, and the
service's results and events become OpenAI's completion and its chunks.

One request with several prompts runs them together (their ``n`` samples each); the choices
are numbered prompt by prompt. Errors use OpenAI's body (``app/errors.py`` picks it for
every path under ``/v1/``): a request the service refuses (a 422 on ``/generate``) is a 400
here, as OpenAI answers it, with ``param`` naming OpenAI's field.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing
from typing import Any

import anyio
from pydantic import BaseModel

from app.engine.handles import WordEvent
from app.errors import ApiError, OpenAIError, from_api_error
from app.generation import Failed, TextEvent, TextRequest, TextResult
from app.openai.protocol import (
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionUsage,
)
from app.serving import TextService
from app.text import Alternatives


def text_request(req: CompletionRequest, prompt: str) -> TextRequest:
    """The service's request for one prompt of ``req`` (its ``n`` samples)."""
    return TextRequest(
        seed_words=prompt,
        max_words=16 if req.max_tokens is None else req.max_tokens,
        n=req.n or 1,
        top_k=req.top_k or 0,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=req.top_p or 1.0,
        stop=tuple(req.stop or ()),
        random_seed=req.seed,
        logprobs=req.logprobs,
        presence_penalty=req.presence_penalty or 0.0,
        frequency_penalty=req.frequency_penalty or 0.0,
        max_copy_words=req.max_copy_words or 0,
    )


class Completions:
    """One completion request: its prompts as `TextRequest`s, their results as OpenAI's.

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
        # No completion continues a session: no caller's sessions are involved (owner None).
        requests = [text_request(self.req, p) for p in self.prompts]
        try:
            async with asyncio.TaskGroup() as group:
                tasks = [
                    group.create_task(self._call(i, self.service.generate(r, owner=None)))
                    for i, r in enumerate(requests)
                ]
        except BaseExceptionGroup as group_error:
            raise _first(group_error) from None
        results: list[TextResult] = [task.result() for task in tasks]
        echoed = [await self._echoed(i, prompt) for i, prompt in enumerate(self.prompts)]
        choices = []
        for p, (prompt, result) in enumerate(zip(self.prompts, results, strict=True)):
            head = prompt if self.echo else ""
            for sample in result.samples:
                scores = self._logprobs(sample.pieces, sample.log_probs, sample.tops, len(head))
                choices.append(
                    CompletionChoice(
                        index=p * self.n + sample.index,
                        text=head + sample.generated_text,
                        logprobs=_joined(echoed[p], scores),
                        finish_reason=sample.finish_reason,
                    )
                )
        return Completion(**self._head(), choices=choices, usage=usage_of(results))

    async def stream(self, stopping: anyio.Event) -> AsyncIterator[dict[str, str]]:
        """Start every prompt's stream (refusals raise before any byte is sent), then chunks."""
        # Check every prompt before submitting any, so that a refusal of a later prompt does
        # not leave the earlier ones generating for no one.
        for i, prompt in enumerate(self.prompts):
            try:
                self.service.encode(prompt, "replace")
            except ApiError as exc:
                raise self._refused(i, exc) from None
        echoed = [await self._echoed(i, prompt) for i, prompt in enumerate(self.prompts)]
        streams = []
        for i, prompt in enumerate(self.prompts):
            req = text_request(self.req, prompt)
            streams.append(await self._call(i, self.service.stream(req, stopping, owner=None)))
        return self._chunks(streams, echoed)

    async def _chunks(
        self,
        streams: list[AsyncIterator[TextEvent]],
        echoed: list[CompletionLogprobs | None],
    ) -> AsyncIterator[dict[str, str]]:
        include_usage = bool(self.req.stream_options and self.req.stream_options.include_usage)
        results: list[TextResult] = []
        offsets: dict[int, int] = {}  # where each choice's next word starts in its text
        if self.echo:
            for p, prompt in enumerate(self.prompts):
                for j in range(self.n):
                    offsets[p * self.n + j] = len(prompt)
                    yield self._chunk(p * self.n + j, prompt, None, echoed[p])
        # Closed on the way out, so an early end stops the other prompts' generations too.
        async with aclosing(_merge(streams)) as events:
            async for p, event in events:
                if isinstance(event, WordEvent):
                    index = p * self.n + event.index
                    start = offsets.get(index, 0)
                    offsets[index] = start + len(event.text)
                    scores = self._logprobs([event.text], [event.log_prob], [event.top], start)
                    yield self._chunk(index, event.text, None, scores)
                elif isinstance(event, Failed):
                    for frame in failure_frames(event):
                        yield frame
                    return
                else:
                    results.append(event.result)
                    for sample in event.result.samples:
                        yield self._chunk(p * self.n + sample.index, "", sample.finish_reason)
        if include_usage:
            usage = usage_of(results).model_dump()
            yield {"data": json.dumps({**self._head(), "choices": [], "usage": usage})}
        yield {"data": "[DONE]"}

    def _chunk(
        self,
        index: int,
        text: str,
        finish: str | None,
        scores: CompletionLogprobs | None = None,
    ) -> dict[str, str]:
        return chunk_frame(self._head(), index, {"text": text}, scores, finish)

    async def _echoed(self, i: int, prompt: str) -> CompletionLogprobs | None:
        """The log-probabilities of prompt ``i``'s words when they are echoed with them (the
        first word's is null, as OpenAI gives it: it has no words before it)."""
        if not self.echo or self.req.logprobs is None or not prompt.split():
            return None
        scores = await self._call(i, self.service.score(prompt, "replace"))
        count = len(scores.pieces)
        return CompletionLogprobs(
            tokens=scores.pieces,
            token_logprobs=[None, *scores.log_probs[1:]],
            top_logprobs=[None] + [{}] * (count - 1),
            text_offset=[sum(len(p) for p in scores.pieces[:j]) for j in range(count)],
        )

    def _logprobs(
        self,
        pieces: Sequence[str],
        log_probs: Sequence[float | None],
        tops: Sequence[Alternatives],
        start: int,
    ) -> CompletionLogprobs | None:
        """OpenAI's log-probabilities of words whose text starts at ``start`` of the choice
        (None when the request did not ask for them). Alternatives that spell alike keep the
        likelier one."""
        if self.req.logprobs is None:
            return None
        offsets = []
        for piece in pieces:
            offsets.append(start)
            start += len(piece)
        return CompletionLogprobs(
            tokens=list(pieces),
            token_logprobs=list(log_probs),
            top_logprobs=[likeliest(alternatives) for alternatives in tops],
            text_offset=offsets,
        )


def _joined(
    head: CompletionLogprobs | None, tail: CompletionLogprobs | None
) -> CompletionLogprobs | None:
    """A prompt's log-probabilities followed by its completion's."""
    if head is None or tail is None:
        return tail
    return CompletionLogprobs(
        tokens=head.tokens + tail.tokens,
        token_logprobs=head.token_logprobs + tail.token_logprobs,
        top_logprobs=head.top_logprobs + tail.top_logprobs,
        text_offset=head.text_offset + tail.text_offset,
    )


def chunk_frame(
    head: dict[str, Any],
    index: int,
    content: dict[str, Any],
    scores: BaseModel | None,
    finish: str | None,
) -> dict[str, str]:
    """The server-sent event of one streamed choice: ``head`` (id, model, ...), then the
    choice's ``content`` (text or delta), its log-probabilities and its finish reason."""
    choice = {
        "index": index,
        **content,
        "logprobs": scores.model_dump() if scores is not None else None,
        "finish_reason": finish,
    }
    return {"data": json.dumps({**head, "choices": [choice]})}


def failure_frames(event: Failed) -> list[dict[str, str]]:
    """How a stream cut short ends: OpenAI's error body, then ``[DONE]``. The request had been
    accepted, so what ended it is the server's doing (stopping, or failing): a server error."""
    error = OpenAIError(500, event.error.detail)
    return [{"data": json.dumps(error.openai_body())}, {"data": "[DONE]"}]


def likeliest(alternatives: Alternatives) -> dict[str, float]:
    """Alternatives by their text, best first; of two that spell alike, the likelier."""
    top: dict[str, float] = {}
    for token, log_prob in alternatives:
        top.setdefault(token, log_prob)
    return top


def usage_of(results: Sequence[TextResult]) -> CompletionUsage:
    prompt = sum(len(r.seed.tokens) for r in results)
    completion = sum(r.generated_words for r in results)
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
    streams: Sequence[AsyncIterator[TextEvent]],
) -> AsyncIterator[tuple[int, TextEvent]]:
    """The events of several streams as they come, each tagged with its stream's position."""
    if len(streams) == 1:
        async with aclosing(streams[0]) as only:  # type: ignore[type-var]
            async for event in only:
                yield 0, event
        return
    queue: asyncio.Queue[tuple[int, TextEvent] | None] = asyncio.Queue()

    async def pump(i: int, stream: AsyncIterator[TextEvent]) -> None:
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
