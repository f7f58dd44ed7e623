"""``bench/server.py``: which run the serving benchmarks serve."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from bench import server


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
        (tmp_path / f"bench-{preset}").mkdir()
        (tmp_path / f"bench-{preset}" / "manifest.json").write_text("{}")
        assert server.model_dir(parse("--model", model)) == tmp_path / f"bench-{preset}"
    assert server.MODELS["small"][0] == "lab"  # the lab's tanh RNN 64
