"""How repetitive generated text is, with each generation control off and on, and its cost.

    python -m bench.generation_quality                    # 200 samples of 50 words a control
    python -m bench.generation_quality --samples 64 --words 30

On the default model (``bench/server.py``: ``runs/default``, or the cached default one), in
process: each configuration generates ``--samples`` samples of ``--words`` words from the
same seeds and random seeds (top-k 5, temperature 0.8, where small models loop; only the
control differs), 64 rows stepped together as the batched engine steps them. Reported per
configuration:

- distinct-1/2/3: the share of distinct word n-grams among all n-grams of all samples;
- repeated trigrams: the share of a sample's trigrams that occurred earlier in the same
  sample (the loops small models fall into), averaged over the samples;
- longest copy: the median, 90th percentile and largest of the samples' ``longest_copy``
  (words in the longest run, seed included, found verbatim in the training text);
- words/s at 64 rows (the fastest of ``--repeats`` runs), and its ratio to the run without
  controls (the cost of the control);
- and once: the size of the model's copy index (``copies.npz``) next to its weights', and
  what measuring a sample's ``longest_copy`` costs, 64 at a time (the service does it for
  every sample, those that finish together in one pass).

Writes ``bench/results/generation_quality.json`` and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Hashable, Sequence
from dataclasses import replace
from pathlib import Path

import torch

from app.engine.batch import Batch
from app.engine.handles import GenerationJob
from app.text import SampleText
from bench.server import REPO, BenchError, add_model_args, model_dir
from model_store import checkpoint
from model_store.checkpoint import Checkpoint
from model_store.copies import CopyGuard
from model_store.sampling import SamplingParams

RESULTS = REPO / "bench" / "results" / "generation_quality.json"
ROWS = 64
SEEDS = ["I can", "The king", "What is", "My lord", "Come,", "O", "Now", "She said"]
BASE = SamplingParams(top_k=5, temperature=0.8)  # /generate's top-k, a cooler temperature
CONTROLS: dict[str, SamplingParams] = {
    "none": BASE,
    "repetition_penalty 1.3": replace(BASE, repetition_penalty=1.3),
    "presence_penalty 0.8": replace(BASE, presence_penalty=0.8),
    "frequency_penalty 0.8": replace(BASE, frequency_penalty=0.8),
    "no_repeat_ngram_size 3": replace(BASE, no_repeat_ngram_size=3),
    "max_copy_words 6": replace(BASE, max_copy_words=6),
    "max_copy_words 4": replace(BASE, max_copy_words=4),
}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.generation_quality",
        description="Repetition of generated text with each generation control, and its cost.",
    )
    add_model_args(parser)
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--words", type=int, default=50)
    parser.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="time each configuration this many times and keep the fastest (default 3)",
    )
    parser.add_argument(
        "--threads", type=int, default=0, help="torch's threads (default 0: torch's own)"
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.samples < 1 or args.words < 3 or args.repeats < 1:
        parser.error("--samples and --repeats must be >= 1, and --words >= 3")
    return args


def jobs(
    loaded: Checkpoint, params: SamplingParams, samples: int, words: int
) -> list[GenerationJob]:
    vocab = loaded.vocab
    out = []
    for i in range(samples):
        seed = vocab.split_words(SEEDS[i % len(SEEDS)])
        ids, _, _ = vocab.encode_words(seed)
        job = GenerationJob(
            seed_ids=ids,
            context=seed,
            params=params,
            random_seed=i,
            max_words=words,
            history=ids if params.penalizes else (),
        )
        out.append(job)
    return out


def generate(
    loaded: Checkpoint, all_jobs: list[GenerationJob]
) -> tuple[list[list[str]], list[int], float, float]:
    """Every job's words and longest copy, ``ROWS`` rows at a time, the seconds the steps
    took, and the seconds `longest_copy` took a sample, measured ``ROWS`` at a time (what the
    service adds to each)."""
    if loaded.copies is None:
        raise BenchError(f"{loaded.run_dir} has no copy index: train it again")
    guard = CopyGuard(loaded.copies, loaded.vocab)
    texts: list[list[str]] = []
    copies: list[int] = []
    seconds = measuring = 0.0
    with torch.inference_mode():
        for start in range(0, len(all_jobs), ROWS):
            batch = Batch(loaded.model, loaded.vocab, loaded.vocab.special_ids, guard)
            chunk = all_jobs[start : start + ROWS]
            begin = time.perf_counter()
            updates = batch.join(list(enumerate(chunk)))
            results: dict[Hashable, SampleText] = {}
            while True:
                for update in updates:
                    if update.error is not None:
                        raise BenchError(f"a generation failed: {update.error}")
                    if update.result is not None:
                        results[update.key] = update.result.samples[0]
                if not batch.size:
                    break
                updates = batch.step()
            seconds += time.perf_counter() - begin
            texts += [results[i].words for i in range(len(chunk))]
            begin = time.perf_counter()
            # In one pass, as the service measures the samples that finish together.
            copies += loaded.copies.longest_copies(
                [[*chunk[i].context, *results[i].words] for i in range(len(chunk))]
            )
            measuring += time.perf_counter() - begin
    return texts, copies, seconds, measuring / len(all_jobs)


def distinct(texts: list[list[str]], n: int) -> float:
    grams = [tuple(t[i : i + n]) for t in texts for i in range(len(t) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def repeated_trigrams(texts: list[list[str]]) -> float:
    shares = []
    for text in texts:
        grams = [tuple(text[i : i + 3]) for i in range(len(text) - 2)]
        if grams:
            seen: set[tuple[str, ...]] = set()
            again = 0
            for gram in grams:
                again += gram in seen
                seen.add(gram)
            shares.append(again / len(grams))
    return sum(shares) / len(shares) if shares else 0.0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        run_dir = model_dir(args)
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    loaded = checkpoint.load(run_dir, "cpu")
    rows: dict[str, dict[str, float]] = {}
    for name, params in CONTROLS.items():
        try:
            todo = jobs(loaded, params, args.samples, args.words)
            texts, copies, seconds, measuring = generate(loaded, todo)
            for _ in range(args.repeats - 1):  # the same words again: only the time differs
                _, _, again, measured = generate(loaded, todo)
                seconds, measuring = min(seconds, again), min(measuring, measured)
        except BenchError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        words = sum(len(t) for t in texts)
        copies.sort()
        rows[name] = {
            "distinct_1": distinct(texts, 1),
            "distinct_2": distinct(texts, 2),
            "distinct_3": distinct(texts, 3),
            "repeated_trigrams": repeated_trigrams(texts),
            "longest_copy_p50": copies[len(copies) // 2],
            "longest_copy_p90": copies[len(copies) * 9 // 10],
            "longest_copy_max": copies[-1],
            "words_per_second": words / seconds,
            "longest_copy_us": measuring * 1e6,
        }
        print(f"  {name}: {json.dumps(rows[name])}", file=sys.stderr)
    base = rows["none"]["words_per_second"]
    lines = [
        "| control | distinct-1 | distinct-2 | distinct-3 | repeated trigrams "
        "| longest copy p50 / p90 / max | words/s (64 rows) | vs none |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, row in rows.items():
        lines.append(
            f"| {name} | {row['distinct_1']:.3f} | {row['distinct_2']:.3f} | "
            f"{row['distinct_3']:.3f} | {row['repeated_trigrams']:.1%} | "
            f"{row['longest_copy_p50']} / {row['longest_copy_p90']} / {row['longest_copy_max']} | "
            f"{row['words_per_second']:,.0f} | {row['words_per_second'] / base:.2f}x |"
        )
    files = loaded.manifest["files"]
    sizes = {
        "copy_index_bytes": files[loaded.manifest["copies"]]["bytes"],
        "weights_bytes": files[loaded.manifest["weights"]]["bytes"],
    }
    per_sample = min(row["longest_copy_us"] for row in rows.values())
    lines.append(
        f"\ncopy index {sizes['copy_index_bytes'] / 1e6:.1f} MB, weights "
        f"{sizes['weights_bytes'] / 1e6:.1f} MB; longest_copy {per_sample:.0f} us a sample"
    )
    report = {
        "command": "python -m bench.generation_quality "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "model": str(run_dir),
        **sizes,
        "samples": args.samples,
        "words": args.words,
        "rows": ROWS,
        "results": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print("\n".join(lines))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
