"""``/sessions``: hidden states kept between requests, so a text can continue later."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Body, Path, Response
from fastapi.openapi.models import Example

from app.deps import ServiceDep
from app.routes.responses import errors
from app.schemas import SESSION_ID_MAX_CHARS, SessionCreate, SessionPublic

router = APIRouter(prefix="/sessions", tags=["sessions"])

SessionId = Annotated[str, Path(min_length=1, max_length=SESSION_ID_MAX_CHARS)]

EXAMPLES: dict[str, Example] = {
    "seeded": {"summary": "Start from seed words", "value": {"seed_words": "I can see"}},
    "start": {"summary": "Start from the start of a text", "value": {}},
}


@router.post(
    "",
    status_code=201,
    response_model=SessionPublic,
    responses=errors(400, 401, 413, 422, 503),
    summary="Start a session",
)
async def create_session(
    req: Annotated[SessionCreate, Body(openapi_examples=EXAMPLES)], service: ServiceDep
) -> SessionPublic:
    """Feed the seed words and keep the hidden state; continue it with `POST /generate`."""
    return await service.create_session(req)


@router.get(
    "/{session_id}",
    response_model=SessionPublic,
    responses=errors(401, 404, 503),
    summary="Show a session",
)
async def get_session(session_id: SessionId, service: ServiceDep) -> SessionPublic:
    """The session's words so far and when it expires (each use moves that on)."""
    return await service.get_session(session_id)


@router.delete(
    "/{session_id}",
    status_code=204,
    response_class=Response,
    responses=errors(401, 404, 503),
    summary="End a session",
)
async def delete_session(session_id: SessionId, service: ServiceDep) -> Response:
    await service.delete_session(session_id)
    return Response(status_code=204)
