"""``GET /metrics``: Prometheus' format, parsed back with prometheus_client's own parser."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from app.engine import SECONDS_BUCKETS, Durations, EngineStats
from app.main import create_app
from app.metrics import ENGINE_METRICS, ServiceCollector
from tests.app_helpers import settings_for

Labels = tuple[tuple[str, str], ...]


@pytest.fixture(scope="module")
def client(tiny_run: Path) -> Iterator[TestClient]:
    with TestClient(create_app(settings_for(tiny_run))) as client:
        yield client


def scrape(client: TestClient) -> dict[tuple[str, Labels], float]:
    """Every sample of a scrape, by name and labels."""
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: dict[tuple[str, Labels], float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_requests_are_counted_by_route_template_and_status(client: TestClient) -> None:
    before = scrape(client)
    assert client.post("/generate", json={"max_words": 3}).status_code == 200
    assert client.post("/generate", json={"max_words": -1}).status_code == 422
    assert client.get("/sessions/no-such-session").status_code == 404
    assert client.get("/no/such/path/42").status_code == 404
    after = scrape(client)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    requests = "wordrnn_http_requests_total"
    assert delta(requests, method="POST", route="/generate", status="200") == 1
    assert delta(requests, method="POST", route="/generate", status="422") == 1
    assert delta(requests, method="GET", route="/sessions/{session_id}", status="404") == 1
    assert delta(requests, method="GET", route="<unmatched>", status="404") == 1
    assert not any("/no/such" in str(labels) for _, labels in after)  # labels stay bounded
    latency = "wordrnn_http_request_duration_seconds_count"
    assert delta(latency, method="POST", route="/generate") == 2


def test_generated_words_and_time_to_first_word(client: TestClient) -> None:
    before = scrape(client)
    plain = client.post("/generate", json={"max_words": 7, "n": 2}).json()
    streamed = client.post("/generate", json={"max_words": 5, "stream": True})
    assert streamed.status_code == 200
    openai_stream = client.post("/v1/completions", json={"max_tokens": 4, "stream": True})
    assert openai_stream.status_code == 200
    after = scrape(client)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    words = delta("wordrnn_generated_words_total", model=client.get("/info").json()["name"])
    assert words == plain["usage"]["generated_words"] + 5 + 4
    first_word = "wordrnn_time_to_first_word_seconds_count"
    assert delta(first_word, route="/generate") == 1  # the stream only
    assert delta(first_word, route="/v1/completions") == 1
    assert value(after, "wordrnn_time_to_first_word_seconds_sum", route="/generate") > 0


def test_model_readiness_and_sessions(client: TestClient) -> None:
    info = client.get("/info").json()
    samples = scrape(client)
    assert value(samples, "wordrnn_ready") == 1
    [model_labels] = [dict(labels) for name, labels in samples if name == "wordrnn_model_info"]
    assert model_labels["model"] == info["name"]
    assert model_labels["version"] == info["model"]
    assert model_labels["vocab_size"] == str(info["vocab_size"])
    assert model_labels["cell"] == info["architecture"]["cell"]
    model = info["name"]
    assert value(samples, "wordrnn_model_parameters", model=model) == info["parameters"]

    active = value(samples, "wordrnn_active_sessions", model=model)
    session = client.post("/sessions", json={"seed_words": "I can"}).json()["session_id"]
    assert value(scrape(client), "wordrnn_active_sessions", model=model) == active + 1
    client.delete(f"/sessions/{session}")
    assert value(scrape(client), "wordrnn_active_sessions", model=model) == active


def test_every_engine_statistic_is_exported(client: TestClient) -> None:
    service = client.app.state.models.default.service  # type: ignore[attr-defined]
    stats = service.engine.stats()
    samples = scrape(client)
    names = {name for name, _ in samples}
    shown_otherwise = {"engine", "recent_batch_sizes"}  # a label; the histogram's last steps
    for field in dataclasses.fields(EngineStats):
        if field.name in shown_otherwise:
            continue
        kind, name, _ = ENGINE_METRICS[field.name]
        full = f"wordrnn_{name}" + ("_total" if kind == "counter" else "")
        if kind in ("histogram", "seconds"):
            full += "_count"
        assert full in names, (field.name, sorted(names))
    info = value(samples, "wordrnn_engine_info", model=service.name, engine=stats.engine)
    assert info == 1


def test_openmetrics_is_served_when_asked_for(client: TestClient) -> None:
    response = client.get("/metrics", headers={"accept": "application/openmetrics-text"})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/openmetrics-text")
    assert response.text.endswith("# EOF\n")


def test_before_the_model_is_loaded_metrics_say_not_ready(tiny_run: Path) -> None:
    client = TestClient(create_app(settings_for(tiny_run)))  # no lifespan: still loading
    samples = scrape(client)
    assert value(samples, "wordrnn_ready") == 0
    assert not any(name.startswith("wordrnn_model") for name, _ in samples)


def test_apps_do_not_share_counts(tiny_run: Path, client: TestClient) -> None:
    client.get("/healthz")
    fresh = TestClient(create_app(settings_for(tiny_run)))
    samples = scrape(fresh)
    healthz = value(
        samples, "wordrnn_http_requests_total", method="GET", route="/healthz", status="200"
    )
    assert healthz == 0


# -- the engine's statistics, read at scrape time ---------------------------------------------


def test_engine_stats_become_gauges_counters_and_a_batch_size_histogram() -> None:
    stats = EngineStats(
        engine="batched",
        queue_length=3,
        active_requests=2,
        active_rows=12,
        pending=5,
        max_pending=256,
        max_batch=128,
        steps_total=40,
        rows_stepped_total=130,
        step_batch_sizes={1: 10, 4: 20, 5: 10},
        recent_batch_sizes=[4, 4, 5],
        # 2 waits up to 0.5 ms, 3 up to 25 ms, 1 past 10 s
        queue_wait_seconds=Durations([2, *[0] * 4, 3, *[0] * 8, 1], 11.5),
        round_seconds=Durations(),
        generations=7,
        words=125,
        cancelled=0,
        expired=0,
        failed=0,
        rejected=2,
    )
    families = {f.name: f for f in ServiceCollector._engine(stats, {"model": "m"})}
    assert families["wordrnn_engine_queue_length"].type == "gauge"
    assert families["wordrnn_engine_queue_length"].samples[0].value == 3
    assert families["wordrnn_engine_active_rows"].samples[0].value == 12
    assert families["wordrnn_engine_steps"].type == "counter"
    assert families["wordrnn_engine_rows_stepped"].samples[0].value == 130
    assert families["wordrnn_generated_words"].samples[0].value == 125
    assert families["wordrnn_engine_rejected"].samples[0].value == 2
    histogram = families["wordrnn_engine_step_batch_size"]
    buckets = {s.labels["le"]: s.value for s in histogram.samples if s.name.endswith("_bucket")}
    assert buckets["1.0"] == 10
    assert buckets["2.0"] == 10
    assert buckets["4.0"] == 30
    assert buckets["8.0"] == 40
    assert buckets["+Inf"] == 40
    total = [s.value for s in histogram.samples if s.name.endswith("_sum")]
    assert total == [1 * 10 + 4 * 20 + 5 * 10]
    waits = families["wordrnn_engine_queue_wait_seconds"]
    assert waits.type == "histogram"
    buckets = {s.labels["le"]: s.value for s in waits.samples if s.name.endswith("_bucket")}
    assert list(buckets) == [*(str(float(b)) for b in SECONDS_BUCKETS), "+Inf"]
    assert (buckets["0.0005"], buckets["0.01"], buckets["0.025"], buckets["10.0"]) == (2, 2, 5, 5)
    assert buckets["+Inf"] == 6
    assert [s.value for s in waits.samples if s.name.endswith("_sum")] == [11.5]
    rounds = families["wordrnn_engine_round_seconds"]
    assert [s.value for s in rounds.samples if s.name.endswith("_count")] == [0]
    assert families["wordrnn_engine"].samples[0].labels == {"model": "m", "engine": "batched"}
    assert not any("engine_engine" in name or "recent" in name for name in families)
