"""Several models in one server: chosen by ``model``, the default otherwise, listed with cards."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError

from app.__main__ import build_settings, main, parse_args
from app.errors import StartupError
from app.main import create_app
from app.settings import Settings
from model_store import checkpoint
from tests.app_helpers import Replay, write_nested_manifest
from tests.conftest import build_run

POEMS = "Roses are red, violets are blue.\nSugar is sweet, and so are you.\n" * 4


def models_settings(models_dir: Path, **overrides: Any) -> Settings:
    return Settings(
        models_dir=models_dir, **{"device": "cpu", "reload_interval_seconds": 0, **overrides}
    )


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("models")
    build_run(root / "default", seed=0)
    build_run(root / "poems", text=POEMS, seed=1, hidden_dim=12)
    (root / "notes").mkdir()  # no manifest.json: not a model
    return root


@pytest.fixture(scope="module")
def client(models_dir: Path) -> Iterator[TestClient]:
    with TestClient(create_app(models_settings(models_dir))) as client:
        yield client


def post(client: TestClient, path: str, **body: Any) -> dict[str, Any]:
    response = client.post(path, json=body)
    assert response.status_code in (200, 201), response.text
    return response.json()  # type: ignore[no-any-return]


def test_each_model_is_chosen_by_its_name_and_the_default_otherwise(
    client: TestClient, models_dir: Path
) -> None:
    body = {"seed_words": "are", "max_words": 6, "temperature": 0, "random_seed": 1}
    poems = post(client, "/generate", model="poems", **body)
    default = post(client, "/generate", **body)
    assert poems["model"].startswith("poems-")
    assert default["model"].startswith("default-")
    assert poems["words"] == Replay(models_dir / "poems").greedy(["are"], 6)
    assert default["words"] == Replay(models_dir / "default").greedy(["are"], 6)
    assert post(client, "/generate", model="default", **body) == default


def test_every_model_endpoint_takes_model(client: TestClient) -> None:
    assert post(client, "/next-words", model="poems", seed_words="roses")["model"].startswith(
        "poems-"
    )
    assert post(client, "/score", model="poems", text="roses are red")["model"].startswith("poems-")
    assert post(client, "/sessions", model="poems")["model"].startswith("poems-")
    info = client.get("/info", params={"model": "poems"}).json()
    assert info["name"] == "poems"
    assert info["architecture"]["hidden_dim"] == 12
    assert client.get("/info").json()["name"] == "default"


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("POST", "/generate", {"model": "nope"}),
        ("POST", "/next-words", {"model": "nope"}),
        ("POST", "/score", {"model": "nope", "text": "I"}),
        ("POST", "/sessions", {"model": "nope"}),
        ("GET", "/info?model=nope", None),
        ("GET", "/sessions/some-id?model=nope", None),
    ],
)
def test_an_unknown_model_is_a_404_that_lists_the_models(
    client: TestClient, method: str, path: str, body: dict[str, Any] | None
) -> None:
    response = client.request(method, path, json=body)
    assert response.status_code == 404
    error = response.json()
    assert "'nope'" in error["detail"]
    assert error["errors"][0]["field"] == "model"
    assert "'default', 'poems'" in error["errors"][0]["message"]


def test_v1_models_lists_every_model_with_its_card(client: TestClient) -> None:
    sdk = openai.OpenAI(
        base_url="http://testserver/v1", api_key="unused", http_client=client, max_retries=0
    )
    listed = sdk.models.list().data
    assert [m.id for m in listed] == ["default", "poems"]  # the default first
    cards = {m.id: m.model_dump() for m in listed}
    poems = cards["poems"]
    info = client.get("/info", params={"model": "poems"}).json()
    assert poems["owned_by"] == "wordrnn"
    assert poems["version"] == info["model"]
    assert (poems["cell"], poems["layers"], poems["hidden_dim"]) == ("rnn_tanh", 1, 12)
    assert poems["vocab_size"] == info["vocab_size"]
    assert poems["parameters"] == info["parameters"]
    assert poems["loaded_at"] > 0
    assert (poems["default"], cards["default"]["default"]) == (False, True)
    assert sdk.models.retrieve("poems").id == "poems"
    assert sdk.models.retrieve(info["model"]).id == "poems"  # by its weights id too

    completion = sdk.completions.create(model="poems", prompt="roses", max_tokens=3, seed=1)
    assert completion.model == "poems"
    assert completion.system_fingerprint == info["model"]
    with pytest.raises(openai.NotFoundError) as caught:
        sdk.completions.create(model="nope", prompt="I", max_tokens=1)
    assert isinstance(caught.value.body, dict)
    assert caught.value.body["code"] == "model_not_found"
    assert "'default', 'poems'" in caught.value.body["message"]


def test_a_session_continues_only_on_the_model_that_created_it(client: TestClient) -> None:
    session = post(client, "/sessions", model="poems", seed_words="roses are")["session_id"]
    elsewhere = client.post("/generate", json={"session_id": session, "max_words": 2})
    assert elsewhere.status_code == 404
    assert "model 'default'" in elsewhere.json()["detail"]
    continued = post(client, "/generate", model="poems", session_id=session, max_words=2)
    assert continued["session_id"] == session
    shown = client.get(f"/sessions/{session}", params={"model": "poems"})
    assert shown.status_code == 200
    assert shown.json()["word_count"] == 4
    assert client.get(f"/sessions/{session}").status_code == 404
    assert client.delete(f"/sessions/{session}", params={"model": "poems"}).status_code == 204


def test_metrics_label_each_model(client: TestClient) -> None:
    post(client, "/generate", model="poems", max_words=2)
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(client.get("/metrics").text)
        for sample in family.samples
    }
    infos = {dict(labels)["model"] for name, labels in samples if name == "wordrnn_model_info"}
    assert infos == {"default", "poems"}
    for model in ("default", "poems"):
        labels = (("model", model),)
        assert samples[("wordrnn_engine_steps_total", labels)] > 0
        assert samples[("wordrnn_model_reload_failures_total", labels)] == 0


# -- which model is the default ---------------------------------------------------------------


def test_default_model_picks_the_default(models_dir: Path) -> None:
    settings = models_settings(models_dir, default_model="poems")
    with TestClient(create_app(settings)) as client:
        assert client.get("/info").json()["name"] == "poems"
        assert client.get("/readyz").json()["model"].startswith("poems-")


def test_the_only_model_is_the_default(tmp_path: Path) -> None:
    build_run(tmp_path / "solo")
    with TestClient(create_app(models_settings(tmp_path))) as client:
        assert post(client, "/generate", max_words=1)["model"].startswith("solo-")


@pytest.mark.parametrize(
    ("names", "default", "message"),
    [
        (["a", "b"], None, "several models ('a', 'b') and no default; pass --default-model"),
        (["a", "b"], "c", "no model 'c' to be the default (found 'a', 'b')"),
        ([], None, "holds no run folder"),
    ],
)
def test_start_up_stops_when_the_default_is_unclear(
    tmp_path: Path, names: list[str], default: str | None, message: str
) -> None:
    for name in names:
        build_run(tmp_path / name)
    app = create_app(models_settings(tmp_path, default_model=default))
    with pytest.raises(StartupError, match=re.escape(message)), TestClient(app):
        pass


def test_the_command_line_reports_a_models_folder_without_models(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--models-dir", str(tmp_path), "--device", "cpu"]) == 1
    last = capsys.readouterr().err.splitlines()[-1]
    assert last == f"error: {tmp_path}: holds no run folder (a subfolder with manifest.json)"


def test_a_bad_checkpoint_among_the_models_stops_start_up(tmp_path: Path) -> None:
    build_run(tmp_path / "default")
    bad = build_run(tmp_path / "bad")
    weights = bad / checkpoint.read_manifest(bad)["weights"]
    weights.write_bytes(b"not weights")
    app = create_app(models_settings(tmp_path))
    with pytest.raises(StartupError, match=re.escape(f"{weights}: corrupt")), TestClient(app):
        pass


def test_a_manifest_that_cannot_be_read_skips_its_folder_and_the_others_start(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    build_run(tmp_path / "default")
    build_run(tmp_path / "poems", text=POEMS, seed=1)
    manifest = write_nested_manifest(tmp_path / "nested")
    app = create_app(models_settings(tmp_path))
    with caplog.at_level(logging.WARNING, logger="app"), TestClient(app) as client:
        assert [card["id"] for card in client.get("/v1/models").json()["data"]] == [
            "default",
            "poems",
        ]
        assert post(client, "/generate", model="poems", max_words=2)["model"].startswith("poems-")
        assert client.post("/generate", json={"model": "nested"}).status_code == 404
    [record] = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert str(manifest) in record.getMessage()
    assert "nested too deeply" in record.getMessage()
    assert "\n" not in record.getMessage()
    assert record.exc_info is None  # no traceback


def test_the_command_line_names_the_manifest_it_cannot_read_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest = write_nested_manifest(tmp_path / "nested")
    assert main(["--models-dir", str(tmp_path), "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == (
        f"error: {tmp_path}: holds no run folder (a subfolder with manifest.json); "
        f"cannot read {manifest}"
    )
    assert "Traceback" not in err


def test_flags_and_settings_for_several_models(tmp_path: Path) -> None:
    args = parse_args(
        ["--models-dir", "m", "--default-model", "poems", "--reload-interval-seconds", "0.5"]
    )
    settings = build_settings(args)
    assert settings.models_dir == Path("m")
    assert settings.model_dir is None
    assert (settings.default_model, settings.reload_interval_seconds) == ("poems", 0.5)
    assert Settings(model_dir=Path("r")).reload_interval_seconds == 5
    with pytest.raises(ValidationError, match="not both"):
        Settings(model_dir=tmp_path, models_dir=tmp_path)
    with pytest.raises(ValidationError, match="reload_interval_seconds"):
        Settings(model_dir=tmp_path, reload_interval_seconds=-1)
