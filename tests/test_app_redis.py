"""Sessions shared through a real Redis server: one replica creates, another continues."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from app.settings import Settings
from tests.conftest import MakeRun
from tests.live_server import free_port, run_redis

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None, reason="no redis-server")


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with run_redis(tmp_path_factory.mktemp("redis")) as url:
        yield url


def replica(run_dir: Path, redis_url: str, **extra: object) -> TestClient:
    settings = Settings(
        model_dir=run_dir, device="cpu", session_store="redis", redis_url=redis_url, **extra
    )  # type: ignore[arg-type]
    return TestClient(create_app(settings))


def post(client: TestClient, path: str, **body: object) -> dict[str, object]:
    response = client.post(path, json=body)
    assert response.status_code in (200, 201), response.text
    return response.json()  # type: ignore[no-any-return]


def test_a_session_continues_on_another_replica(tiny_run: Path, redis_url: str) -> None:
    with replica(tiny_run, redis_url) as a, replica(tiny_run, redis_url) as b:
        whole = post(a, "/generate", seed_words="I can", max_words=12, temperature=0)
        session = post(a, "/sessions", seed_words="I can")["session_id"]
        first = post(a, "/generate", session_id=session, max_words=5, temperature=0)
        second = post(b, "/generate", session_id=session, max_words=7, temperature=0)
        assert first["words"] + second["words"] == whole["words"]
        shown = b.get(f"/sessions/{session}").json()
        assert shown["words"] == ["I", "can", *whole["words"]]
        assert b.delete(f"/sessions/{session}").status_code == 204
        assert a.get(f"/sessions/{session}").status_code == 404


def test_a_replica_with_another_model_refuses_the_session(
    tiny_run: Path, make_run: MakeRun, redis_url: str
) -> None:
    other = make_run(seed=5)
    with replica(tiny_run, redis_url) as a, replica(other, redis_url) as b:
        session = post(a, "/sessions", seed_words="I can")["session_id"]
        response = b.post("/generate", json={"session_id": session, "max_words": 3})
        assert response.status_code == 409
        assert "another model" in response.json()["errors"][0]["message"]


def test_sessions_expire_in_redis(tiny_run: Path, redis_url: str) -> None:
    with replica(tiny_run, redis_url, session_ttl_seconds=30) as a:
        session = post(a, "/sessions", seed_words="I can")["session_id"]
        store = a.app.state.models.default.service.sessions  # type: ignore[attr-defined]
        assert a.portal is not None
        ttl = a.portal.call(store._redis.ttl, store._key(session))
        assert 0 < ttl <= 30


def test_an_unreachable_redis_stops_start_up(tiny_run: Path) -> None:
    app = create_app(
        Settings(
            model_dir=tiny_run,
            device="cpu",
            session_store="redis",
            redis_url=f"redis://127.0.0.1:{free_port()}/0",
        )
    )
    with pytest.raises(Exception, match="cannot reach Redis"), TestClient(app):
        pass


def stored_fields(client: TestClient, session: str) -> dict[bytes, bytes]:
    store = client.app.state.models.default.service.sessions  # type: ignore[attr-defined]
    assert client.portal is not None
    return client.portal.call(store._redis.hgetall, store._key(session))  # type: ignore[no-any-return]


def test_a_session_belongs_to_its_key_on_every_replica(tiny_run: Path, redis_url: str) -> None:
    keys = {"api_keys": ["alpha-key", "beta-key"]}
    alpha, beta = {"X-API-Key": "alpha-key"}, {"X-API-Key": "beta-key"}
    with replica(tiny_run, redis_url, **keys) as a, replica(tiny_run, redis_url, **keys) as b:
        made = a.post("/sessions", json={"seed_words": "I can"}, headers=alpha)
        session = made.json()["session_id"]
        fields = stored_fields(a, session)
        assert fields[b"owner"] == hashlib.sha256(b"alpha-key").hexdigest().encode()
        assert fields[b"format"] == b"2"  # refused by replicas that do not know owners
        continued = {"session_id": session, "max_words": 2}
        assert b.get(f"/sessions/{session}", headers=beta).status_code == 404
        assert b.post("/generate", json=continued, headers=beta).status_code == 404
        assert b.delete(f"/sessions/{session}", headers=beta).status_code == 404
        assert b.post("/generate", json=continued, headers=alpha).status_code == 200
        assert b.delete(f"/sessions/{session}", headers=alpha).status_code == 204


def test_only_the_owner_moves_a_sessions_expiry_on(tiny_run: Path, redis_url: str) -> None:
    settings = {"api_keys": ["alpha-key", "beta-key"], "session_ttl_seconds": 30}
    with replica(tiny_run, redis_url, **settings) as a:
        made = a.post("/sessions", json={"seed_words": "I"}, headers={"X-API-Key": "alpha-key"})
        session = made.json()["session_id"]
        store = a.app.state.models.default.service.sessions  # type: ignore[attr-defined]
        assert a.portal is not None

        def ttl() -> int:
            return int(a.portal.call(store._redis.ttl, store._key(session)))  # type: ignore[union-attr]

        a.portal.call(store._redis.expire, store._key(session), 5)
        assert a.get(f"/sessions/{session}", headers={"X-API-Key": "beta-key"}).status_code == 404
        assert ttl() <= 5  # another key's look renews nothing
        assert a.get(f"/sessions/{session}", headers={"X-API-Key": "alpha-key"}).status_code == 200
        assert ttl() > 5


def test_a_session_without_keys_keeps_the_first_format(tiny_run: Path, redis_url: str) -> None:
    with replica(tiny_run, redis_url) as a:
        session = post(a, "/sessions", seed_words="I can")["session_id"]
        fields = stored_fields(a, str(session))
        assert fields[b"format"] == b"1"
        assert b"owner" not in fields


def test_replicas_share_one_rate_limit_budget(tiny_run: Path, redis_url: str) -> None:
    limit = {"rate_limit": "2/minute"}
    with replica(tiny_run, redis_url, **limit) as a, replica(tiny_run, redis_url, **limit) as b:
        assert a.get("/info").status_code == 200
        assert b.get("/info").status_code == 200
        refused = a.get("/info")
        assert refused.status_code == 429
        assert 1 <= int(refused.headers["retry-after"]) <= 60


def test_rate_limits_let_requests_pass_while_redis_is_down(
    tiny_run: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with contextlib.ExitStack() as own_redis:
        url = own_redis.enter_context(run_redis(tmp_path / "redis"))
        with replica(tiny_run, url, rate_limit="1/minute") as client:
            assert [client.get("/info").status_code for _ in range(2)] == [200, 429]
            own_redis.close()  # stops the server under the running replica
            with caplog.at_level(logging.WARNING, logger="app"):
                assert [client.get("/info").status_code for _ in range(3)] == [200] * 3
            warnings = [r.getMessage() for r in caplog.records if "rate limits" in r.getMessage()]
            assert len(warnings) == 1, warnings  # once for the outage, not once a request
