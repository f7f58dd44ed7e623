"""Property-based fuzzing of every route against the app's own OpenAPI schema (schemathesis).

Each operation gets schema-valid and schema-invalid requests (its examples, the coverage
phase's boundary values, then random ones) and every answer must pass schemathesis' checks:
no 5xx, a documented status and content type, a body that matches its schema, invalid data
refused, ``Allow`` right on a 405, with API keys set a 401 without a valid key, and past the
rate limit a 429 (with ``Retry-After``) on every route but the probes and ``/metrics``.

Schema-valid requests may still be refused for what the static schema cannot state: the
deployment's limits and the loaded model (``max_words``, ``n``, ``top_k`` up to the vocabulary
size, seed length, unknown words, ``best_of`` equal to ``n``), listed by ``GET /info``.
``bench.fuzz.accepted_unless_limited``, shared with the long run (``python -m bench.fuzz``),
replaces schemathesis' ``positive_data_acceptance`` to allow those refusals and no other.

The schemas are read at import time, from apps whose model is never loaded: schemathesis'
pytest integration needs the operations when it collects the tests (its fixture-based loader
does not run on pytest 9), and a schema does not depend on the model. It does depend on the
keys: only a server with keys declares security, which schemathesis' ``ignored_auth`` then
checks. `test_the_fuzzed_schemas_are_the_served_ones` checks that they are what the apps serve. The
requests go to `AppUnderTest` stand-ins, which the fixtures point at apps on a tiny model.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from fastapi import FastAPI
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, settings
from schemathesis import BaseSchema, Case
from schemathesis.checks import positive_data_acceptance, unsupported_method
from starlette.types import ASGIApp, Receive, Scope, Send

from app.main import create_app
from app.schemas import NOT_WHITESPACE
from app.settings import Settings
from bench.fuzz import API_KEY, KEY_HEADERS, REQUEST_TIMEOUT_SECONDS, accepted_unless_limited
from tests.app_helpers import settings_for


class AppUnderTest:
    """An ASGI app that passes everything, the lifespan too, to the app a fixture sets."""

    def __init__(self) -> None:
        self.app: ASGIApp | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        assert self.app is not None, "no fixture has set the app under test"
        await self.app(scope, receive, send)


def _schema(**settings: Any) -> BaseSchema:
    """The schema of an app with ``settings``, whose model is never loaded."""
    app = create_app(Settings(model_dir=Path("never-loaded"), **settings))
    return schemathesis.openapi.from_dict(app.openapi())


OPEN, KEYED, LIMITED = AppUnderTest(), AppUnderTest(), AppUnderTest()
SCHEMA = _schema()
SCHEMA.app = OPEN
# With keys: the routes without a body (GET and DELETE), the OpenAI ones among them.
KEYED_SCHEMA = _schema(api_keys=[API_KEY]).include(method=["GET", "DELETE"])
KEYED_SCHEMA.app = KEYED
LIMITED_SCHEMA = SCHEMA.clone()
LIMITED_SCHEMA.app = LIMITED
UNLIMITED_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
FUZZ = settings(
    max_examples=15,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


def _app(run_dir: Path, **overrides: Any) -> FastAPI:
    return create_app(
        settings_for(run_dir, max_words=20, max_samples=3, max_seed_words=50, **overrides)
    )


@pytest.fixture(scope="module")
def app(tiny_run: Path) -> Iterator[FastAPI]:
    OPEN.app = _app(tiny_run)
    yield OPEN.app
    OPEN.app = None


@pytest.fixture(scope="module")
def keyed_app(tiny_run: Path) -> Iterator[FastAPI]:
    KEYED.app = _app(tiny_run, api_keys=[API_KEY])
    yield KEYED.app
    KEYED.app = None


@pytest.fixture(scope="module")
def limited_app(tiny_run: Path) -> Iterator[FastAPI]:
    """An app whose one request an hour is spent already."""
    LIMITED.app = _app(tiny_run, rate_limit="1/hour")
    TestClient(LIMITED.app).get("/info")
    yield LIMITED.app
    LIMITED.app = None


def test_the_fuzzed_schemas_are_the_served_ones(app: FastAPI, keyed_app: FastAPI) -> None:
    served = schemathesis.openapi.from_asgi("/openapi.json", app)
    assert served.raw_schema == SCHEMA.raw_schema
    served = schemathesis.openapi.from_asgi("/openapi.json", keyed_app)
    assert served.raw_schema == KEYED_SCHEMA.raw_schema


@SCHEMA.parametrize()
@FUZZ
@pytest.mark.usefixtures("app")
def test_every_route_keeps_its_schema(case: Case) -> None:
    case.call_and_validate(
        timeout=REQUEST_TIMEOUT_SECONDS,
        excluded_checks=[positive_data_acceptance],
        additional_checks=[accepted_unless_limited],
    )


@KEYED_SCHEMA.parametrize()
@FUZZ
@pytest.mark.usefixtures("keyed_app")
def test_with_api_keys_a_request_without_a_valid_key_is_a_401(case: Case) -> None:
    case.call_and_validate(
        # Explicit credentials: schemathesis also sends each request without them, and with
        # made-up ones.
        headers=KEY_HEADERS,
        timeout=REQUEST_TIMEOUT_SECONDS,
        excluded_checks=[positive_data_acceptance],
        additional_checks=[accepted_unless_limited],
    )


@LIMITED_SCHEMA.parametrize()
@settings(FUZZ, max_examples=5)
@pytest.mark.usefixtures("limited_app")
def test_past_the_rate_limit_every_limited_route_answers_a_documented_429(case: Case) -> None:
    response = case.call_and_validate(
        timeout=REQUEST_TIMEOUT_SECONDS,
        # The limiter answers before routing, so an unsupported method gets a 429 too.
        excluded_checks=[positive_data_acceptance, unsupported_method],
        additional_checks=[accepted_unless_limited],
    )
    assert (response.status_code == 429) == (case.path not in UNLIMITED_PATHS)


def test_a_405_names_every_method_of_the_path(app: FastAPI) -> None:
    response = TestClient(app).put("/sessions/abc")
    assert response.status_code == 405
    assert response.headers["allow"] == "GET, DELETE"


def test_the_schema_pattern_of_a_word_is_the_validators_idea_of_whitespace() -> None:
    not_whitespace = re.compile(NOT_WHITESPACE)
    characters = map(chr, range(sys.maxunicode + 1))
    assert all(bool(not_whitespace.fullmatch(c)) != c.isspace() for c in characters)
