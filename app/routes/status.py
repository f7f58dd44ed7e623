"""``/healthz`` (the process answers), ``/readyz`` (the model is loaded) and ``/info``."""

from __future__ import annotations

from fastapi import APIRouter

from app.deps import ServiceDep
from app.routes.responses import errors
from app.schemas import InfoResponse, Status

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
    "/info", response_model=InfoResponse, responses=errors(401, 503), summary="Model card"
)
async def info(service: ServiceDep) -> InfoResponse:
    """The model's architecture, vocabulary, tokenizer, training corpus digest, validation
    perplexity, device and creation time, and the limits of this deployment."""
    return service.info()
