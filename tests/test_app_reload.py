"""Reloading while serving: a new checkpoint is swapped in, a bad one refused, a new model added.

The tests call `ModelRegistry.check_now` (what the watcher runs every interval) instead of
waiting for the interval; one test lets the watcher itself find a new checkpoint.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from asgi_lifespan import LifespanManager
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from app.engine import Engine, EngineClosed
from app.engine import batch as batch_module
from app.main import create_app
from app.registry import Change, ModelRegistry
from app.sessions import MemorySessionStore, Session
from app.settings import Settings
from model_store import checkpoint
from model_store.network import Hidden, WordRNN
from tests.app_helpers import parse_sse, write_nested_manifest
from tests.conftest import build_run, commit_non_finite_weights
from tests.live_server import wait_for


def settings_for(**values: Any) -> Settings:
    return Settings(**{"device": "cpu", "reload_interval_seconds": 0, **values})


@pytest.fixture
def models_dir(tmp_path: Path) -> Path:
    build_run(tmp_path / "models" / "default", seed=0)
    return tmp_path / "models"


@pytest.fixture
def client(models_dir: Path) -> Iterator[TestClient]:
    with TestClient(create_app(settings_for(models_dir=models_dir))) as client:
        yield client


def check_now(client: TestClient) -> list[Change]:
    registry: ModelRegistry = client.app.state.models  # type: ignore[attr-defined]
    assert client.portal is not None
    return client.portal.call(registry.check_now)


def post(client: TestClient, path: str, **body: Any) -> dict[str, Any]:
    response = client.post(path, json=body)
    assert response.status_code in (200, 201), response.text
    return response.json()  # type: ignore[no-any-return]


def reload_failures(client: TestClient, model: str) -> float:
    wanted = ("wordrnn_model_reload_failures_total", {"model": model})
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for sample in family.samples:
            if (sample.name, sample.labels) == wanted:
                return sample.value
    return 0.0


class ModelGate:
    """Holds the inference thread of one model's engine inside its next step until opened;
    other engines (a newly loaded version) step freely."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, model: WordRNN) -> None:
        self.entered = threading.Event()
        self.opened = threading.Event()
        real = batch_module.next_logits

        def gated(stepped: WordRNN, hidden: Hidden) -> Any:
            if stepped is model:
                self.entered.set()
                if not self.opened.wait(timeout=30):
                    raise RuntimeError("the test never opened the gate")
            return real(stepped, hidden)

        monkeypatch.setattr(batch_module, "next_logits", gated)


async def closed(engine: Engine) -> bool:
    try:
        await engine.prime([], None)
    except EngineClosed:
        return True
    return False


async def poll(check: Any, what: str, timeout: float = 30) -> None:
    """Await ``check()`` until it is true, polling within a deadline."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not await check():
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)  # a polling interval, not a synchronisation


def test_a_new_checkpoint_is_swapped_in_while_a_stream_ends_on_the_old_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_dir = build_run(tmp_path / "run", seed=0)
    app = create_app(settings_for(model_dir=run_dir))
    body = {"seed_words": "I can", "max_words": 30, "random_seed": 3}
    suggest = {"seed_words": "I can", "top_k": 5}

    async def scenario() -> None:
        transport = httpx.ASGITransport(app)
        async with (
            LifespanManager(app),
            httpx.AsyncClient(transport=transport, base_url="http://test") as http,
        ):
            registry: ModelRegistry = app.state.models
            old = registry.get().service
            expected = (await http.post("/generate", json=body)).json()
            before = (await http.post("/next-words", json=suggest)).json()
            gate = ModelGate(monkeypatch, old.engine.model)
            try:
                stream = asyncio.create_task(http.post("/generate", json={**body, "stream": True}))
                await asyncio.to_thread(gate.entered.wait, 30)
                build_run(run_dir, seed=1)  # the trainer commits new best weights
                [change] = await registry.check_now()
                new_id = registry.get().service.model_id
                assert change == Change("run", "reloaded", new_id)
                assert new_id != old.model_id

                after = (await http.post("/next-words", json=suggest)).json()
                assert after["model"] == new_id
                assert after["words"] != before["words"]
                changed = (await http.post("/generate", json=body)).json()
                assert changed["words"] != expected["words"]
                by_old_id = await http.post("/generate", json={**body, "model": old.model_id})
                assert by_old_id.json()["model"] == new_id  # an old id means the model
                [card] = (await http.get("/v1/models")).json()["data"]
                assert (card["id"], card["version"], card["name"]) == (new_id, new_id, "run")
                assert not stream.done()
            finally:
                gate.opened.set()
            events = parse_sse((await asyncio.wait_for(stream, 30)).text)
            assert [name for name, _ in events] == ["word"] * 30 + ["done"]
            assert events[-1][1] == {**expected, "random_seed": 3}
            await poll(lambda: closed(old.engine), "the old engine to close")

    asyncio.run(scenario())


class SlowSessions(MemorySessionStore):
    """A session store whose reads wait for the test while ``held`` (a shared store's network
    round trip), so a request can pick a model version, then wait before using its engine."""

    def __init__(self) -> None:
        super().__init__(ttl_seconds=3600, max_sessions=10)
        self.held = False
        self.reading = asyncio.Event()
        self.release = asyncio.Event()

    async def get(self, *args: Any, **kwargs: Any) -> Session | None:
        if self.held:
            self.reading.set()
            await self.release.wait()
        return await super().get(*args, **kwargs)


def test_a_request_that_chose_the_old_version_before_the_swap_is_served_by_it(
    tmp_path: Path,
) -> None:
    run_dir = build_run(tmp_path / "run", seed=0)
    app = create_app(settings_for(model_dir=run_dir), session_store=(store := SlowSessions()))

    async def scenario() -> None:
        transport = httpx.ASGITransport(app)
        async with (
            LifespanManager(app),
            httpx.AsyncClient(transport=transport, base_url="http://test") as http,
        ):
            registry: ModelRegistry = app.state.models
            old = registry.get().service
            session = (await http.post("/sessions", json={"seed_words": "I"})).json()
            store.held = True
            body = {"session_id": session["session_id"], "max_words": 3}
            waiting = asyncio.create_task(http.post("/generate", json=body))
            await asyncio.wait_for(store.reading.wait(), 30)  # the request holds the old version
            build_run(run_dir, seed=1)
            [change] = await registry.check_now()
            assert change.outcome == "reloaded"
            store.release.set()
            response = await asyncio.wait_for(waiting, 30)
            assert response.status_code == 200, response.text
            assert response.json()["model"] == old.model_id
            await poll(lambda: closed(old.engine), "the old engine to close")

    asyncio.run(scenario())


def test_a_corrupt_checkpoint_is_refused_and_the_old_one_keeps_serving(
    client: TestClient, models_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run_dir = models_dir / "default"
    serving = client.get("/info").json()["model"]
    build_run(run_dir, seed=1)
    weights = run_dir / checkpoint.read_manifest(run_dir)["weights"]
    weights.write_bytes(b"not safetensors")
    with caplog.at_level(logging.ERROR, logger="app"):
        [change] = check_now(client)
        assert check_now(client) == []  # the same bad manifest is not tried again
    assert change.outcome == "refused"
    assert str(weights) in change.detail
    [record] = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert str(weights) in record.getMessage()
    assert "corrupt" in record.getMessage()
    assert "\n" not in record.getMessage()
    assert reload_failures(client, "default") == 1
    assert post(client, "/generate", max_words=3)["model"] == serving

    build_run(run_dir, seed=2)  # the next good commit is loaded
    [change] = check_now(client)
    assert change.outcome == "reloaded"
    assert post(client, "/generate", max_words=3)["model"] == change.detail != serving


def test_non_finite_weights_are_refused_and_the_old_ones_keep_serving(
    client: TestClient, models_dir: Path
) -> None:
    serving = client.get("/info").json()["model"]
    weights = commit_non_finite_weights(models_dir / "default")
    [change] = check_now(client)
    assert change.outcome == "refused"
    assert f"{weights}: tensor embedding.weight holds NaN or infinite values" in change.detail
    assert post(client, "/generate", max_words=3)["model"] == serving


def test_a_commit_of_the_training_state_alone_is_not_a_new_version(
    client: TestClient, models_dir: Path
) -> None:
    engine = client.app.state.models.default.service.engine  # type: ignore[attr-defined]
    checkpoint.commit(models_dir / "default", info={"epochs": 3})
    assert check_now(client) == []
    assert client.app.state.models.default.service.engine is engine  # type: ignore[attr-defined]


def test_a_new_subfolder_is_served_and_a_bad_one_refused(
    client: TestClient, models_dir: Path
) -> None:
    build_run(models_dir / "late", seed=4)
    bad = build_run(models_dir / "broken")
    (bad / "vocab.json").write_text("{}")
    changes = {change.name: change for change in check_now(client)}
    assert changes["late"].outcome == "added"
    assert changes["broken"].outcome == "refused"
    assert "vocab.json" in changes["broken"].detail
    assert post(client, "/generate", model="late", max_words=2)["model"] == changes["late"].detail
    ids = [card["id"] for card in client.get("/v1/models").json()["data"]]
    assert ids == ["default", "late"]
    refused = client.post("/generate", json={"model": "broken"})
    assert refused.status_code == 404
    assert reload_failures(client, "broken") == 1


@pytest.mark.parametrize("broken", ["late", "served"])  # a new subfolder, a served model
def test_a_manifest_that_cannot_be_read_holds_back_no_other_model(
    tmp_path: Path, broken: str, caplog: pytest.LogCaptureFixture
) -> None:
    models_dir = tmp_path / "models"
    build_run(models_dir / "default", seed=0)
    build_run(models_dir / "served", seed=2)
    with TestClient(create_app(settings_for(models_dir=models_dir))) as client:
        serving = post(client, "/generate", model="served", max_words=1)["model"]
        manifest = write_nested_manifest(models_dir / broken)
        build_run(models_dir / "default", seed=1)  # a good commit to another model
        with caplog.at_level(logging.WARNING, logger="app"):
            changes = {change.name: change for change in check_now(client)}
            assert check_now(client) == []  # the same manifest is not tried again
        assert changes["default"].outcome == "reloaded"
        assert post(client, "/generate", max_words=2)["model"] == changes["default"].detail
        assert changes[broken].outcome == "refused"
        [record] = [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert str(manifest) in record.getMessage()
        assert "nested too deeply" in record.getMessage()
        assert "\n" not in record.getMessage()
        assert reload_failures(client, broken) == 1
        assert post(client, "/generate", model="served", max_words=1)["model"] == serving
        ids = [card["id"] for card in client.get("/v1/models").json()["data"]]
        assert ids == ["default", "served"]


def test_a_training_run_becomes_a_model_with_its_first_weights(
    client: TestClient, models_dir: Path
) -> None:
    run_dir = build_run(models_dir / "training", seed=5)
    header = {**checkpoint.read_manifest(run_dir), "weights": None}  # before a first evaluation
    checkpoint.atomic_write_text(run_dir / "manifest.json", json.dumps(header))
    assert check_now(client) == []
    assert client.post("/generate", json={"model": "training"}).status_code == 404
    build_run(run_dir, seed=6)
    [change] = check_now(client)
    assert (change.name, change.outcome) == ("training", "added")


def test_a_session_survives_a_reload_with_the_same_shapes_and_not_others(
    client: TestClient, models_dir: Path
) -> None:
    session = post(client, "/sessions", seed_words="I can")["session_id"]
    build_run(models_dir / "default", seed=1)
    [same_shapes] = check_now(client)
    continued = post(client, "/generate", session_id=session, max_words=2)
    assert continued["model"] == same_shapes.detail

    build_run(models_dir / "default", seed=1, hidden_dim=16)
    [other_shapes] = check_now(client)
    assert other_shapes.outcome == "reloaded"
    for path in ("/generate", "/next-words"):
        refused = client.post(path, json={"session_id": session})
        assert refused.status_code == 409
        assert "create a new session" in refused.json()["detail"]
        assert refused.json()["errors"][0]["field"] == "session_id"
    assert client.get(f"/sessions/{session}").json()["word_count"] == 4  # still readable
    fresh = post(client, "/sessions", seed_words="I can")["session_id"]
    assert post(client, "/generate", session_id=fresh, max_words=2)["model"] == other_shapes.detail


def test_the_watcher_finds_a_new_checkpoint_by_itself(models_dir: Path) -> None:
    settings = settings_for(models_dir=models_dir, reload_interval_seconds=0.05)
    with TestClient(create_app(settings)) as client:
        serving = client.get("/info").json()["model"]
        build_run(models_dir / "default", seed=1)

        def reloaded() -> str | None:
            version: str = client.get("/v1/models").json()["data"][0]["version"]
            return version if version != serving else None

        version = wait_for(reloaded, "the watcher to load the new checkpoint", timeout=30)
        assert post(client, "/generate", max_words=1)["model"] == version
