"""Errors and their JSON shape: every 4xx/5xx body is ``{"detail": ..., "errors": [...]}``.

``detail`` is one readable sentence; ``errors`` lists ``{"field": ..., "message": ...}`` for each
field at fault (``body`` for the body as a whole), so a client can point at the input to fix.
FastAPI's validation errors, HTTP errors and unexpected exceptions are all mapped to that shape;
no response ever carries a traceback.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel
from starlette.exceptions import HTTPException
from starlette.routing import Match

log = logging.getLogger("app")


class StartupError(Exception):
    """The service cannot start; ``str()`` is one line that names the file or setting at fault."""


class ApiError(Exception):
    """A request the service refuses, with the status, a sentence, and the fields at fault."""

    def __init__(
        self,
        status: int,
        detail: str,
        errors: Iterable[tuple[str, str]] = (),
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.errors = list(errors)
        self.headers = dict(headers or {})

    @classmethod
    def field(cls, field: str, message: str, status: int = 422) -> ApiError:
        return cls(status, f"{field}: {message}", [(field, message)])

    def body(self) -> dict[str, Any]:
        return error_body(self.detail, self.errors)


def error_body(detail: str, errors: Iterable[tuple[str, str]] = ()) -> dict[str, Any]:
    return {"detail": detail, "errors": [{"field": f, "message": m} for f, m in errors]}


def _field_name(loc: Sequence[Any]) -> str:
    """``("body", "stop", 1)`` -> ``stop[1]``; the body itself is ``body``."""
    parts = list(loc[1:] if loc and loc[0] in ("body", "query", "path", "header") else loc)
    name = ""
    for part in parts:
        name += f"[{part}]" if isinstance(part, int) else (f".{part}" if name else str(part))
    return name or "body"


def _accepted_fields(request: Request) -> list[str]:
    route = request.scope.get("route")
    field = getattr(route, "body_field", None) if isinstance(route, APIRoute) else None
    model = getattr(getattr(field, "field_info", None), "annotation", None)
    if isinstance(model, type) and issubclass(model, BaseModel):
        return list(model.model_fields)
    return []


def _convert(request: Request, exc: RequestValidationError) -> tuple[int, list[tuple[str, str]]]:
    status = 422
    errors: list[tuple[str, str]] = []
    for err in exc.errors():
        kind, loc, msg = err.get("type", ""), tuple(err.get("loc", ())), str(err.get("msg", ""))
        if kind == "json_invalid":
            status = 400
            reason = (err.get("ctx") or {}).get("error", "cannot be parsed")
            where = f" at character {loc[1]}" if len(loc) > 1 else ""
            errors.append(("body", f"not valid JSON{where}: {reason}"))
            continue
        field = _field_name(loc)
        if kind == "extra_forbidden":
            accepted = _accepted_fields(request)
            msg = "unknown field" + (f"; accepted: {', '.join(accepted)}" if accepted else "")
        elif kind == "missing" and field == "body":
            msg = "a JSON object is required"
        elif kind == "model_attributes_type" and field == "body":
            msg = "must be a JSON object"
        errors.append((field, msg.removeprefix("Value error, ")))
    return status, errors


def _summary(errors: Sequence[tuple[str, str]]) -> str:
    return "; ".join(f"{field}: {message}" for field, message in errors) or "invalid request"


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    status, errors = _convert(request, exc)
    return JSONResponse(error_body(_summary(errors), errors), status_code=status)


async def _api_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


HTTP_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")


def _allowed_methods(request: Request) -> list[str]:
    """Every method some route answers at this path. Starlette's 405 names the methods of the
    first route that matched the path alone, but ``GET`` and ``DELETE /sessions/{id}`` are two
    routes."""
    routes = request.app.router.routes
    return [
        method
        for method in HTTP_METHODS
        if any(
            route.matches({**request.scope, "method": method})[0] == Match.FULL for route in routes
        )
    ]


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    headers = dict(exc.headers or {})
    if exc.status_code == 405:
        headers["Allow"] = ", ".join(_allowed_methods(request))
    return JSONResponse(error_body(str(exc.detail)), status_code=exc.status_code, headers=headers)


async def _unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    from app.logs import log_safe, loggable_path  # app.logs imports this module

    log.exception(
        "unexpected error in %s %s", log_safe(request.method), loggable_path(request.url.path)
    )
    return JSONResponse(error_body("internal error; the server log has the details"), 500)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected_error)
