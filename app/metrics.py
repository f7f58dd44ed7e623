"""``GET /metrics``: the service's Prometheus metrics, written by ``prometheus_client``.

Each app has its own registry (`Metrics`), so apps built side by side (tests) never share
counts. `MetricsMiddleware` records every HTTP request by route template (``/sessions/{id}``,
never the raw path), method and status, its duration until the last byte, and for event
streams the time to the first word. What the service holds is read when Prometheus scrapes,
by `ServiceCollector`: readiness, then for each model (labelled ``model="NAME"``) its card,
active sessions, load time, reloads and refused reloads, and its engine's own counters
(`EngineStats`, every number of it).
"""

from __future__ import annotations

import functools
import itertools
import logging
import math
import time
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from fastapi import APIRouter, Request, Response
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.engine import SECONDS_BUCKETS, Durations, EngineStats
from app.routes.docs import errors
from model_store.network import count_parameters

log = logging.getLogger("app")

PREFIX = "wordrnn"
# Requests: from a health check (milliseconds) to a long stream (minutes).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
FIRST_WORD_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
UNMATCHED = "<unmatched>"  # the route label of a path no route serves (keeps labels bounded)

# Each number of `EngineStats`: field -> (kind, metric name, help).
ENGINE_METRICS: dict[str, tuple[str, str, str]] = {
    "queue_length": ("gauge", "engine_queue_length", "Generations waiting to join the batch."),
    "active_requests": ("gauge", "engine_active_requests", "Requests in the running batch."),
    "active_rows": ("gauge", "engine_active_rows", "Rows (samples) in the running batch."),
    "pending": ("gauge", "engine_pending_jobs", "Model jobs queued or running."),
    "max_pending": ("gauge", "engine_max_pending", "Requests queued or running at most."),
    "max_batch": ("gauge", "engine_max_batch", "Rows one step advances at most."),
    "steps_total": ("counter", "engine_steps", "Batched model steps run."),
    "rows_stepped_total": ("counter", "engine_rows_stepped", "Rows advanced by a step, summed."),
    "step_batch_sizes": ("histogram", "engine_step_batch_size", "Rows per batched model step."),
    "queue_wait_seconds": (
        "seconds",
        "engine_queue_wait_seconds",
        "How long a generation waited in the queue before it started.",
    ),
    "round_seconds": (
        "seconds",
        "engine_round_seconds",
        "Rounds of the batched engine: the seed words of the requests that join fed, then "
        "one step of every row (a stream's first word takes a few).",
    ),
    "generations": ("counter", "engine_generations", "Generations run (the warm-up included)."),
    "words": ("counter", "generated_words", "Words generated, all samples together."),
    "cancelled": ("counter", "engine_cancelled", "Generations stopped before their end."),
    "expired": ("counter", "engine_expired", "Generations dropped at their deadline."),
    "failed": ("counter", "engine_failed", "Generations that failed."),
    "rejected": ("counter", "engine_rejected", "Requests refused because the queue was full."),
}


def _histogram(
    name: str, doc: str, below: Iterable[tuple[float, int]], total: float, labels: Mapping[str, str]
) -> HistogramMetricFamily:
    """A histogram from ``below``: (upper bound, observations up to it), the last bound inf."""
    buckets = [("+Inf" if bound == math.inf else str(float(bound)), n) for bound, n in below]
    family = HistogramMetricFamily(name, doc, labels=list(labels))
    family.add_metric(list(labels.values()), buckets, total)
    return family


def _batch_histogram(
    name: str, doc: str, tally: Mapping[int, int], labels: Mapping[str, str]
) -> HistogramMetricFamily:
    """``{size: steps}`` as a histogram of rows per step."""
    below = [
        (bound, sum(n for size, n in tally.items() if size <= bound))
        for bound in (*BATCH_BUCKETS, math.inf)
    ]
    return _histogram(name, doc, below, float(sum(size * n for size, n in tally.items())), labels)


def _seconds_histogram(
    name: str, doc: str, durations: Durations, labels: Mapping[str, str]
) -> HistogramMetricFamily:
    """The engine's `Durations` (a count per bucket) as a histogram."""
    below = zip((*SECONDS_BUCKETS, math.inf), itertools.accumulate(durations.counts), strict=True)
    return _histogram(name, doc, below, durations.total, labels)


def _one(
    kind: type[GaugeMetricFamily | CounterMetricFamily],
    name: str,
    doc: str,
    value: float,
    labels: Mapping[str, str],
) -> Metric:
    family = kind(name, doc, labels=list(labels))
    family.add_metric(list(labels.values()), value)
    return family


def _merge(families: dict[str, Metric], family: Metric) -> None:
    """Add ``family``'s samples (one model's) to the family of that name (every model's)."""
    if family.name in families:
        families[family.name].samples.extend(family.samples)
    else:
        families[family.name] = family


class ServiceCollector(Collector):
    """What the app holds, read at scrape time from ``app.state``: each model's figures are
    labelled with its name (``model="..."``)."""

    def __init__(self, state: Any) -> None:
        self.state = state

    def collect(self) -> Iterator[Metric]:
        models = getattr(self.state, "models", None)
        yield GaugeMetricFamily(
            f"{PREFIX}_ready",
            "1 once the models are loaded and warmed up.",
            value=int(models is not None),
        )
        if models is None:
            return
        families: dict[str, Metric] = {}
        try:
            for slot in models.slots:
                labels = {"model": slot.name}
                service = slot.service
                for family in (
                    *self._model(service, labels),
                    *self._sessions(service, labels),
                    *self._engine(service.engine.stats(), labels),
                ):
                    _merge(families, family)
            for family in self._reloads(models):
                _merge(families, family)
        except Exception:  # a scrape must not fail because one figure could not be read
            log.warning("some metrics could not be read", exc_info=True)
        yield from families.values()

    @staticmethod
    def _model(service: Any, labels: Mapping[str, str]) -> Iterator[Metric]:
        loaded = service.engine.checkpoint
        config = loaded.config
        info = InfoMetricFamily(f"{PREFIX}_model", "The models being served.", labels=list(labels))
        info.add_metric(
            list(labels.values()),
            {
                "version": str(service.model_id),
                "run": loaded.run_dir.name,
                "device": str(loaded.device),
                "cell": str(config.cell),
                "layers": str(config.layers),
                "hidden_dim": str(config.hidden_dim),
                "vocab_size": str(len(service.vocab)),
            },
        )
        yield info
        yield _one(
            GaugeMetricFamily,
            f"{PREFIX}_model_parameters",
            "Parameters of the served model.",
            count_parameters(loaded.model),
            labels,
        )
        yield _one(
            GaugeMetricFamily,
            f"{PREFIX}_model_loaded_timestamp_seconds",
            "When the served version of the model was loaded.",
            service.loaded_at.timestamp(),
            labels,
        )

    @staticmethod
    def _reloads(models: Any) -> Iterator[Metric]:
        reloads = CounterMetricFamily(
            f"{PREFIX}_model_reloads",
            "New versions of a model loaded and swapped in while serving.",
            labels=["model"],
        )
        failures = CounterMetricFamily(
            f"{PREFIX}_model_reload_failures",
            "New versions (or new models) refused because they failed to load.",
            labels=["model"],
        )
        for name in sorted({*models.names, *models.failures}):
            reloads.add_metric([name], models.reloads[name])
            failures.add_metric([name], models.failures[name])
        yield reloads
        yield failures

    @staticmethod
    def _sessions(service: Any, labels: Mapping[str, str]) -> Iterator[Metric]:
        try:
            active = len(service.sessions)
        except TypeError:  # a store that cannot count cheaply
            return
        yield _one(
            GaugeMetricFamily, f"{PREFIX}_active_sessions", "Sessions kept now.", active, labels
        )

    @staticmethod
    def _engine(stats: EngineStats, labels: Mapping[str, str]) -> Iterator[Metric]:
        info = InfoMetricFamily(
            f"{PREFIX}_engine", "What the engine says of itself.", labels=list(labels)
        )
        info.add_metric(list(labels.values()), {"engine": stats.engine})
        yield info
        for key, (kind, name, doc) in ENGINE_METRICS.items():
            value, full = getattr(stats, key), f"{PREFIX}_{name}"
            if kind == "histogram":
                yield _batch_histogram(full, doc, value, labels)
            elif kind == "seconds":
                yield _seconds_histogram(full, doc, value, labels)
            elif kind == "counter":
                yield _one(CounterMetricFamily, full, doc, value, labels)
            else:
                yield _one(GaugeMetricFamily, full, doc, value, labels)


class Metrics:
    """One app's registry and the metrics its middleware records."""

    def __init__(self, state: Any) -> None:
        self.registry = CollectorRegistry()
        labels = ("method", "route", "status")
        self.requests = Counter(
            f"{PREFIX}_http_requests",
            "HTTP requests answered, by route template, method and status.",
            labels,
            registry=self.registry,
        )
        self.latency = Histogram(
            f"{PREFIX}_http_request_duration_seconds",
            "From a request's arrival to the last byte of its answer.",
            ("method", "route"),
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.in_progress = Gauge(
            f"{PREFIX}_http_requests_in_progress",
            "Requests being answered now.",
            registry=self.registry,
        )
        self.first_word = Histogram(
            f"{PREFIX}_time_to_first_word_seconds",
            "From a streaming request's arrival to its first event (its first word).",
            ("route",),
            buckets=FIRST_WORD_BUCKETS,
            registry=self.registry,
        )
        ProcessCollector(registry=self.registry)
        self.registry.register(ServiceCollector(state))
        # A metric's labels() checks and locks on every call, and a server answers the same
        # few label sets all day: each one's child is looked up once (by the middleware).
        self.answered = functools.lru_cache(maxsize=1024)(self.requests.labels)
        self.took = functools.lru_cache(maxsize=1024)(self.latency.labels)

    def render(self, accept: str | None) -> tuple[bytes, str]:
        """The exposition, in the format the scraper asked for (text or OpenMetrics)."""
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.registry), content_type


class MetricsMiddleware:
    """Records each HTTP request in `Metrics` (status 500 when a handler raised)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        metrics = self.metrics
        started = time.perf_counter()
        status = 499  # nginx's "client closed the request": nothing was answered
        streaming = False
        first_word: float | None = None

        async def record(message: Message) -> None:
            nonlocal status, streaming, first_word
            if message["type"] == "http.response.start":
                status = message["status"]
                content_type = dict(message.get("headers", [])).get(b"content-type", b"")
                streaming = content_type.startswith(b"text/event-stream")
            elif streaming and first_word is None and message.get("body"):
                first_word = time.perf_counter() - started
            await send(message)

        metrics.in_progress.inc()
        try:
            await self.app(scope, receive, record)
        except Exception:
            status = 500
            raise
        finally:
            metrics.in_progress.dec()
            route = getattr(scope.get("route"), "path", None) or UNMATCHED
            method = scope["method"]
            metrics.answered(method, route, str(status)).inc()
            metrics.took(method, route).observe(time.perf_counter() - started)
            if first_word is not None:
                metrics.first_word.labels(route).observe(first_word)


router = APIRouter(tags=["status"])


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}, **errors(401)},
    summary="Prometheus metrics",
)
async def metrics(request: Request) -> Response:
    """Requests, latencies, time to first word, generated words, the engine's batches and
    queue, active sessions and the model, in Prometheus' text format (or OpenMetrics when the
    scraper asks for it)."""
    body, content_type = request.app.state.metrics.render(request.headers.get("accept"))
    return Response(body, media_type=content_type)
