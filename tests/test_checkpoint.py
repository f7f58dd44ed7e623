"""The run folder: save/load fidelity, verified loading, atomic commits, resume state, devices."""

from __future__ import annotations

import hashlib
import json
import math
import pickle
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch

from model_store import checkpoint
from model_store.checkpoint import CheckpointError
from model_store.network import ModelConfig, WordRNN
from model_store.vocab import Vocab, tokenize
from tests.conftest import TINY_TEXT, MakeRun, commit_non_finite_weights

VOCAB = Vocab.build(tokenize(TINY_TEXT))
IDS = torch.tensor([VOCAB.encode(tokenize("I can see the sea ."))])  # (1, 6)


def make_model(seed: int = 0, **kwargs: Any) -> WordRNN:
    values: dict[str, Any] = {"vocab_size": len(VOCAB), "embed_dim": 8, "hidden_dim": 8}
    values.update(kwargs)
    torch.manual_seed(seed)
    return WordRNN(ModelConfig(**values)).eval()


def first_commit(run_dir: Path, model: WordRNN, iteration: int = 1) -> Path:
    checkpoint.commit(
        run_dir,
        config=model.config,
        training={"seed": 0},
        vocab=VOCAB,
        weights=checkpoint.weights_state(model),
        iteration=iteration,
    )
    return run_dir


def logits_of(model: WordRNN) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS.to(model.embedding.weight.device))[0].cpu()


def manifest_of(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / checkpoint.MANIFEST_FILE).read_text())  # type: ignore[no-any-return]


def weights_file(run_dir: Path) -> Path:
    return run_dir / manifest_of(run_dir)["weights"]


def replace_file(run_dir: Path, name: str, data: bytes) -> None:
    """Put ``data`` in place of a file and record its true hash, as a careful forger would."""
    (run_dir / name).write_bytes(data)
    manifest = manifest_of(run_dir)
    manifest["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (run_dir / checkpoint.MANIFEST_FILE).write_text(json.dumps(manifest))


def load_error(run_dir: Path) -> str:
    with pytest.raises(CheckpointError) as info:
        checkpoint.load(run_dir)
    return str(info.value)


# ---------------------------------------------------------------------------------------------
# Save -> load


@pytest.mark.parametrize(
    "kwargs",
    [
        {"cell": "rnn_tanh"},
        {"cell": "rnn_relu"},
        {"cell": "lstm", "layers": 2},
        {"cell": "gru"},
        {"tie_weights": True},
        {"softmax": "adaptive"},
        {"cell": "lstm", "softmax": "adaptive", "cutoffs": (5, 12), "div_value": 2.0},
    ],
)
def test_load_gives_identical_logits(tmp_path: Path, kwargs: dict[str, Any]) -> None:
    model = make_model(**kwargs)
    loaded = checkpoint.load(first_commit(tmp_path / "run", model))
    assert torch.equal(logits_of(loaded.model), logits_of(model))


def test_load_returns_the_vocab_config_and_an_eval_model(tmp_path: Path) -> None:
    model = make_model(cell="gru")
    loaded = checkpoint.load(first_commit(tmp_path / "run", model))
    assert (loaded.vocab, loaded.config, loaded.training) == (VOCAB, model.config, {"seed": 0})
    assert (loaded.model.training, loaded.device) == (False, torch.device("cpu"))


@pytest.mark.parametrize(("cell", "table"), [("lstm", True), ("gru", False)])
def test_a_loaded_lstm_is_frozen_with_its_input_table(
    tmp_path: Path, cell: str, table: bool
) -> None:
    """A loaded model serves: an LSTM's steps read their input projections from a table."""
    loaded = checkpoint.load(first_commit(tmp_path / "run", make_model(cell=cell)))
    assert (loaded.model._input_table is not None) is table


def test_load_keeps_tied_weights_tied(tmp_path: Path) -> None:
    loaded = checkpoint.load(first_commit(tmp_path / "run", make_model(tie_weights=True)))
    assert loaded.model.decoder is not None
    assert loaded.model.decoder.weight is loaded.model.embedding.weight


def test_model_id_changes_with_the_weights(make_run: MakeRun) -> None:
    first = checkpoint.load(make_run(seed=1)).model_id
    second = checkpoint.load(make_run(seed=2)).model_id
    assert first != second


# ---------------------------------------------------------------------------------------------
# Verified loading: each problem names the offending file


def test_missing_manifest_names_it(make_run: MakeRun) -> None:
    run_dir = make_run()
    (run_dir / checkpoint.MANIFEST_FILE).unlink()
    assert checkpoint.MANIFEST_FILE in load_error(run_dir)


def test_missing_folder_names_it(tmp_path: Path) -> None:
    assert "nowhere" in load_error(tmp_path / "nowhere")


def test_missing_weights_file_names_it(make_run: MakeRun) -> None:
    run_dir = make_run()
    path = weights_file(run_dir)
    path.unlink()
    assert path.name in load_error(run_dir)


def test_truncated_weights_name_the_file(make_run: MakeRun) -> None:
    run_dir = make_run()
    path = weights_file(run_dir)
    path.write_bytes(path.read_bytes()[:-10])
    assert path.name in load_error(run_dir)


@pytest.mark.parametrize("name", ["weights", "config.json", "vocab.json"])
def test_a_flipped_byte_names_the_file(make_run: MakeRun, name: str) -> None:
    run_dir = make_run()
    path = weights_file(run_dir) if name == "weights" else run_dir / name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    assert path.name in load_error(run_dir)


def test_vocab_of_another_size_names_vocab_json(make_run: MakeRun) -> None:
    run_dir = make_run()
    other = Vocab.build(tokenize("a completely different and longer text, with more words."))
    replace_file(run_dir, "vocab.json", other.dumps().encode())
    message = load_error(run_dir)
    assert "vocab.json" in message
    assert "vocab_size" in message


def test_weights_of_the_wrong_shape_name_the_file(make_run: MakeRun) -> None:
    run_dir = make_run()
    name = weights_file(run_dir).name
    tensors = safetensors.torch.load_file(run_dir / name)
    tensors["embedding.weight"] = torch.zeros(len(VOCAB) + 1, 8)
    replace_file(run_dir, name, safetensors.torch.save(tensors))
    message = load_error(run_dir)
    assert name in message
    assert "embedding.weight" in message


def test_weights_missing_a_tensor_name_the_file(make_run: MakeRun) -> None:
    run_dir = make_run()
    name = weights_file(run_dir).name
    tensors = safetensors.torch.load_file(run_dir / name)
    del tensors["decoder.bias"]
    replace_file(run_dir, name, safetensors.torch.save(tensors))
    message = load_error(run_dir)
    assert name in message
    assert "decoder.bias" in message


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_weights_name_the_file_and_the_tensor(make_run: MakeRun, value: float) -> None:
    weights = commit_non_finite_weights(make_run(), value)
    message = load_error(weights.parent)
    assert message == f"{weights}: tensor embedding.weight holds NaN or infinite values"


def test_unknown_manifest_format_version_names_the_manifest(make_run: MakeRun) -> None:
    run_dir = make_run()
    manifest = {**manifest_of(run_dir), "format_version": 99}
    (run_dir / checkpoint.MANIFEST_FILE).write_text(json.dumps(manifest))
    message = load_error(run_dir)
    assert checkpoint.MANIFEST_FILE in message
    assert "format_version 99" in message


def test_unknown_config_format_version_names_config_json(make_run: MakeRun) -> None:
    run_dir = make_run()
    header = {**json.loads((run_dir / "config.json").read_text()), "format_version": 99}
    replace_file(run_dir, "config.json", json.dumps(header).encode())
    message = load_error(run_dir)
    assert "config.json" in message
    assert "format_version 99" in message


def test_bad_model_config_names_config_json(make_run: MakeRun) -> None:
    run_dir = make_run()
    header = json.loads((run_dir / "config.json").read_text())
    header["model"]["cell"] = "transformer"
    replace_file(run_dir, "config.json", json.dumps(header).encode())
    assert "config.json" in load_error(run_dir)


class _Payload:
    """Unpickling it creates ``marker``: proof that loading ran code from the file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.marker), "w"))


def test_payload_runs_code_when_unpickled(tmp_path: Path) -> None:
    # Guards the next test: its payload really would run if anything unpickled it.
    marker = tmp_path / "ran"
    pickle.loads(pickle.dumps(_Payload(marker))).close()
    assert marker.exists()


def test_a_pickle_in_place_of_the_weights_is_rejected_unrun(
    make_run: MakeRun, tmp_path: Path
) -> None:
    run_dir = make_run()
    marker = tmp_path / "pwned"
    name = weights_file(run_dir).name
    replace_file(run_dir, name, pickle.dumps(_Payload(marker)))
    message = load_error(run_dir)
    assert name in message
    assert not marker.exists()


def test_a_torch_save_file_in_place_of_the_weights_is_rejected(make_run: MakeRun) -> None:
    run_dir = make_run()
    name = weights_file(run_dir).name
    torch.save(safetensors.torch.load_file(run_dir / name), run_dir / "state.pt")
    replace_file(run_dir, name, (run_dir / "state.pt").read_bytes())
    assert name in load_error(run_dir)


def test_a_run_without_weights_names_the_manifest(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    checkpoint.commit(run_dir, config=make_model().config, training={}, vocab=VOCAB)
    assert checkpoint.MANIFEST_FILE in load_error(run_dir)


# ---------------------------------------------------------------------------------------------
# Atomic commits


class Crash(Exception):
    """Stands for a kill between two steps of a commit."""


def commit_then_crash(monkeypatch: pytest.MonkeyPatch, run_dir: Path, **kwargs: Any) -> None:
    """Run a commit that dies after writing its data files, just before the manifest."""
    real = checkpoint.atomic_write_bytes

    def write(path: Path, data: bytes) -> None:
        if Path(path).name == checkpoint.MANIFEST_FILE:
            raise Crash(path)
        real(path, data)

    with monkeypatch.context() as patch:
        patch.setattr(checkpoint, "atomic_write_bytes", write)
        with pytest.raises(Crash):
            checkpoint.commit(run_dir, **kwargs)


def test_a_crash_before_the_manifest_keeps_the_previous_weights(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    old, new = make_model(seed=1), make_model(seed=2)
    run_dir = first_commit(tmp_path / "run", old, iteration=1)
    commit_then_crash(monkeypatch, run_dir, weights=checkpoint.weights_state(new), iteration=2)
    assert (run_dir / "model-00000002.safetensors").exists()  # the crash came after it
    assert torch.equal(logits_of(checkpoint.load(run_dir).model), logits_of(old))


def test_a_crash_inside_the_manifest_replace_keeps_the_previous_weights(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    old, new = make_model(seed=1), make_model(seed=2)
    run_dir = first_commit(tmp_path / "run", old, iteration=1)
    real = checkpoint.os.replace

    def replace(src: Any, dst: Any) -> None:
        if Path(dst).name == checkpoint.MANIFEST_FILE:
            raise Crash(dst)
        real(src, dst)

    with monkeypatch.context() as patch:
        patch.setattr(checkpoint.os, "replace", replace)
        with pytest.raises(Crash):
            checkpoint.commit(run_dir, weights=checkpoint.weights_state(new), iteration=2)
    assert torch.equal(logits_of(checkpoint.load(run_dir).model), logits_of(old))


def test_the_commit_after_a_crash_removes_its_leftovers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_dir = first_commit(tmp_path / "run", make_model(seed=1), iteration=1)
    commit_then_crash(
        monkeypatch, run_dir, weights=checkpoint.weights_state(make_model(seed=2)), iteration=2
    )
    (run_dir / "manifest.json.tmp-k1ll3d").write_bytes(b"{")  # a kill inside atomic_write
    newest = make_model(seed=3)
    checkpoint.commit(run_dir, weights=checkpoint.weights_state(newest), iteration=3)
    assert sorted(p.name for p in run_dir.iterdir()) == [
        "config.json",
        "manifest.json",
        "model-00000003.safetensors",
        "vocab.json",
    ]
    assert torch.equal(logits_of(checkpoint.load(run_dir).model), logits_of(newest))


def test_a_crash_while_changing_the_training_config_keeps_the_folder_loadable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Resuming with new hyperparameters (e.g. more epochs) commits config.json again.
    old, new = make_model(seed=1), make_model(seed=2)
    run_dir = first_commit(tmp_path / "run", old, iteration=1)
    commit_then_crash(
        monkeypatch,
        run_dir,
        config=old.config,
        training={"seed": 0, "epochs": 99},
        weights=checkpoint.weights_state(new),
        iteration=2,
    )
    assert torch.equal(logits_of(checkpoint.load(run_dir).model), logits_of(old))


def test_a_crash_while_rewriting_the_same_iteration_keeps_the_folder_loadable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    old, new = make_model(seed=1), make_model(seed=2)
    run_dir = first_commit(tmp_path / "run", old, iteration=5)
    commit_then_crash(monkeypatch, run_dir, weights=checkpoint.weights_state(new), iteration=5)
    assert torch.equal(logits_of(checkpoint.load(run_dir).model), logits_of(old))


def test_a_commit_removes_weights_no_manifest_names(tmp_path: Path) -> None:
    run_dir = first_commit(tmp_path / "run", make_model(seed=1), iteration=1)
    checkpoint.commit(run_dir, weights=checkpoint.weights_state(make_model(seed=2)), iteration=2)
    newest = checkpoint.commit(
        run_dir, weights=checkpoint.weights_state(make_model(seed=3)), iteration=3
    )
    weights = sorted(p.name for p in run_dir.glob("model-*.safetensors"))
    assert weights == ["model-00000003.safetensors"]
    assert sorted(newest["files"]) == ["config.json", "model-00000003.safetensors", "vocab.json"]


def test_remove_leftovers_clears_a_killed_save_and_a_reader_never_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_dir = first_commit(tmp_path / "run", make_model(seed=1), iteration=1)
    commit_then_crash(
        monkeypatch, run_dir, weights=checkpoint.weights_state(make_model(seed=2)), iteration=2
    )
    (run_dir / "resume-00000003.safetensors.tmp-k1ll3d").write_bytes(b"\0" * 4096)
    (run_dir / "metrics.jsonl").write_text("{}\n")
    leftovers = ["model-00000002.safetensors", "resume-00000003.safetensors.tmp-k1ll3d"]
    checkpoint.load(run_dir)  # what the server does at start-up and at each reload
    assert all((run_dir / name).exists() for name in leftovers)
    checkpoint.remove_leftovers(run_dir)
    assert sorted(p.name for p in run_dir.iterdir()) == [
        "config.json",
        "manifest.json",
        "metrics.jsonl",
        "model-00000001.safetensors",
        "vocab.json",
    ]


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_a_non_finite_number_is_never_written_to_the_manifest(
    make_run: MakeRun, value: float
) -> None:
    run_dir = make_run()
    before = (run_dir / checkpoint.MANIFEST_FILE).read_bytes()
    with pytest.raises(ValueError, match="not JSON compliant"):
        checkpoint.commit(run_dir, info={"best_valid_perplexity": value})
    assert (run_dir / checkpoint.MANIFEST_FILE).read_bytes() == before


def test_a_commit_keeps_files_it_does_not_manage(make_run: MakeRun) -> None:
    run_dir = make_run()
    (run_dir / "metrics.jsonl").write_text("{}\n")
    (run_dir / "loss.png").write_bytes(b"png")
    checkpoint.commit(run_dir, weights=checkpoint.weights_state(make_model(seed=3)), iteration=9)
    assert (run_dir / "metrics.jsonl").exists()
    assert (run_dir / "loss.png").exists()


def test_the_first_commit_needs_config_training_and_vocab(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="first commit"):
        checkpoint.commit(tmp_path / "run", weights=checkpoint.weights_state(make_model()))


# ---------------------------------------------------------------------------------------------
# Resume state


def resume_tensors() -> dict[str, torch.Tensor]:
    return {"model.embedding.weight": torch.randn(4, 3), "optimizer.step": torch.tensor([7])}


def test_resume_state_round_trip(make_run: MakeRun) -> None:
    run_dir = make_run()
    tensors, state = resume_tensors(), {"epoch": 3, "position": 17, "rng": [1, 2], "ok": True}
    manifest = checkpoint.commit(run_dir, resume=(tensors, state), iteration=7)
    got_tensors, got_state = checkpoint.load_resume(run_dir)
    assert manifest["resume"] == "resume-00000007.safetensors"
    assert got_state == state
    assert got_tensors.keys() == tensors.keys()
    assert all(torch.equal(got_tensors[k], tensors[k]) for k in tensors)


def test_a_new_resume_state_replaces_the_old_file(make_run: MakeRun) -> None:
    run_dir = make_run()
    checkpoint.commit(run_dir, resume=(resume_tensors(), {"epoch": 1}), iteration=7)
    checkpoint.commit(run_dir, resume=(resume_tensors(), {"epoch": 2}), iteration=8)
    assert sorted(p.name for p in run_dir.glob("resume-*")) == ["resume-00000008.safetensors"]
    assert checkpoint.load_resume(run_dir)[1] == {"epoch": 2}


def test_load_resume_without_a_state_names_the_manifest(make_run: MakeRun) -> None:
    with pytest.raises(CheckpointError, match=r"manifest\.json"):
        checkpoint.load_resume(make_run())


def test_load_resume_verifies_the_file(make_run: MakeRun) -> None:
    run_dir = make_run()
    checkpoint.commit(run_dir, resume=(resume_tensors(), {"epoch": 1}), iteration=7)
    path = run_dir / "resume-00000007.safetensors"
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(CheckpointError, match=path.name):
        checkpoint.load_resume(run_dir)


def test_a_training_state_packs_to_the_resume_file_names_and_back() -> None:
    model = make_model(cell="lstm")
    optimizer = torch.optim.Adam(model.parameters())
    model(IDS)[0].sum().backward()
    optimizer.step()
    hidden = (torch.randn(1, 4, 8), torch.randn(1, 4, 8))
    state = checkpoint.ResumeState(
        weights=checkpoint.weights_state(model),
        optimizer=optimizer.state_dict(),
        scheduler=None,
        progress={"epoch": 1, "window": 3},
        rng=torch.get_rng_state().unsqueeze(0),
        cuda_rng=None,
        hidden=hidden,
    )
    tensors, meta = checkpoint.pack_resume(state)
    # The names are the file format: resume files already written must keep loading.
    assert {k for k in tensors if not k.startswith(("model.", "optim."))} == {
        "rng.torch",
        "hidden.h",
        "hidden.c",
    }
    assert "optim.0.exp_avg" in tensors
    assert list(meta) == ["progress", "optimizer", "scheduler"]
    got = checkpoint.unpack_resume(tensors, json.loads(json.dumps(meta)))
    assert got.progress == state.progress
    assert got.optimizer["param_groups"] == json.loads(json.dumps(state.optimizer["param_groups"]))
    assert got.weights.keys() == state.weights.keys()
    assert got.cuda_rng is None
    assert isinstance(got.hidden, tuple)
    assert all(torch.equal(a, b) for a, b in zip(got.hidden, hidden, strict=True))
    optimizer.load_state_dict(got.optimizer)  # what the trainer does with it


# ---------------------------------------------------------------------------------------------
# Devices


def test_auto_is_cpu_without_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert checkpoint.pick_device("auto") == torch.device("cpu")


def test_cuda_without_cuda_raises_a_readable_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="'cuda' asked for, but CUDA is not available"):
        checkpoint.pick_device("cuda")


@pytest.mark.parametrize("name", ["garbage", "cuda:x", "", "gpu", "meta", "cpu:zero"])
def test_unknown_device_names_raise_value_error(name: str) -> None:
    with pytest.raises(ValueError, match="use auto, cpu, cuda, cuda:N or mps"):
        checkpoint.pick_device(name)


def test_cpu_is_cpu() -> None:
    assert checkpoint.pick_device("cpu") == torch.device("cpu")


def test_load_rejects_an_unknown_device_name(make_run: MakeRun) -> None:
    with pytest.raises(ValueError, match="garbage"):
        checkpoint.load(make_run(), device="garbage")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_load_onto_cuda_gives_the_cpu_logits(tmp_path: Path) -> None:
    model = make_model(cell="lstm", layers=2)
    run_dir = first_commit(tmp_path / "run", model)
    on_gpu = checkpoint.load(run_dir, device="cuda")
    assert on_gpu.model.embedding.weight.device.type == "cuda"
    torch.testing.assert_close(logits_of(on_gpu.model), logits_of(model), rtol=1e-4, atol=1e-5)
