"""The error responses each route declares in the OpenAPI document, and the shape of the
server-sent events its streams send.

Every route but ``/healthz``, ``/readyz`` and ``/metrics`` is rate limited, so declares 429.
"""

from __future__ import annotations

from typing import Any

from app.schemas import ErrorResponse

RETRY_AFTER: dict[str, Any] = {
    "Retry-After": {
        "description": "Seconds to wait before trying again.",
        "schema": {"type": "integer"},
    }
}


def component(name: str) -> dict[str, str]:
    """A reference to a model the document already holds (as some route's response model)."""
    return {"$ref": f"#/components/schemas/{name}"}


def json_data(schema: dict[str, Any]) -> dict[str, Any]:
    """An event's ``data`` field: a JSON document of ``schema``."""
    return {"type": "string", "contentMediaType": "application/json", "contentSchema": schema}


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    described = {
        400: "The body is not valid JSON (or its Content-Length is not a number).",
        401: "A valid API key is required.",
        404: "No model has that name (`errors` lists the names), or the session is unknown "
        "or has expired.",
        409: "The session changed during the request (nothing was saved), or its state does "
        "not fit the model now served (it was reloaded): start a new session.",
        413: "The body is too large.",
        422: "A field is missing, of the wrong type or out of range: `errors` names it.",
        429: "Too many requests from this API key (or client address): retry after "
        "`Retry-After` seconds.",
        503: "The model is not loaded yet, or is busy: retry after `Retry-After` seconds.",
        504: "The generation did not finish within the server's time limit.",
    }
    return {
        s: {
            "model": ErrorResponse,
            "description": described[s],
            **({"headers": RETRY_AFTER} if s in (429, 503) else {}),
        }
        for s in statuses
    }
