"""The HTTP routes, one module per resource; `include_routes` adds them all to the app.

Handlers stay thin: they take a validated body, call `TextService` through their format's
translation (``app/native.py``, ``app/openai/``, ``app/tgi/``), and return its answer.
"""

from __future__ import annotations

from fastapi import FastAPI

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


def include_routes(app: FastAPI, settings: Settings) -> None:
    """Add every route to ``app`` (with ``settings``): the model routes and ``/metrics`` need
    an API key when keys are set (see `key_required`).

    Each router is included into the app itself, not gathered into one router first: FastAPI
    matches a request one level of included routers at a time, and every request would pay
    for the extra level."""
    protected = key_required(settings)
    # FastAPI tries the routers in order, and each one passed costs every request that goes
    # on: the generation routes come first.
    for router in (generate.router, openai.router):
        app.include_router(router, dependencies=protected)
    app.include_router(status.router)
    # The playground's page and files hold no data (its API calls carry the key typed into it).
    app.include_router(playground.router)
    app.include_router(apidocs.router)  # the API's documentation, open as the schema is
    for router in (
        metrics.router,
        sessions.router,
        probabilities.router,
        tokenize.router,
        status.info_router,
        tgi.router,
    ):
        app.include_router(router, dependencies=protected)
