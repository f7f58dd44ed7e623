"""`python -m training`: the command-line contract, end to end, and its one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest

from model_store import checkpoint
from training import evaluate
from training.__main__ import build_parser, main
from training.config import SERVE_PRESET, TrainConfig

FAST = [
    "--embed-dim",
    "8",
    "--hidden-dim",
    "8",
    "--batch-size",
    "2",
    "--seq-size",
    "5",
    "--quiet",
    "--sample-every",
    "0",
]


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    return code, capsys.readouterr().err


def test_end_to_end_subprocess(tiny_corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "training",
            "--corpus",
            str(tiny_corpus),
            "--out",
            str(out),
            "--epochs",
            "2",
            *FAST,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "best validation perplexity" in proc.stderr
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "vocab.json", "manifest.json", "metrics.jsonl", "loss.png"} <= names
    assert any(n.startswith("model-") and n.endswith(".safetensors") for n in names)
    loaded = checkpoint.load(out)
    assert loaded.manifest["epochs"] == 2
    assert loaded.manifest["corpus"]["sha256"]
    assert loaded.training["epochs"] == 2
    assert loaded.vocab.tokenizer.name == "words"


def test_help_explains_every_option_and_its_default() -> None:
    parser = build_parser()
    for action in parser._actions:
        if action.dest in {"help"}:
            continue
        assert action.help, action.dest
    text = parser.format_help()
    for flag in (
        "--corpus",
        "--out",
        "--preset",
        "--epochs",
        "--max-minutes",
        "--seed",
        "--device",
        "--resume",
        "--softmax",
        "--tie-weights",
        "--valid-fraction",
    ):
        assert flag in text
    assert text.count("default") >= 30


def test_lab_preset_takes_the_lab_settings(
    tiny_corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, err = run_cli(
        capsys,
        "--corpus",
        str(tiny_corpus),
        "--out",
        str(tmp_path / "r"),
        "--preset",
        "lab",
        "--epochs",
        "1",
        "--batch-size",
        "2",
        "--quiet",
    )
    assert code == 0, err
    loaded = checkpoint.load(tmp_path / "r")
    assert loaded.vocab.tokenizer.name == "whitespace"
    assert loaded.config.cell == "rnn_tanh"
    assert (loaded.config.embed_dim, loaded.config.hidden_dim) == (64, 64)
    assert loaded.training["lr"] == 0.01
    assert loaded.training["seed_words"] == ["I", "can"]


def test_resume_continues_and_refuses_changed_hyperparameters(
    tiny_corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = str(tmp_path / "r")
    assert (
        run_cli(capsys, "--corpus", str(tiny_corpus), "--out", out, "--epochs", "1", *FAST)[0] == 0
    )
    code, err = run_cli(capsys, "--resume", out, "--hidden-dim", "16")
    assert code == 2
    assert "--hidden-dim cannot change when resuming" in err
    code, err = run_cli(capsys, "--resume", out, "--epochs", "2", "--quiet")
    assert code == 0, err
    assert checkpoint.load(out).manifest["epochs"] == 2


def test_resume_with_another_corpus_is_refused(
    tiny_corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = str(tmp_path / "r")
    assert (
        run_cli(capsys, "--corpus", str(tiny_corpus), "--out", out, "--epochs", "1", *FAST)[0] == 0
    )
    other = tmp_path / "other.txt"
    other.write_text(tiny_corpus.read_text() + " more", encoding="utf-8")
    code, err = run_cli(capsys, "--resume", out, "--corpus", str(other), "--quiet")
    assert code != 0
    assert "corpus differs" in err


def _error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def test_bad_inputs_give_one_line_and_non_zero_exit(
    tiny_corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("", encoding="utf-8")
    short = tmp_path / "short.txt"
    short.write_text("a few words only", encoding="utf-8")
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"hello \xff\xfe world")
    out = str(tmp_path / "out")
    cases = [
        (["--corpus", str(empty), "--out", out], "no words"),
        (["--corpus", str(short), "--out", out], "at least 321"),
        (["--corpus", str(tmp_path / "nope.txt"), "--out", out], "no such file"),
        (["--corpus", str(binary), "--out", out], "byte 6"),
        (
            ["--corpus", str(tiny_corpus), "--out", out, "--tie-weights", "--hidden-dim", "32"],
            "--tie-weights needs --embed-dim equal to --hidden-dim",
        ),
        (["--corpus", str(tiny_corpus), "--out", out, "--epochs", "0"], "--epochs must be"),
        (["--corpus", str(tiny_corpus), "--out", out, "--device", "cuda:7"], "cuda"),
        (["--corpus", str(tiny_corpus)], "--out are required"),
    ]
    for argv, message in cases:
        code, err = run_cli(capsys, *argv, "--quiet")
        assert code != 0, argv
        assert message in _error_line(err), (argv, err)
    assert not (tmp_path / "out").exists()


FLOAT_FIELDS = [f.name for f in fields(TrainConfig) if f.type in ("float", "float | None")]


@pytest.mark.parametrize("name", FLOAT_FIELDS)
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_a_non_finite_hyperparameter_is_refused_in_one_line(
    tiny_corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str, value: str
) -> None:
    flag = "--" + name.replace("_", "-")
    out = tmp_path / "out"
    argv = ["--corpus", str(tiny_corpus), "--out", str(out), "--epochs", "1", *FAST]
    code, err = run_cli(capsys, *argv, f"{flag}={value}")
    assert code == 2
    assert _error_line(err).startswith(f"error: {flag} must be")
    assert not out.exists()


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--sample-words", "100000000", "--sample-words must be at most 1000"),
        ("--seed-words", " ".join(["I"] * 1001), "--seed-words must hold at most 1000 words"),
        ("--seed", str(2**64), "--seed must be in [0, 4294967295]"),
        ("--seed", "-1", "--seed must be in [0, 4294967295]"),
    ],
)
def test_an_unbounded_preview_or_seed_is_refused_in_one_line(
    tiny_corpus: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    flag: str,
    value: str,
    message: str,
) -> None:
    out = tmp_path / "out"
    argv = ["--corpus", str(tiny_corpus), "--out", str(out), "--epochs", "1", *FAST]
    code, err = run_cli(capsys, *argv, f"{flag}={value}")
    assert code == 2
    assert _error_line(err) == f"error: {message}"
    assert not out.exists()


def test_a_diverging_run_ends_in_one_line_and_saves_no_nan(
    tiny_corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    argv = ["--corpus", str(tiny_corpus), "--out", str(out), "--epochs", "3", *FAST]
    # Finite, but the weights overflow on any CPU (1e30 did not on every one).
    code, err = run_cli(capsys, *argv, "--lr", "1e38")
    assert code == 1
    line = _error_line(err)
    assert line.startswith("error: training diverged at iteration ")
    assert "the training loss is not finite" in line
    text = (out / checkpoint.MANIFEST_FILE).read_text(encoding="utf-8")
    assert "NaN" not in text
    assert "Infinity" not in text
    with pytest.raises(checkpoint.CheckpointError, match="names no weights yet"):
        checkpoint.load(out)


def test_output_folder_with_other_files_is_left_alone(
    tiny_corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "docs"
    out.mkdir()
    (out / "thesis.tex").write_text("precious", encoding="utf-8")
    code, err = run_cli(capsys, "--corpus", str(tiny_corpus), "--out", str(out), *FAST)
    assert code == 2
    assert "holds other files" in _error_line(err)
    assert [p.name for p in out.iterdir()] == ["thesis.tex"]


def test_an_earlier_run_is_never_overwritten(
    tiny_corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "r"
    assert (
        run_cli(capsys, "--corpus", str(tiny_corpus), "--out", str(out), "--epochs", "1", *FAST)[0]
        == 0
    )
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    code, err = run_cli(capsys, "--corpus", str(tiny_corpus), "--out", str(out), *FAST)
    assert code == 2
    assert "--resume" in _error_line(err)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_valid_file_replaces_the_held_out_end(
    tiny_corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    valid = tmp_path / "valid.txt"
    valid.write_text("I can see the sea.\n", encoding="utf-8")
    out = tmp_path / "r"
    code, err = run_cli(
        capsys,
        "--corpus",
        str(tiny_corpus),
        "--out",
        str(out),
        "--epochs",
        "1",
        "--valid-file",
        str(valid),
        *FAST,
    )
    assert code == 0, err
    corpus = checkpoint.read_manifest(out)["corpus"]
    assert corpus["valid_tokens"] == 8  # <bos> I can see the sea . <nl>


def test_subword_run_resumes_with_its_pieces_and_reports_bits_per_char(
    tiny_corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = str(tmp_path / "sub")
    argv = ["--tokenizer", "subword", "--subword-vocab", "300", "--epochs", "1", *FAST]
    assert run_cli(capsys, "--corpus", str(tiny_corpus), "--out", out, *argv)[0] == 0
    first = checkpoint.load(out)
    assert first.vocab.is_subword
    assert first.manifest["best_valid_bits_per_char"] > 0
    code, err = run_cli(capsys, "--resume", out, "--epochs", "2", "--quiet")
    assert code == 0, err
    resumed = checkpoint.load(out)
    assert resumed.manifest["epochs"] == 2
    assert resumed.vocab.tokens == first.vocab.tokens
    records = (tmp_path / "sub" / "metrics.jsonl").read_text().splitlines()
    assert any('"valid_bpc"' in line for line in records)


def test_evaluate_prints_bits_per_char_as_json(
    tiny_corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = str(tmp_path / "run")
    assert (
        run_cli(capsys, "--corpus", str(tiny_corpus), "--out", out, "--epochs", "1", *FAST)[0] == 0
    )
    held_out = tmp_path / "held-out.txt"
    held_out.write_text("I can see the zebra.\n", encoding="utf-8")
    assert evaluate.main([out, "--text", str(held_out)]) == 0
    line = capsys.readouterr().out
    assert "bits per character over 21 characters" in line
    assert "16.67% of the words not in the vocabulary" in line
    assert evaluate.main([out, "--text", str(held_out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["characters"] == 21
    assert result["words"] == 5
    assert result["unknown_word_share"] == pytest.approx(1 / 6)  # "zebra" of 6 word tokens
    assert result["bits_per_char"] > 0
    assert evaluate.main([out, "--text", str(tmp_path / "missing.txt")]) == 1
    assert "no such file" in capsys.readouterr().err


def test_make_serve_trains_the_serve_preset() -> None:
    makefile = (Path(__file__).resolve().parents[1] / "Makefile").read_text()
    assert f"PRESET ?= {SERVE_PRESET}\n" in makefile


def test_resuming_a_folder_written_before_copy_indexes_adds_one(
    tiny_corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "r"
    assert (
        run_cli(capsys, "--corpus", str(tiny_corpus), "--out", str(out), "--epochs", "1", *FAST)[0]
        == 0
    )
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest.pop("copies") == "copies.npz"
    del manifest["files"]["copies.npz"]
    (out / "manifest.json").write_text(json.dumps(manifest))
    (out / "copies.npz").unlink()
    assert checkpoint.load(out).copies is None
    code, err = run_cli(capsys, "--resume", str(out), "--quiet")
    assert code == 0, err
    loaded = checkpoint.load(out)
    assert loaded.copies is not None
    words = loaded.vocab.tokenizer.words(tiny_corpus.read_text())
    assert loaded.copies.longest_copy(words[:6]) == 6
