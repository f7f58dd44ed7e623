"""The network: every cell and softmax, the lab's default structure, and ModelConfig."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from model_store.network import (
    CELL_STEPS,
    CELLS,
    ConfigError,
    LockedDropout,
    ModelConfig,
    WordRNN,
    adaptive_cutoffs,
    detach_hidden,
    hidden_cat,
    hidden_from_tensors,
    hidden_parts,
    hidden_select,
    hidden_shapes,
    hidden_to_tensors,
    projected_lstm_cell,
    quantized,
    state_shapes,
    top_features,
)

VOCAB = 12
DIM = 16


def make_model(seed: int = 0, **kwargs: Any) -> WordRNN:
    config: dict[str, Any] = {"vocab_size": VOCAB, "embed_dim": DIM, "hidden_dim": DIM}
    config.update(kwargs)
    torch.manual_seed(seed)
    return WordRNN(ModelConfig(**config))


ALL_VARIANTS = pytest.mark.parametrize(
    ("cell", "softmax", "layers"),
    [(c, s, n) for c in CELLS for s in ("full", "adaptive") for n in (1, 2)],
)


# ---------------------------------------------------------------------------------------------
# Every cell x softmax x depth


@ALL_VARIANTS
def test_forward_shapes(cell: str, softmax: str, layers: int) -> None:
    model = make_model(cell=cell, softmax=softmax, layers=layers)
    ids = torch.randint(VOCAB, (3, 5))
    logits, hidden = model(ids)
    expected = [(layers, 3, DIM)] * (2 if cell == "lstm" else 1)
    assert (tuple(logits.shape), hidden_shapes(hidden)) == ((3, 5, VOCAB), expected)


@ALL_VARIANTS
def test_loss_decreases_on_a_repetitive_sequence(cell: str, softmax: str, layers: int) -> None:
    model = make_model(cell=cell, softmax=softmax, layers=layers)
    ids = torch.tensor([list(range(2, VOCAB)) * 4])  # (1, 40)
    inputs, targets = ids[:, :-1], ids[:, 1:]
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    losses = []
    for _ in range(20):
        optimizer.zero_grad()
        features, _ = model.features(inputs)
        loss = model.loss(features, targets)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("layers", [1, 2])
def test_top_features_equal_the_last_output(cell: str, layers: int) -> None:
    # The generator reads the next word's features from the hidden state alone.
    model = make_model(cell=cell, layers=layers, dropout=0.3).eval()
    features, hidden = model.features(torch.randint(VOCAB, (4, 7)))
    torch.testing.assert_close(top_features(hidden), features[:, -1], rtol=0, atol=1e-6)


@pytest.mark.parametrize("softmax", ["full", "adaptive"])
def test_log_probs_are_normalised(softmax: str) -> None:
    model = make_model(softmax=softmax)
    probs = model.log_probs(torch.randn(3, 4, DIM)).exp()  # (3, 4, V)
    torch.testing.assert_close(probs.sum(-1), torch.ones(3, 4))


@pytest.mark.parametrize("softmax", ["full", "adaptive"])
def test_loss_is_the_mean_negative_log_probability(softmax: str) -> None:
    model = make_model(softmax=softmax)
    features, targets = torch.randn(2, 5, DIM), torch.randint(VOCAB, (2, 5))
    picked = model.log_probs(features).gather(-1, targets.unsqueeze(-1))
    torch.testing.assert_close(model.loss(features, targets), -picked.mean())


@pytest.mark.parametrize("cell", CELLS)
def test_init_hidden_is_zeros_on_the_model_dtype(cell: str) -> None:
    model = make_model(cell=cell, layers=2).double()
    hidden = model.init_hidden(3)
    parts = hidden_parts(hidden)
    assert len(parts) == (2 if cell == "lstm" else 1)
    assert all(p.dtype == torch.float64 and p.shape == (2, 3, DIM) for p in parts)
    assert all(not p.any() for p in parts)


# ---------------------------------------------------------------------------------------------
# The lab's structure and weight tying


def test_default_config_is_the_lab_network() -> None:
    model = WordRNN(ModelConfig(vocab_size=100))
    rnn = model.rnn
    assert type(model.embedding) is nn.Embedding
    assert (model.embedding.num_embeddings, model.embedding.embedding_dim) == (100, 64)
    assert type(rnn) is nn.RNN
    assert (rnn.mode, rnn.input_size, rnn.hidden_size, rnn.num_layers) == ("RNN_TANH", 64, 64, 1)
    assert (rnn.batch_first, rnn.bias, rnn.bidirectional) == (True, True, False)
    assert type(model.decoder) is nn.Linear
    assert (model.decoder.in_features, model.decoder.out_features) == (64, 100)
    assert model.adaptive is None


def test_default_config_has_exactly_the_lab_parameters() -> None:
    model = WordRNN(ModelConfig(vocab_size=100))
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    assert shapes == {
        "embedding.weight": (100, 64),
        "rnn.weight_ih_l0": (64, 64),
        "rnn.weight_hh_l0": (64, 64),
        "rnn.bias_ih_l0": (64,),
        "rnn.bias_hh_l0": (64,),
        "decoder.weight": (100, 64),
        "decoder.bias": (100,),
    }


def test_tie_weights_shares_the_embedding_tensor() -> None:
    model = make_model(tie_weights=True)
    assert model.decoder is not None
    assert model.decoder.weight is model.embedding.weight


def test_dropout_keeps_one_mask_along_each_sequence() -> None:
    """In training a row loses the same features at every step, each row its own, and what
    is kept is scaled by 1 / (1 - p); in evaluation nothing is dropped."""
    drop = LockedDropout(0.5).train()
    torch.manual_seed(0)
    x = torch.ones(4, 7, 64)
    y = drop(x)
    assert set(y.unique().tolist()) == {0.0, 2.0}
    assert torch.equal(y, y[:, :1].expand_as(y))  # the same mask at every step
    assert not torch.equal(y[0], y[1])  # another for each row
    assert torch.equal(drop.eval()(x), x)
    assert torch.equal(LockedDropout(0.0).train()(x), x)


# ---------------------------------------------------------------------------------------------
# ModelConfig


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"embed_dim": 8, "hidden_dim": 16, "tie_weights": True}, "tie_weights needs embed_dim"),
        ({"cell": "transformer"}, "cell must be one of rnn_tanh, rnn_relu, lstm, gru"),
        ({"softmax": "adaptive", "tie_weights": True}, "full softmax only"),
        ({"softmax": "adaptive", "cutoffs": (6, 3)}, "cutoffs must increase strictly"),
        ({"softmax": "adaptive", "cutoffs": (3, 3)}, "cutoffs must increase strictly"),
        ({"softmax": "adaptive", "cutoffs": (0, 4)}, "cutoffs must increase strictly"),
        ({"softmax": "adaptive", "cutoffs": (4, VOCAB)}, "cutoffs must increase strictly"),
        ({"softmax": "hierarchical"}, "softmax must be one of"),
        ({"vocab_size": 2}, "vocab_size must be at least 3"),
        ({"layers": 0}, "layers must be at least 1"),
        ({"dropout": 1.0}, "dropout must be in [0, 1)"),
    ],
)
def test_config_error_says_what_is_wrong(kwargs: dict[str, Any], message: str) -> None:
    values: dict[str, Any] = {"vocab_size": VOCAB, "embed_dim": DIM, "hidden_dim": DIM}
    values.update(kwargs)
    with pytest.raises(ConfigError, match=re.escape(message)):
        ModelConfig(**values)


def test_adaptive_cutoffs_follow_the_vocabulary_size() -> None:
    assert (adaptive_cutoffs(100), adaptive_cutoffs(20_000), adaptive_cutoffs(60_000)) == (
        (25,),
        (2_000, 10_000),
        (2_000, 10_000, 40_000),
    )


@pytest.mark.parametrize(
    "config",
    [
        ModelConfig(vocab_size=50),
        ModelConfig(vocab_size=50, cell="lstm", layers=2, dropout=0.25, tie_weights=True),
        ModelConfig(vocab_size=50, cell="gru", softmax="adaptive", cutoffs=(10, 30), div_value=2),
    ],
)
def test_config_json_round_trip(config: ModelConfig) -> None:
    assert ModelConfig.from_json(json.loads(json.dumps(config.to_json()))) == config


def test_config_json_writes_resolved_adaptive_cutoffs() -> None:
    config = ModelConfig(vocab_size=50, softmax="adaptive")
    assert ModelConfig.from_json(config.to_json()).cutoffs == config.resolved_cutoffs() == (12,)


def test_config_from_json_rejects_unknown_keys() -> None:
    data = {**ModelConfig(vocab_size=50).to_json(), "hiden_dim": 32}
    with pytest.raises(ConfigError, match="unknown model config keys: hiden_dim"):
        ModelConfig.from_json(data)


@pytest.mark.parametrize("data", [None, [], {"cell": "gru"}, {"vocab_size": "fifty"}])
def test_config_from_json_rejects_unusable_data(data: Any) -> None:
    with pytest.raises(ConfigError):
        ModelConfig.from_json(data)


@pytest.mark.parametrize(
    ("key", "value"),
    [("embed_dim", "8"), ("layers", 1.5), ("tie_weights", "false"), ("cutoffs", 5)],
)
def test_config_from_json_rejects_wrongly_typed_values(key: str, value: Any) -> None:
    # A config.json edited by hand must fail as a ConfigError, not build a strange network
    # or crash later with a TypeError inside torch.
    data = {**ModelConfig(vocab_size=50, embed_dim=8, hidden_dim=8).to_json(), key: value}
    with pytest.raises(ConfigError):
        ModelConfig.from_json(data)


# ---------------------------------------------------------------------------------------------
# Hidden-state helpers


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_hidden_select_and_cat_rebuild_the_batch(cell: str) -> None:
    model = make_model(cell=cell, layers=2)
    _, hidden = model.features(torch.randint(VOCAB, (3, 4)))
    rebuilt = hidden_cat([hidden_select(hidden, [i]) for i in (0, 1, 2)])
    pairs = zip(hidden_parts(hidden), hidden_parts(rebuilt), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)


def test_detach_hidden_keeps_values_and_cuts_the_graph() -> None:
    model = make_model(cell="lstm")
    _, hidden = model.features(torch.randint(VOCAB, (2, 3)))
    detached = detach_hidden(hidden)
    assert isinstance(hidden, tuple)
    assert isinstance(detached, tuple)
    assert all(d.grad_fn is None for d in detached)
    assert all(torch.equal(d, h) for d, h in zip(detached, hidden, strict=True))


@pytest.mark.parametrize("cell", CELLS)
def test_state_shapes_are_the_shapes_the_cell_returns(cell: str) -> None:
    model = make_model(cell=cell, layers=2)
    _, hidden = model.features(torch.randint(VOCAB, (3, 4)))
    expected = [(2, 3, DIM)] * (2 if cell == "lstm" else 1)
    assert state_shapes(model.config, 3) == hidden_shapes(hidden) == expected


@pytest.mark.parametrize("cell", CELLS)
def test_named_tensors_round_trip_every_cell(cell: str) -> None:
    model = make_model(cell=cell, layers=2)
    _, hidden = model.features(torch.randint(VOCAB, (3, 4)))
    tensors = hidden_to_tensors(hidden)
    assert list(tensors) == (["h", "c"] if cell == "lstm" else ["h"])
    assert all(t.grad_fn is None and t.is_contiguous() for t in tensors.values())
    restored = hidden_from_tensors(tensors)
    assert isinstance(restored, tuple) == isinstance(hidden, tuple)
    pairs = zip(hidden_parts(restored), hidden_parts(hidden), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)


STATE = torch.zeros(2, 1, DIM)


@pytest.mark.parametrize(
    ("tensors", "message"),
    [
        ({}, r"'h', or 'h' and 'c'.*got none"),
        ({"c": STATE}, r"got \['c'\]"),
        ({"h": STATE, "x": STATE}, r"got \['h', 'x'\]"),
        ({"h": STATE, "c": torch.zeros(2, 1, DIM + 1)}, r"h \[2, 1, 16\], c \[2, 1, 17\]"),
        ({"h": torch.zeros(1, DIM)}, r"\(layers, rows, hidden_dim\).*h \[1, 16\]"),
    ],
)
def test_a_malformed_state_is_a_value_error_that_says_why(
    tensors: dict[str, torch.Tensor], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        hidden_from_tensors(tensors)


@pytest.mark.parametrize("layers", [1, 2])
@pytest.mark.parametrize("steps", [1, CELL_STEPS])
@pytest.mark.parametrize("start", ["zeros", "given"])
def test_an_lstm_fed_cell_by_cell_gives_torchs_own_kernel_numbers(
    layers: int, steps: int, start: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A few steps of an LSTM on a CPU go through `torch.lstm_cell`, never the module (whose
    oneDNN kernel costs many steps a call): exactly the numbers of torch's own kernel fed one
    step a call. (Fed several at once, it projects all their inputs in one product, whose
    last bits some CPUs' matrix kernels make depend on the number of rows.)"""
    model = make_model(cell="lstm", layers=layers).eval()
    torch.manual_seed(1)
    inputs = torch.randn(3, steps, DIM)
    given = (torch.randn(layers, 3, DIM), torch.randn(layers, 3, DIM))
    hidden = None if start == "zeros" else given
    with monkeypatch.context() as patched:
        patched.setattr(torch.backends.mkldnn, "enabled", False)
        want = hidden
        for t in range(steps):
            _, want = model.rnn(inputs[:, t : t + 1], want)
        assert want is not None
    with monkeypatch.context() as patched:
        patched.setattr(model.rnn, "forward", _refuse)
        got = model.recur(inputs, hidden)
        ids = torch.tensor([1, 5, 7])
        stepped = model.step(ids, given)
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    fed = model.rnn(model.embedding(ids).unsqueeze(1), given)[1]
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(stepped, fed, strict=True))


@pytest.mark.parametrize("layers", [1, 2])
@pytest.mark.parametrize("steps", [1, CELL_STEPS])
def test_an_input_table_gives_the_numbers_of_the_cells(
    layers: int, steps: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With its input table a frozen LSTM reads the first layer's input projections instead
    of computing them, and its states are those it computes without one (to the last bits,
    which the matrix kernel may give a batch of the vocabulary's size and one of a few rows
    differently)."""
    model = make_model(cell="lstm", layers=layers).eval()
    torch.manual_seed(1)
    ids = torch.randint(VOCAB, (3, steps))
    given = (torch.randn(layers, 3, DIM), torch.randn(layers, 3, DIM))
    want = model.feed(ids, given)
    assert model._input_table is None
    assert model.tabulate_inputs()
    assert model._input_table is not None
    assert model._input_table.gates.shape == (VOCAB, 4 * DIM)
    with monkeypatch.context() as patched:
        patched.setattr(model.rnn, "forward", _refuse)
        got = model.feed(ids, given)
        stepped = model.step(ids[:, 0], given)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(got, want, strict=True))
    first = model.feed(ids[:, :1], given)
    assert all(torch.equal(a, b) for a, b in zip(stepped, first, strict=True))


def test_a_projected_cell_is_torchs_cell_to_the_last_bit() -> None:
    """Given the projection `torch.lstm_cell` makes of its input, the table's cell runs its
    operations in its order: the same numbers."""
    model = make_model(cell="lstm").eval()
    w_ih, w_hh, b_ih, b_hh = model.rnn.all_weights[0]
    torch.manual_seed(2)
    x, h, c = torch.randn(5, DIM), torch.randn(5, DIM), torch.randn(5, DIM)
    with torch.no_grad():
        want = torch.lstm_cell(x, (h, c), w_ih, w_hh, b_ih, b_hh)
        got = projected_lstm_cell(F.linear(x, w_ih, b_ih), (h, c), w_hh, b_hh)
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))


def test_changing_the_weights_retires_the_input_table() -> None:
    """A table made before an optimizer step would feed the old weights: after any in-place
    change of the weights it came from, the model computes again and drops it."""
    model = make_model(cell="lstm").eval()
    model.tabulate_inputs()
    ids = torch.randint(VOCAB, (3, 2))
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    model(ids)[0].sum().backward()
    optimizer.step()
    model.eval()
    with torch.no_grad():
        got = model.feed(ids)
        want = model.recur(model.embedding(ids))
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    assert model._input_table is None


@pytest.mark.parametrize(
    ("cell", "max_bytes", "quantize", "made"),
    [
        ("lstm", VOCAB * 4 * DIM * 4, False, True),
        ("lstm", VOCAB * 4 * DIM * 4 - 1, False, False),
        ("lstm", 2**20, True, True),  # an int8 LSTM reads its input projections too
        ("gru", 2**20, False, False),
        ("rnn_tanh", 2**20, False, False),
    ],
)
def test_only_an_lstm_whose_table_fits_has_one(
    cell: str, max_bytes: int, quantize: bool, made: bool
) -> None:
    model = make_model(cell=cell).eval()
    if quantize:
        model = quantized(model)
    assert model.tabulate_inputs(max_bytes) is made
    assert (model._input_table is not None) is made


def test_weights_made_in_inference_mode_get_no_table() -> None:
    """Their changes cannot be told (they keep no change counter): no table to go stale."""
    with torch.inference_mode():
        model = make_model(cell="lstm").eval()
        assert not model.tabulate_inputs()
        assert model.step(torch.tensor([1, 2]), model.init_hidden(2))[0].shape == (1, 2, DIM)


@pytest.mark.parametrize("cell", CELLS)
def test_the_module_feeds_what_cells_do_not(cell: str) -> None:
    """Long sequences, a model in training (its dropout between layers) and the cells
    without a oneDNN kernel are fed by the module itself."""
    model = make_model(cell=cell, layers=2, dropout=0.5)
    torch.manual_seed(2)
    long = torch.randn(2, CELL_STEPS + 1, DIM)
    for inputs, training in ((long, False), (long[:, :1], True)):
        model.train(training)
        torch.manual_seed(3)
        got, calls = _recur_counting(model, inputs)
        torch.manual_seed(3)
        want = model.rnn(inputs)[1]
        assert calls == 1
        pairs = zip(hidden_parts(got), hidden_parts(want), strict=True)
        assert all(torch.equal(a, b) for a, b in pairs)
    model.eval()
    assert _recur_counting(model, long[:, :1])[1] == (0 if cell == "lstm" else 1)


def _recur_counting(model: WordRNN, inputs: torch.Tensor) -> tuple[Any, int]:
    """``model.recur(inputs)`` and how many times it called the module."""
    calls: list[object] = []
    hook = model.rnn.register_forward_hook(lambda *_: calls.append(None))
    try:
        return model.recur(inputs), len(calls)
    finally:
        hook.remove()


def _refuse(*args: object, **kwargs: object) -> None:
    raise AssertionError("the module was called")
