"""Rate limits: a budget per API key or client address, 429 with Retry-After past it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

from app.__main__ import main
from app.main import create_app
from app.ratelimit import RateLimitMiddleware
from tests.app_helpers import settings_for
from tests.live_server import wait_for


def client_for(run_dir: Path, address: str = "192.0.2.1", **settings: Any) -> TestClient:
    return TestClient(create_app(settings_for(run_dir, **settings)), client=(address, 50000))


def statuses(client: TestClient, path: str, count: int, **kwargs: Any) -> list[int]:
    return [client.get(path, **kwargs).status_code for _ in range(count)]


def test_rate_limiting_is_off_by_default(tiny_run: Path) -> None:
    with client_for(tiny_run) as client:
        assert not any(m.cls is RateLimitMiddleware for m in client.app.user_middleware)  # type: ignore[attr-defined]
        assert statuses(client, "/info", 20) == [200] * 20


def test_a_caller_past_its_budget_gets_429_with_retry_after(tiny_run: Path) -> None:
    with client_for(tiny_run, rate_limit="2/minute") as client:
        assert statuses(client, "/info", 2) == [200, 200]
        refused = client.get("/info")
        assert refused.status_code == 429
        assert 1 <= int(refused.headers["retry-after"]) <= 60
        body = refused.json()
        assert body["errors"] == []
        assert "2 per 1 minute" in body["detail"]
        assert "client address" in body["detail"]


def test_every_limit_of_a_list_applies(tiny_run: Path) -> None:
    with client_for(tiny_run, rate_limit="100/minute;1/hour") as client:
        assert client.get("/info").status_code == 200
        refused = client.get("/info")
        assert refused.status_code == 429
        assert 60 < int(refused.headers["retry-after"]) <= 3600


def test_the_budget_returns_when_its_window_ends(tiny_run: Path) -> None:
    with client_for(tiny_run, rate_limit="1/second") as client:
        assert client.get("/info").status_code == 200
        refused = client.get("/info")
        assert refused.status_code == 429
        assert refused.headers["retry-after"] == "1"
        wait_for(lambda: client.get("/info").status_code == 200, "a new window", timeout=5)


def test_openai_routes_refuse_with_openai_error_body(tiny_run: Path) -> None:
    with client_for(tiny_run, rate_limit="1/minute") as client:
        assert client.get("/v1/models").status_code == 200
        refused = client.get("/v1/models")
        assert refused.status_code == 429
        assert "retry-after" in refused.headers
        error = refused.json()["error"]
        assert error["type"] == "rate_limit_error"
        assert error["code"] == "rate_limit_exceeded"
        assert "1 per 1 minute" in error["message"]


def test_each_api_key_has_its_own_budget(tiny_run: Path) -> None:
    keys = ["alpha-key", "beta-key"]
    with client_for(tiny_run, rate_limit="2/minute", api_keys=keys) as client:
        alpha = {"headers": {"Authorization": "Bearer alpha-key"}}
        beta = {"headers": {"X-API-Key": "beta-key"}}
        assert statuses(client, "/info", 3, **alpha) == [200, 200, 429]
        assert "API key" in client.get("/info", **alpha).json()["detail"]
        assert statuses(client, "/info", 2, **beta) == [200, 200]
        assert client.get("/info", **beta).status_code == 429


def test_an_invalid_key_counts_against_the_address(tiny_run: Path) -> None:
    with client_for(tiny_run, rate_limit="2/minute", api_keys=["alpha-key"]) as client:
        made_up = [{"headers": {"X-API-Key": f"guess-{i}"}} for i in range(2)]
        assert [client.get("/info", **h).status_code for h in made_up] == [401, 401]
        assert client.get("/info", headers={"X-API-Key": "guess-3"}).status_code == 429
        assert client.get("/info").status_code == 429  # the same address, without a key
        assert client.get("/info", headers={"X-API-Key": "alpha-key"}).status_code == 200


def test_each_client_address_behind_a_trusted_proxy_has_its_own_budget(tiny_run: Path) -> None:
    app = create_app(settings_for(tiny_run, rate_limit="2/minute"))
    proxied = ProxyHeadersMiddleware(app, trusted_hosts="127.0.0.1")  # as uvicorn runs it
    with TestClient(proxied, client=("127.0.0.1", 1)) as proxy:
        first = {"headers": {"X-Forwarded-For": "198.51.100.7"}}
        second = {"headers": {"X-Forwarded-For": "198.51.100.8"}}
        assert statuses(proxy, "/info", 3, **first) == [200, 200, 429]
        assert statuses(proxy, "/info", 2, **second) == [200, 200]


@pytest.mark.parametrize("root_path", ["", "/textgen"])
def test_health_readiness_and_metrics_are_never_limited(tiny_run: Path, root_path: str) -> None:
    with client_for(tiny_run, rate_limit="1/minute", root_path=root_path) as client:
        for path in ("/healthz", "/readyz", "/metrics"):
            assert statuses(client, root_path + path, 5) == [200] * 5, path
        assert statuses(client, root_path + "/info", 2) == [200, 429]


@pytest.mark.parametrize("value", ["often", "0/minute", "10/fortnight"])
def test_a_bad_rate_limit_is_refused_at_start_up(
    tiny_run: Path, value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(ValidationError, match="rate_limit"):
        settings_for(tiny_run, rate_limit=value)
    assert main(["--model-dir", str(tiny_run), "--rate-limit", value]) == 2
    assert "rate_limit" in capsys.readouterr().err
