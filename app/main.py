"""The application factory: ``uvicorn --factory app.main:create_app`` (``WORDRNN_MODEL_DIR`` set).

`create_app` builds the app from `Settings` and reads nothing else. Its lifespan loads and
verifies the run folder (or every run folder of ``WORDRNN_MODELS_DIR``, see ``app/registry.py``)
onto the device, warms each model up, and only then marks the service ready (``/readyz`` 200,
``/generate`` served); until then, and while stopping, model endpoints answer 503. A bad
checkpoint or device raises `StartupError`, whose one line names the file. While serving, the
run folders are watched for new checkpoints, which are swapped in without dropping a request.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib import metadata

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from app.errors import install_error_handlers
from app.logs import RequestLogMiddleware
from app.metrics import Metrics, MetricsMiddleware
from app.middleware import (
    AdmissionMiddleware,
    BodyLimitMiddleware,
    HeaderLimitMiddleware,
    RootPathMiddleware,
    StartupErrorMiddleware,
)
from app.ratelimit import RateLimitMiddleware
from app.registry import ModelRegistry
from app.routes import include_routes
from app.sessions import MemorySessionStore, RedisSessionStore, SessionStore
from app.settings import Settings

log = logging.getLogger("app")

DESCRIPTION = """\
Text from a word-level recurrent network trained by `python -m training`.

`POST /generate` continues seed words (or a session) with the lab's stateful hidden-state
sampling; `stream: true` sends each word as a server-sent event. Sessions keep the hidden
state between requests. `POST /next-words` suggests the next word, `POST /score` scores a text.
Errors are `{"detail": ..., "errors": [{"field": ..., "message": ...}]}`.

`POST /v1/completions` and `GET /v1/models` are OpenAI's completions API on the same models
(point an OpenAI client at `.../v1`; errors there use OpenAI's body). `GET /` is a playground
page, `GET /metrics` Prometheus' metrics. Every answer carries an `X-Request-ID`.

A server may serve several models: every request that uses one takes an optional `model`
(a name from `GET /v1/models`; the default model without it).
"""


def _version() -> str:
    try:
        return metadata.version("wordrnn")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def _session_store(settings: Settings, model: str) -> SessionStore:
    """A new session store for the model named ``model`` (in Redis, its sessions carry it)."""
    if settings.session_store == "redis":
        return RedisSessionStore.from_url(settings.redis_url, settings.session_ttl_seconds, model)
    return MemorySessionStore(settings.session_ttl_seconds, settings.max_sessions)


def create_app(
    settings: Settings | None = None, *, session_store: SessionStore | None = None
) -> FastAPI:
    """The app for ``settings`` (read from the environment when None).

    ``session_store`` replaces the default model's in-memory session store (tests pass one
    with a fake clock).
    """
    settings = settings or Settings()

    async def open_sessions(name: str, default: bool) -> SessionStore:
        sessions = (
            session_store
            if default and session_store is not None
            else _session_store(settings, name)
        )
        if isinstance(sessions, RedisSessionStore):
            try:
                await sessions.ping()
            except BaseException:
                await sessions.close()
                raise
        return sessions

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        where = settings.models_dir or settings.model_dir
        log.info("loading %s on device %s", where, settings.device)
        models = ModelRegistry(settings, open_sessions)
        await models.start()
        app.state.models = models
        app.state.phase = "ready"
        for slot in models.slots:
            engine = slot.service.engine
            log.info(
                "ready: model %s (%s) on %s (%s engine)%s",
                slot.name,
                slot.service.model_id,
                engine.device,
                engine.kind,
                ", the default" if slot.name == models.default_name else "",
            )
        try:
            yield
        finally:
            app.state.phase = "stopping"
            app.state.models = None
            await models.close()
            log.info("stopped")

    app = FastAPI(
        title="wordrnn",
        version=_version(),
        description=DESCRIPTION,
        lifespan=lifespan,
        docs_url=None,  # served offline by app/routes/apidocs.py
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.models = None
    app.state.phase = "loading"
    app.state.metrics = Metrics(app.state)
    install_error_handlers(app)
    include_routes(app, settings)
    # The last added runs first: the root path, then CORS (so refusals carry its headers too),
    # the rate limit, the header limit, early refusals when the engine is full, then the body
    # limit; the start-up middleware only sees the lifespan.
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(AdmissionMiddleware, state=app.state)
    app.add_middleware(HeaderLimitMiddleware, max_bytes=settings.max_header_bytes)
    if settings.rate_limit:  # inside CORS, so that a browser can read its 429s
        app.add_middleware(RateLimitMiddleware, settings=settings)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["Authorization", "Content-Type", "X-API-Key"],
            expose_headers=["Retry-After"],  # of a 429 or 503
        )
    # Metrics and the access log see every answer, refusals included, under the root path.
    app.add_middleware(MetricsMiddleware, metrics=app.state.metrics)
    app.add_middleware(RequestLogMiddleware)
    if settings.root_path:
        app.add_middleware(RootPathMiddleware, root_path=settings.root_path)
    app.add_middleware(StartupErrorMiddleware)
    return app
