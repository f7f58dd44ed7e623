"""Request ids, the access log, and the log format (uvicorn's text, or one JSON object a line).

`RequestLogMiddleware` gives every request an id: the client's ``X-Request-ID`` when it is a
plain token (letters, digits, ``._:/+=@-``, at most 128 characters; a proxy such as nginx can
send its own), else a new one: 32 hex digits, this process's random prefix and a counter (as
unique as a random id across processes and restarts, without a system call a request). The id
is returned in ``X-Request-ID``, kept in ``request.state.request_id``, and added to every log
record written while the request is handled. When the request ends, one access line is logged
on the ``app.access`` logger (client address, method, path, status, duration, bytes sent,
request id).

What a log line takes from a request is written by `log_safe`, control characters escaped, so
a client cannot break a line or forge one (``/x%0aERROR: ...``); a session id in a path is
written as its `session_fingerprint`, never as itself.

An exception that escapes a handler is logged here, once, with its request id and traceback,
and answered with the usual 500 body; request bodies are never logged. Set
``WORDRNN_LOG_FORMAT=json`` (or ``--log-format json``) for JSON lines.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import re
import secrets
import time
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any, Literal

from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.logging import DefaultFormatter

from app.errors import ApiError, error_response
from app.middleware import app_path

LogFormat = Literal["text", "json"]

REQUEST_ID_HEADER = b"x-request-id"
_VALID_ID = re.compile(r"[A-Za-z0-9._:/+=@-]{1,128}")
_request_id: ContextVar[str | None] = ContextVar("request_id", default=None)
_ID_PREFIX = secrets.token_hex(8)  # this process's: its ids never meet another's
_ID_COUNTER = itertools.count()

log = logging.getLogger("app")
access_log = logging.getLogger("app.access")

# Fields of an access record, written as JSON fields (text: in the message).
ACCESS_FIELDS = ("client", "method", "path", "status", "duration_ms", "bytes")


# What a log line must not hold as it is: C0 controls, DEL and C1 controls (a line feed, a
# carriage return or U+0085 starts a line; others drive terminals), the Unicode line and
# paragraph separators, lone surrogates (no UTF-8 stream can write them), and the backslash,
# so that an escape in a log line always stands for an escaped character.
_UNSAFE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff\\]")
_SHORT_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t", "\\": "\\\\"}
# A session id in a request's path (``/sessions/{id}``, under any root path).
_SESSION_ID_IN_PATH = re.compile(r"(?<=/sessions/)[^/]+")


def _escape(match: re.Match[str]) -> str:
    char = match[0]
    code = ord(char)
    return _SHORT_ESCAPES.get(char) or (f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")


def log_safe(text: str) -> str:
    """``text`` from a request as a log line may hold it: on one line, forging no other.

    Applied where a record is made, not in a formatter, so that both formats and any other
    handler (pytest's, or uvicorn's own config under ``uvicorn --factory``) get the same text.
    """
    return _UNSAFE.sub(_escape, text)


def session_fingerprint(session_id: str) -> str:
    """What logs write for a session id: ``~`` and the first 8 hex digits of its SHA-256.

    Whoever holds a session id can read, continue and end the session (with API keys, along
    with its creator's key), and logs are read by more people and systems than hold sessions.
    The fingerprint still lets a reader follow one session through the log, but cannot be
    turned back into the id (192 random bits); ``~`` is outside the ids' alphabet, so it is
    never taken for one.
    """
    digest = hashlib.sha256(session_id.encode("utf-8", "surrogatepass")).hexdigest()
    return "~" + digest[:8]


def loggable_path(path: str) -> str:
    """A request's path as logs write it: session ids fingerprinted, then made `log_safe`."""
    return log_safe(_SESSION_ID_IN_PATH.sub(lambda m: session_fingerprint(m[0]), path))


def current_request_id() -> str | None:
    """The id of the request being handled, if any."""
    return _request_id.get()


def _incoming_id(scope: Scope) -> str | None:
    for name, value in scope["headers"]:
        if name == REQUEST_ID_HEADER:
            text = value.decode("latin-1").strip()
            return text if _VALID_ID.fullmatch(text) else None
    return None


class RequestIdFilter(logging.Filter):
    """Adds ``record.request_id``: the current request's id, or None outside a request."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            record.request_id = _request_id.get()
        return True


class TextFormatter(DefaultFormatter):
    """uvicorn's format, with ``[request_id=...]`` after the message of a request's records."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        line = super().formatMessage(record)
        request_id = getattr(record, "request_id", None)
        return f"{line} [request_id={request_id}]" if request_id else line


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time, level, logger, message, request_id, access fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = getattr(record, "request_id", None)
        if request_id:
            entry["request_id"] = request_id
        for field in ACCESS_FIELDS:
            if (value := getattr(record, field, None)) is not None:
                entry[field] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def log_config(level: str, fmt: LogFormat = "text") -> dict[str, Any]:
    """A `logging.config.dictConfig` for uvicorn and the ``app`` loggers, in ``fmt``.

    uvicorn's own access log is replaced by ``app.access`` (pass ``access_log=False``).
    """
    formatter: dict[str, Any] = (
        {"()": "app.logs.JsonFormatter"}
        if fmt == "json"
        else {"()": "app.logs.TextFormatter", "fmt": "%(levelprefix)s %(message)s"}
    )
    handler = {
        "class": "logging.StreamHandler",
        "formatter": "default",
        "filters": ["request_id"],
        "stream": "ext://sys.stderr",
    }
    quiet = {"handlers": ["default"], "level": level.upper(), "propagate": False}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"request_id": {"()": "app.logs.RequestIdFilter"}},
        "formatters": {"default": formatter},
        "handlers": {"default": handler},
        "loggers": {
            "uvicorn": quiet,
            "uvicorn.error": {"level": level.upper()},
            "uvicorn.access": {"handlers": [], "propagate": False},
            "app": quiet,
        },
    }


class RequestLogMiddleware:
    """Request ids, one access line per request, and one error line per unexpected exception."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = _incoming_id(scope) or f"{_ID_PREFIX}{next(_ID_COUNTER):016x}"
        scope.setdefault("state", {})["request_id"] = request_id
        token = _request_id.set(request_id)
        started = time.perf_counter()
        status: int | None = None
        sent = 0

        async def send_with_id(message: Message) -> None:
            nonlocal status, sent
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = [
                    (k, v) for k, v in message.get("headers", []) if k.lower() != REQUEST_ID_HEADER
                ]
                headers.append((REQUEST_ID_HEADER, request_id.encode()))
                message = {**message, "headers": headers}
            elif message["type"] == "http.response.body":
                sent += len(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            log.exception(
                "unexpected error in %s %s",
                log_safe(scope["method"]),
                loggable_path(scope["path"]),
                extra={"request_id": request_id},
            )
            if status is None:
                error = ApiError(500, "internal error; the server log has the details")
                await error_response(app_path(scope), error)(scope, receive, send_with_id)
        finally:
            self._access(scope, request_id, status, started, sent)
            _request_id.reset(token)

    @staticmethod
    def _access(
        scope: Scope, request_id: str, status: int | None, started: float, sent: int
    ) -> None:
        if not access_log.isEnabledFor(logging.INFO):
            return  # the line's fields cost more than the rest of this middleware
        client = scope.get("client")
        fields = {
            "client": log_safe(client[0]) if client else None,
            "method": log_safe(scope["method"]),
            "path": loggable_path(scope["path"]),
            "status": status,  # None: the client left before an answer
            "duration_ms": round((time.perf_counter() - started) * 1000, 1),
            "bytes": sent,
        }
        access_log.info(
            '%s - "%s %s HTTP/%s" %s %.1f ms',
            fields["client"] or "-",
            fields["method"],
            fields["path"],
            scope.get("http_version", "1.1"),
            status if status is not None else "-",
            fields["duration_ms"],
            extra={**fields, "request_id": request_id},
        )
