"""The training loop: truncated BPTT over the lab's windows, validation, checkpoints, resume.

Per window: detach the carried hidden state, forward, cross-entropy, backward, clip the
gradient norm, Adam step (the lab's loop). Around it: a validation perplexity at the end of
every epoch (and every ``eval_every`` iterations), the best weights kept by validation
perplexity, optional LR reduction on plateau and early stopping, previews through
``model_store.sampling`` (the server's sampler), a JSON-lines metrics log, a loss plot, a
``max_minutes`` budget, and clean stops on Ctrl-C/SIGTERM (previews included). Every checkpoint
also stores the full training state (weights, optimizer, scheduler, RNG, position, carried hidden
state), so ``Trainer.restore`` continues and ends with the same weights on CPU as an uninterrupted
run. A run whose loss or weights stop being finite ends with ``TrainingDiverged`` and commits
nothing more: the run folder keeps its last good checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol, cast

import torch
from torch import Tensor
from torch.optim.swa_utils import AveragedModel

from model_store import checkpoint, sampling
from model_store.cache import mix_terms, text_terms
from model_store.network import (
    Hidden,
    WordRNN,
    count_parameters,
    detach_hidden,
    hidden_map,
    hidden_to,
)
from model_store.vocab import Vocab
from training.config import TrainConfig
from training.data import Dataset, batchify, eval_rows, windows
from training.distributed import DistContext
from training.plots import plot_history

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"


class TrainingDiverged(RuntimeError):
    """The loss or the weights are no longer finite (NaN or infinity): nothing more is saved,
    so the run folder keeps its last good checkpoint; ``str()`` is one line for the CLI."""


class Reporter(Protocol):
    """Where progress goes: a progress bar in the CLI, nowhere in tests."""

    def start(self, total_words: int, done_words: int) -> None: ...
    def advance(self, words: int) -> None: ...
    def status(self, loss: float, epoch: int) -> None: ...
    def message(self, text: str) -> None: ...
    def close(self) -> None: ...


class SilentReporter:
    def start(self, total_words: int, done_words: int) -> None:
        pass

    def advance(self, words: int) -> None:
        pass

    def status(self, loss: float, epoch: int) -> None:
        pass

    def message(self, text: str) -> None:
        pass

    def close(self) -> None:
        pass


@dataclass
class Progress:
    """Where the run stands; saved as JSON with every checkpoint."""

    epoch: int = 0  # epochs completed
    window: int = 0  # next window within the current epoch
    iteration: int = 0  # optimizer steps taken
    words: int = 0  # training words processed
    seconds: float = 0.0  # training wall-clock time, over all sessions
    best_valid_ppl: float | None = None  # over every evaluation: picks the served weights
    best_valid_bpc: float | None = None  # bits per character of those weights
    scheduled_best: float | None = None  # over scheduled evaluations: drives patience
    bad_evals: int = 0
    averaged: int = 0  # steps in the weights' moving average
    stop_reason: str | None = None


@dataclass
class Summary:
    run_dir: Path
    stop_reason: str
    epochs: int
    iterations: int
    words: int
    seconds: float
    words_per_second: float
    best_valid_ppl: float | None
    best_valid_bpc: float | None
    history: list[dict[str, Any]] = field(default_factory=list)


def _json_line(record: dict[str, Any]) -> str:
    """One metrics.jsonl line, strict JSON: a NaN would make the file unreadable to others."""
    return json.dumps(record, allow_nan=False) + "\n"


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 700.0))


def make_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """The lab's Adam (or AdamW, or plain SGD), with the fused kernel where this torch has it
    for the device: one pass over each parameter instead of several (2-3x faster steps on a
    CPU, same algorithm)."""
    kinds: dict[str, type[torch.optim.Optimizer]] = {
        "adam": torch.optim.Adam,
        "adamw": torch.optim.AdamW,
        "sgd": torch.optim.SGD,
    }
    kind = kinds[config.optimizer]
    options = {"lr": config.lr, "weight_decay": config.weight_decay}
    try:
        return kind(model.parameters(), **options, fused=True)  # type: ignore[call-arg]
    except (RuntimeError, ValueError, TypeError):
        return kind(model.parameters(), **options)  # type: ignore[call-arg]


class _LossStep(torch.nn.Module):
    """One training window as a module call, so DistributedDataParallel can wrap it: it hooks
    the gradients of whatever its wrapped module's ``forward`` computes."""

    def __init__(self, model: WordRNN) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids: Tensor, hidden: Hidden, targets: Tensor) -> tuple[Tensor, Hidden]:
        features, hidden = self.model.features(ids, hidden)
        return self.model.loss(features, targets), hidden


class _StopFlag:
    """SIGINT/SIGTERM ask for a clean stop after the current iteration; a second Ctrl-C
    aborts at once (the last committed checkpoint stays intact either way)."""

    def __init__(self) -> None:
        self.reason: str | None = None

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handle(signum: int, frame: object) -> None:
            if self.reason is not None and signum == signal.SIGINT:
                raise KeyboardInterrupt
            self.reason = "interrupted" if signum == signal.SIGINT else "terminated"

        previous = {s: signal.signal(s, handle) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, h in previous.items():
                signal.signal(s, h)


def _recent_average(decay: float) -> Callable[[list[Tensor], list[Tensor], Tensor], None]:
    """An exponential moving average whose decay after n steps is min(decay, n / (n + 4)):
    it covers about the last quarter of the steps so far, so that a short run's average is not
    held back by its first, untrained weights, and at most 1 / (1 - decay) steps."""

    def update(averaged: list[Tensor], current: list[Tensor], steps: Tensor) -> None:
        n = int(steps)
        keep = min(decay, n / (n + 4))
        for mean, value in zip(averaged, current, strict=True):
            mean.lerp_(value, 1.0 - keep)

    return update


class Trainer:
    def __init__(
        self,
        config: TrainConfig,
        dataset: Dataset,
        run_dir: Path,
        device: torch.device,
        reporter: Reporter | None = None,
        info: dict[str, Any] | None = None,
        dist: DistContext | None = None,
    ) -> None:
        self.config = config
        self.dataset = dataset
        self.vocab: Vocab = dataset.vocab
        self.run_dir = Path(run_dir)
        self.device = device
        self.reporter: Reporter = reporter or SilentReporter()
        self.info = dict(info or {})
        self.dist = dist or DistContext()
        torch.manual_seed(config.seed)  # the same initial weights on every rank
        self.model_config = config.model_config(len(self.vocab))
        self.model = WordRNN(self.model_config).to(device)
        self.step: torch.nn.Module = _LossStep(self.model)
        if self.dist.enabled:
            torch.manual_seed(config.seed + self.dist.rank)  # dropout masks differ per rank
            self.step = torch.nn.parallel.DistributedDataParallel(
                self.step, device_ids=[device] if device.type == "cuda" else None
            )
        self.optimizer = make_optimizer(self.model, config)
        # Iterate averaging: the weights evaluated and saved are a moving average of the
        # steps' (their noise averaged out; about 1% fewer bits per character for the
        # subword preset at 3 minutes, bench/quality.py).
        self.average = (
            AveragedModel(
                self.model, multi_avg_fn=_recent_average(config.average_decay), use_buffers=False
            )
            if config.average_decay
            else None
        )
        self.scheduler = (
            torch.optim.lr_scheduler.ReduceLROnPlateau(
                self.optimizer, mode="min", factor=config.lr_plateau_factor, patience=0
            )
            if config.lr_plateau_factor < 1
            else None
        )
        self.progress = Progress()
        self.hidden: Hidden | None = None
        self.history: list[dict[str, Any]] = []  # validation records
        self.train_losses: list[tuple[int, float]] = []  # (iteration, mean loss), for the plot
        self._stop = _StopFlag()
        self._deadline = math.inf  # time.monotonic() at which the time budget ends
        self._last_eval_iteration = -1
        self._valid_terms: Tensor | None = None  # the text cache's say on the validation text

    # ----------------------------------------------------------------------------- set-up

    def start_new(self) -> None:
        """Write the run folder's header (config and vocabulary) before the first step."""
        checkpoint.commit(
            self.run_dir,
            config=self.model_config,
            training=self.config.to_json(),
            vocab=self.vocab,
            copies=self.dataset.copies,
            info=self._manifest_info(),
        )
        with contextlib.suppress(FileNotFoundError):
            (self.run_dir / METRICS_FILE).unlink()
        self._log({"event": "start", "parameters": count_parameters(self.model), **self.info})

    def restore(self, tensors: dict[str, Tensor], state: dict[str, Any]) -> None:
        """Load a resume state written by ``_resume_state`` (see ``Trainer.resume`` in cli)."""
        resume = checkpoint.unpack_resume(tensors, state)
        checkpoint.check_state(self.model, resume.weights, self.run_dir)
        self.model.load_state_dict(resume.weights, strict=not self.model_config.tie_weights)
        if self.average is not None and resume.average is not None:
            self.average.module.load_state_dict(
                resume.average, strict=not self.model_config.tie_weights
            )
            self.average.n_averaged.fill_(resume.progress.get("averaged", 0))
        self.optimizer.load_state_dict(resume.optimizer)
        if self.scheduler is not None:
            self.scheduler.load_state_dict(resume.scheduler)
        self.progress = Progress(**{**resume.progress, "stop_reason": None})
        rows = self.dist.rows(self.config.batch_size)
        if resume.hidden is not None:  # (layers, batch_size, hidden): this rank's rows
            self.hidden = hidden_to(hidden_map(resume.hidden, lambda t: t[:, rows]), self.device)
        rng = resume.rng  # (processes, state) rows by rank
        if rng.shape[0] == self.dist.world_size:
            torch.set_rng_state(rng[self.dist.rank].clone())  # a view of row 1 crashes it
        else:  # resumed with another process count: a fresh, still deterministic stream
            torch.manual_seed(self.config.seed + self.dist.rank + self.progress.iteration)
        if self.device.type == "cuda" and resume.cuda_rng is not None:
            cuda_rng = resume.cuda_rng
            if cuda_rng.shape[0] == self.dist.world_size:
                torch.cuda.set_rng_state(cuda_rng[self.dist.rank].clone(), self.device)
        self._reload_metrics()
        self._last_eval_iteration = self.progress.iteration
        if self.dist.is_main:  # the run owns its folder again: clear what a killed save left
            checkpoint.remove_leftovers(self.run_dir)

    def request_stop(self, reason: str = "interrupted") -> None:
        """Stop cleanly after the current iteration (what Ctrl-C does)."""
        self._stop.reason = reason

    def _should_stop(self) -> bool:
        """A stop was asked for or the time budget is spent: what cuts a preview short."""
        return self._stop.reason is not None or time.monotonic() >= self._deadline

    # ----------------------------------------------------------------------------- the loop

    def run(self) -> Summary:
        cfg = self.config
        x, y = batchify(self.dataset.train_ids.to(self.device), cfg.batch_size, cfg.seq_size)
        n_windows = math.ceil(x.shape[1] / cfg.seq_size)
        words_per_epoch = x.numel()  # all ranks together
        rows = self.dist.rows(cfg.batch_size)
        x, y = x[rows], y[rows]  # this rank's rows
        world = self.dist.world_size
        budget = cfg.max_minutes * 60 if cfg.max_minutes else math.inf
        p = self.progress
        self.reporter.start(
            cfg.epochs * words_per_epoch,
            p.epoch * words_per_epoch + p.window * cfg.batch_size * cfg.seq_size,
        )
        self.model.train()
        running = torch.zeros((), device=self.device)
        running_n = 0
        session_start = time.monotonic() - p.seconds
        self._deadline = session_start + budget
        with self._stop.installed(), contextlib.closing(self.reporter):
            while p.epoch < cfg.epochs and p.stop_reason is None:
                hidden = (
                    self.hidden
                    if p.window > 0 and self.hidden is not None
                    else (self.model.init_hidden(x.shape[0]))
                )
                for index, xb, yb in windows(x, y, cfg.seq_size, start=p.window):
                    hidden = detach_hidden(hidden)
                    loss, hidden = self.step(xb, hidden, yb)
                    self.optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.clip)
                    self.optimizer.step()
                    if self.average is not None:
                        self.average.update_parameters(self.model)
                        p.averaged += 1
                    p.iteration += 1
                    p.window = index + 1
                    p.words += xb.numel() * world
                    p.seconds = time.monotonic() - session_start
                    running += loss.detach()
                    running_n += 1
                    self.hidden = hidden
                    if p.iteration % cfg.log_every == 0 or p.window == n_windows:
                        mean = float(running) / running_n
                        self._check_finite(math.isfinite(mean), "the training loss")
                        running.zero_()
                        running_n = 0
                        self._log_train(mean)
                        self.reporter.status(mean, p.epoch + 1)
                    self.reporter.advance(xb.numel() * world)
                    if (
                        cfg.sample_every
                        and p.iteration % cfg.sample_every == 0
                        and self.dist.is_main
                    ):
                        self._preview()
                    if cfg.eval_every and p.iteration % cfg.eval_every == 0:
                        self._evaluate(scheduled=True)
                    reason = (  # the clock read again: a preview or an evaluation took time
                        p.stop_reason
                        or self._stop.reason
                        or ("time budget" if time.monotonic() >= self._deadline else None)
                    )
                    if self.dist.any(reason is not None):  # every rank stops at the same step
                        p.stop_reason = reason or "stopped by another process"
                        break
                if p.window >= n_windows:
                    p.epoch += 1
                    p.window = 0
                    self.hidden = None
                    self._evaluate(scheduled=True)
            p.stop_reason = p.stop_reason or "completed"
            if self._last_eval_iteration != p.iteration:
                self._evaluate(scheduled=False)
            elif self.dist.is_main:  # record why the run ended
                checkpoint.commit(self.run_dir, info=self._manifest_info())
        return Summary(
            run_dir=self.run_dir,
            stop_reason=p.stop_reason,
            epochs=p.epoch,
            iterations=p.iteration,
            words=p.words,
            seconds=p.seconds,
            words_per_second=p.words / p.seconds if p.seconds else 0.0,
            best_valid_ppl=p.best_valid_ppl,
            best_valid_bpc=p.best_valid_bpc,
            history=self.history,
        )

    # ----------------------------------------------------------------------------- evaluation

    @torch.no_grad()
    def validation_loss(self) -> float | None:
        """Mean cross-entropy per word over the validation text (None without one), of the
        weights a checkpoint saves (`served`)."""
        ids = self.dataset.valid_ids
        if ids.numel() < 2:
            return None
        model = self.served
        was_training = model.training
        model.eval()
        x, y = eval_rows(ids.to(self.device), self.config.batch_size)
        hidden = model.init_hidden(x.shape[0])
        parts: list[Tensor] = []  # each window's (rows, w) target log-probabilities
        for _, xb, yb in windows(x, y, self.config.seq_size):
            features, hidden = model.features(xb, hidden)
            flat = features.reshape(-1, features.shape[-1])
            parts.append(model.target_log_probs(flat, yb.reshape(-1)).view_as(yb))
        model.train(was_training)
        # Row-major, the rows' targets are the validation text in order: the text cache
        # (if the model has one) reads it as /score and training.evaluate do. What it says
        # depends on the text alone: worked out at the first validation, then kept.
        own = torch.cat(parts, dim=1).flatten().cpu()
        settings = model.config.cache
        if not settings.enabled:
            return -float(own.double().sum()) / y.numel()
        if self._valid_terms is None:
            self._valid_terms = text_terms(settings, y.flatten().tolist(), self.vocab.starts_word())
        return -float(mix_terms(own, self._valid_terms).sum()) / y.numel()

    @property
    def served(self) -> WordRNN:
        """The weights validated and saved: the moving average's, when one is kept."""
        return cast(WordRNN, self.average.module) if self.average is not None else self.model

    def _evaluate(self, scheduled: bool) -> None:
        """Validate, keep the weights if they are the best so far, and commit a checkpoint.

        Only scheduled evaluations (epoch ends, ``eval_every``) drive the LR schedule and
        early stopping, so a run stopped early and resumed takes the same decisions as one
        that never stopped.
        """
        p = self.progress
        loss = self.validation_loss()
        self._check_finite(loss is None or math.isfinite(loss), "the validation loss")
        ppl = perplexity(loss) if loss is not None else None
        bpc = self.dataset.bits_per_char(loss) if loss is not None else None
        improved = ppl is None or p.best_valid_ppl is None or ppl < p.best_valid_ppl
        if improved:
            p.best_valid_ppl, p.best_valid_bpc = ppl, bpc
        if scheduled and ppl is not None:
            if p.scheduled_best is None or ppl < p.scheduled_best:
                p.scheduled_best = ppl
                p.bad_evals = 0
            else:
                p.bad_evals += 1
            if self.scheduler is not None:
                self.scheduler.step(loss)
            if self.config.patience and p.bad_evals >= self.config.patience:
                p.stop_reason = "early stopping"
        record = {
            "event": "valid",
            "iteration": p.iteration,
            "epoch": p.epoch + p.window / max(1, self._windows_per_epoch()),
            "valid_loss": loss,
            "valid_ppl": ppl,
            "valid_bpc": bpc,
            "best_valid_ppl": p.best_valid_ppl,
            "lr": self.optimizer.param_groups[0]["lr"],
        }
        self._log(record)
        self.history.append(record)
        self._commit(weights=improved)
        self._last_eval_iteration = p.iteration
        text = (
            f"valid perplexity {ppl:.2f}, {bpc:.4f} bits per character"
            if ppl is not None and bpc is not None
            else "no validation text"
        )
        self.reporter.message(
            f"epoch {record['epoch']:.2f} iteration {p.iteration}: {text}"
            + (" (best, saved)" if improved and ppl is not None else "")
        )

    def _windows_per_epoch(self) -> int:
        """Full windows only, as the lab (the stream's remainder is left out)."""
        return (self.dataset.train_ids.numel() - 1) // (
            self.config.batch_size * self.config.seq_size
        )

    # ----------------------------------------------------------------------------- previews

    def preview(
        self,
        seed_text: str | None = None,
        words: int | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> str:
        """A sample from the seed words, through the server's sampler, as the lab prints it;
        cut short once ``should_stop`` says so (see ``sampling.generate``)."""
        cfg = self.config
        vocab = self.vocab
        seed_words = vocab.split_words(seed_text or " ".join(cfg.seed_words))
        seed_ids, _, _ = vocab.encode_words(seed_words)
        params = sampling.SamplingParams(top_k=cfg.top_k, uniform=cfg.uniform_samples)
        generator = sampling.make_generator(cfg.seed * 1_000_003 + self.progress.iteration)
        model = self.served
        was_training = model.training
        model.eval()
        ids, _ = sampling.generate(
            model,
            seed_ids,
            cfg.sample_words if words is None else words,
            params,
            generator,
            vocab.bos_id,
            banned_ids=vocab.special_ids,
            opens=vocab.starts_word(),
            should_stop=should_stop,
        )
        model.train(was_training)
        seed_tokens = vocab.decode(seed_ids) if vocab.is_subword else seed_words
        return vocab.detokenize([*seed_tokens, *vocab.decode(ids)])

    def _preview(self) -> None:
        text = self.preview(should_stop=self._should_stop)
        self._log({"event": "sample", "iteration": self.progress.iteration, "text": text})
        self.reporter.message(text)

    # ----------------------------------------------------------------------------- files

    def _resume_state(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """The state a resume file holds; a collective, as it gathers every rank's RNG state
        and rows of the carried hidden state."""
        gather = self.dist.gather
        rng = torch.get_rng_state().to(self.device if self.device.type == "cuda" else "cpu")
        rngs = gather(rng.unsqueeze(0), 0)  # (processes, state)
        cuda_rngs = None
        if self.device.type == "cuda":
            cuda_rng = torch.cuda.get_rng_state(self.device).to(self.device)
            cuda_rngs = gather(cuda_rng.unsqueeze(0), 0)
        hidden = None
        mid_epoch = self.dist.any(self.hidden is not None and self.progress.window > 0)
        if mid_epoch and self.hidden is not None:  # every rank's rows: (layers, batch, hidden)
            hidden = hidden_map(self.hidden, lambda t: gather(t.detach(), 1))
        return checkpoint.pack_resume(
            checkpoint.ResumeState(
                weights=checkpoint.weights_state(self.model),
                average=(
                    checkpoint.weights_state(self.served) if self.average is not None else None
                ),
                optimizer=self.optimizer.state_dict(),
                scheduler=self.scheduler.state_dict() if self.scheduler else None,
                progress=asdict(self.progress),
                rng=rngs,
                cuda_rng=cuda_rngs,
                hidden=hidden,
            )
        )

    def _manifest_info(self) -> dict[str, Any]:
        p = self.progress
        return {
            **self.info,
            "best_valid_perplexity": p.best_valid_ppl,
            "best_valid_bits_per_char": p.best_valid_bpc,
            "epochs": p.epoch,
            "iterations": p.iteration,
            "train_words_seen": p.words,
            "train_seconds": round(p.seconds, 3),
            "stop_reason": p.stop_reason,
        }

    def _check_finite(self, finite: bool, what: str) -> None:
        """Raise TrainingDiverged unless ``what`` is finite on every rank (a collective: every
        rank checks at the same step, so every rank stops there)."""
        if self.dist.any(not finite):
            kept = (
                f"the run folder keeps its checkpoint of iteration {self._last_eval_iteration}"
                if self._last_eval_iteration >= 0
                else "no checkpoint was saved"
            )
            raise TrainingDiverged(
                f"training diverged at iteration {self.progress.iteration}: {what} is not "
                f"finite (NaN or infinity); {kept}; try a lower --lr or --clip"
            )

    def _commit(self, weights: bool) -> None:
        finite = torch.stack([p.isfinite().all() for p in self.model.parameters()]).all()
        self._check_finite(bool(finite), "a weight")  # never save a poisoned model
        resume = self._resume_state()  # a collective: every rank takes part
        if not self.dist.is_main:
            return
        checkpoint.commit(
            self.run_dir,
            weights=checkpoint.weights_state(self.served) if weights else None,
            resume=resume,
            iteration=self.progress.iteration,
            info=self._manifest_info(),
        )
        png = plot_history(self.history, self.train_losses)
        checkpoint.atomic_write_bytes(self.run_dir / PLOT_FILE, png)

    def _log_train(self, loss: float) -> None:
        p = self.progress
        self.train_losses.append((p.iteration, loss))
        self._log(
            {
                "event": "train",
                "iteration": p.iteration,
                "epoch": p.epoch + p.window / max(1, self._windows_per_epoch()),
                "loss": loss,
                "lr": self.optimizer.param_groups[0]["lr"],
                "words_per_second": p.words / p.seconds if p.seconds else None,
            }
        )

    def _log(self, record: dict[str, Any]) -> None:
        if not self.dist.is_main:
            return
        record = {"time": round(time.time(), 3), **record}
        with open(self.run_dir / METRICS_FILE, "a", encoding="utf-8") as f:
            f.write(_json_line(record))

    def _reload_metrics(self) -> None:
        """On resume: trim the metrics log to the restored position (a killed run may have
        logged past its last checkpoint) and take back its records for the loss plot."""
        path = self.run_dir / METRICS_FILE
        lines = path.read_text(encoding="utf-8").splitlines() if path.is_file() else []
        kept = []
        for line in lines:
            with contextlib.suppress(json.JSONDecodeError):
                record = json.loads(line)
                if record.get("iteration", 0) <= self.progress.iteration:
                    kept.append(record)
        if self.dist.is_main:
            checkpoint.atomic_write_text(path, "".join(_json_line(r) for r in kept))
        self.history = [r for r in kept if r.get("event") == "valid"]
        self.train_losses = [(r["iteration"], r["loss"]) for r in kept if r.get("event") == "train"]
