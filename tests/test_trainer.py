"""The training loop: it learns, it is reproducible, it resumes exactly, it stops cleanly."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

import training.trainer as trainer_module
from model_store import checkpoint, sampling
from model_store.vocab import TokenizerSpec
from training.config import TrainConfig
from training.corpus import Corpus, Document
from training.data import build_dataset
from training.trainer import SilentReporter, Summary, Trainer, TrainingDiverged

CYCLE = "the quick brown fox jumps over the lazy dog .\n" * 120


def make_trainer(
    run_dir: Path, text: str = CYCLE, start: bool = True, **overrides: object
) -> Trainer:
    settings: dict[str, object] = {
        "embed_dim": 16,
        "hidden_dim": 16,
        "epochs": 2,
        "batch_size": 4,
        "seq_size": 8,
        "sample_every": 0,
        "log_every": 5,
    }
    settings.update(overrides)
    config = TrainConfig(**settings)  # type: ignore[arg-type]
    dataset = build_dataset(
        Corpus((Document("cycle", text),)),
        TokenizerSpec(config.tokenizer, config.lowercase),  # type: ignore[arg-type]
        batch_size=config.batch_size,
        subword_vocab=300,
        seq_size=config.seq_size,
        valid_fraction=config.valid_fraction,
        min_count=config.min_count,
    )
    trainer = Trainer(config, dataset, run_dir, torch.device("cpu"))
    if start:
        trainer.start_new()
    return trainer


def resume_trainer(run_dir: Path, **overrides: object) -> Trainer:
    _, training, _, _ = checkpoint.read_header(run_dir)
    settings = {**training, "seed_words": tuple(training["seed_words"]), **overrides}
    trainer = make_trainer(run_dir, start=False, **settings)
    tensors, state = checkpoint.load_resume(run_dir)
    trainer.restore(tensors, state)
    return trainer


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    tensors, _ = checkpoint.load_resume(run_dir)
    return {k: v for k, v in tensors.items() if k.startswith(("model.", "optim.", "average."))}


def test_learns_a_regular_text_to_perplexity_near_one(tmp_path: Path) -> None:
    summary = make_trainer(tmp_path / "run", epochs=6, cell="lstm").run()
    assert summary.best_valid_ppl is not None
    assert summary.best_valid_ppl < 1.2
    loaded = checkpoint.load(tmp_path / "run")
    assert loaded.manifest["best_valid_perplexity"] == pytest.approx(summary.best_valid_ppl)


def test_same_seed_gives_identical_weights(tmp_path: Path) -> None:
    make_trainer(tmp_path / "a", dropout=0.2).run()
    make_trainer(tmp_path / "b", dropout=0.2).run()
    a, b = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    ("cell", "tokenizer"), [("rnn_tanh", "words"), ("lstm", "words"), ("lstm", "subword")]
)
def test_resume_after_an_epoch_equals_an_uninterrupted_run(
    tmp_path: Path, cell: str, tokenizer: str
) -> None:
    options = {
        "cell": cell,
        "tokenizer": tokenizer,
        "dropout": 0.3,
        "lr_plateau_factor": 0.5,
        "average_decay": 0.9,
    }
    full = make_trainer(tmp_path / "full", epochs=3, **options).run()
    make_trainer(tmp_path / "part", epochs=1, **options).run()
    resumed = resume_trainer(tmp_path / "part", epochs=3).run()
    assert resumed.iterations == full.iterations
    a, b = weights(tmp_path / "full"), weights(tmp_path / "part")
    assert all(torch.equal(a[k], b[k]) for k in a)


class StopAt:
    """A reporter that asks the trainer to stop after ``words`` training words (as Ctrl-C)."""

    def __init__(self, words: int) -> None:
        self.trainer: Trainer | None = None
        self.left = words

    def start(self, total_words: int, done_words: int) -> None:
        pass

    def advance(self, words: int) -> None:
        self.left -= words
        if self.left <= 0 and self.trainer is not None:
            self.trainer.request_stop()

    def status(self, loss: float, epoch: int) -> None:
        pass

    def message(self, text: str) -> None:
        pass

    def close(self) -> None:
        pass


@pytest.mark.parametrize("average_decay", [0.0, 0.9])
def test_resume_mid_epoch_equals_an_uninterrupted_run(tmp_path: Path, average_decay: float) -> None:
    options = {"epochs": 2, "dropout": 0.3, "cell": "gru", "average_decay": average_decay}
    full = make_trainer(tmp_path / "full", **options).run()
    part = make_trainer(tmp_path / "part", **options)
    stopper = StopAt(words=4 * 8 * 7)  # 7 windows into the first epoch
    stopper.trainer = part
    part.reporter = stopper
    stopped = part.run()
    assert stopped.stop_reason == "interrupted"
    assert stopped.iterations == 7
    resumed = resume_trainer(tmp_path / "part").run()
    assert resumed.iterations == full.iterations
    a, b = weights(tmp_path / "full"), weights(tmp_path / "part")
    assert a.keys() == b.keys()
    assert any(k.startswith("average.") for k in a) == bool(average_decay)
    assert all(torch.equal(a[k], b[k]) for k in a)
    metrics = (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()
    iterations = [json.loads(line).get("iteration", 0) for line in metrics]
    train = [json.loads(line) for line in metrics if '"train"' in line]
    assert len({r["iteration"] for r in train}) == len(train)  # no duplicated records
    assert max(iterations) == full.iterations


def test_interrupt_keeps_a_loadable_checkpoint(tmp_path: Path) -> None:
    trainer = make_trainer(tmp_path / "run", epochs=50)
    stopper = StopAt(words=1)
    stopper.trainer = trainer
    trainer.reporter = stopper
    summary = trainer.run()
    assert summary.stop_reason == "interrupted"
    assert summary.iterations == 1
    loaded = checkpoint.load(tmp_path / "run")
    assert loaded.manifest["stop_reason"] == "interrupted"


def test_time_budget_ends_with_a_checkpoint(tmp_path: Path) -> None:
    summary = make_trainer(tmp_path / "run", epochs=10_000, max_minutes=0.02).run()
    assert summary.stop_reason == "time budget"
    assert summary.epochs < 10_000
    assert checkpoint.load(tmp_path / "run").manifest["iterations"] == summary.iterations


def test_early_stopping(tmp_path: Path) -> None:
    # lr so high that validation stops improving at once
    summary: Summary = make_trainer(tmp_path / "run", epochs=200, lr=5.0, patience=2).run()
    assert summary.stop_reason == "early stopping"
    assert summary.epochs < 200


def test_failed_save_keeps_the_previous_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    trainer = make_trainer(tmp_path / "run", epochs=2)
    original = checkpoint.commit
    calls = {"n": 0}

    def commit_then_crash(*args: object, **kwargs: object) -> dict[str, object]:
        calls["n"] += 1
        if calls["n"] == 2:  # the second checkpoint: crash before the manifest is replaced
            monkeypatch.setattr(checkpoint, "atomic_write_bytes", _disk_full)
        return original(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(checkpoint, "commit", commit_then_crash)
    with pytest.raises(OSError, match="No space left"):
        trainer.run()
    loaded = checkpoint.load(tmp_path / "run")
    assert loaded.manifest["iterations"] == trainer._windows_per_epoch()


def _disk_full(path: Path, data: bytes) -> None:
    raise OSError(28, "No space left on device", str(path))


def strict_json(text: str) -> Any:
    """``json.loads`` refusing NaN and infinities, as JSON readers other than Python's do."""

    def refuse(constant: str) -> None:
        raise ValueError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


class AtIteration(SilentReporter):
    """A reporter that runs ``action`` once the trainer has taken ``iteration`` steps."""

    def __init__(self, trainer: Trainer, iteration: int, action: Callable[[], None]) -> None:
        self.trainer, self.iteration, self.action = trainer, iteration, action

    def advance(self, words: int) -> None:
        if self.trainer.progress.iteration == self.iteration:
            self.action()


@pytest.mark.parametrize(
    ("valid_fraction", "at_epoch_end", "caught_by"),
    [
        (0.1, False, "the training loss"),  # mid-epoch: the next mean loss logged
        (0.1, True, "the validation loss"),  # the epoch's last step: its validation
        (0.0, True, "a weight"),  # no validation text: the save itself
    ],
)
def test_a_diverged_run_stops_and_keeps_its_last_good_checkpoint(
    tmp_path: Path, valid_fraction: float, at_epoch_end: bool, caught_by: str
) -> None:
    trainer = make_trainer(tmp_path / "run", epochs=4, valid_fraction=valid_fraction)
    first = trainer._windows_per_epoch()

    def poison() -> None:  # what an exploding step does to the weights
        with torch.no_grad():
            trainer.model.rnn.weight_hh_l0[0, 0] = math.nan

    trainer.reporter = AtIteration(trainer, 2 * first if at_epoch_end else first + 2, poison)
    with pytest.raises(TrainingDiverged) as caught:
        trainer.run()
    message = str(caught.value)
    assert f": {caught_by} is not finite (NaN or infinity); " in message
    assert f"the run folder keeps its checkpoint of iteration {first}; " in message
    run = tmp_path / "run"
    assert strict_json((run / "manifest.json").read_text())["iterations"] == first
    assert all(bool(p.isfinite().all()) for p in checkpoint.load(run).model.parameters())
    assert checkpoint.load_resume(run)[1]["progress"]["iteration"] == first
    for line in (run / "metrics.jsonl").read_text().splitlines():
        strict_json(line)


def count_sampled_words(monkeypatch: pytest.MonkeyPatch, each: Callable[[int], None]) -> list[int]:
    """Count the words the sampler draws, calling ``each(n)`` before the n-th (from 1)."""
    drawn: list[int] = []
    real = sampling.sample

    def sample(*args: Any, **kwargs: Any) -> list[int]:
        drawn.append(len(drawn) + 1)
        each(drawn[-1])
        return real(*args, **kwargs)

    monkeypatch.setattr(sampling, "sample", sample)
    return drawn


def test_a_stop_asked_for_during_a_preview_cuts_it_short(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    trainer = make_trainer(tmp_path / "run", epochs=50, sample_every=1, sample_words=1000)

    def sigterm_at_the_third_word(n: int) -> None:
        if n == 3:
            trainer.request_stop("terminated")  # what the SIGTERM handler does

    drawn = count_sampled_words(monkeypatch, sigterm_at_the_third_word)
    summary = trainer.run()
    assert (summary.stop_reason, summary.iterations, len(drawn)) == ("terminated", 1, 3)


def test_the_time_budget_cuts_a_preview_short(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    now = [0.0]  # the trainer's clock: a second passes with each word sampled, else none
    monkeypatch.setattr(
        trainer_module, "time", SimpleNamespace(monotonic=lambda: now[0], time=time.time)
    )
    drawn = count_sampled_words(monkeypatch, lambda n: now.__setitem__(0, now[0] + 1.0))
    trainer = make_trainer(
        tmp_path / "run", epochs=50, sample_every=1, sample_words=1000, max_minutes=0.1
    )
    summary = trainer.run()
    assert (summary.stop_reason, summary.iterations, len(drawn)) == ("time budget", 1, 6)


def test_resume_removes_what_a_killed_save_left(tmp_path: Path) -> None:
    run = tmp_path / "run"
    make_trainer(run, epochs=1).run()
    names = sorted(p.name for p in run.iterdir())
    leftovers = [  # a kill inside a save: half-written temporaries, a file no manifest names
        "model-00000099.safetensors.tmp-k1ll3d",
        "resume-00000099.safetensors.tmp-x2y3z4",
        "resume-00000099.safetensors",
        "loss.png.tmp-ab12cd",
    ]
    for name in leftovers:
        (run / name).write_bytes(b"\0" * 65_536)
    checkpoint.load(run)  # the server reading the folder deletes nothing
    assert all((run / name).exists() for name in leftovers)
    resume_trainer(run, epochs=2)  # before its first save
    assert sorted(p.name for p in run.iterdir()) == names


def test_preview_goes_through_the_sampler_and_starts_with_the_seed(tmp_path: Path) -> None:
    trainer = make_trainer(tmp_path / "run", epochs=4, seed_words=("the", "quick"))
    trainer.run()
    text = trainer.preview(words=10)
    assert text == "the quick brown fox jumps over the lazy dog.\nthe"
    assert trainer.preview() != ""


def test_run_folder_has_metrics_and_plot(tmp_path: Path) -> None:
    make_trainer(tmp_path / "run", sample_every=10).run()
    run = tmp_path / "run"
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    events = {r["event"] for r in records}
    assert events == {"start", "train", "valid", "sample"}
    assert (run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    manifest = checkpoint.read_manifest(run)
    for key in ("best_valid_perplexity", "epochs", "versions", "created"):
        assert key in manifest


def test_the_weights_saved_and_validated_are_the_moving_average(tmp_path: Path) -> None:
    # One epoch: one evaluation, at its end, whose weights are saved (the first is the best).
    trainer = make_trainer(tmp_path / "run", epochs=1, average_decay=0.9, valid_fraction=0.2)
    trainer.run()
    assert trainer.average is not None
    averaged, raw = trainer.average.module.state_dict(), trainer.model.state_dict()
    assert any(not torch.equal(averaged[k], raw[k]) for k in raw)
    saved = checkpoint.load(tmp_path / "run").model.state_dict()
    assert all(torch.equal(saved[k], averaged[k]) for k in saved)
    # Validation reads the averaged weights, not the raw ones.
    loss = trainer.validation_loss()
    trainer.average.module.load_state_dict(raw)
    assert trainer.validation_loss() != pytest.approx(loss, abs=1e-6)


def test_the_average_covers_the_recent_steps() -> None:
    update = trainer_module._recent_average(0.999)
    value = [torch.ones(3)]
    for steps, keep in ((4, 0.5), (396, 0.99), (10**6, 0.999)):  # n / (n + 4), capped
        mean = [torch.zeros(3)]
        update(mean, value, torch.tensor(steps))
        assert mean[0].tolist() == pytest.approx([1 - keep] * 3)
