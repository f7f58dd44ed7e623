"""The original lab's training loop, kept unchanged as the benchmark baseline.

    python -m bench.lab_baseline corpus.txt [--epochs N] [--max-seconds S] [--max-iterations N]

A faithful re-implementation of the lab this project grew from (the widely copied "word-level
text generation with PyTorch" tutorial): the text cut by ``text.split()``, a vocabulary sorted by
frequency, the lab's batch layout, ``nn.Embedding -> nn.RNN(tanh) -> nn.Linear``, cross-entropy
with Adam at 0.01, gradients clipped at 5, the hidden state carried from window to window and
detached, and the lab's top-k ``predict``. Every training iteration does exactly the lab's work
(numpy windows copied into new tensors, ``loss.item()`` at every step, autograd on while
predicting), so the project's trainer and sampler can be measured against it in the same run.

It imports nothing from ``model_store`` or ``training`` on purpose: it is what they are
compared with. What differs from the lab, all of it outside the iteration:

* timing and stopping limits (``max_seconds``, ``max_iterations``), an optional seed, and a
  summary (iterations, words processed, seconds, words per second, final loss);
* ``predict`` returns its words and makes ``n_words`` of them (25; the lab made 101), and
  copies the seed list instead of appending to the caller's (the lab's ``initial_words`` grew
  with every preview);
* no ``torch.save`` every 1000 iterations, and the epoch count printed is the real one (the
  lab printed ``/200``);
* the text file is read as UTF-8; unknown seed words are reported before training starts
  rather than as a KeyError at the first preview.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

# The lab's flags.
SEQ_SIZE = 20
BATCH_SIZE = 16
EMBEDDING_SIZE = 64
RNN_SIZE = 64
EPOCHS = 50
LEARNING_RATE = 0.01
GRADIENTS_NORM = 5.0
INITIAL_WORDS = ("I", "can")
PREDICT_TOP_K = 5
PRINT_EVERY = 100
PREDICT_EVERY = 1000
# The project's default length of a sample (the lab: 1 + 100 words).
PREDICT_WORDS = 25


class Chooser(Protocol):
    """``np.random`` (the lab's global generator) or a ``np.random.Generator``."""

    def choice(self, a: Sequence[int]) -> Any: ...


def load_words(path: str | Path) -> list[str]:
    """The lab's tokenizer: the whole file, split on whitespace."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    return text.split()


def build_vocab(words: Sequence[str]) -> tuple[dict[int, str], dict[str, int]]:
    """``int_to_vocab`` and ``vocab_to_int``, most frequent word first (ties: first seen)."""
    word_counts = Counter(words)
    sorted_vocab = sorted(word_counts, key=word_counts.__getitem__, reverse=True)
    int_to_vocab = dict(enumerate(sorted_vocab))
    vocab_to_int = {w: k for k, w in int_to_vocab.items()}
    return int_to_vocab, vocab_to_int


def make_arrays(
    int_text: Sequence[int], batch_size: int, seq_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """The lab's layout: inputs and targets as (batch_size, num_batches * seq_size) arrays.

    The text is cut to whole batches and split into ``batch_size`` contiguous rows; the
    targets are the inputs shifted by one word, the very last target wrapping to the first word::

        int_text  0 1 2 3 4 5 6 7 8 9 10 11 (12 13: dropped)   batch_size 2, seq_size 3
        in_text   [[0 1 2 3 4 5], [6 7 8 9 10 11]]
        out_text  [[1 2 3 4 5 6], [7 8 9 10 11 0]]
    """
    num_batches = len(int_text) // (seq_size * batch_size)
    if num_batches == 0:
        raise ValueError(
            f"the text has {len(int_text)} words, fewer than one batch of "
            f"batch_size x seq_size = {batch_size * seq_size}"
        )
    in_text = int_text[: num_batches * batch_size * seq_size]
    out_text = np.zeros_like(in_text)
    out_text[:-1] = in_text[1:]
    out_text[-1] = in_text[0]
    in_text = np.reshape(in_text, (batch_size, -1))
    out_text = np.reshape(out_text, (batch_size, -1))
    return in_text, out_text


def get_batches(
    in_text: np.ndarray, out_text: np.ndarray, batch_size: int, seq_size: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Consecutive (batch_size, seq_size) windows, left to right, so the state can carry on."""
    num_batches = int(np.prod(in_text.shape)) // (seq_size * batch_size)
    for i in range(0, num_batches * seq_size, seq_size):
        yield in_text[:, i : i + seq_size], out_text[:, i : i + seq_size]


class RNNModule(nn.Module):
    """The lab's network: embedding -> one-layer tanh RNN -> linear layer over the vocabulary."""

    def __init__(self, n_vocab: int, seq_size: int, embedding_size: int, rnn_size: int) -> None:
        super().__init__()
        self.seq_size = seq_size
        self.rnn_size = rnn_size
        self.embedding = nn.Embedding(n_vocab, embedding_size)
        self.rnn = nn.RNN(embedding_size, rnn_size, batch_first=True)
        self.dense = nn.Linear(rnn_size, n_vocab)

    def forward(self, x: torch.Tensor, prev_state: torch.Tensor) -> tuple[torch.Tensor, Any]:
        embed = self.embedding(x)  # (B, T, E)
        output, state = self.rnn(embed, prev_state)  # (B, T, H), (1, B, H)
        logits = self.dense(output)  # (B, T, V)
        return logits, state

    def zero_state(self, batch_size: int) -> torch.Tensor:
        return torch.zeros(1, batch_size, self.rnn_size)


def get_loss_and_train_op(
    net: nn.Module, lr: float = LEARNING_RATE
) -> tuple[nn.CrossEntropyLoss, torch.optim.Adam]:
    criterion = nn.CrossEntropyLoss()
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    return criterion, optimizer


def predict(
    device: torch.device | str,
    net: RNNModule,
    words: Sequence[str],
    n_vocab: int,
    vocab_to_int: dict[str, int],
    int_to_vocab: dict[int, str],
    top_k: int = PREDICT_TOP_K,
    n_words: int = PREDICT_WORDS,
    rng: Chooser | None = None,
) -> list[str]:
    """The lab's sampler: feed the seed words, then ``n_words`` times pick uniformly among the
    ``top_k`` most likely next words and feed the pick back. Returns seed + new words."""
    chooser: Chooser = np.random if rng is None else rng  # type: ignore[assignment]
    words = list(words)
    net.eval()
    state = net.zero_state(1).to(device)
    for w in words:
        ix = torch.tensor([[vocab_to_int[w]]]).to(device)
        output, state = net(ix, state)

    _, top_ix = torch.topk(output[0], k=top_k)
    choices = top_ix.tolist()
    choice = chooser.choice(choices[0])
    words.append(int_to_vocab[choice])

    for _ in range(n_words - 1):
        ix = torch.tensor([[choice]]).to(device)
        output, state = net(ix, state)

        _, top_ix = torch.topk(output[0], k=top_k)
        choices = top_ix.tolist()
        choice = chooser.choice(choices[0])
        words.append(int_to_vocab[choice])
    return words


def resolve_device(name: str | torch.device) -> torch.device:
    """``auto`` -> the lab's choice: ``cuda`` when available, else ``cpu``."""
    if isinstance(name, torch.device):
        return name
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def train(
    words: Sequence[str],
    *,
    epochs: int = EPOCHS,
    seq_size: int = SEQ_SIZE,
    batch_size: int = BATCH_SIZE,
    embedding_size: int = EMBEDDING_SIZE,
    rnn_size: int = RNN_SIZE,
    lr: float = LEARNING_RATE,
    gradients_norm: float = GRADIENTS_NORM,
    device: str | torch.device = "auto",
    max_seconds: float | None = None,
    max_iterations: int | None = None,
    print_every: int = PRINT_EVERY,
    predict_every: int = PREDICT_EVERY,
    initial_words: Sequence[str] = INITIAL_WORDS,
    top_k: int = PREDICT_TOP_K,
    predict_words: int = PREDICT_WORDS,
    seed: int | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train the lab's network on ``words`` with the lab's loop; return the run's figures.

    Stops after ``epochs``, or once ``max_iterations`` iterations are done, or at the end of
    the first iteration that finishes ``max_seconds`` after the start (0: one iteration), or
    on Ctrl-C. ``print_every`` / ``predict_every`` = 0 turn the loss lines / samples off.

    ``seconds`` counts the training iterations only; the previews' time is in
    ``preview_seconds`` and both are in ``wall_seconds``. Besides the figures, the returned dict
    holds the trained ``net`` and the ``int_to_vocab`` / ``vocab_to_int`` maps.
    """
    dev = resolve_device(device)
    if seed is not None:
        torch.manual_seed(seed)
        np.random.seed(seed)

    int_to_vocab, vocab_to_int = build_vocab(words)
    n_vocab = len(int_to_vocab)
    log(f"Vocabulary size {n_vocab}")
    int_text = [vocab_to_int[w] for w in words]
    in_text, out_text = make_arrays(int_text, batch_size, seq_size)
    num_batches = in_text.shape[1] // seq_size
    if predict_every:
        unknown = [w for w in initial_words if w not in vocab_to_int]
        if unknown:
            raise ValueError(
                f"initial words not in the vocabulary: {', '.join(map(repr, unknown))}"
            )
        if n_vocab < top_k:
            raise ValueError(f"top_k {top_k} is larger than the vocabulary ({n_vocab} words)")

    net = RNNModule(n_vocab, seq_size, embedding_size, rnn_size)
    net = net.to(dev)
    criterion, optimizer = get_loss_and_train_op(net, lr)

    iteration = 0
    losses: list[float] = []
    samples: list[str] = []
    preview_seconds = 0.0
    stopped_by = "epochs"
    start = time.perf_counter()
    try:
        for e in range(epochs):
            batches = get_batches(in_text, out_text, batch_size, seq_size)
            state = net.zero_state(batch_size)
            state = state.to(dev)
            for x, y in batches:
                iteration += 1
                net.train()
                optimizer.zero_grad()
                x = torch.tensor(x).to(dev)
                y = torch.tensor(y).to(dev)
                logits, state = net(x, state)
                loss = criterion(logits.transpose(1, 2), y)
                state = state.detach()
                loss_value = loss.item()
                loss.backward()
                _ = torch.nn.utils.clip_grad_norm_(net.parameters(), gradients_norm)
                optimizer.step()
                losses.append(loss_value)

                if print_every and iteration % print_every == 0:
                    log(f"Epoch: {e}/{epochs} Iteration: {iteration} Loss: {loss_value}")
                if predict_every and iteration % predict_every == 0:
                    begin = time.perf_counter()
                    sample = predict(
                        dev,
                        net,
                        initial_words,
                        n_vocab,
                        vocab_to_int,
                        int_to_vocab,
                        top_k=top_k,
                        n_words=predict_words,
                    )
                    text = " ".join(sample)
                    samples.append(text)
                    log(text)
                    preview_seconds += time.perf_counter() - begin

                if max_iterations is not None and iteration >= max_iterations:
                    stopped_by = "max_iterations"
                elif max_seconds is not None and time.perf_counter() - start >= max_seconds:
                    stopped_by = "max_seconds"
                else:
                    continue
                break
            if stopped_by != "epochs":
                break
    except KeyboardInterrupt:
        stopped_by = "interrupted"
    wall_seconds = time.perf_counter() - start

    seconds = wall_seconds - preview_seconds
    words_processed = iteration * batch_size * seq_size
    return {
        "iterations": iteration,
        "epochs": iteration / num_batches,
        "words_processed": words_processed,
        "seconds": seconds,
        "preview_seconds": preview_seconds,
        "wall_seconds": wall_seconds,
        "words_per_second": words_processed / seconds if seconds > 0 else float("nan"),
        "final_loss": losses[-1] if losses else float("nan"),
        "losses": losses,
        "samples": samples,
        "stopped_by": stopped_by,
        "vocab_size": n_vocab,
        "batches_per_epoch": num_batches,
        "device": str(dev),
        "threads": torch.get_num_threads(),
        "net": net,
        "int_to_vocab": int_to_vocab,
        "vocab_to_int": vocab_to_int,
    }


SUMMARY_KEYS = (
    "iterations",
    "epochs",
    "words_processed",
    "seconds",
    "preview_seconds",
    "wall_seconds",
    "words_per_second",
    "final_loss",
    "stopped_by",
    "vocab_size",
    "batches_per_epoch",
    "device",
    "threads",
)


def summary(result: dict[str, Any]) -> dict[str, Any]:
    """The JSON-able figures of a ``train`` result."""
    return {key: result[key] for key in SUMMARY_KEYS}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.lab_baseline",
        description="Train the original lab's word-level RNN (the benchmark baseline).",
    )
    parser.add_argument("file", type=Path, help="a plain text file (split on whitespace)")
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    parser.add_argument("--max-seconds", type=float, default=None, help="stop after S seconds")
    parser.add_argument("--max-iterations", type=int, default=None)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N (auto)")
    parser.add_argument("--seq-size", type=int, default=SEQ_SIZE)
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE)
    parser.add_argument("--embedding-size", type=int, default=EMBEDDING_SIZE)
    parser.add_argument("--rnn-size", type=int, default=RNN_SIZE)
    parser.add_argument("--lr", type=float, default=LEARNING_RATE)
    parser.add_argument("--gradients-norm", type=float, default=GRADIENTS_NORM)
    parser.add_argument("--print-every", type=int, default=PRINT_EVERY, help="0: never")
    parser.add_argument("--predict-every", type=int, default=PREDICT_EVERY, help="0: never")
    parser.add_argument("--initial-words", nargs="+", default=list(INITIAL_WORDS))
    parser.add_argument("--top-k", type=int, default=PREDICT_TOP_K)
    parser.add_argument("--predict-words", type=int, default=PREDICT_WORDS)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--json", action="store_true", help="end with the summary as JSON")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        words = load_words(args.file)
    except (OSError, UnicodeDecodeError) as exc:
        parser.error(f"cannot read {args.file}: {exc}")
    try:
        device = resolve_device(args.device)
    except RuntimeError as exc:
        parser.error(f"unknown device {args.device!r} ({exc})")
    try:
        result = train(
            words,
            epochs=args.epochs,
            seq_size=args.seq_size,
            batch_size=args.batch_size,
            embedding_size=args.embedding_size,
            rnn_size=args.rnn_size,
            lr=args.lr,
            gradients_norm=args.gradients_norm,
            device=device,
            max_seconds=args.max_seconds,
            max_iterations=args.max_iterations,
            print_every=args.print_every,
            predict_every=args.predict_every,
            initial_words=args.initial_words,
            top_k=args.top_k,
            predict_words=args.predict_words,
            seed=args.seed,
        )
    except ValueError as exc:
        parser.error(f"{exc} (see --initial-words, --predict-every, --batch-size, --seq-size)")

    if all(w in result["vocab_to_int"] for w in args.initial_words):
        sample = predict(
            result["device"],
            result["net"],
            args.initial_words,
            result["vocab_size"],
            result["vocab_to_int"],
            result["int_to_vocab"],
            top_k=min(args.top_k, result["vocab_size"]),
            n_words=args.predict_words,
        )
        print(" ".join(sample))
    figures = summary(result)
    print(
        f"{figures['iterations']} iterations ({figures['epochs']:.2f} epochs), "
        f"{figures['words_processed']} words in {figures['seconds']:.1f} s: "
        f"{figures['words_per_second']:.0f} words/s on {figures['device']}, "
        f"final loss {figures['final_loss']:.4f} (stopped by {figures['stopped_by']})"
    )
    if args.json:
        print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
