"""Words/s of one training process against two data-parallel processes (torchrun, gloo).

    python -m bench.train_distributed                    # about 3 minutes
    python -m bench.train_distributed --preset lab --seconds 30

Each configuration trains the same preset on the built-in Shakespeare for ``--seconds`` and
reads the words/s the trainer recorded in its manifest (training iterations only). On a CPU the
two processes share the machine's cores, so the ratio shows what data parallelism costs and
gains here; on GPUs each rank has a device of its own, and the same global batch split over N
GPUs does about 1/N of the work per rank, so words/s scale with N up to the all-reduce cost
(the weights' size per step: printed below).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from model_store import checkpoint

RESULTS = Path(__file__).parent / "results" / "train_distributed.json"


def launch(processes: int, threads: int, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    train = [
        "-m",
        "training",
        "--corpus",
        "builtin:shakespeare",
        "--out",
        str(out),
        "--preset",
        args.preset,
        "--max-minutes",
        str(args.seconds / 60),
        "--epochs",
        "1000",
        "--quiet",
        "--sample-every",
        "0",
    ]
    if processes == 1:
        command = [sys.executable, *train]
    else:
        torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
        command = [torchrun, "--standalone", f"--nproc_per_node={processes}", *train]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    subprocess.run(command, check=True, env=env, capture_output=True, timeout=args.seconds * 10)
    manifest = checkpoint.read_manifest(out)
    params = sum(t.numel() for t in checkpoint.load(out).model.parameters())
    return {
        "processes": processes,
        "threads_per_process": threads,
        "words_per_second": manifest["train_words_seen"] / manifest["train_seconds"],
        "iterations": manifest["iterations"],
        "allreduce_megabytes_per_step": params * 4 / 1e6,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="lstm", help="training preset (default: lstm)")
    parser.add_argument(
        "--seconds",
        type=float,
        default=45,
        help="training time of each configuration (default: 45)",
    )
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    configs = [(1, cores), (2, max(1, cores // 2))]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (processes, threads) in enumerate(configs):
            res = launch(processes, threads, args, Path(tmp) / f"run{i}")
            results.append(res)
            print(
                f"{processes} process(es) x {threads} thread(s): "
                f"{res['words_per_second']:,.0f} words/s"
            )
    base = results[0]["words_per_second"]
    for res in results:
        res["ratio"] = res["words_per_second"] / base
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"preset": args.preset, "results": results}, indent=2) + "\n")
    print("\n| processes | threads each | words/s | vs 1 process |\n|---:|---:|---:|---:|")
    for res in results:
        print(
            f"| {res['processes']} | {res['threads_per_process']} | "
            f"{res['words_per_second']:,.0f} | {res['ratio']:.2f}x |"
        )
    print(
        f"\nall-reduce per step: {results[0]['allreduce_megabytes_per_step']:.1f} MB of gradients"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
