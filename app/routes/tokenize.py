"""``POST /tokenize``: a text's tokens and ids, as generation and scoring read it."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Body
from fastapi.openapi.models import Example

from app.deps import ModelsDep
from app.native import tokenize_response
from app.routes.docs import errors
from app.schemas import TokenizeRequest, TokenizeResponse

router = APIRouter(tags=["tokenize"])

EXAMPLES: dict[str, Example] = {
    "text": {"summary": "Tokenize a sentence", "value": {"text": "I can see the sea."}},
}


@router.post(
    "/tokenize",
    response_model=TokenizeResponse,
    responses=errors(400, 401, 404, 413, 422, 429, 503),
    summary="Tokenize a text",
)
async def tokenize(
    req: Annotated[TokenizeRequest, Body(openapi_examples=EXAMPLES)], models: ModelsDep
) -> TokenizeResponse:
    """The model's words of the text, each with its tokens (a subword model's pieces) and
    ids, and every id in order: what the model reads. A word the vocabulary lacks is read as
    a case-insensitive match or <unk> and flagged with `known: false`."""
    return tokenize_response(models.service(req.model).tokenize(req.text))
