"""Serving and scoring with int8 weights (``WORDRNN_QUANTIZE=int8``, ``--quantize int8``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import get_args

import pytest
import torch
from fastapi.testclient import TestClient

from app.main import create_app
from app.settings import Settings
from model_store import checkpoint
from model_store.network import QUANTIZATIONS
from model_store.scoring import token_log_probs
from tests.app_helpers import settings_for
from tests.conftest import TINY_TEXT, MakeRun, build_run
from training import evaluate


@pytest.fixture(scope="module")
def lstm_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_run(tmp_path_factory.mktemp("q") / "run", cell="lstm", embed_dim=16, hidden_dim=32)


def test_int8_weights_score_nearly_as_float32(lstm_run: Path) -> None:
    exact, int8 = checkpoint.load(lstm_run), checkpoint.load(lstm_run, "cpu", "int8")
    assert type(int8.model.rnn).__module__.startswith("torch.ao.nn.quantized")
    assert exact.model.rnn.weight_ih_l0.dtype == torch.float32  # the float model is untouched
    ids = exact.vocab.encode(exact.vocab.tokenize(TINY_TEXT))
    with torch.inference_mode():
        want = token_log_probs(exact.model, exact.vocab, ids)
        got = token_log_probs(int8.model, exact.vocab, ids)
    assert float(got.sum()) == pytest.approx(float(want.sum()), rel=0.01)
    assert float(got.sum()) != float(want.sum())  # it did change the weights


def test_a_server_with_int8_weights_generates_and_says_so(lstm_run: Path) -> None:
    with TestClient(create_app(settings_for(lstm_run, quantize="int8"))) as client:
        assert client.get("/info").json()["quantize"] == "int8"
        out = client.post("/generate", json={"seed_words": "I can", "max_words": 8})
        assert out.status_code == 200, out.text
        assert len(out.json()["words"]) == 8


def test_int8_is_for_the_cpu_only(make_run: MakeRun) -> None:
    with pytest.raises(checkpoint.DeviceError, match="runs on the CPU only"):
        checkpoint.load(make_run(), torch.device("meta"), "int8")
    with pytest.raises(ValueError, match="quantize must be one of off, int8"):
        checkpoint.load(make_run(), "cpu", "int4")


def test_evaluate_reports_the_int8_figures(
    lstm_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = tmp_path / "held-out.txt"
    text.write_text(TINY_TEXT, encoding="utf-8")
    figures = {}
    for quantize in ("off", "int8"):
        argv = [str(lstm_run), "--text", str(text), "--json", "--quantize", quantize]
        assert evaluate.main(argv) == 0
        figures[quantize] = json.loads(capsys.readouterr().out)["bits_per_char"]
    assert figures["int8"] == pytest.approx(figures["off"], rel=0.01)


def test_the_setting_offers_exactly_the_quantizations_the_loader_knows() -> None:
    assert get_args(Settings.model_fields["quantize"].annotation) == QUANTIZATIONS


def test_int8_rows_move_with_the_rows_that_share_their_step(lstm_run: Path) -> None:
    """The README's caveat: int8 inputs are quantized with the whole step's batch, so a row's
    scores depend on the rows beside it (a `random_seed` reproduces a text only when it ran
    alone); float32 rows do not."""
    moved = {}
    for quantize in ("off", "int8"):
        model = checkpoint.load(lstm_run, "cpu", quantize).model
        row = torch.linspace(-1, 1, model.config.hidden_dim).unsqueeze(0)
        with torch.inference_mode():
            alone = model.logits(row)
            beside = model.logits(torch.cat([row, 40 * row.flip(1)]))[:1]
        moved[quantize] = float((alone - beside).abs().max())
    assert moved["off"] < 1e-5
    assert moved["int8"] > 1e-3
