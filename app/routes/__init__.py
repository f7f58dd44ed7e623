"""The HTTP routes, one module per resource; `api_router` gathers them.

Handlers stay thin: they take a validated body, call `TextService` through their format's
translation (``app/native.py``, ``app/openai/``, ``app/tgi/``), and return its answer.
"""

from __future__ import annotations

from fastapi import APIRouter

from app import metrics
from app.deps import key_required
from app.routes import (
    apidocs,
    generate,
    openai,
    playground,
    probabilities,
    sessions,
    status,
    tgi,
    tokenize,
)
from app.settings import Settings


def api_router(settings: Settings) -> APIRouter:
    """Every route of an app with ``settings``: the model routes and ``/metrics`` need an API
    key when keys are set (see `key_required`)."""
    router = APIRouter()
    router.include_router(status.router)
    # The playground's page and files hold no data (its API calls carry the key typed into it).
    router.include_router(playground.router)
    router.include_router(apidocs.router)  # the API's documentation, open as the schema is
    for protected in (
        metrics.router,
        generate.router,
        sessions.router,
        probabilities.router,
        tokenize.router,
        status.info_router,
        openai.router,
        tgi.router,
    ):
        router.include_router(protected, dependencies=key_required(settings))
    return router
