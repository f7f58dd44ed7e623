"""Training hyperparameters: one dataclass whose defaults are the lab's, and named presets.

The lab trains ``Embedding(64) -> RNN(tanh, 64) -> Linear`` for 50 epochs on windows of 20 words
in 16 parallel rows, with Adam (lr 0.01) and gradient-norm clipping at 5, printing a top-5 sample
from "I can" every 20 iterations. ``TrainConfig()`` is exactly that; ``--preset lab`` also takes
the lab's whitespace tokenizer and its uniform choice among the top-k words for previews.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from model_store.cache import CacheSettings
from model_store.network import CELLS, SOFTMAXES, ConfigError, ModelConfig
from model_store.vocab import TOKENIZERS

OPTIMIZERS: tuple[str, ...] = ("adam", "adamw", "sgd")
# Bounds on the previews, which run inside the training loop: a preview of millions of words
# would stall training for minutes. The server's default for seed words is the same.
MAX_SAMPLE_WORDS = 1000
MAX_SEED_WORDS = 1000
# torch seeds generators with 64-bit integers, and a preview's seed is derived from this one
# (see Trainer.preview), so keep it to 32 bits.
MAX_SEED = 2**32 - 1


@dataclass(frozen=True)
class TrainConfig:
    # Data and vocabulary
    tokenizer: str = "words"
    lowercase: bool = False
    min_count: int = 1
    max_vocab: int | None = None
    subword_vocab: int = 4000
    valid_fraction: float = 0.1
    # Network
    cell: str = "rnn_tanh"
    embed_dim: int = 64
    hidden_dim: int = 64
    layers: int = 1
    dropout: float = 0.0
    tie_weights: bool = False
    softmax: str = "full"
    # The text cache (model_store.cache); order 0: none, as in the lab
    cache_order: int = 0
    cache_weight: float = 0.9
    cache_confidence: float = 4.0
    cache_inner_confidence: float | None = None
    # Optimisation (the lab's)
    epochs: int = 50
    seq_size: int = 20
    batch_size: int = 16
    lr: float = 0.01
    clip: float = 5.0
    optimizer: str = "adam"
    weight_decay: float = 0.0
    # Schedule and stopping (off in the lab)
    lr_plateau_factor: float = 1.0
    average_decay: float = 0.0  # an exponential moving average of the weights; 0: none
    patience: int = 0
    eval_every: int = 0
    max_minutes: float | None = None
    # Previews (the lab's)
    sample_every: int = 20
    sample_words: int = 25
    seed_words: tuple[str, ...] = ("I", "can")
    top_k: int = 5
    uniform_samples: bool = False
    # Reproducibility and logging
    seed: int = 1234
    log_every: int = 10

    def __post_init__(self) -> None:
        problems = []
        positive = ("epochs", "seq_size", "batch_size", "embed_dim", "hidden_dim", "layers")
        for name in positive:
            if getattr(self, name) < 1:
                problems.append(f"--{name.replace('_', '-')} must be at least 1")
        for name in ("sample_every", "sample_words", "patience", "eval_every", "top_k"):
            if getattr(self, name) < 0:
                problems.append(f"--{name.replace('_', '-')} must be 0 or more")
        if self.sample_words > MAX_SAMPLE_WORDS:
            problems.append(f"--sample-words must be at most {MAX_SAMPLE_WORDS}")
        if len(self.seed_words) > MAX_SEED_WORDS:
            problems.append(f"--seed-words must hold at most {MAX_SEED_WORDS} words")
        if not 0 <= self.seed <= MAX_SEED:
            problems.append(f"--seed must be in [0, {MAX_SEED}]")
        if self.log_every < 1:
            problems.append("--log-every must be at least 1")
        if self.min_count < 1:
            problems.append("--min-count must be at least 1")
        if self.max_vocab is not None and self.max_vocab < 3:
            problems.append("--max-vocab must be at least 3")
        if not 257 <= self.subword_vocab <= 1_000_000:
            problems.append("--subword-vocab must be in [257, 1000000] (256 bytes, then merges)")
        if self.optimizer not in OPTIMIZERS:
            problems.append(f"--optimizer must be one of {', '.join(OPTIMIZERS)}")
        if not 0 <= self.weight_decay < 1:
            problems.append("--weight-decay must be in [0, 1)")
        # NaN fails every comparison and infinity every bounded range: only the flags bounded
        # on one side need math.isfinite (an infinite --lr trains NaN weights).
        if not (math.isfinite(self.lr) and self.lr > 0):
            problems.append("--lr must be a positive finite number")
        if not (math.isfinite(self.clip) and self.clip > 0):
            problems.append("--clip must be a positive finite number")
        if not 0 <= self.valid_fraction < 0.9:
            problems.append("--valid-fraction must be in [0, 0.9)")
        if not 0 <= self.average_decay < 1:
            problems.append("--average-decay must be in [0, 1) (0 turns it off)")
        if not 0 < self.lr_plateau_factor <= 1:
            problems.append("--lr-plateau-factor must be in (0, 1] (1 turns it off)")
        if self.max_minutes is not None and not (
            math.isfinite(self.max_minutes) and self.max_minutes > 0
        ):
            problems.append("--max-minutes must be a positive finite number")
        if self.tokenizer not in TOKENIZERS:
            problems.append(f"--tokenizer must be one of {', '.join(TOKENIZERS)}")
        if self.cell not in CELLS:
            problems.append(f"--cell must be one of {', '.join(CELLS)}")
        if self.softmax not in SOFTMAXES:
            problems.append(f"--softmax must be one of {', '.join(SOFTMAXES)}")
        if not 0 <= self.dropout < 1:
            problems.append("--dropout must be in [0, 1)")
        if self.tie_weights and self.embed_dim != self.hidden_dim:
            problems.append(
                f"--tie-weights needs --embed-dim equal to --hidden-dim "
                f"(got {self.embed_dim} and {self.hidden_dim})"
            )
        if self.tie_weights and self.softmax == "adaptive":
            problems.append("--tie-weights works with --softmax full only")
        settings = CacheSettings(
            self.cache_order, self.cache_weight, self.cache_confidence, self.cache_inner_confidence
        )
        problems += [f"--{p.replace('_', '-')}" for p in settings.problems()]
        if problems:
            raise ConfigError("; ".join(problems))

    def model_config(self, vocab_size: int) -> ModelConfig:
        return ModelConfig(
            vocab_size=vocab_size,
            cell=self.cell,  # type: ignore[arg-type]
            embed_dim=self.embed_dim,
            hidden_dim=self.hidden_dim,
            layers=self.layers,
            dropout=self.dropout,
            tie_weights=self.tie_weights,
            softmax=self.softmax,  # type: ignore[arg-type]
            cache_order=self.cache_order,
            cache_weight=self.cache_weight,
            cache_confidence=self.cache_confidence,
            cache_inner_confidence=self.cache_inner_confidence,
        )

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["seed_words"] = list(self.seed_words)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        if "seed_words" in values:
            values["seed_words"] = tuple(values["seed_words"])
        return cls(**values)

    def with_overrides(self, **overrides: Any) -> TrainConfig:
        return replace(self, **overrides)


PRESETS: dict[str, dict[str, Any]] = {
    # The lab exactly: its tokenizer, network, optimiser and preview sampling.
    "lab": {"tokenizer": "whitespace", "uniform_samples": True},
    # A better model for the same wall-clock budget on a CPU: an LSTM with dropout and an
    # adaptive softmax (the output layer is most of the work), longer windows, LR decay on
    # plateau and early stopping. See the README for what it buys, measured.
    "lstm": {
        "cell": "lstm",
        "embed_dim": 256,
        "hidden_dim": 256,
        "dropout": 0.25,
        "softmax": "adaptive",
        "seq_size": 35,
        "batch_size": 32,
        "lr": 0.003,
        "clip": 0.5,
        "min_count": 2,
        "lr_plateau_factor": 0.5,
        "patience": 3,
        "sample_every": 200,
    },
}

# What `make serve` trains (the Makefile's PRESET; a test holds the two together).
SERVE_PRESET = "subword"

# The open vocabulary: the lstm preset's network and schedule on subword pieces. The
# vocabulary size was chosen by measurement (bench/quality.py; the README has the figures).
PRESETS["subword"] = {
    **PRESETS["lstm"],
    "tokenizer": "subword",
    "subword_vocab": 4000,
    "min_count": 1,
    # At 4k pieces a full softmax tied to the embedding beats the adaptive one, and its
    # regularisation takes more dropout and a larger step.
    "softmax": "full",
    "tie_weights": True,
    "dropout": 0.4,
    "lr": 0.005,
    "cache_order": 3,
    "cache_confidence": 8.0,
    "cache_inner_confidence": 1.0,
    "average_decay": 0.999,
}

PRESET_HELP = {
    "default": "the lab's hyperparameters with the `words` tokenizer",
    "lab": "the lab exactly: whitespace tokens, tanh RNN 64/64, uniform top-5 previews",
    "lstm": "LSTM 256, dropout, adaptive softmax on words: the best held-out score when a "
    "prompt's words are all in the training text (rarer words become <unk>)",
    "subword": "the lstm preset's LSTM on subword pieces, its output layer tied to the embedding, "
    "with the text cache: any text encodes, no "
    "word is ever <unk>, text round-trips, names repeated in a text cost little; pick it to "
    "serve prompts with new words and names (make serve does)",
}


def preset(name: str) -> TrainConfig:
    if name == "default":
        return TrainConfig()
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose from default, {', '.join(PRESETS)}")
    return TrainConfig(**PRESETS[name])
