"""Held-out quality at equal training budgets: every preset against PyTorch's example recipe.

    python -m bench.quality                         # 1 and 3 minutes, 200k words and all
    python -m bench.quality --minutes 3 --sizes 200k
    python -m bench.quality --device cuda --epochs 6  # GPUs: equal epochs instead of minutes

The built-in Shakespeare is split by play: two plays (``HELD_OUT``) are the validation text,
the others, in order, the training text, either its first 200,000 words (cut at a line) or
all of it. Each configuration trains in a process of its own on the same files, for the same
wall-clock budget (``--minutes``) or number of epochs, and is then scored on the held-out
plays: bits per character (every character counted, so any two models compare), word
perplexity per whitespace-separated word, and the share of held-out words its vocabulary
did not hold. The baseline is ``bench/word_lm_example.py``. Results go to
``bench/results/quality.json`` and a Markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from model_store import checkpoint
from training.config import PRESETS
from training.corpus import read_corpus
from training.evaluate import evaluate

HELD_OUT = ("builtin:shakespeare/macbeth", "builtin:shakespeare/julius-caesar")
SIZES = {"200k": 200_000, "all": None}
BASELINE = "example"
RESULTS = Path(__file__).parent / "results" / "quality.json"


def split_corpus(words: int | None) -> tuple[str, str]:
    """(training text, held-out text) of the built-in corpus."""
    docs = read_corpus(["builtin:shakespeare"]).documents
    valid = "\n".join(d.text for d in docs if d.name in HELD_OUT)
    train = "\n".join(d.text for d in docs if d.name not in HELD_OUT)
    if words is not None:
        kept, count = [], 0
        for line in train.splitlines(keepends=True):
            if count >= words:
                break
            kept.append(line)
            count += len(line.split())
        train = "".join(kept)
    return train, valid


def run_preset(
    name: str, train: Path, valid: Path, out: Path, budget: list[str], device: str
) -> dict[str, Any]:
    command = [
        sys.executable, "-m", "training", "--corpus", str(train), "--valid-file", str(valid),
        "--out", str(out), "--preset", name, "--quiet", "--sample-every", "0",
        "--device", device, *budget,
    ]  # fmt: skip
    subprocess.run(command, check=True)
    manifest = checkpoint.read_manifest(out)
    loaded = checkpoint.load(out, torch.device(device))
    with torch.inference_mode():
        result = evaluate(loaded, valid.read_text("utf-8"))
    seconds = manifest.get("train_seconds") or 0
    result.update(
        vocabulary=len(loaded.vocab),
        epochs=round(manifest.get("train_words_seen", 0) / manifest["corpus"]["train_tokens"], 2),
        seconds=seconds,
        tokens_per_second=round(manifest.get("train_words_seen", 0) / seconds, 1)
        if seconds
        else None,
    )
    return result


def run_baseline(train: Path, valid: Path, budget: list[str], device: str) -> dict[str, Any]:
    command = [sys.executable, "-m", "bench.word_lm_example", str(train), str(valid), "--json"]
    done = subprocess.run(
        [*command, "--device", device, *budget], check=True, capture_output=True, text=True
    )
    return json.loads(done.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.quality", description=__doc__)
    parser.add_argument("--minutes", default="1,3", help="budgets, comma-separated")
    parser.add_argument("--epochs", type=int, help="equal epochs instead of minutes (GPUs)")
    parser.add_argument("--sizes", default="200k,all", help=f"of {', '.join(SIZES)}")
    parser.add_argument(
        "--presets",
        default=",".join(["default", *PRESETS, BASELINE]),
        help=f"configurations to run ({BASELINE}: the baseline)",
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    budgets = (
        [("epochs", str(args.epochs))]
        if args.epochs
        else [("max-minutes", m) for m in args.minutes.split(",")]
    )
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes.split(","):
            train_text, valid_text = split_corpus(SIZES[size])
            train, valid = Path(tmp, f"train-{size}.txt"), Path(tmp, "valid.txt")
            train.write_text(train_text, "utf-8")
            valid.write_text(valid_text, "utf-8")
            for flag, value in budgets:
                for name in args.presets.split(","):
                    if name == BASELINE:
                        flags = ["--minutes" if flag == "max-minutes" else "--epochs", value]
                        result = run_baseline(train, valid, flags, args.device)
                    else:
                        out = Path(tmp, f"{name}-{size}-{value}")
                        result = run_preset(
                            name, train, valid, out, [f"--{flag}", value], args.device
                        )
                    row = {"size": size, flag: float(value), "config": name, **result}
                    rows.append(row)
                    print(json.dumps(row), file=sys.stderr, flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=1) + "\n", "utf-8")
    print(table(rows))
    return 0


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| training text | budget | configuration | bits/char | vs example | word ppl "
        "| unseen words | epochs |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        budget = f"{row['max-minutes']:g} min" if "max-minutes" in row else f"{row['epochs']} ep"
        base = next(
            (
                r["bits_per_char"]
                for r in rows
                if r["config"] == BASELINE
                and r["size"] == row["size"]
                and r.get("max-minutes") == row.get("max-minutes")
            ),
            None,
        )
        ratio = f"{row['bits_per_char'] / base - 1:+.1%}" if base else "-"
        lines.append(
            f"| {row['size']} | {budget} | {row['config']} | {row['bits_per_char']:.3f} "
            f"| {ratio} | {row['word_perplexity']:.1f} | {row['unknown_word_share']:.1%} "
            f"| {row['epochs']} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
