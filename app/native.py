"""The native format (``/generate``, ``/score``): its bodies (``app/schemas.py``) to and from
the service's types (``app/generation.py``), and its server-sent events."""

from __future__ import annotations

import json
import math
from collections.abc import AsyncIterator
from contextlib import aclosing

from app.engine.handles import WordEvent
from app.generation import Failed, TextEvent, TextRequest, TextResult, TextScores, TextTokens
from app.schemas import (
    GenerateRequest,
    GenerateResponse,
    Sample,
    ScoredWord,
    ScoreResponse,
    TokenizedWord,
    TokenizeResponse,
    Usage,
    WordEventData,
)
from model_store.scoring import bits_per_char


def text_request(req: GenerateRequest) -> TextRequest:
    return TextRequest(
        seed_words=req.seed_words,
        max_words=req.max_words,
        n=req.n,
        top_k=req.top_k,
        temperature=req.temperature,
        top_p=req.top_p,
        uniform=req.uniform,
        stop=tuple(req.stop or ()),
        random_seed=req.random_seed,
        session_id=req.session_id,
        on_unknown=req.on_unknown,
        repetition_penalty=req.repetition_penalty,
        presence_penalty=req.presence_penalty,
        frequency_penalty=req.frequency_penalty,
        no_repeat_ngram_size=req.no_repeat_ngram_size,
        bad_words=tuple(req.bad_words or ()),
        min_words=req.min_words,
        max_copy_words=req.max_copy_words,
    )


def tokenize_response(tokens: TextTokens) -> TokenizeResponse:
    seed, words, start = tokens.seed, [], 0
    unknown = set(seed.unknown)
    for word, size in zip(seed.tokens, seed.sizes, strict=True):
        words.append(
            TokenizedWord(
                word=word,
                tokens=tokens.tokens[start : start + size],
                ids=seed.ids[start : start + size],
                known=word not in unknown,
            )
        )
        start += size
    return TokenizeResponse(
        model=tokens.model_id,
        tokenizer=tokens.tokenizer,
        words=words,
        ids=seed.ids,
        count=len(seed.ids),
    )


def score_response(scores: TextScores) -> ScoreResponse:
    seed, total = scores.seed, math.fsum(scores.log_probs)
    unknown = set(seed.unknown)  # the words with no exact match (none for subword)
    return ScoreResponse(
        model=scores.model_id,
        words=[
            ScoredWord(
                word=word,
                token=seen,
                known=word not in unknown,
                probability=math.exp(lp),
                log_prob=lp,
            )
            for word, seen, lp in zip(seed.tokens, seed.seen, scores.log_probs, strict=True)
        ],
        unknown_words=seed.unknown,
        log_prob=total,
        perplexity=math.exp(min(-total / len(scores.log_probs), 700.0)),
        bits_per_char=bits_per_char(total, scores.characters),
        characters=scores.characters,
    )


def generate_response(result: TextResult) -> GenerateResponse:
    samples = [
        Sample(
            index=s.index,
            text=result.prefix + s.generated_text,
            generated_text=s.generated_text,
            words=s.words,
            finish_reason=s.finish_reason,
            longest_copy=s.longest_copy,
        )
        for s in result.samples
    ]
    seed_words = len(result.seed.tokens)
    first = samples[0]
    return GenerateResponse(
        model=result.model_id,
        random_seed=result.random_seed,
        session_id=result.session_id,
        seed_words=result.seed.seen,
        unknown_words=result.seed.unknown,
        text=first.text,
        generated_text=first.generated_text,
        words=first.words,
        finish_reason=first.finish_reason,
        usage=Usage(
            seed_words=seed_words,
            generated_words=result.generated_words,
            total_words=seed_words + result.generated_words,
        ),
        samples=samples,
    )


async def sse_events(events: AsyncIterator[TextEvent]) -> AsyncIterator[dict[str, str]]:
    """One ``word`` event per word, then ``done`` with the whole response (or ``error``).
    Closing these events closes ``events``, which stops the generation."""
    async with aclosing(events) as inner:  # type: ignore[type-var]
        async for event in inner:
            if isinstance(event, WordEvent):
                data = WordEventData(index=event.index, word=event.word, text=event.text)
                yield {"event": "word", "data": data.model_dump_json()}
            elif isinstance(event, Failed):
                yield {"event": "error", "data": json.dumps(event.error.body())}
            else:
                done = generate_response(event.result).model_dump_json()
                yield {"event": "done", "data": done}
