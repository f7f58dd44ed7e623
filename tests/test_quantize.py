"""Serving and scoring with int8 weights (``WORDRNN_QUANTIZE=int8``, ``--quantize int8``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import get_args

import pytest
import torch
from fastapi.testclient import TestClient
from torch import nn

from app.main import create_app
from app.settings import Settings
from model_store import checkpoint
from model_store.network import QUANTIZATIONS, Int8Linear, Int8LSTM, ModelConfig, WordRNN, quantized
from model_store.sampling import feed
from model_store.scoring import token_log_probs
from tests.app_helpers import settings_for
from tests.conftest import TINY_TEXT, MakeRun, build_run
from training import evaluate


@pytest.fixture(scope="module")
def lstm_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_run(tmp_path_factory.mktemp("q") / "run", cell="lstm", embed_dim=16, hidden_dim=32)


def test_int8_weights_score_nearly_as_float32(lstm_run: Path) -> None:
    exact, int8 = checkpoint.load(lstm_run), checkpoint.load(lstm_run, "cpu", "int8")
    assert isinstance(int8.model.decoder, Int8Linear)
    assert isinstance(int8.model.rnn, Int8LSTM)
    assert int8.model._input_table is not None  # its steps read their input projections
    assert exact.model.decoder.weight.dtype == torch.float32  # the float model is untouched
    ids = exact.vocab.encode(exact.vocab.tokenize(TINY_TEXT))
    with torch.inference_mode():
        want = token_log_probs(exact.model, exact.vocab, ids)
        got = token_log_probs(int8.model, exact.vocab, ids)
    assert float(got.sum()) == pytest.approx(float(want.sum()), rel=0.01)
    assert float(got.sum()) != float(want.sum())  # it did change the weights


def test_an_int8_layer_is_close_to_its_float_layer_and_keeps_the_shape() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(24, 50)
    layer = Int8Linear(linear.weight, linear.bias)
    assert layer.weight.dtype == torch.int8
    x = torch.randn(2, 3, 24)
    with torch.inference_mode():
        want, got = linear(x), layer(x)
        assert got.shape == want.shape == (2, 3, 50)
        # Off by a few rounding steps of the row's scale and the weights': within 2%.
        assert float((got - want).abs().max()) < 0.02 * float(want.abs().max())
        assert torch.equal(layer(torch.zeros(1, 24)), linear.bias.detach().unsqueeze(0))
        assert layer(torch.zeros(0, 24)).shape == (0, 50)


def test_an_adaptive_softmax_gets_int8_layers_too(tmp_path: Path) -> None:
    run = build_run(tmp_path / "run", cell="gru", softmax="adaptive", cutoffs=(10,))
    int8 = checkpoint.load(run, "cpu", "int8").model
    assert int8.adaptive is not None
    assert not any(type(m) is nn.Linear for m in int8.modules())
    assert any(isinstance(m, Int8Linear) for m in int8.adaptive.modules())
    with torch.inference_mode():
        probs = int8.log_probs(torch.randn(3, int8.config.hidden_dim)).exp().sum(-1)
    torch.testing.assert_close(probs, torch.ones(3))


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


def test_int8_rows_are_the_same_whatever_rows_share_their_step(lstm_run: Path) -> None:
    """Each row is quantized by itself and summed in integers, so that a `random_seed` gives
    the same words beside other requests as alone (`tests/test_engine.py` checks the texts):
    a row's scores are the same bits alone and beside others, whatever their size."""
    model = checkpoint.load(lstm_run, "cpu", "int8").model
    row = torch.linspace(-1, 1, model.config.hidden_dim).unsqueeze(0)
    others = torch.randn(75, model.config.hidden_dim, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        alone = model.logits(row)
        for before, after in ((0, 1), (70, 5)):  # the row at 0 of 2, at 70 of 76
            beside = torch.cat([40 * others[:before], row, 40 * others[before : before + after]])
            assert torch.equal(model.logits(beside)[before : before + 1], alone)


def _int8_lstm(layers: int) -> tuple[WordRNN, WordRNN]:
    """A float LSTM and its int8 copy (with an input table), 32 units a layer."""
    torch.manual_seed(layers)
    config = ModelConfig(vocab_size=40, cell="lstm", embed_dim=16, hidden_dim=32, layers=layers)
    exact = WordRNN(config).eval()
    int8 = WordRNN(config).eval()
    int8.load_state_dict(exact.state_dict())
    int8 = quantized(int8)
    assert int8.tabulate_inputs()
    return exact, int8


@pytest.mark.parametrize("layers", [1, 2])
def test_an_int8_lstm_state_is_the_same_bits_whichever_way_it_is_fed(layers: int) -> None:
    """A step, a seed read from the input table, seeds of several lengths packed together,
    the module and a text to score all give a row the same state, alone or beside others:
    the engine's words for a `random_seed` do not depend on how its seed was fed or what
    shared its steps."""
    exact, int8 = _int8_lstm(layers)
    seeds = [[1, 2, 3, 4, 5], [6, 7], [8, 9, 10]]
    with torch.inference_mode():
        packed = feed(int8, seeds)  # several lengths: the packed path
        for row, seed in enumerate(seeds):
            ids = torch.tensor([seed])
            alone = feed(int8, [seed])  # the table's path
            module = int8.rnn(int8.embedding(ids))[1]
            scored, state = int8.features(ids)
            for part in range(2):
                assert torch.equal(packed[part][:, row : row + 1], alone[part])
                assert torch.equal(module[part], alone[part])
                assert torch.equal(state[part], alone[part])
            assert torch.equal(scored[:, -1], alone[0][-1])
        states = feed(int8, [[1, 2, 3]] * 6)
        states = (states[0] * torch.arange(1, 7).view(1, 6, 1), states[1])
        words = torch.tensor([3, 4, 5, 6, 7, 8])
        batched = int8.step(words, states)
        for row in range(6):
            one = int8.step(words[row : row + 1], tuple(s[:, row : row + 1] for s in states))
            for together, alone in zip(batched, one, strict=True):
                assert torch.equal(together[:, row : row + 1], alone)
        # Close to the float cell's, off by rounding steps of the weights and the rows.
        want, got = feed(exact, seeds)[0], packed[0]
        assert float((got - want).abs().max()) < 0.02 * float(want.abs().max())
