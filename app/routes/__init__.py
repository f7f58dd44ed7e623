"""The HTTP routes, one module per resource; `api_router` gathers them.

Handlers stay thin: they take a validated body, call `TextService`, and return its model.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends

from app import metrics
from app.deps import require_api_key
from app.routes import generate, openai, playground, sessions, status, suggest

api_router = APIRouter()
api_router.include_router(status.router)
# The playground's page and files hold no data (its API calls carry the key typed into it).
api_router.include_router(playground.router)
for protected in (
    metrics.router,
    generate.router,
    sessions.router,
    suggest.router,
    status.info_router,
    openai.router,
):
    api_router.include_router(protected, dependencies=[Depends(require_api_key)])
