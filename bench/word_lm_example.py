"""PyTorch's ``word_language_model`` example, kept as the quality benchmark's baseline.

    python -m bench.word_lm_example train.txt valid.txt [--minutes M | --epochs N] [--json]

A faithful re-implementation of the example's recipe (its ``main.py`` with the defaults
it documents for a good small model): each line split on whitespace plus ``<eos>``, a
frequency-free dictionary in order of first appearance, ``nn.Embedding -> nn.LSTM(2 layers x
200, dropout 0.2) -> nn.Linear``, dropout 0.2 on the embeddings and the LSTM's output, plain
SGD written as ``p -= lr * grad`` with lr 20, gradient-norm clipping at 0.25, the learning
rate divided by 4 whenever an epoch's validation loss does not improve, batch 20, BPTT 35,
the hidden state carried between windows and detached, evaluation with batch 10, and the
weights of the best validation loss kept.

It imports nothing from ``model_store`` or ``training`` on purpose: it is what they are
compared with. What differs from the example, none of it in the recipe:

* the dictionary is built from the training text only, with ``<unk>`` for words it lacks
  (the example adds the validation and test words too, which a real held-out text cannot
  do); ``<unk>`` never occurs in training, so it gets the little probability the model
  gives it, as for any closed-vocabulary model;
* a wall-clock budget (``--minutes``) besides the epoch count, checked after each batch,
  with one last evaluation when it runs out;
* ``bits_per_char``: the validation text's total log-loss (every token, ``<eos>`` and
  ``<unk>`` included) over its characters, the figure ``training.evaluate`` prints for the
  project's models.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

EOS, UNK = "<eos>", "<unk>"


class Dictionary:
    def __init__(self) -> None:
        self.word2idx: dict[str, int] = {}
        self.idx2word: list[str] = []

    def add_word(self, word: str) -> int:
        if word not in self.word2idx:
            self.idx2word.append(word)
            self.word2idx[word] = len(self.idx2word) - 1
        return self.word2idx[word]


def tokenize(text: str, dictionary: Dictionary, grow: bool) -> Tensor:
    ids: list[int] = []
    for line in text.splitlines():
        for word in [*line.split(), EOS]:
            if grow:
                ids.append(dictionary.add_word(word))
            else:
                ids.append(dictionary.word2idx.get(word, dictionary.word2idx[UNK]))
    return torch.tensor(ids, dtype=torch.long)


def batchify(data: Tensor, bsz: int) -> Tensor:
    nbatch = data.size(0) // bsz
    return data.narrow(0, 0, nbatch * bsz).view(bsz, -1).t().contiguous()


def get_batch(source: Tensor, i: int, bptt: int) -> tuple[Tensor, Tensor]:
    seq_len = min(bptt, len(source) - 1 - i)
    return source[i : i + seq_len], source[i + 1 : i + 1 + seq_len].reshape(-1)


class RNNModel(nn.Module):
    def __init__(self, ntoken: int, ninp: int, nhid: int, nlayers: int, dropout: float) -> None:
        super().__init__()
        self.ntoken = ntoken
        self.drop = nn.Dropout(dropout)
        self.encoder = nn.Embedding(ntoken, ninp)
        self.rnn = nn.LSTM(ninp, nhid, nlayers, dropout=dropout)
        self.decoder = nn.Linear(nhid, ntoken)
        self.nlayers, self.nhid = nlayers, nhid
        initrange = 0.1
        nn.init.uniform_(self.encoder.weight, -initrange, initrange)
        nn.init.zeros_(self.decoder.bias)
        nn.init.uniform_(self.decoder.weight, -initrange, initrange)

    def forward(self, x: Tensor, hidden: tuple[Tensor, Tensor]) -> tuple[Tensor, Any]:
        emb = self.drop(self.encoder(x))
        output, hidden = self.rnn(emb, hidden)
        decoded = self.decoder(self.drop(output)).view(-1, self.ntoken)
        return torch.log_softmax(decoded, dim=1), hidden

    def init_hidden(self, bsz: int) -> tuple[Tensor, Tensor]:
        weight = next(self.parameters())
        shape = (self.nlayers, bsz, self.nhid)
        return (weight.new_zeros(shape), weight.new_zeros(shape))


def repackage(hidden: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    return (hidden[0].detach(), hidden[1].detach())


def evaluate(model: RNNModel, source: Tensor, bptt: int, eval_bsz: int) -> float:
    """Mean loss per token over ``source`` (batchified), as the example computes it."""
    model.eval()
    total = 0.0
    hidden = model.init_hidden(eval_bsz)
    with torch.no_grad():
        for i in range(0, source.size(0) - 1, bptt):
            data, targets = get_batch(source, i, bptt)
            output, hidden = model(data, hidden)
            hidden = repackage(hidden)
            total += len(data) * nn.functional.nll_loss(output, targets).item()
    return total / (len(source) - 1)


def stream_log_prob(model: RNNModel, ids: Tensor, bptt: int) -> float:
    """Total log-probability of every token of the validation stream after the first, read
    as one row: what bits per character is computed from."""
    return -evaluate(model, ids.view(-1, 1), bptt, 1) * (ids.numel() - 1)


def run(
    train_text: str,
    valid_text: str,
    *,
    minutes: float | None = None,
    epochs: int = 40,
    lr: float = 20.0,
    clip: float = 0.25,
    bptt: int = 35,
    batch_size: int = 20,
    seed: int = 1111,
    device: str = "cpu",
) -> dict[str, Any]:
    torch.manual_seed(seed)
    dev = torch.device(device)
    dictionary = Dictionary()
    dictionary.add_word(UNK)
    train_ids = tokenize(train_text, dictionary, grow=True)
    valid_ids = tokenize(valid_text, dictionary, grow=False)
    train_data = batchify(train_ids, batch_size).to(dev)
    val_data = batchify(valid_ids, 10).to(dev)
    model = RNNModel(len(dictionary.idx2word), 200, 200, 2, 0.2).to(dev)
    criterion = nn.NLLLoss()
    budget = minutes * 60 if minutes else math.inf
    start = time.monotonic()
    best_val: float | None = None
    best_state: dict[str, Tensor] | None = None
    done_epochs = 0.0
    out_of_time = False
    for _epoch in range(1, epochs + 1):
        model.train()
        hidden = model.init_hidden(batch_size)
        batches = range(0, train_data.size(0) - 1, bptt)
        for n, i in enumerate(batches, start=1):
            data, targets = get_batch(train_data, i, bptt)
            model.zero_grad()
            hidden = repackage(hidden)
            output, hidden = model(data, hidden)
            loss = criterion(output, targets)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(p.grad, alpha=-lr)
            if time.monotonic() - start >= budget:
                done_epochs += n / len(batches)
                out_of_time = True
                break
        else:
            done_epochs += 1
        val_loss = evaluate(model, val_data, bptt, 10)
        if best_val is None or val_loss < best_val:
            best_val = val_loss
            best_state = {k: v.clone() for k, v in model.state_dict().items()}
        else:
            lr /= 4.0
        if out_of_time:
            break
    seconds = time.monotonic() - start
    assert best_state is not None
    model.load_state_dict(best_state)
    log_prob = stream_log_prob(model, valid_ids.to(dev), bptt)
    unk = int((valid_ids == dictionary.word2idx[UNK]).sum())
    words = len(valid_text.split())
    return {
        "bits_per_char": -log_prob / math.log(2) / len(valid_text),
        "word_perplexity": math.exp(-log_prob / words),
        "unknown_word_share": unk / words,
        "characters": len(valid_text),
        "words": words,
        "vocabulary": len(dictionary.idx2word),
        "epochs": round(done_epochs, 2),
        "seconds": round(seconds, 1),
        "words_per_second": round(done_epochs * train_ids.numel() / seconds, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.word_lm_example", description=__doc__)
    parser.add_argument("train", type=Path)
    parser.add_argument("valid", type=Path)
    parser.add_argument("--minutes", type=float, help="wall-clock training budget")
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    result = run(
        args.train.read_text("utf-8"),
        args.valid.read_text("utf-8"),
        minutes=args.minutes,
        epochs=args.epochs,
        device=args.device,
    )
    print(json.dumps(result) if args.json else result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
