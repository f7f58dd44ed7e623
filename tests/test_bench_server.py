"""``bench/server.py``: which run the serving benchmarks serve."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from bench import server
from tests.conftest import build_run
from training import config


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    server.add_model_args(parser)
    return parser.parse_args(argv)


def test_a_run_dir_must_hold_a_run(tmp_path: Path) -> None:
    with pytest.raises(server.BenchError, match="holds no run"):
        server.model_dir(parse("--run-dir", str(tmp_path)))
    (tmp_path / "manifest.json").write_text("{}")
    assert server.model_dir(parse("--run-dir", str(tmp_path))) == tmp_path


def test_each_model_is_cached_under_its_preset(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(server, "CACHE", tmp_path)
    monkeypatch.setattr(server, "DEFAULT_RUN", tmp_path / "no-run")
    for model, preset in (("default", server.SERVE_PRESET), ("small", "lab")):
        training = {**config.preset(preset).to_json(), "max_minutes": 5.0}
        build_run(tmp_path / f"bench-{preset}", training=training)
        assert server.model_dir(parse("--model", model)) == tmp_path / f"bench-{preset}"
    assert server.MODELS["small"][0] == "lab"  # the lab's tanh RNN 64


def test_a_model_trained_with_other_settings_is_not_reused(tmp_path: Path) -> None:
    training = {**config.preset("subword").to_json(), "max_minutes": 5.0}
    assert server._trained_as(build_run(tmp_path / "same", training=training), "subword")
    training["cache_order"] = 0  # the preset before its text cache
    assert not server._trained_as(build_run(tmp_path / "older", training=training), "subword")
