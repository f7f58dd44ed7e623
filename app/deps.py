"""Dependencies: what a handler needs, read from ``app.state``, and the API-key check."""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from app.errors import ApiError
from app.serving import TextService
from app.settings import Settings

_bearer = HTTPBearer(auto_error=False, description="Authorization: Bearer KEY")
_api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False)


def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def get_service(request: Request) -> TextService:
    """The service once the model is loaded; a 503 before that and while stopping."""
    service: TextService | None = request.app.state.service
    if service is None:
        raise ApiError(
            503,
            f"the model is not ready ({request.app.state.phase}); retry shortly",
            headers={"Retry-After": "2"},
        )
    return service


SettingsDep = Annotated[Settings, Depends(get_settings)]
ServiceDep = Annotated[TextService, Depends(get_service)]


def require_api_key(
    settings: SettingsDep,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    api_key: Annotated[str | None, Depends(_api_key_header)],
) -> None:
    """With ``WORDRNN_API_KEYS`` set, accept only a request that carries one of the keys."""
    if not settings.api_keys:
        return
    given = api_key or (bearer.credentials if bearer else None)
    if given is not None:
        presented = given.encode()
        # Compare with every key, in constant time, so timing tells nothing about them.
        matches = [
            secrets.compare_digest(presented, key.get_secret_value().encode())
            for key in settings.api_keys
        ]
        if any(matches):
            return
    raise ApiError(
        401,
        "a valid API key is required: send 'Authorization: Bearer KEY' or 'X-API-Key: KEY'",
        headers={"WWW-Authenticate": "Bearer"},
    )
