"""Dependencies: what a handler needs, read from ``app.state``, and the API-key check.

The dependencies are ``async`` although they never wait: FastAPI runs a plain ``def``
dependency on its thread pool, and a hop there for every request (refusals included) costs
more than the work itself and queues under load.

A caller is known by the fingerprint of its key (see ``app/keys.py``), never the key itself:
sessions record it as their owner, and the rate limiter (``app/ratelimit.py``) counts by it.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request, params
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from app.errors import ApiError
from app.keys import key_owner, presented_key
from app.registry import ModelAccess, ModelRegistry
from app.serving import TextService
from app.settings import Settings

_bearer = HTTPBearer(auto_error=False, description="Authorization: Bearer KEY")
_api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False)


async def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


async def get_caller(request: Request) -> str | None:
    """The fingerprint of the caller's key when it is a valid one, else None."""
    settings: Settings = request.app.state.settings
    return key_owner(settings.api_keys, presented_key(request.headers))


CallerDep = Annotated[str | None, Depends(get_caller)]


async def get_service(request: Request) -> TextService:
    """The default model's service once it is loaded; a 503 before that and while stopping."""
    registry: ModelRegistry | None = request.app.state.models
    if registry is None:
        raise _not_ready(request)
    return registry.default.service


async def get_models(request: Request) -> ModelAccess:
    """The served models, with the caller's key fingerprint (whose sessions it may use: None
    without a valid key); a 503 before they are loaded and while stopping. The caller is read
    here, not declared as a dependency: each level of dependencies a request goes through
    costs FastAPI more than reading the key (with keys set, `require_api_key` reads it too)."""
    registry: ModelRegistry | None = request.app.state.models
    if registry is None:
        raise _not_ready(request)
    return ModelAccess(registry, await get_caller(request))


def _not_ready(request: Request) -> ApiError:
    return ApiError(
        503,
        f"the model is not ready ({request.app.state.phase}); retry shortly",
        headers={"Retry-After": "2"},
    )


SettingsDep = Annotated[Settings, Depends(get_settings)]
ServiceDep = Annotated[TextService, Depends(get_service)]
ModelsDep = Annotated[ModelAccess, Depends(get_models)]


async def require_api_key(
    caller: CallerDep,
    # Declared so that the OpenAPI schema shows both ways of sending a key; `get_caller`
    # reads the key itself.
    bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    api_key: Annotated[str | None, Depends(_api_key_header)],
) -> None:
    """Accept only a request that carries one of the keys of ``WORDRNN_API_KEYS``."""
    if caller is not None:
        return
    raise ApiError(
        401,
        "a valid API key is required: send 'Authorization: Bearer KEY' or 'X-API-Key: KEY'",
        headers={"WWW-Authenticate": "Bearer"},
    )


def key_required(settings: Settings) -> list[params.Depends]:
    """The dependencies of a route that needs an API key: `require_api_key` when keys are set,
    none otherwise, so that a server without keys declares no security in its OpenAPI document
    (its routes are open, and the document says so)."""
    return [Depends(require_api_key)] if settings.api_keys else []
