"""`torchrun -m training`: data-parallel training equals one process with the same global batch."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model_store import checkpoint
from training.__main__ import main

ARGS = [
    "--batch-size",
    "4",
    "--seq-size",
    "5",
    "--embed-dim",
    "8",
    "--hidden-dim",
    "8",
    "--quiet",
    "--sample-every",
    "0",
    "--seed",
    "7",
]


def torchrun(*argv: str) -> subprocess.CompletedProcess[str]:
    launcher = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [launcher, "--standalone", "--nproc_per_node=2", "-m", "training", *argv],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env=env,
    )


def model_tensors(run_dir: Path) -> dict[str, torch.Tensor]:
    tensors, _ = checkpoint.load_resume(run_dir)
    return {k: v for k, v in tensors.items() if k.startswith("model.")}


def assert_close_weights(a: Path, b: Path) -> None:
    wa, wb = model_tensors(a), model_tensors(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=0, atol=1e-4, msg=name)


def test_two_processes_equal_one_and_resume(tiny_corpus: Path, tmp_path: Path) -> None:
    single, multi = tmp_path / "single", tmp_path / "multi"
    assert main(["--corpus", str(tiny_corpus), "--out", str(single), "--epochs", "3", *ARGS]) == 0
    first = torchrun("--corpus", str(tiny_corpus), "--out", str(multi), "--epochs", "2", *ARGS)
    assert first.returncode == 0, first.stderr
    resumed = torchrun("--resume", str(multi), "--epochs", "3", "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    manifest = checkpoint.read_manifest(multi)
    assert manifest["processes"] == 2
    assert manifest["iterations"] == checkpoint.read_manifest(single)["iterations"]
    assert_close_weights(single, multi)
    # only rank 0 wrote: one metrics log with one start record per launch
    starts = [
        line for line in (multi / "metrics.jsonl").read_text().splitlines() if '"start"' in line
    ]
    assert len(starts) == 1


def test_a_diverging_run_stops_every_process_with_one_message(
    tiny_corpus: Path, tmp_path: Path
) -> None:
    out = tmp_path / "r"
    proc = torchrun("--corpus", str(tiny_corpus), "--out", str(out), "--lr", "1e38", *ARGS)
    assert proc.returncode != 0
    assert proc.stderr.count("error: training diverged at iteration ") == 1, proc.stderr
    assert "lost its peers" not in proc.stderr  # every rank stopped at the same step
    assert "NaN" not in (out / checkpoint.MANIFEST_FILE).read_text(encoding="utf-8")


def test_rows_must_split_over_the_processes(tiny_corpus: Path, tmp_path: Path) -> None:
    proc = torchrun(
        "--corpus", str(tiny_corpus), "--out", str(tmp_path / "r"), "--batch-size", "3", "--quiet"
    )
    assert proc.returncode != 0
    assert "--batch-size 3 does not split over 2 processes" in proc.stderr
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("argv", [["--device", "cuda:1"]])
def test_bad_device_is_one_line(
    tiny_corpus: Path, tmp_path: Path, argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    if torch.cuda.device_count() > 1:
        pytest.skip("this machine has that device")
    code = main(["--corpus", str(tiny_corpus), "--out", str(tmp_path / "r"), *argv, "--quiet"])
    assert code == 2
    assert "cuda" in capsys.readouterr().err
