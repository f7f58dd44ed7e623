"""The application factory: ``uvicorn --factory app.main:create_app`` (``WORDRNN_MODEL_DIR`` set).

`create_app` builds the app from `Settings` and reads nothing else. Its lifespan loads and
verifies the run folder onto the device, warms the model up, and only then marks the service
ready (``/readyz`` 200, ``/generate`` served); until then, and while stopping, model endpoints
answer 503. A bad checkpoint or device raises `StartupError`, whose one line names the file.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib import metadata

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from app.engine import Engine
from app.errors import install_error_handlers
from app.middleware import BodyLimitMiddleware, RootPathMiddleware, StartupErrorMiddleware
from app.routes import api_router
from app.serving import TextService
from app.sessions import MemorySessionStore, SessionStore
from app.settings import Settings

log = logging.getLogger("app")

DESCRIPTION = """\
Text from a word-level recurrent network trained by `python -m training`.

`POST /generate` continues seed words (or a session) with the lab's stateful hidden-state
sampling; `stream: true` sends each word as a server-sent event. Sessions keep the hidden
state between requests. `POST /next-words` suggests the next word, `POST /score` scores a text.
Errors are `{"detail": ..., "errors": [{"field": ..., "message": ...}]}`.
"""


def _version() -> str:
    try:
        return metadata.version("wordrnn")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def create_app(
    settings: Settings | None = None, *, session_store: SessionStore | None = None
) -> FastAPI:
    """The app for ``settings`` (read from the environment when None).

    ``session_store`` replaces the in-memory session store (tests pass one with a fake clock).
    """
    settings = settings or Settings()  # type: ignore[call-arg]  # model_dir from the env

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        log.info("loading %s on device %s", settings.model_dir, settings.device)
        engine = await Engine.start(settings.model_dir, settings.device, settings.max_pending)
        sessions = (
            MemorySessionStore(settings.session_ttl_seconds, settings.max_sessions)
            if session_store is None
            else session_store
        )
        app.state.service = TextService(engine, sessions, settings)
        app.state.phase = "ready"
        log.info("ready: model %s on %s", engine.checkpoint.model_id, engine.device)
        try:
            yield
        finally:
            app.state.phase = "stopping"
            app.state.service = None
            await engine.close()
            await sessions.close()
            log.info("stopped")

    app = FastAPI(
        title="wordrnn",
        version=_version(),
        description=DESCRIPTION,
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.service = None
    app.state.phase = "loading"
    install_error_handlers(app)
    app.include_router(api_router)
    # The last added runs first: the root path, then CORS (so refusals carry its headers too),
    # then the body limit; the start-up middleware only sees the lifespan.
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["Authorization", "Content-Type", "X-API-Key"],
        )
    if settings.root_path:
        app.add_middleware(RootPathMiddleware, root_path=settings.root_path)
    app.add_middleware(StartupErrorMiddleware)
    return app
