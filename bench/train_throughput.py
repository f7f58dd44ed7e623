"""Training speed and quality against the lab's own loop, measured in one run.

    python -m bench.train_throughput                  # about 15 minutes on 2 cores
    python -m bench.train_throughput --quick          # about 2 minutes: a smoke run

Part 1, throughput (words/s, best of ``--repeats`` alternating runs of ``--seconds`` each):
the lab's loop (``bench/lab_baseline.py``) and this trainer at the lab's configuration on the
same words (the first ``--words`` whitespace tokens of the built-in Shakespeare, ~26k distinct),
then this trainer with ``--softmax adaptive`` on the same words. Ratios are against the lab loop
measured in the same run. Targets: lab config >= 1.0x, adaptive >= 3x.

Part 2, quality: the validation perplexity each preset reaches on the whole built-in corpus in
the same wall-clock budget (``--budget-minutes``). Perplexities are comparable only between runs
with the same tokenizer, so the table names it.

Results go to ``bench/results/train_throughput.json`` and a Markdown table to stdout.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bench import lab_baseline
from model_store.vocab import TokenizerSpec
from training.config import TrainConfig, preset
from training.corpus import Corpus, Document, read_corpus
from training.data import build_dataset
from training.trainer import Trainer

RESULTS = Path(__file__).parent / "results" / "train_throughput.json"


def shakespeare_words(limit: int) -> list[str]:
    corpus = read_corpus(["builtin:shakespeare"])
    words: list[str] = []
    for doc in corpus.documents:
        words.extend(doc.text.split())
        if len(words) >= limit:
            break
    return words[:limit]


def run_trainer(
    config: TrainConfig, corpus: Corpus, workdir: Path, device: str = "cpu"
) -> dict[str, Any]:
    """Train in-process for ``config.max_minutes``; words/s counts training iterations only."""
    dataset = build_dataset(
        corpus,
        TokenizerSpec(config.tokenizer, config.lowercase),  # type: ignore[arg-type]
        batch_size=config.batch_size,
        seq_size=config.seq_size,
        valid_fraction=config.valid_fraction,
        min_count=config.min_count,
        max_vocab=config.max_vocab,
    )
    run_dir = Path(tempfile.mkdtemp(dir=workdir))
    trainer = Trainer(config, dataset, run_dir, torch.device(device))
    trainer.start_new()
    summary = trainer.run()
    return {
        "words_per_second": summary.words_per_second,
        "iterations": summary.iterations,
        "seconds": summary.seconds,
        "best_valid_ppl": summary.best_valid_ppl,
        "vocab_size": len(dataset.vocab),
        "epochs": summary.iterations / max(1, trainer._windows_per_epoch()),
    }


def throughput(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    words = shakespeare_words(args.words)
    corpus = Corpus((Document("shakespeare-head", " ".join(words)),))
    lab_cfg = preset("lab").with_overrides(
        valid_fraction=0.0, sample_every=0, max_minutes=args.seconds / 60, epochs=1000
    )
    variants = {
        "lab loop (baseline)": None,
        "trainer, lab config": lab_cfg,
        "trainer, lab config + adaptive softmax": lab_cfg.with_overrides(softmax="adaptive"),
    }
    best: dict[str, dict[str, Any]] = {}
    for rep in range(args.repeats):
        for name, cfg in variants.items():
            if cfg is None:
                res = lab_baseline.train(
                    words,
                    max_seconds=args.seconds,
                    epochs=1000,
                    print_every=0,
                    predict_every=0,
                    device=args.device,
                    seed=rep,
                    log=lambda _: None,
                )
                res = {
                    "words_per_second": res["words_per_second"],
                    "iterations": res["iterations"],
                    "vocab_size": res["vocab_size"],
                }
            else:
                res = run_trainer(cfg, corpus, workdir, args.device)
            print(f"  [{rep + 1}/{args.repeats}] {name}: {res['words_per_second']:,.0f} words/s")
            if name not in best or res["words_per_second"] > best[name]["words_per_second"]:
                best[name] = res
    base = best["lab loop (baseline)"]["words_per_second"]
    for res in best.values():
        res["ratio"] = res["words_per_second"] / base
    return {
        "words": len(words),
        "vocab_size": best["lab loop (baseline)"]["vocab_size"],
        "seconds_per_run": args.seconds,
        "repeats": args.repeats,
        "results": best,
    }


def quality(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    corpus = read_corpus(["builtin:shakespeare"])
    budget = {"max_minutes": args.budget_minutes, "epochs": 1000, "sample_every": 0}
    variants = {
        "lab (whitespace tokens)": preset("lab").with_overrides(**budget),
        "default: lab config, words tokens": preset("default").with_overrides(**budget),
        "lab config + adaptive softmax, words tokens": preset("default").with_overrides(
            softmax="adaptive", **budget
        ),
        "lstm preset (words tokens)": preset("lstm").with_overrides(**budget),
    }
    results = {}
    for name, cfg in variants.items():
        started = time.monotonic()
        res = run_trainer(cfg, corpus, workdir, args.device)
        res["tokenizer"] = cfg.tokenizer
        res["wall_seconds"] = time.monotonic() - started
        print(
            f"  {name}: valid perplexity {res['best_valid_ppl']:.1f} "
            f"({res['epochs']:.2f} epochs, {res['words_per_second']:,.0f} words/s)"
        )
        results[name] = res
    return {"budget_minutes": args.budget_minutes, "results": results}


def markdown(report: dict[str, Any]) -> str:
    t = report["throughput"]
    lines = [
        f"Throughput on the first {t['words']:,} whitespace words of the built-in Shakespeare "
        f"(vocabulary {t['vocab_size']:,}), best of {t['repeats']} runs of "
        f"{t['seconds_per_run']} s:",
        "",
        "| loop | words/s | vs lab loop |",
        "|---|---:|---:|",
    ]
    for name, res in t["results"].items():
        lines.append(f"| {name} | {res['words_per_second']:,.0f} | {res['ratio']:.2f}x |")
    q = report.get("quality")
    if q:
        lines += [
            "",
            f"Validation perplexity after {q['budget_minutes']} minutes of training on the whole "
            "built-in corpus (10% held out):",
            "",
            "| preset | tokens | vocabulary | epochs | words/s | valid perplexity |",
            "|---|---|---:|---:|---:|---:|",
        ]
        for name, res in q["results"].items():
            lines.append(
                f"| {name} | {res['tokenizer']} | {res['vocab_size']:,} | {res['epochs']:.2f} | "
                f"{res['words_per_second']:,.0f} | {res['best_valid_ppl']:.1f} |"
            )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--words", type=int, default=200_000, help="words for the throughput part (default: 200000)"
    )
    parser.add_argument(
        "--seconds", type=float, default=30, help="length of each throughput run (default: 30)"
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=2,
        help="alternating repeats of each throughput run (default: 2)",
    )
    parser.add_argument(
        "--budget-minutes",
        type=float,
        default=3,
        help="training budget of each preset in the quality part (default: 3)",
    )
    parser.add_argument(
        "--device", default="cpu", help="cpu (default, the figures in the README) or cuda[:N]"
    )
    parser.add_argument("--skip-quality", action="store_true", help="throughput part only")
    parser.add_argument(
        "--quick", action="store_true", help="a smoke run: 50k words, 5 s runs, 0.3-minute budgets"
    )
    args = parser.parse_args()
    if args.quick:
        args.words, args.seconds, args.repeats, args.budget_minutes = 50_000, 5, 1, 0.3
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        print("throughput:")
        report: dict[str, Any] = {"throughput": throughput(args, work)}
        if not args.skip_quality:
            print("quality:")
            report["quality"] = quality(args, work)
    report["machine"] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "processor": platform.processor(),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print()
    print(markdown(report))
    print(f"\n(written to {RESULTS})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
