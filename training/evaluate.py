"""Score a held-out text with a trained run: ``python -m training.evaluate RUN_DIR --text FILE``.

Prints bits per character (every character of the file counted, whatever the model's
tokens: the figure that compares any two models), word perplexity (per whitespace-separated
word of the file, so it too compares models with different tokens) and the share of words
the vocabulary did not hold (``<unk>``; always 0 for a ``subword`` model). ``--json`` prints
one JSON object instead.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import torch

from model_store import checkpoint
from model_store.checkpoint import Checkpoint
from model_store.network import QUANTIZATIONS
from model_store.scoring import bits_per_char, token_log_probs
from model_store.vocab import NEWLINE
from training.corpus import CorpusError, read_corpus


def evaluate(loaded: Checkpoint, text: str) -> dict[str, Any]:
    """The figures of ``text`` (one document: ``<bos>``, then its tokens) under ``loaded``."""
    vocab = loaded.vocab
    ids = vocab.encode(vocab.tokenize(text))  # exact, as training read its text
    if not ids:
        raise ValueError("the text holds no words")
    log_prob = math.fsum(token_log_probs(loaded.model, vocab, ids).tolist())
    n_words = len(text.split())
    held = [i for i, w in zip(ids, vocab.decode(ids), strict=True) if w != NEWLINE]
    unknown = 0 if vocab.is_subword else sum(1 for i in held if i == vocab.unk_id)
    return {
        "bits_per_char": bits_per_char(log_prob, len(text)),
        "word_perplexity": math.exp(min(-log_prob / max(n_words, 1), 700.0)),
        "unknown_word_share": unknown / len(held) if held else 0.0,
        "log_prob": log_prob,
        "characters": len(text),
        "words": n_words,
        "tokens": len(ids),
        "tokenizer": vocab.tokenizer.name,
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m training.evaluate",
        description="Bits per character, word perplexity and unknown words of a held-out "
        "text under a trained run.",
    )
    parser.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a trained run folder")
    parser.add_argument("--text", required=True, nargs="+", metavar="PATH", help="text files")
    parser.add_argument("--encoding", default="utf-8", help="text encoding (default: utf-8)")
    parser.add_argument("--device", default="cpu", help="cpu (default), auto, cuda, cuda:N, mps")
    parser.add_argument(
        "--quantize",
        choices=QUANTIZATIONS,
        default="off",
        help="int8: score with the int8 weights a server started with WORDRNN_QUANTIZE=int8 "
        "uses (CPU only)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        corpus = read_corpus(args.text, args.encoding)
        device = checkpoint.pick_device(args.device)
        loaded = checkpoint.load(args.run_dir, device, args.quantize)
        text = "\n".join(doc.text for doc in corpus.documents)
        with torch.inference_mode():
            result = evaluate(loaded, text)
    except (CorpusError, checkpoint.CheckpointError, ValueError) as exc:
        print(f"error: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"{result['bits_per_char']:.4f} bits per character over {result['characters']:,} "
            f"characters; word perplexity {result['word_perplexity']:.2f} over "
            f"{result['words']:,} words; {result['unknown_word_share']:.2%} of the words "
            "not in the vocabulary"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
