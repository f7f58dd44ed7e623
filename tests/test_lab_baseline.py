"""The lab's loop kept as the benchmark baseline: its data layout, training, sampling and CLI."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from bench import lab_baseline as lab
from model_store.network import ModelConfig, WordRNN
from tests.conftest import TINY_TEXT

N_WORDS = len(TINY_TEXT.split())
N_VOCAB = len(set(TINY_TEXT.split()))
SMALL = {"seq_size": 5, "batch_size": 2, "embedding_size": 16, "rnn_size": 16}


@pytest.fixture
def words(tmp_path: Path) -> list[str]:
    path = tmp_path / "lab.txt"
    path.write_text(TINY_TEXT, encoding="utf-8")
    return lab.load_words(path)


@pytest.fixture(scope="module")
def trained() -> dict[str, Any]:
    return lab.train(
        TINY_TEXT.split(), epochs=8, device="cpu", seed=0, print_every=0, predict_every=0, **SMALL
    )


# ---------------------------------------------------------------------------------------------
# Data


def test_load_words_is_the_lab_split(words: list[str]) -> None:
    assert words == TINY_TEXT.split()


def test_build_vocab_sorts_by_frequency_then_first_appearance() -> None:
    int_to_vocab, vocab_to_int = lab.build_vocab(["b", "a", "a", "c", "b", "d", "a"])
    assert int_to_vocab == {0: "a", 1: "b", 2: "c", 3: "d"}
    assert vocab_to_int == {"a": 0, "b": 1, "c": 2, "d": 3}


def test_make_arrays_lays_out_rows_and_shifted_targets() -> None:
    in_text, out_text = lab.make_arrays(list(range(50)), batch_size=2, seq_size=3)
    assert in_text.tolist() == [list(range(24)), list(range(24, 48))]
    assert out_text.tolist() == [list(range(1, 25)), [*range(25, 48), 0]]


def test_get_batches_yields_consecutive_windows() -> None:
    in_text, out_text = lab.make_arrays(list(range(50)), batch_size=2, seq_size=3)
    windows = list(lab.get_batches(in_text, out_text, batch_size=2, seq_size=3))
    assert len(windows) == 8
    assert windows[0][0].tolist() == [[0, 1, 2], [24, 25, 26]]
    assert windows[0][1].tolist() == [[1, 2, 3], [25, 26, 27]]
    assert windows[-1][0].tolist() == [[21, 22, 23], [45, 46, 47]]
    assert windows[-1][1].tolist() == [[22, 23, 24], [46, 47, 0]]


def test_make_arrays_rejects_a_text_shorter_than_one_batch() -> None:
    with pytest.raises(ValueError, match="fewer than one batch"):
        lab.make_arrays(list(range(5)), batch_size=2, seq_size=3)


# ---------------------------------------------------------------------------------------------
# Network


def test_rnn_module_shapes() -> None:
    net = lab.RNNModule(n_vocab=30, seq_size=4, embedding_size=8, rnn_size=6)
    state = net.zero_state(3)
    logits, new_state = net(torch.randint(30, (3, 4)), state)
    assert (tuple(logits.shape), tuple(new_state.shape)) == ((3, 4, 30), (1, 3, 6))
    assert not state.any()


def test_lab_weights_give_the_same_logits_in_the_projects_network() -> None:
    # The project's default ModelConfig is the lab's network: same tensors, same outputs.
    torch.manual_seed(0)
    net = lab.RNNModule(n_vocab=40, seq_size=20, embedding_size=64, rnn_size=64)
    model = WordRNN(ModelConfig(vocab_size=40))
    renamed = {k.replace("dense.", "decoder."): v for k, v in net.state_dict().items()}
    model.load_state_dict(renamed)
    ids = torch.randint(40, (2, 7))
    with torch.no_grad():
        expected, _ = net(ids, net.zero_state(2))
        got, _ = model(ids)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# Training


def test_train_reduces_the_loss(trained: dict[str, Any]) -> None:
    losses = trained["losses"]
    assert np.mean(losses[-4:]) < 0.5 * np.mean(losses[:4])


def test_train_reports_its_work(trained: dict[str, Any]) -> None:
    batches = N_WORDS // 10
    assert trained["batches_per_epoch"] == batches
    assert trained["iterations"] == 8 * batches
    assert trained["words_processed"] == 8 * batches * 2 * 5
    assert trained["words_per_second"] == pytest.approx(
        trained["words_processed"] / trained["seconds"]
    )
    assert (trained["stopped_by"], trained["final_loss"]) == ("epochs", trained["losses"][-1])


def test_max_iterations_stops_training(words: list[str]) -> None:
    result = lab.train(words, max_iterations=3, device="cpu", print_every=0, **SMALL)
    assert (result["iterations"], result["stopped_by"]) == (3, "max_iterations")


def test_max_seconds_zero_stops_after_one_iteration(words: list[str]) -> None:
    result = lab.train(words, max_seconds=0, device="cpu", print_every=0, **SMALL)
    assert (result["iterations"], result["stopped_by"]) == (1, "max_seconds")


def test_train_prints_the_labs_loss_lines_and_samples(words: list[str]) -> None:
    lines: list[str] = []
    lab.train(
        words,
        epochs=2,
        device="cpu",
        seed=0,
        print_every=5,
        predict_every=10,
        log=lines.append,
        **SMALL,
    )
    assert lines[0] == f"Vocabulary size {N_VOCAB}"
    assert lines[1].startswith("Epoch: 0/2 Iteration: 5 Loss: ")
    assert lines[3].startswith("I can ")
    assert len(lines[3].split()) == 2 + lab.PREDICT_WORDS


def test_train_rejects_initial_words_outside_the_vocabulary(words: list[str]) -> None:
    with pytest.raises(ValueError, match="'Zebra'"):
        lab.train(words, initial_words=["I", "Zebra"], device="cpu", **SMALL)


# ---------------------------------------------------------------------------------------------
# Predicting


def test_predict_returns_the_seed_then_words_of_the_vocabulary(trained: dict[str, Any]) -> None:
    seed = ["I", "can"]
    out = lab.predict(
        "cpu",
        trained["net"],
        seed,
        trained["vocab_size"],
        trained["vocab_to_int"],
        trained["int_to_vocab"],
        rng=np.random.default_rng(0),
    )
    assert (out[:2], len(out), seed) == (["I", "can"], 2 + lab.PREDICT_WORDS, ["I", "can"])
    assert set(out) <= set(trained["vocab_to_int"])


def test_predict_picks_among_the_top_k(trained: dict[str, Any]) -> None:
    net, vocab_to_int = trained["net"], trained["vocab_to_int"]
    out = lab.predict(
        "cpu",
        net,
        ["the"],
        trained["vocab_size"],
        vocab_to_int,
        trained["int_to_vocab"],
        top_k=3,
        n_words=10,
        rng=np.random.default_rng(1),
    )
    ids = [vocab_to_int[w] for w in out]
    with torch.no_grad():
        logits, _ = net(torch.tensor([ids]), net.zero_state(1))  # (1, T, V)
    for position in range(len(ids) - 1):
        assert ids[position + 1] in torch.topk(logits[0, position], 3).indices.tolist()


# ---------------------------------------------------------------------------------------------
# CLI and independence


def test_main_trains_and_prints_a_summary(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "lab.txt"
    path.write_text(TINY_TEXT, encoding="utf-8")
    argv = [str(path), "--epochs", "1", "--seq-size", "5", "--batch-size", "2", "--device", "cpu"]
    assert lab.main([*argv, "--print-every", "4", "--seed", "0", "--json"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"Vocabulary size {N_VOCAB}"
    assert out[1].startswith("Epoch: 0/1 Iteration: 4 Loss: ")
    assert "words/s on cpu" in out[-2]
    assert f'"iterations": {N_WORDS // 10},' in out[-1]


def test_main_rejects_a_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        lab.main([str(tmp_path / "missing.txt")])
    assert info.value.code == 2
    assert "cannot read" in capsys.readouterr().err


def test_the_baseline_imports_nothing_from_the_project() -> None:
    tree = ast.parse(Path(lab.__file__).read_text(encoding="utf-8"))
    imported = {
        name.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.Import | ast.ImportFrom)
        for name in (
            [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
        )
    }
    assert not imported & {"model_store", "training", "app"}
