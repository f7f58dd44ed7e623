"""``/healthz`` (the process answers), ``/readyz`` (the model is loaded) and ``/info``."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from app.deps import ModelsDep, ServiceDep
from app.routes.docs import errors
from app.schemas import MODEL_NAME_MAX_CHARS, InfoResponse, Status

router = APIRouter(tags=["status"])
info_router = APIRouter(tags=["status"])


@router.get("/healthz", response_model=Status, response_model_exclude_none=True, summary="Liveness")
async def healthz() -> Status:
    """Answers as long as the event loop does, even while the model is busy."""
    return Status(status="ok")


@router.get("/readyz", response_model=Status, responses=errors(503), summary="Readiness")
async def readyz(service: ServiceDep) -> Status:
    """200 once the model is loaded and warmed up; 503 before that and while stopping."""
    return Status(status="ready", model=service.model_id)


@info_router.get(
    "/info",
    response_model=InfoResponse,
    responses=errors(401, 404, 422, 429, 503),
    summary="Model card",
)
async def info(
    models: ModelsDep,
    model: Annotated[
        str | None,
        Query(
            min_length=1,
            max_length=MODEL_NAME_MAX_CHARS,
            description="A name from GET /v1/models (the default model when absent).",
        ),
    ] = None,
) -> InfoResponse:
    """The model's architecture, vocabulary, tokenizer, training corpus digest, validation
    perplexity, device, creation and load times, and the limits of this deployment."""
    return models.service(model).info()
