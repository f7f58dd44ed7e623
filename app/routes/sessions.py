"""``/sessions``: hidden states kept between requests, so a text can continue later.

A session belongs to the model that created it: ``GET`` and ``DELETE`` take that model's name
as ``?model=`` (the default model without it).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Body, Path, Query, Response
from fastapi.openapi.models import Example

from app.deps import ModelsDep
from app.routes.docs import errors
from app.schemas import MODEL_NAME_MAX_CHARS, SESSION_ID_MAX_CHARS, SessionCreate, SessionPublic

router = APIRouter(prefix="/sessions", tags=["sessions"])

SessionId = Annotated[str, Path(min_length=1, max_length=SESSION_ID_MAX_CHARS)]
ModelName = Annotated[
    str | None,
    Query(
        min_length=1,
        max_length=MODEL_NAME_MAX_CHARS,
        description="The model that created the session (the default model when absent).",
    ),
]

EXAMPLES: dict[str, Example] = {
    "seeded": {"summary": "Start from seed words", "value": {"seed_words": "I can see"}},
    "start": {"summary": "Start from the start of a text", "value": {}},
}


@router.post(
    "",
    status_code=201,
    response_model=SessionPublic,
    responses=errors(400, 401, 404, 413, 422, 429, 503),
    summary="Start a session",
)
async def create_session(
    req: Annotated[SessionCreate, Body(openapi_examples=EXAMPLES)], models: ModelsDep
) -> SessionPublic:
    """Feed the seed words and keep the hidden state; continue it with `POST /generate`
    (on the same `model`)."""
    return await models.run(
        req.model, lambda service: service.create_session(req, owner=models.owner)
    )


@router.get(
    "/{session_id}",
    response_model=SessionPublic,
    responses=errors(401, 404, 409, 422, 429, 503),
    summary="Show a session",
)
async def get_session(
    session_id: SessionId, models: ModelsDep, model: ModelName = None
) -> SessionPublic:
    """The session's words so far and when it expires (each use moves that on)."""
    return await models.run(
        model, lambda service: service.get_session(session_id, owner=models.owner)
    )


@router.delete(
    "/{session_id}",
    status_code=204,
    response_class=Response,
    responses=errors(401, 404, 409, 422, 429, 503),
    summary="End a session",
)
async def delete_session(
    session_id: SessionId, models: ModelsDep, model: ModelName = None
) -> Response:
    await models.run(model, lambda service: service.delete_session(session_id, owner=models.owner))
    return Response(status_code=204)
