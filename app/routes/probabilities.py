"""``POST /next-words`` (autocomplete) and ``POST /score`` (how likely a text is)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Body
from fastapi.openapi.models import Example

from app.deps import ModelsDep
from app.native import score_response
from app.routes.docs import errors
from app.schemas import NextWordsRequest, NextWordsResponse, ScoreRequest, ScoreResponse

router = APIRouter(tags=["suggest"])

NEXT_EXAMPLES: dict[str, Example] = {
    "seeded": {
        "summary": "Words likely after a seed",
        "value": {"seed_words": "I can", "top_k": 5},
    },
    "start": {"summary": "Words likely to open a text", "value": {"top_k": 5}},
}
SCORE_EXAMPLES: dict[str, Example] = {
    "text": {"summary": "Score a sentence", "value": {"text": "I can see the sea."}},
    "words": {"summary": "Score a list of words", "value": {"text": ["the", "sea", "is", "blue"]}},
}


@router.post(
    "/next-words",
    response_model=NextWordsResponse,
    responses=errors(400, 401, 404, 409, 413, 422, 429, 503),
    summary="Suggest the next word",
)
async def next_words(
    req: Annotated[NextWordsRequest, Body(openapi_examples=NEXT_EXAMPLES)], models: ModelsDep
) -> NextWordsResponse:
    """The model's most likely next words after the seed words (or a session), with their
    probabilities, from one forward pass. <unk> and <bos> are never suggested."""
    return await models.run(req.model, lambda service: service.next_words(req, owner=models.owner))


@router.post(
    "/score",
    response_model=ScoreResponse,
    responses=errors(400, 401, 404, 413, 422, 429, 503),
    summary="Score a text",
)
async def score(
    req: Annotated[ScoreRequest, Body(openapi_examples=SCORE_EXAMPLES)], models: ModelsDep
) -> ScoreResponse:
    """Each word's probability given the words before it, and the text's perplexity.

    The text is read from the start-of-text state (<bos>), as training opened each document
    and as the validation perplexity was measured. Unknown words are scored as what the model
    saw (often <unk>) and flagged with `known: false`."""
    scores = await models.run(req.model, lambda service: service.score(req.text, req.on_unknown))
    return score_response(scores)
