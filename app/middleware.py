"""Plain ASGI middleware: the header and body size limits, early refusals when the engine is
full, the proxy sub-path, one-line start-up failures."""

from __future__ import annotations

from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.errors import ApiError, StartupError, error_response


async def _refuse_and_close(
    scope: Scope, receive: Receive, send: Send, status: int, field: str, message: str
) -> None:
    """Refuse with ``message`` about ``field``, closing the connection: the request was not
    read to its end, so nothing else on the connection could be read after it."""
    response = error_response(app_path(scope), ApiError(status, message, [(field, message)]))
    response.headers["Connection"] = "close"
    await response(scope, receive, send)


def app_path(scope: Scope) -> str:
    """The path without the proxy's sub-path (``root_path``), as the routes declare it."""
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    return path[len(root) :] if root and path.startswith(root) else path


class AdmissionMiddleware:
    """Refuse a generation at once, before its body is read, when the engine's queue is full.

    The engine would refuse it anyway (a 503 with ``Retry-After``); answering here skips the
    routing, the body and its validation, so that under a flood the event loop spends its
    time on the requests it can serve, and on the probes. Only with one model: with several,
    which one a request wants is in its body, and the routes refuse it. ``state`` is
    ``app.state``, whose ``models`` registry is None until the models are loaded.
    """

    PATHS = frozenset({"/generate", "/v1/completions"})

    def __init__(self, app: ASGIApp, state: Any) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] == "http"
            and scope["method"] == "POST"
            and app_path(scope) in self.PATHS
            and self._refused()
        ):
            error = ApiError(503, "the model is busy; retry shortly", headers={"Retry-After": "1"})
            await error_response(app_path(scope), error)(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _refused(self) -> bool:
        registry = self.state.models
        if registry is None:  # not ready yet, or stopping: the routes say so
            return False
        slots = registry.slots
        return len(slots) == 1 and slots[0].service.engine.refuse_if_full()


class HeaderLimitMiddleware:
    """Refuse a request whose header lines add up to more than ``max_bytes`` with a 431.

    Under ``python -m app``, `app.protocol` refuses such headers while they still arrive; this
    check bounds the app wherever it runs without that protocol (``uvicorn --factory``, tests),
    before anything else reads the headers."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            size = sum(len(name) + len(value) + 4 for name, value in scope["headers"])
            if size > self.max_bytes:
                message = f"the request's headers are larger than {self.max_bytes} bytes"
                await _refuse_and_close(scope, receive, send, 431, "headers", message)
                return
        await self.app(scope, receive, send)


class BodyLimitMiddleware:
    """Refuse bodies over ``max_bytes`` with a 413 while reading them, before any parsing.

    A declared ``Content-Length`` over the limit is refused before a byte is read; a chunked
    body is counted as it arrives and refused as soon as it passes the limit. A body within
    the limit is handed on whole (it is small), then ``receive`` passes through, so streaming
    responses still hear a client that disconnects.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None:
            if not declared.strip().isdigit():
                message = "Content-Length is not a number"
                await _refuse_and_close(scope, receive, send, 400, "body", message)
                return
            if int(declared) > self.max_bytes:
                await self._too_large(scope, receive, send)
                return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._too_large(scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        delivered = False

        async def replay() -> Message:
            nonlocal delivered
            if delivered:
                return await receive()
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        message = f"the request body is larger than {self.max_bytes} bytes"
        await _refuse_and_close(scope, receive, send, 413, "body", message)


class RootPathMiddleware:
    """Serve under a proxy's sub-path whether or not the proxy strips it from the path.

    Sets the ASGI ``root_path`` (so ``/docs`` links to ``{root_path}/openapi.json``) and adds
    the prefix to paths that arrive without it, the way the ASGI spec lays paths out.
    """

    def __init__(self, app: ASGIApp, root_path: str) -> None:
        self.app = app
        self.root_path = root_path

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            scope = dict(scope)
            scope["root_path"] = self.root_path
            path: str = scope["path"]
            if path != self.root_path and not path.startswith(self.root_path + "/"):
                scope["path"] = self.root_path + path
                scope["raw_path"] = self.root_path.encode() + (
                    scope.get("raw_path") or path.encode()
                )
        await self.app(scope, receive, send)


class StartupErrorMiddleware:
    """Report a `StartupError` to the ASGI server as its one-line message, not a traceback.

    Starlette sends ``lifespan.startup.failed`` with the whole traceback; for the errors the
    service expects (a bad checkpoint or device) that message is replaced with the error's
    own line, so ``uvicorn --factory app.main:create_app`` logs one line that names the file.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return
        held: list[Message] = []

        async def hold_failure(message: Message) -> None:
            if message["type"] == "lifespan.startup.failed":
                held.append(message)
            else:
                await send(message)

        try:
            await self.app(scope, receive, hold_failure)
        except StartupError as exc:
            await send({"type": "lifespan.startup.failed", "message": f"cannot start: {exc}"})
            raise
        except BaseException:
            for message in held:
                await send(message)
            raise
