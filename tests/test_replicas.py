"""Two replicas behind nginx (``deploy/nginx.replicas.conf``), sharing sessions through Redis.

Real processes on loopback: a Redis server, two ``python -m app`` with
``WORDRNN_SESSION_STORE=redis`` serving the same run folder, and nginx spreading requests over
both, round robin. Each continuation of a session is tagged with its own X-Request-ID, so the
replicas' access logs tell which one served it. The words must be those of the same session
in a single process with sessions in memory; a replica killed with SIGKILL must cost nothing:
nginx passes its requests to the other one, and the session carries on.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from app.settings import Settings
from tests.live_server import (
    App,
    Nginx,
    nginx_binary,
    replicas_site,
    run_app,
    run_nginx,
    run_redis,
    wait_for,
)

pytestmark = [
    pytest.mark.skipif(nginx_binary() is None, reason="nginx is not installed"),
    pytest.mark.skipif(
        shutil.which("redis-server") is None, reason="redis-server is not installed"
    ),
]

PREFIX = "/textgen"
SEED_WORDS = "I can"
# Sampled, not greedy: each continuation depends on the hidden state the session carries.
STEPS = [{"max_words": 3, "random_seed": seed, "top_k": 0} for seed in range(8)]


@pytest.fixture(scope="module")
def expected(tiny_run: Path) -> list[list[str]]:
    """The words of each step of the session, in one process with sessions in memory."""
    app = create_app(Settings(model_dir=tiny_run, device="cpu", session_store="memory"))
    with TestClient(app) as client:
        created = client.post("/sessions", json={"seed_words": SEED_WORDS})
        assert created.status_code == 201, created.text
        session_id = created.json()["session_id"]
        words = []
        for step in STEPS:
            response = client.post("/generate", json={"session_id": session_id, **step})
            assert response.status_code == 200, response.text
            words.append(response.json()["words"])
    return words


@dataclass
class Replicas:
    apps: list[App]
    nginx: Nginx
    access_log: Path

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.nginx.url + PREFIX, timeout=60)

    def served_by(self, request_id: str) -> list[int]:
        """The indexes of the replicas whose access log has the request (empty: none yet)."""
        return [i for i, app in enumerate(self.apps) if _logged(app, request_id)]

    def wait_served_by(self, request_id: str) -> list[int]:
        return wait_for(partial(self.served_by, request_id), f"the access line of {request_id}")

    def nginx_line(self, text: str) -> str:
        """The first line of nginx's access log that has ``text``, once it is written."""

        def find() -> str | None:
            lines = self.access_log.read_text().splitlines() if self.access_log.exists() else []
            return next((line for line in lines if text in line), None)

        return wait_for(find, f"{text!r} in nginx's access log")


def _logged(app: App, request_id: str) -> bool:
    return any(
        line.get("logger") == "app.access" and line.get("request_id") == request_id
        for line in app.json_log()
    )


@pytest.fixture
def replicas(tmp_path: Path, tiny_run: Path) -> Iterator[Replicas]:
    with ExitStack() as stack:
        redis_url = stack.enter_context(run_redis(tmp_path / "redis"))
        env = {"WORDRNN_SESSION_STORE": "redis", "WORDRNN_REDIS_URL": redis_url}
        args = ("--root-path", PREFIX, "--log-format", "json")
        apps = [
            stack.enter_context(run_app(tiny_run, tmp_path / f"app{i}.log", *args, **env))
            for i in range(2)
        ]
        access_log = tmp_path / "nginx-access.log"
        site = replicas_site([app.port for app in apps], access_log)
        nginx = stack.enter_context(run_nginx(site, tmp_path / "nginx"))
        yield Replicas(apps, nginx, access_log)


def start_session(http: httpx.Client) -> str:
    response = http.post("/sessions", json={"seed_words": SEED_WORDS})
    assert response.status_code == 201, response.text
    return str(response.json()["session_id"])


def continue_session(http: httpx.Client, session_id: str, step: int) -> tuple[str, list[str]]:
    """Step ``step`` of the session, through nginx: its request id and its words."""
    request_id = f"{session_id[:8]}-step-{step}"
    response = http.post(
        "/generate",
        json={"session_id": session_id, **STEPS[step]},
        headers={"X-Request-ID": request_id},
    )
    assert response.status_code == 200, f"step {step}: {response.status_code} {response.text}"
    return request_id, response.json()["words"]


def test_a_session_continues_on_both_replicas(
    replicas: Replicas, expected: list[list[str]]
) -> None:
    with replicas.client() as http:
        session_id = start_session(http)
        request_ids = []
        for step in range(len(STEPS)):
            request_id, words = continue_session(http, session_id, step)
            assert words == expected[step], f"step {step}"
            request_ids.append(request_id)
        shown = http.get(f"/sessions/{session_id}")
    assert shown.status_code == 200
    assert shown.json()["words"] == [*SEED_WORDS.split(), *(w for words in expected for w in words)]

    served = [replicas.wait_served_by(request_id) for request_id in request_ids]
    assert all(len(by) == 1 for by in served), served
    assert {by[0] for by in served} == {0, 1}, served  # round robin: both replicas served


def test_a_replica_killed_loses_no_session(replicas: Replicas, expected: list[list[str]]) -> None:
    half = len(STEPS) // 2
    with replicas.client() as http:
        session_id = start_session(http)
        for step in range(half):
            _, words = continue_session(http, session_id, step)
            assert words == expected[step], f"step {step}"

        dead, alive = replicas.apps
        dead.process.kill()  # SIGKILL: no graceful shutdown, connections reset
        dead.process.wait(timeout=30)

        request_ids = []
        for step in range(half, len(STEPS)):
            request_id, words = continue_session(http, session_id, step)
            assert words == expected[step], f"step {step}"
            request_ids.append(request_id)
    served = [replicas.wait_served_by(request_id) for request_id in request_ids]
    assert all(by == [1] for by in served), served  # all by the live replica
    # nginx did send a request to the dead replica, then passed it on to the live one.
    retried = replicas.nginx_line(f"upstream=127.0.0.1:{dead.port}, 127.0.0.1:{alive.port} ")
    assert '"POST /textgen/generate HTTP/1.1" 200 ' in retried
