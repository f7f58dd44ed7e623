"""Sessions shared through a real Redis server: one replica creates, another continues."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from app.settings import Settings
from tests.conftest import MakeRun

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None, reason="no redis-server")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = _free_port()
    workdir = tmp_path_factory.mktemp("redis")
    server = subprocess.Popen(
        [
            "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(workdir),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5) as conn:
                    conn.sendall(b"PING\r\n")
                    if conn.recv(16).startswith(b"+PONG"):
                        break
            except OSError:
                pass
            if time.monotonic() > deadline or server.poll() is not None:
                raise RuntimeError("redis-server did not start")
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        server.terminate()
        server.wait(timeout=10)


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
        store = a.app.state.service.sessions  # type: ignore[attr-defined]
        assert a.portal is not None
        ttl = a.portal.call(store._redis.ttl, store._key(session))
        assert 0 < ttl <= 30


def test_an_unreachable_redis_stops_start_up(tiny_run: Path) -> None:
    app = create_app(
        Settings(
            model_dir=tiny_run,
            device="cpu",
            session_store="redis",
            redis_url=f"redis://127.0.0.1:{_free_port()}/0",
        )
    )
    with pytest.raises(Exception, match="cannot reach Redis"), TestClient(app):
        pass
