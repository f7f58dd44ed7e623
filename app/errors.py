"""Errors and their JSON shape, chosen by path in one place: `error_response`.

Off ``/v1/``, every 4xx/5xx body is ``{"detail": ..., "errors": [...]}``: ``detail`` is one
readable sentence; ``errors`` lists ``{"field": ..., "message": ...}`` for each field at fault
(``body`` for the body as a whole), so a client can point at the input to fix. Under ``/v1/``,
the OpenAI-compatible API, the same errors have OpenAI's body, ``{"error": {"message", "type",
"param", "code"}}``, with OpenAI's field names and 400 for a 422, as OpenAI's clients expect.
FastAPI's validation errors, HTTP errors, unexpected exceptions and the middleware's refusals
all go through `error_response`; no response ever carries a traceback.

This module imports no model code (nor torch), so that the plain ASGI middleware can use it.
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

OPENAI_PREFIX = "/v1/"
# The service's field names, as the OpenAI request calls them.
OPENAI_NAMES = {"seed_words": "prompt", "max_words": "max_tokens", "random_seed": "seed"}
# The same, for a chat completion: the seed words are the rendered conversation.
CHAT_NAMES = {**OPENAI_NAMES, "seed_words": "messages"}
# Fields that stand for the request as a whole: OpenAI's ``param`` is null for them.
WHOLE_REQUEST = frozenset({"body", "headers"})
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
}


# What a client learns of a failure that is the server's own; the log has the rest.
INTERNAL_ERROR = "internal error; the server log has the details"


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


class UnknownModel(ApiError):
    """A ``model`` that no served model answers to (404); the message lists the names."""

    def __init__(self, model: str, names: Sequence[str]) -> None:
        listed = ", ".join(repr(name) for name in names)
        super().__init__(
            404,
            f"no model {model!r} is served here; the models are {listed} (GET /v1/models)",
            [("model", f"unknown; one of {listed}")],
        )


class OpenAIError(ApiError):
    """A refusal already in OpenAI's terms: the parameter at fault and OpenAI's error code.

    Raised where the OpenAI routes refuse a request themselves; off ``/v1/`` (a rate limit)
    it is answered as any `ApiError`, its message as ``detail``.
    """

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
        kind: str | None = None,
    ) -> None:
        super().__init__(status, message, headers=headers)
        self.param = param
        self.code = code
        self.kind = kind  # OpenAI's error type, when the status does not say it

    def openai_body(self) -> dict[str, Any]:
        kind = self.kind or ERROR_TYPES.get(
            self.status, "server_error" if self.status >= 500 else ""
        )
        return {
            "error": {
                "message": self.detail,
                "type": kind or "invalid_request_error",
                "param": self.param,
                "code": self.code,
            }
        }


def error_body(detail: str, errors: Iterable[tuple[str, str]] = ()) -> dict[str, Any]:
    return {"detail": detail, "errors": [{"field": f, "message": m} for f, m in errors]}


def openai_name(
    field: str, prompt_index: int | None = None, names: Mapping[str, str] = OPENAI_NAMES
) -> str:
    """The OpenAI name of a service field (``seed_words`` of the 2nd prompt: ``prompt[1]``);
    ``names`` maps the fields a route calls otherwise."""
    head, dot, rest = field.partition(".")
    name = names.get(head, head)
    if name == "prompt" and prompt_index is not None:
        name = f"prompt[{prompt_index}]"
    return name + dot + rest


def from_api_error(
    exc: ApiError, prompt_index: int | None = None, names: Mapping[str, str] = OPENAI_NAMES
) -> OpenAIError:
    """The service's error, with OpenAI's field names (``names``) and status (422 becomes
    400); an `OpenAIError` is in OpenAI's terms already."""
    if isinstance(exc, OpenAIError):
        return exc
    if isinstance(exc, UnknownModel):
        return OpenAIError(404, exc.detail, param="model", code="model_not_found")
    status = 400 if exc.status == 422 else exc.status
    if not exc.errors:
        return OpenAIError(status, exc.detail, headers=exc.headers)
    named = [(openai_name(f, prompt_index, names), m) for f, m in exc.errors]
    message = "; ".join(f"{f}: {m}" for f, m in named)
    param = named[0][0] if named[0][0] not in WHOLE_REQUEST else None
    return OpenAIError(status, message, param=param, headers=exc.headers)


def error_response(path: str, error: ApiError) -> JSONResponse:
    """The answer to ``error`` on ``path`` (the app's path, without the proxy's root path).

    The one place that picks the body: OpenAI's under ``/v1/`` (where OpenAI's SDKs parse
    it), the service's own elsewhere, whichever layer refused the request.
    """
    if path.startswith(OPENAI_PREFIX):
        openai = from_api_error(error)
        return JSONResponse(openai.openai_body(), openai.status, headers=openai.headers)
    return JSONResponse(error.body(), error.status, headers=error.headers)


def _answer(request: Request, error: ApiError) -> JSONResponse:
    from app.middleware import app_path  # app.middleware imports this module

    return error_response(app_path(request.scope), error)


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
    return _answer(request, ApiError(status, _summary(errors), errors))


async def _api_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return _answer(request, exc)


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
    if exc.status_code == 404:  # no route has this path: name it (OpenAI's words on /v1/)
        return _answer(request, _no_route(request))
    return _answer(request, ApiError(exc.status_code, str(exc.detail), headers=headers))


def _no_route(request: Request) -> ApiError:
    from app.logs import log_safe  # app.logs and app.middleware import this module
    from app.middleware import app_path

    method, path = log_safe(request.method), log_safe(request.url.path)
    if app_path(request.scope).startswith(OPENAI_PREFIX):
        return OpenAIError(404, f"Invalid URL ({method} {path})", kind="invalid_request_error")
    return ApiError(404, f"no route {method} {path}; GET /docs lists the API")


async def _unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    from app.logs import log_safe, loggable_path  # app.logs imports this module

    log.exception(
        "unexpected error in %s %s", log_safe(request.method), loggable_path(request.url.path)
    )
    return _answer(request, ApiError(500, INTERNAL_ERROR))


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected_error)
