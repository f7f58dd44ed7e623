"""Rate limiting: a budget of requests for each API key, or else for each client address.

``Settings.rate_limit`` takes the notation of the ``limits`` package (``"60/minute"``,
``"10/second;100/minute"``: every limit applies). A request that carries a valid API key is
counted against that key (by its fingerprint), any other against its client address, which
behind a trusted proxy is the one it forwarded (uvicorn's proxy headers set
``scope["client"]``). A key that is not valid counts nothing of its own: making keys up does
not buy a new budget.

Windows are fixed (``limits``' fixed-window strategy): a budget returns whole when its window
ends, and ``Retry-After`` says in how many seconds. Counts live in this process, or in Redis
with ``session_store=redis`` so that replicas share one budget per caller; when Redis cannot
be reached, requests pass unlimited (and a warning is logged) rather than fail.

``/healthz``, ``/readyz`` and ``/metrics`` are never limited: probes and Prometheus' scrapes
come often from one address, and must keep working while clients are refused.
"""

from __future__ import annotations

import logging
import math
import time

from limits import RateLimitItem, parse_many
from limits.aio.storage import MemoryStorage, RedisStorage, Storage
from limits.aio.strategies import FixedWindowRateLimiter
from limits.errors import StorageError
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from app.errors import OpenAIError, error_response
from app.keys import key_owner, presented_key
from app.middleware import app_path
from app.settings import Settings

log = logging.getLogger("app")

EXEMPT_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
REDIS_PREFIX = "wordrnn:ratelimit"


def _storage(settings: Settings) -> Storage:
    if settings.session_store == "redis":
        return RedisStorage(
            "async+" + settings.redis_url,
            implementation="redispy",
            wrap_exceptions=True,
            key_prefix=REDIS_PREFIX,
            socket_timeout=5,
        )
    return MemoryStorage()


class RateLimitMiddleware:
    """Answer 429 with ``Retry-After`` to a caller past its budget, before its body is read."""

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        assert settings.rate_limit is not None
        self.app = app
        self.items = parse_many(settings.rate_limit)
        self.api_keys = settings.api_keys
        self.limiter = FixedWindowRateLimiter(_storage(settings))
        self._storage_failing = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = app_path(scope) if scope["type"] == "http" else ""
        if scope["type"] != "http" or path in EXEMPT_PATHS:
            await self.app(scope, receive, send)
            return
        caller, who = self._caller(scope)
        refused = await self._check(caller)
        if refused is None:
            await self.app(scope, receive, send)
            return
        item, retry_after = refused
        message = f"too many requests: the limit is {item} for each {who}; retry in {retry_after} s"
        headers = {"Retry-After": str(retry_after)}
        error = OpenAIError(429, message, code="rate_limit_exceeded", headers=headers)
        await error_response(path, error)(scope, receive, send)

    def _caller(self, scope: Scope) -> tuple[str, str]:
        """Whom the request is counted against (a storage key) and, in words, what that is."""
        owner = key_owner(self.api_keys, presented_key(Headers(scope=scope)))
        if owner is not None:
            return f"key:{owner}", "API key"
        client = scope.get("client")
        return f"address:{client[0] if client else 'unknown'}", "client address"

    async def _check(self, caller: str) -> tuple[RateLimitItem, int] | None:
        """Count the request; the limit it passes and the seconds until that resets, or None."""
        try:
            for item in self.items:
                if not await self.limiter.hit(item, caller):
                    stats = await self.limiter.get_window_stats(item, caller)
                    return item, max(1, math.ceil(stats.reset_time - time.time()))
        except StorageError as exc:
            if not self._storage_failing:
                log.warning("rate limits not applied: their store failed (%s)", exc)
            self._storage_failing = True
            return None
        if self._storage_failing:
            log.warning("rate limits applied again: their store answers")
            self._storage_failing = False
        return None
