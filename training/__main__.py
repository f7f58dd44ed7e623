"""Command line of the trainer.

    python -m training --corpus lyrics.txt --out runs/lyrics               # the lab's model
    python -m training --corpus builtin:shakespeare --out runs/shakespeare --preset lstm
    python -m training --resume runs/lyrics --epochs 80                    # continue a run

Bad input (a missing or undecodable corpus, one too short for a batch, bad hyperparameters,
an output folder that holds something else) and a run that diverges (a NaN loss) end with a
one-line message and a non-zero exit.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tqdm import tqdm

from model_store import checkpoint
from model_store.network import CELLS, SOFTMAXES, ConfigError
from model_store.vocab import TOKENIZERS, TokenizerSpec, VocabError
from training import distributed
from training.config import (
    MAX_SAMPLE_WORDS,
    MAX_SEED,
    MAX_SEED_WORDS,
    OPTIMIZERS,
    PRESET_HELP,
    PRESETS,
    TrainConfig,
    preset,
)
from training.corpus import CorpusError, read_corpus
from training.data import DataError, build_dataset
from training.distributed import DistContext, DistributedError
from training.trainer import Summary, Trainer, TrainingDiverged

DEFAULTS = TrainConfig()
# What may change when a run is resumed; everything else is fixed by the run folder.
RESUMABLE = {"epochs", "max_minutes", "sample_every", "log_every", "eval_every", "patience"}


class UsageError(Exception):
    """Bad command-line input, reported in one line."""


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def build_parser() -> argparse.ArgumentParser:
    d = DEFAULTS
    parser = argparse.ArgumentParser(
        prog="python -m training",
        description="Train a word-level RNN language model on plain text and write a run folder "
        "(weights, vocabulary, metrics, loss plot) that `python -m app` serves. Defaults are "
        "the lab's; a --preset changes several at once, and any flag given overrides it.",
    )
    io = parser.add_argument_group("input and output")
    io.add_argument(
        "--corpus",
        nargs="+",
        metavar="PATH_OR_BUILTIN",
        help="text files, folders of .txt files, or builtin:shakespeare (the plays "
        "of the optional 'corpora' extra); several are read in order",
    )
    io.add_argument(
        "--out", type=Path, metavar="RUN_DIR", help="run folder to create (must be new or empty)"
    )
    io.add_argument(
        "--resume",
        type=Path,
        metavar="RUN_DIR",
        help="continue the run in RUN_DIR from its last checkpoint (same corpus; "
        f"only {', '.join(sorted(_flag(n) for n in RESUMABLE))} may change)",
    )
    io.add_argument(
        "--preset",
        choices=["default", *PRESETS],
        default="default",
        help="; ".join(f"{k}: {v}" for k, v in PRESET_HELP.items()) + " (default: default)",
    )
    io.add_argument(
        "--valid-file",
        nargs="+",
        metavar="PATH",
        help="validation text instead of holding out the end of the corpus",
    )
    io.add_argument("--encoding", default="utf-8", help="text encoding (default: utf-8)")
    io.add_argument(
        "--encoding-errors",
        choices=["strict", "replace", "ignore"],
        default="strict",
        help="what to do with undecodable bytes (default: strict, "
        "which stops and names the file and byte offset)",
    )
    io.add_argument(
        "--device",
        default="auto",
        help="auto (cuda when present, else cpu), cpu, cuda, cuda:N or mps (default: auto)",
    )
    io.add_argument("--quiet", action="store_true", help="no progress bar or previews")

    data = parser.add_argument_group("tokens and vocabulary")
    data.add_argument(
        "--tokenizer",
        choices=TOKENIZERS,
        help="words: words and punctuation apart, line breaks kept; whitespace: "
        f"the lab's text.split() (default: {d.tokenizer})",
    )
    data.add_argument(
        "--lowercase",
        action=argparse.BooleanOptionalAction,
        help=f"fold case before counting (default: {d.lowercase})",
    )
    data.add_argument(
        "--min-count", type=int, help=f"rarer words become <unk> (default: {d.min_count})"
    )
    data.add_argument(
        "--max-vocab",
        type=int,
        help="keep at most this many tokens, specials included (default: all)",
    )
    data.add_argument(
        "--subword-vocab",
        type=int,
        help="pieces of the subword tokenizer, its 256 bytes included "
        f"(default: {d.subword_vocab})",
    )
    data.add_argument(
        "--valid-fraction",
        type=float,
        help=f"share of the corpus's end held out to validate; 0 turns "
        f"validation off (default: {d.valid_fraction})",
    )

    net = parser.add_argument_group("network")
    net.add_argument("--cell", choices=CELLS, help=f"recurrent cell (default: {d.cell})")
    net.add_argument("--embed-dim", type=int, help=f"embedding size (default: {d.embed_dim})")
    net.add_argument("--hidden-dim", type=int, help=f"hidden size (default: {d.hidden_dim})")
    net.add_argument("--layers", type=int, help=f"stacked layers (default: {d.layers})")
    net.add_argument(
        "--dropout",
        type=float,
        help="dropout of the embeddings and the cell's outputs, one mask per sequence "
        f"(locked) (default: {d.dropout})",
    )
    net.add_argument(
        "--tie-weights",
        action=argparse.BooleanOptionalAction,
        help="share the embedding and output matrices; needs embed-dim == "
        f"hidden-dim (default: {d.tie_weights})",
    )
    net.add_argument(
        "--softmax",
        choices=SOFTMAXES,
        help=f"full, or adaptive (much faster for vocabularies above ~10k) (default: {d.softmax})",
    )
    net.add_argument(
        "--cache-order",
        type=int,
        help="the text cache: the longest context (in tokens) of the n-grams counted in the "
        "text so far and mixed into the network's predictions; 0 turns it off "
        f"(default: {d.cache_order})",
    )
    net.add_argument(
        "--cache-weight",
        type=float,
        help=f"the cache's largest share of a prediction, in [0, 1) (default: {d.cache_weight})",
    )
    net.add_argument(
        "--cache-confidence",
        type=float,
        help="how many times a context must be seen per distinct follower before the cache "
        f"takes half its weight (default: {d.cache_confidence})",
    )
    net.add_argument(
        "--cache-inner-confidence",
        type=float,
        help="the same inside a word (a context only ever followed by pieces that continue a "
        "word), where one sighting says more (default: --cache-confidence)",
    )

    opt = parser.add_argument_group("optimisation")
    opt.add_argument("--epochs", type=int, help=f"passes over the corpus (default: {d.epochs})")
    opt.add_argument("--seq-size", type=int, help=f"window length (default: {d.seq_size})")
    opt.add_argument("--batch-size", type=int, help=f"parallel rows (default: {d.batch_size})")
    opt.add_argument("--lr", type=float, help=f"learning rate (default: {d.lr})")
    opt.add_argument("--clip", type=float, help=f"gradient-norm clipping (default: {d.clip})")
    opt.add_argument("--optimizer", choices=OPTIMIZERS, help=f"optimiser (default: {d.optimizer})")
    opt.add_argument(
        "--weight-decay", type=float, help=f"L2 / decoupled decay (default: {d.weight_decay})"
    )
    opt.add_argument(
        "--average-decay",
        type=float,
        help="keep an exponential moving average of the weights with this decay per step "
        "(0.999: about the last 1,000 steps); validation and the saved model use it; 0 turns "
        f"it off (default: {d.average_decay})",
    )
    opt.add_argument(
        "--lr-plateau-factor",
        type=float,
        help="multiply the LR by this when validation does not improve; 1 turns it "
        f"off (default: {d.lr_plateau_factor})",
    )
    opt.add_argument(
        "--patience",
        type=int,
        help="stop after this many evaluations without improvement; 0 never "
        f"(default: {d.patience})",
    )
    opt.add_argument(
        "--eval-every",
        type=int,
        help="also validate and checkpoint every N iterations; 0 only at epoch "
        f"ends (default: {d.eval_every})",
    )
    opt.add_argument(
        "--max-minutes",
        type=float,
        help="training time budget; ends cleanly with a checkpoint (default: none)",
    )
    opt.add_argument("--seed", type=int, help=f"random seed, 0 to {MAX_SEED} (default: {d.seed})")

    out = parser.add_argument_group("previews and logs")
    out.add_argument(
        "--sample-every",
        type=int,
        help=f"print a sample every N iterations; 0 never (default: {d.sample_every})",
    )
    out.add_argument(
        "--sample-words",
        type=int,
        help=f"words per sample, at most {MAX_SAMPLE_WORDS} (default: {d.sample_words})",
    )
    out.add_argument(
        "--seed-words",
        help=f"sample seed, at most {MAX_SEED_WORDS} words (default: {' '.join(d.seed_words)!r})",
    )
    out.add_argument("--top-k", type=int, help=f"sample among the k likeliest (default: {d.top_k})")
    out.add_argument(
        "--log-every",
        type=int,
        help=f"metrics.jsonl gets the mean loss every N iterations (default: {d.log_every})",
    )
    return parser


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    given = {
        f.name: getattr(args, f.name)
        for f in fields(TrainConfig)
        if getattr(args, f.name, None) is not None
    }
    if "seed_words" in given:
        given["seed_words"] = tuple(given["seed_words"].split())
    return given


class ConsoleReporter:
    """A tqdm bar in words with loss, epoch, words/s and ETA; previews printed above it."""

    def __init__(self) -> None:
        self.bar: tqdm[Any] | None = None

    def start(self, total_words: int, done_words: int) -> None:
        self.bar = tqdm(
            total=total_words,
            initial=done_words,
            unit="word",
            unit_scale=True,
            dynamic_ncols=True,
            mininterval=0.5,
            smoothing=0.05,
        )

    def advance(self, words: int) -> None:
        if self.bar is not None:
            self.bar.update(words)

    def status(self, loss: float, epoch: int) -> None:
        if self.bar is not None:
            self.bar.set_postfix(epoch=epoch, loss=f"{loss:.3f}", refresh=False)

    def message(self, text: str) -> None:
        tqdm.write(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _check_out_dir(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out}: exists and is not a folder")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if checkpoint.is_run_dir(out):
        manifest = checkpoint.read_manifest(out)
        if manifest.get("weights") or manifest.get("resume"):
            raise UsageError(
                f"{out}: already holds a trained run; continue it with --resume {out} or "
                "choose another --out"
            )
        return  # a run that never reached its first checkpoint: nothing to lose
    raise UsageError(f"{out}: the folder holds other files; choose a new or empty folder")


def _corpus_info(sources: list[str], corpus: Any, dataset: Any, valid: list[str] | None) -> dict:
    return {
        "corpus": {
            "sources": sources,
            "valid_sources": valid,
            "documents": len(corpus.documents),
            "sha256": corpus.sha256,
            "words": dataset.corpus_words,
            "train_tokens": int(dataset.train_ids.numel()),
            "valid_tokens": int(dataset.valid_ids.numel()),
            "unk_rate": round(dataset.unk_rate, 6),
        },
        "vocab_size": len(dataset.vocab),
    }


def _sources(paths: list[str]) -> list[str]:
    return [p if p.startswith("builtin:") else str(Path(p).resolve()) for p in paths]


def _prepare(
    config: TrainConfig,
    args: argparse.Namespace,
    sources: list[str],
    valid_sources: list[str] | None,
    spec: TokenizerSpec | None = None,
) -> tuple[Any, dict]:
    """Read and tokenize the corpus; ``spec`` is a resumed run's tokenizer (a subword one
    keeps its learned pieces instead of learning them again)."""
    corpus = read_corpus(sources, args.encoding, args.encoding_errors)
    valid = (
        read_corpus(valid_sources, args.encoding, args.encoding_errors) if (valid_sources) else None
    )
    dataset = build_dataset(
        corpus,
        spec or TokenizerSpec(config.tokenizer, config.lowercase),  # type: ignore[arg-type]
        batch_size=config.batch_size,
        seq_size=config.seq_size,
        valid_fraction=config.valid_fraction,
        valid_corpus=valid,
        min_count=config.min_count,
        max_vocab=config.max_vocab,
        subword_vocab=config.subword_vocab,
    )
    return dataset, _corpus_info(sources, corpus, dataset, valid_sources)


class _FollowerExit(Exception):
    """Ends a rank other than 0 after rank 0 has reported the problem."""


def _on_main(ctx: DistContext, check: Callable[[], None]) -> None:
    """Run ``check`` on rank 0 alone and end every rank with its error, if any."""
    problem = None
    if ctx.is_main:
        try:
            check()
        except (UsageError, checkpoint.CheckpointError) as exc:
            problem = exc
    message = ctx.broadcast(None if problem is None else str(problem))
    if problem is not None:
        raise problem
    if message is not None:
        raise _FollowerExit(message)


def new_run(
    args: argparse.Namespace, reporter: Any, ctx: DistContext, device: torch.device
) -> Trainer:
    if not args.corpus or args.out is None:
        raise UsageError("--corpus and --out are required (or --resume RUN_DIR)")
    config = preset(args.preset).with_overrides(**_overrides(args))
    ctx.rows(config.batch_size)  # the rows must split evenly over the processes
    _on_main(ctx, lambda: _check_out_dir(args.out))
    valid = _sources(args.valid_file) if args.valid_file else None
    dataset, info = _prepare(config, args, _sources(args.corpus), valid)
    info["preset"] = args.preset
    info["processes"] = ctx.world_size
    trainer = Trainer(config, dataset, args.out, device, reporter, info, ctx)
    if ctx.is_main:
        trainer.start_new()
    return trainer


def resume_run(
    args: argparse.Namespace, reporter: Any, ctx: DistContext, device: torch.device
) -> Trainer:
    run_dir: Path = args.resume
    if args.out is not None and args.out.resolve() != run_dir.resolve():
        raise UsageError("--out and --resume name different folders; give --resume alone")
    changed = sorted(set(_overrides(args)) - RESUMABLE)
    if changed:
        raise UsageError(
            f"{', '.join(_flag(n) for n in changed)} cannot change when resuming; "
            f"only {', '.join(sorted(_flag(n) for n in RESUMABLE))} can"
        )
    _, training, vocab, manifest = checkpoint.read_header(run_dir)
    tensors, state = checkpoint.load_resume(run_dir)
    config = TrainConfig.from_json(training).with_overrides(**_overrides(args))
    stored = manifest.get("corpus") or {}
    sources = _sources(args.corpus) if args.corpus else stored.get("sources") or []
    dataset, info = _prepare(config, args, sources, stored.get("valid_sources"), vocab.tokenizer)
    if info["corpus"]["sha256"] != stored.get("sha256") or dataset.vocab.tokens != vocab.tokens:
        raise UsageError(
            f"the corpus differs from the one {run_dir} was trained on "
            "(its sha256 is in manifest.json); pass the same --corpus"
        )
    info["preset"] = manifest.get("preset")
    info["processes"] = ctx.world_size
    trainer = Trainer(config, dataset, run_dir, device, reporter, info, ctx)
    trainer.restore(tensors, state)
    if ctx.is_main and (config != TrainConfig.from_json(training) or "copies" not in manifest):
        # A folder written before copy indexes gets one: the corpus is the same (checked).
        checkpoint.commit(
            run_dir,
            config=trainer.model_config,
            training=config.to_json(),
            copies=dataset.copies,
            info=info,
        )
    return trainer


def _report(summary: Summary) -> str:
    ppl = (
        f"best validation perplexity {summary.best_valid_ppl:.2f} "
        f"({summary.best_valid_bpc:.4f} bits per character)"
        if summary.best_valid_ppl is not None and summary.best_valid_bpc is not None
        else "no validation text"
    )
    return (
        f"{summary.run_dir}: {ppl}; {summary.epochs} epochs, {summary.iterations} iterations, "
        f"{summary.words_per_second:,.0f} words/s ({summary.stop_reason}). "
        f"Serve it with: python -m app --model-dir {summary.run_dir}"
    )


def _train(args: argparse.Namespace, ctx: DistContext, device: torch.device) -> Summary:
    """Build the trainer and run it. The trainer (and the DDP wrapper holding the process
    group) lives only in this frame, so it is gone before the group is torn down."""
    reporter = ConsoleReporter() if not args.quiet and ctx.is_main else None
    start = resume_run if args.resume else new_run
    trainer = start(args, reporter, ctx, device)
    if not args.quiet and ctx.is_main:
        n = sum(p.numel() for p in trainer.model.parameters())
        print(
            f"{len(trainer.vocab):,} tokens in the vocabulary, "
            f"{trainer.dataset.train_ids.numel():,} training and "
            f"{trainer.dataset.valid_ids.numel():,} validation tokens, {n:,} parameters, "
            f"device {trainer.device}",
            file=sys.stderr,
        )
    return trainer.run()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    ctx = DistContext()
    summary: Summary | None = None
    try:
        ctx, device = distributed.setup(args.device)
        summary = _train(args, ctx, device)
    except _FollowerExit:
        return 2
    except (
        UsageError,
        CorpusError,
        DataError,
        ConfigError,
        VocabError,
        DistributedError,
        TrainingDiverged,  # every rank stops at the same step: one message is enough
    ) as exc:
        if ctx.is_main:
            print(f"error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, UsageError | ConfigError | DistributedError) else 1
    except checkpoint.DeviceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except checkpoint.CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"error: {exc.filename or ''}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("aborted; the last checkpoint is intact", file=sys.stderr)
        return 130
    except dist.DistBackendError as exc:  # another process died: its collectives fail
        print(
            f"error: training process {ctx.rank} lost its peers ({str(exc).splitlines()[0]}); "
            "the last checkpoint is intact",
            file=sys.stderr,
        )
        return 1
    finally:
        distributed.teardown(ctx, clean=summary is not None)
    if ctx.is_main:
        print(_report(summary), file=sys.stderr if args.quiet else sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
