"""Plain ASGI middleware: the body size limit, the proxy sub-path, one-line start-up failures."""

from __future__ import annotations

import json

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.errors import StartupError, error_body


async def _send_json(send: Send, status: int, body: dict[str, object]) -> None:
    payload = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})


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
                await self._refuse(send, 400, "Content-Length is not a number")
                return
            if int(declared) > self.max_bytes:
                await self._too_large(send)
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
                await self._too_large(send)
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

    async def _too_large(self, send: Send) -> None:
        await self._refuse(send, 413, f"the request body is larger than {self.max_bytes} bytes")

    @staticmethod
    async def _refuse(send: Send, status: int, message: str) -> None:
        await _send_json(send, status, error_body(message, [("body", message)]))


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
