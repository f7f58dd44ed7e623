"""OpenAI's chat completions on `TextService`: the conversation rendered by the chat template
(``app/chat.py``) is one prompt, its ``n`` replies end at the template's turn marker, and the
service's result and events become OpenAI's chat completion and its chunks."""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing
from typing import Any

import anyio

from app.chat import TURN_MARKER, render
from app.engine.handles import WordEvent
from app.errors import CHAT_NAMES, ApiError, OpenAIError, from_api_error
from app.generation import Failed, TextEvent, TextRequest
from app.openai.completions import chunk_frame, failure_frames, likeliest, usage_of
from app.openai.protocol import (
    ChatChoice,
    ChatCompletion,
    ChatCompletionRequest,
    ChatLogprobs,
    ChatReply,
    ChatTokenLogprob,
    ChatTopLogprob,
)
from app.serving import TextService
from app.text import Alternatives

DEFAULT_WORDS = 64  # a reply's length when the request sets none (at most the server's limit)


class ChatCompletions:
    """One chat completion request: its conversation as a `TextRequest`, its replies as
    OpenAI's. ``model_id`` is the model's id in ``/v1/models``."""

    def __init__(self, service: TextService, req: ChatCompletionRequest, model_id: str) -> None:
        self.service = service
        self.req = req
        self.model_id = model_id
        self.id = "chatcmpl-" + secrets.token_hex(12)
        self.created = int(time.time())
        wanted = (
            req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        )
        self.request = TextRequest(
            seed_words=render([m.message() for m in req.messages]),
            max_words=min(DEFAULT_WORDS, service.settings.max_words) if wanted is None else wanted,
            n=req.n or 1,
            top_k=req.top_k or 0,
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=req.top_p or 1.0,
            stop=(*(req.stop or ()), TURN_MARKER),
            random_seed=req.seed,
            presence_penalty=req.presence_penalty or 0.0,
            frequency_penalty=req.frequency_penalty or 0.0,
            max_copy_words=req.max_copy_words or 0,
            # top_logprobs alone implies logprobs (OpenAI would refuse it).
            logprobs=req.top_logprobs
            if req.top_logprobs is not None
            else 0
            if req.logprobs
            else None,
        )

    def _head(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "created": self.created,
            "model": self.model_id,
            "system_fingerprint": self.service.model_id,  # the weights' version
        }

    async def create(self) -> ChatCompletion:
        try:
            result = await self.service.generate(self.request, owner=None)
        except ApiError as exc:
            raise _refused(exc) from None
        choices = [
            ChatChoice(
                index=sample.index,
                message=ChatReply(content=sample.generated_text.lstrip()),
                logprobs=self._logprobs(sample.pieces, sample.log_probs, sample.tops),
                finish_reason=sample.finish_reason,
            )
            for sample in result.samples
        ]
        return ChatCompletion(**self._head(), choices=choices, usage=usage_of([result]))

    async def stream(self, stopping: anyio.Event) -> AsyncIterator[dict[str, str]]:
        """Start the replies (a refusal raises before any byte is sent), then the chunks."""
        try:
            events = await self.service.stream(self.request, stopping, owner=None)
        except ApiError as exc:
            raise _refused(exc) from None
        return self._chunks(events)

    async def _chunks(self, events: AsyncIterator[TextEvent]) -> AsyncIterator[dict[str, str]]:
        started: set[int] = set()  # the replies whose text has begun (its spaces stripped)
        for index in range(self.request.n):
            yield self._chunk(index, {"role": "assistant", "content": ""})
        async with aclosing(events) as replies:  # type: ignore[type-var]
            async for event in replies:
                if isinstance(event, WordEvent):
                    text = event.text if event.index in started else event.text.lstrip()
                    if text:
                        started.add(event.index)
                    scores = self._logprobs([event.text], [event.log_prob], [event.top])
                    yield self._chunk(event.index, {"content": text}, scores)
                elif isinstance(event, Failed):
                    for frame in failure_frames(event):
                        yield frame
                    return
                else:
                    for sample in event.result.samples:
                        yield self._chunk(sample.index, {}, finish=sample.finish_reason)
                    if self.req.stream_options and self.req.stream_options.include_usage:
                        usage = usage_of([event.result]).model_dump()
                        body = {**self._head(), "object": "chat.completion.chunk"}
                        yield {"data": json.dumps({**body, "choices": [], "usage": usage})}
        yield {"data": "[DONE]"}

    def _chunk(
        self,
        index: int,
        delta: dict[str, str],
        scores: ChatLogprobs | None = None,
        finish: str | None = None,
    ) -> dict[str, str]:
        head = {**self._head(), "object": "chat.completion.chunk"}
        return chunk_frame(head, index, {"delta": delta}, scores, finish)

    def _logprobs(
        self,
        pieces: Sequence[str],
        log_probs: Sequence[float | None],
        tops: Sequence[Alternatives],
    ) -> ChatLogprobs | None:
        """OpenAI's log-probabilities of the reply's words (None unless asked for)."""
        if self.request.logprobs is None:
            return None
        return ChatLogprobs(
            content=[
                ChatTokenLogprob(
                    token=piece,
                    logprob=log_prob,
                    bytes=list(piece.encode()),
                    top_logprobs=[
                        ChatTopLogprob(token=t, logprob=lp, bytes=list(t.encode()))
                        for t, lp in likeliest(top).items()
                    ],
                )
                for piece, log_prob, top in zip(pieces, log_probs, tops, strict=True)
            ]
        )


def _refused(exc: ApiError) -> OpenAIError:
    """The service's refusal, in OpenAI's terms (its fields named as the chat request's)."""
    return from_api_error(exc, names=CHAT_NAMES)
