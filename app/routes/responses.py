"""The error responses each route declares in the OpenAPI document."""

from __future__ import annotations

from typing import Any

from app.schemas import ErrorResponse


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    described = {
        400: "The body is not valid JSON.",
        401: "A valid API key is required.",
        404: "The session is unknown or has expired.",
        409: "The session changed during the request; nothing was saved.",
        413: "The body is too large.",
        422: "A field is missing, of the wrong type or out of range: `errors` names it.",
        503: "The model is not loaded yet, or is busy: retry after `Retry-After` seconds.",
        504: "The generation did not finish within the server's time limit.",
    }
    return {s: {"model": ErrorResponse, "description": described[s]} for s in statuses}
