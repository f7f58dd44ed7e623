"""Hugging Face's text-generation protocol on `TextService`: the inputs become a
`TextRequest`, and the service's result and events become the protocol's answer and frames.

Sampling follows Text Generation Inference: greedy unless ``do_sample`` or one of
``temperature``, ``top_k`` and ``top_p`` is given. A stream sends one frame a word; the last
also carries the whole ``generated_text`` and the details, so a frame is held back until the
next word (or the end) shows whether it is the last.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing

import anyio

from app.engine.handles import WordEvent
from app.generation import Failed, TextEvent, TextRequest, TextResult
from app.serving import TextService
from app.text import Alternatives
from app.tgi.protocol import (
    Details,
    FinishReason,
    Generated,
    StreamDetails,
    StreamFrame,
    TextGenerationRequest,
    Token,
)

DEFAULT_WORDS = 20  # the text's length when the request sets none (at most the server's limit)
FINISH: dict[str, FinishReason] = {"length": "length", "stop": "stop_sequence"}


class TextGeneration:
    """One request of the protocol on ``service``."""

    def __init__(self, service: TextService, req: TextGenerationRequest) -> None:
        p = req.parameters
        sample = bool(p.do_sample) or any(v is not None for v in (p.temperature, p.top_k, p.top_p))
        limit = service.settings.max_words
        self.service = service
        self.req = req
        self.details = bool(p.details)
        self.request = TextRequest(
            seed_words=req.inputs,
            max_words=min(DEFAULT_WORDS, limit) if p.max_new_tokens is None else p.max_new_tokens,
            top_k=p.top_k or 0,
            temperature=(p.temperature or 1.0) if sample else 0.0,
            top_p=p.top_p or 1.0,
            stop=tuple(p.stop or ()),
            random_seed=p.seed,
            repetition_penalty=p.repetition_penalty or 1.0,
            frequency_penalty=p.frequency_penalty or 0.0,
            # A stream's frames always carry each word's log-probability.
            logprobs=(p.top_n_tokens or 0) if self.details or req.stream else None,
        )

    def _text(self, generated: str) -> str:
        return (self.req.inputs if self.req.parameters.return_full_text else "") + generated

    def _tokens(
        self, words: Sequence[str], pieces: Sequence[str], log_probs: Sequence[float | None]
    ) -> list[Token]:
        ids = self.service.word_ids(words)
        return [
            Token(id=i, text=text, logprob=lp)
            for i, text, lp in zip(ids, pieces, log_probs, strict=True)
        ]

    def _alternatives(self, top: Alternatives) -> list[Token]:
        ids = self.service.word_ids([token for token, _ in top])
        return [Token(id=i, text=t, logprob=lp) for i, (t, lp) in zip(ids, top, strict=True)]

    async def create(self) -> list[Generated]:
        result = await self.service.generate(self.request, owner=None)
        [sample] = result.samples
        details = None
        if self.details:
            details = Details(
                finish_reason=FINISH[sample.finish_reason],
                generated_tokens=len(sample.words),
                seed=result.random_seed,
                tokens=self._tokens(sample.words, sample.pieces, sample.log_probs),
                top_tokens=(
                    [self._alternatives(top) for top in sample.tops]
                    if self.req.parameters.top_n_tokens
                    else None
                ),
            )
        return [Generated(generated_text=self._text(sample.generated_text), details=details)]

    async def stream(self, stopping: anyio.Event) -> AsyncIterator[dict[str, str]]:
        """Start the text (a refusal raises before any byte is sent), then its frames."""
        return self._frames(await self.service.stream(self.request, stopping, owner=None))

    async def _frames(self, events: AsyncIterator[TextEvent]) -> AsyncIterator[dict[str, str]]:
        held: WordEvent | None = None
        count = 0
        async with aclosing(events) as words:  # type: ignore[type-var]
            async for event in words:
                if isinstance(event, Failed):
                    yield {
                        "data": json.dumps(
                            {"error": event.error.detail, "error_type": "generation"}
                        )
                    }
                    return
                if isinstance(event, WordEvent):
                    if held is not None:
                        count += 1
                        yield self._frame(count, held)
                    held = event
                else:
                    count += 1
                    yield self._frame(count, held, event.result)

    def _frame(
        self, index: int, event: WordEvent | None, result: TextResult | None = None
    ) -> dict[str, str]:
        if event is None:  # no word at all: an empty, special token ends the stream
            token = Token(id=self.service.vocab.bos_id, text="", logprob=None, special=True)
            top = None
        else:
            [token] = self._tokens([event.word], [event.text], [event.log_prob])
            top = self._alternatives(event.top) if self.req.parameters.top_n_tokens else None
        frame = StreamFrame(index=index, token=token, top_tokens=top)
        if result is not None:
            [sample] = result.samples
            frame.generated_text = self._text(sample.generated_text)
            frame.details = StreamDetails(
                finish_reason=FINISH[sample.finish_reason],
                generated_tokens=len(sample.words),
                seed=result.random_seed,
            )
        return {"data": frame.model_dump_json()}
