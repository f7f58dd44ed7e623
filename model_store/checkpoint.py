"""The run folder: the checkpoint format, its atomic writing and its verified loading.

A run folder holds::

    config.json                  format_version, the model config, the training hyperparameters
    vocab.json                   the vocabulary (see vocab.py)
    copies.npz                   the training text's words, for the copy guard (see copies.py;
                                 absent from folders written before it)
    model-<iteration>.safetensors   the best weights so far (what the server loads)
    resume-<iteration>.safetensors  the last training state (`ResumeState`: weights, optimizer,
                                 RNG, position, the hidden state carried mid-epoch)
    manifest.json                names the current weights and resume files, with the sha256
                                 and size of every file above, the corpus digest, word counts,
                                 the best validation perplexity, library versions, times
    metrics.jsonl, loss.png      written by the trainer

``manifest.json`` is the commit point. A save writes its new files under new names, then
replaces the manifest in one ``os.replace``, then removes the files that no manifest names any
more. A crash or a kill at any moment leaves the previous manifest and every file it names in
place, so the folder always loads, and the files a kill leaves behind are removed by the next
save or when the trainer takes the folder back (``remove_leftovers``; a reader never deletes).
Weights are safetensors files: loading never unpickles, and weights that are not finite (a run
that diverged) are refused. The JSON files are strict JSON: NaN and infinities are never written.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import re
import reprlib
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch
from torch import Tensor

from model_store.copies import COPIES_FILE, CopyIndex, CopyIndexError
from model_store.network import (
    QUANTIZATIONS,
    ConfigError,
    Hidden,
    ModelConfig,
    WordRNN,
    hidden_from_tensors,
    hidden_to_tensors,
    quantized,
)
from model_store.vocab import Vocab, VocabError

FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
VOCAB_FILE = "vocab.json"
MANIFEST_FILE = "manifest.json"
# The files a manifest may name (nothing else is ever read, nor any path outside the folder).
_MANAGED_RE = re.compile(
    r"^(?:(?:model|resume)-\d+(?:-[0-9a-f]{12})?\.safetensors"
    r"|(?:config|vocab)(?:-[0-9a-f]{12})?\.json|copies(?:-[0-9a-f]{12})?\.npz)$"
)
_TMP_MARK = ".tmp-"
_UMASK = os.umask(0o022)
os.umask(_UMASK)


class CheckpointError(Exception):
    """A run folder that cannot be loaded; ``str()`` names the offending file."""

    def __init__(self, path: Path | str, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = Path(path)
        self.problem = problem


class DeviceError(ValueError):
    """A device name this machine cannot provide."""


@dataclass
class Checkpoint:
    """A loaded run folder: the network on its device, in eval mode, with its vocabulary."""

    run_dir: Path
    model: WordRNN
    vocab: Vocab
    config: ModelConfig
    training: dict[str, Any]
    manifest: dict[str, Any]
    device: torch.device
    copies: CopyIndex | None = None  # None for a folder written before copy indexes

    @property
    def model_id(self) -> str:
        """A short id that changes whenever the weights change."""
        sha = self.manifest["files"][self.manifest["weights"]]["sha256"]
        return f"{self.run_dir.name}-{sha[:12]}"


# ---------------------------------------------------------------------------------------------
# Devices


def pick_device(name: str = "auto") -> torch.device:
    """``auto`` -> ``cuda`` when present, else ``cpu``; also ``cpu``, ``cuda``, ``cuda:N``, ``mps``.

    Raises DeviceError (a ValueError) with a readable message for a device this machine lacks.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise DeviceError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"device {name!r} asked for, but CUDA is not available here")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceError(
                f"device {name!r} asked for, but only {torch.cuda.device_count()} CUDA "
                "device(s) exist"
            )
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise DeviceError("device 'mps' asked for, but MPS is not available here")
    elif device.type != "cpu":
        raise DeviceError(f"unsupported device {name!r}; use auto, cpu, cuda, cuda:N or mps")
    return device


# ---------------------------------------------------------------------------------------------
# Atomic files


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never half."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=path.name + _TMP_MARK, dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the usual file mode
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def _file_record(data: bytes) -> dict[str, Any]:
    return {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


def _json_bytes(data: Any) -> bytes:
    """Strict JSON: a NaN or an infinity raises ValueError instead of writing a file that other
    JSON readers (browsers, jq, most languages) reject."""
    text = json.dumps(data, indent=2, ensure_ascii=False, sort_keys=False, allow_nan=False)
    return (text + "\n").encode()


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for dist in ("wordrnn", "safetensors", "numpy"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[dist] = metadata.version(dist)
    return versions


# ---------------------------------------------------------------------------------------------
# Writing


def is_run_dir(path: Path) -> bool:
    return (Path(path) / MANIFEST_FILE).is_file()


def weights_state(model: WordRNN) -> dict[str, Tensor]:
    """The tensors saved for ``model``: its state dict without the tied duplicate."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_weights:
        state.pop("decoder.weight", None)
    return state


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _brief(value: object) -> str:
    """``repr(value)``, shortened: messages quote what a damaged file holds, which may be huge."""
    return reprlib.repr(value)


def _parse_json(path: Path, data: bytes | str, what: str) -> Any:
    """Parse a JSON document from ``path``; any failure is a CheckpointError naming the file."""
    try:
        return json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(path, f"{what} is not valid JSON ({exc})") from None
    except RecursionError:
        raise CheckpointError(path, f"{what} is nested too deeply to be read") from None


def read_manifest(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / MANIFEST_FILE
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(path, "missing: this is not a run folder") from None
    except OSError as exc:
        raise CheckpointError(path, f"unreadable manifest ({exc.strerror})") from None
    data = _parse_json(path, raw, "the manifest")
    if not isinstance(data, dict) or not isinstance(data.get("files"), dict):
        raise CheckpointError(path, "not a run manifest (no 'files' table)")
    if data.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            path,
            f"unsupported format_version {_brief(data.get('format_version'))} "
            f"(this version reads {FORMAT_VERSION})",
        )
    return data


def commit(
    run_dir: Path,
    *,
    config: ModelConfig | None = None,
    training: Mapping[str, Any] | None = None,
    vocab: Vocab | None = None,
    weights: Mapping[str, Tensor] | None = None,
    resume: tuple[Mapping[str, Tensor], Mapping[str, Any]] | None = None,
    iteration: int = 0,
    info: Mapping[str, Any] | None = None,
    copies: CopyIndex | None = None,
) -> dict[str, Any]:
    """Write a new version of the run folder atomically and return its manifest.

    The first commit must give ``config``, ``training`` and ``vocab`` (and ``copies``, the
    training text's index, when there is one); later ones give new ``weights`` (the best
    model) and/or a new ``resume`` state (tensors and a JSON-able dict) and ``info`` to merge
    into the manifest. Files not given stay as they were.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    manifest = read_manifest(run_dir) if is_run_dir(run_dir) else None
    if manifest is None:
        if config is None or vocab is None or training is None:
            raise ValueError("the first commit of a run folder needs config, training and vocab")
        manifest = {
            "format_version": FORMAT_VERSION,
            "files": {},
            "weights": None,
            "resume": None,
            "created": _now(),
        }
    files: dict[str, Any] = dict(manifest["files"])

    def put(role: str, name: str, data: bytes) -> None:
        """Write ``data`` for ``role`` (config, vocab, copies, weights, resume) without ever
        touching a file the current manifest names: changed contents under a name already in
        use go to ``<stem>-<sha12><suffix>``, so the old manifest stays loadable until it is
        replaced."""
        record = _file_record(data)
        if name in files and files[name] != record:
            stem, dot, suffix = name.partition(".")
            name = f"{stem}-{record['sha256'][:12]}{dot}{suffix}"
        if files.get(name) != record or not (run_dir / name).is_file():
            atomic_write_bytes(run_dir / name, data)
        files[name] = record
        manifest[role] = name

    if config is not None:
        header = {
            "format_version": FORMAT_VERSION,
            "model": config.to_json(),
            "training": dict(training or {}),
        }
        put("config", CONFIG_FILE, _json_bytes(header))
    if vocab is not None:
        put("vocab", VOCAB_FILE, vocab.dumps().encode("utf-8"))
    if copies is not None:
        put("copies", COPIES_FILE, copies.to_bytes())
    if weights is not None:
        data = safetensors.torch.save(dict(weights), metadata={"kind": "weights"})
        put("weights", f"model-{iteration:08d}.safetensors", data)
    if resume is not None:
        tensors, state = resume
        # Not strict JSON: the LR scheduler's state holds infinities, and only load_resume
        # (Python's json, which reads them back) ever parses it.
        meta = {"kind": "resume", "state": json.dumps(state)}
        put(
            "resume",
            f"resume-{iteration:08d}.safetensors",
            safetensors.torch.save(dict(tensors), metadata=meta),
        )
    live = {manifest.get(role) for role in ("config", "vocab", "copies", "weights", "resume")}
    manifest["files"] = {k: v for k, v in files.items() if k in live}
    manifest.update(dict(info or {}))
    manifest["versions"] = library_versions()
    manifest["updated"] = _now()
    atomic_write_bytes(run_dir / MANIFEST_FILE, _json_bytes(manifest))
    _remove_stale(run_dir, set(manifest["files"]))
    return manifest


def remove_leftovers(run_dir: Path) -> None:
    """Remove what a save killed midway left in ``run_dir``: its temporaries (as large as the
    weights) and the files no manifest names. Only the folder's one writer may call this, when it
    takes the folder (the trainer, as it resumes): another writer's temporaries are in use, and
    a server reading the folder must never delete."""
    run_dir = Path(run_dir)
    _remove_stale(run_dir, set(read_manifest(run_dir)["files"]))


def _remove_stale(run_dir: Path, live: set[str]) -> None:
    """Remove weights no manifest names and temp files left by a crash (one writer per run)."""
    for entry in run_dir.iterdir():
        if (_MANAGED_RE.match(entry.name) and entry.name not in live) or _TMP_MARK in entry.name:
            with contextlib.suppress(OSError):
                entry.unlink()


# ---------------------------------------------------------------------------------------------
# Reading


def _read_verified(run_dir: Path, manifest: Mapping[str, Any], name: str) -> bytes:
    if not isinstance(name, str) or not _MANAGED_RE.match(name):
        raise CheckpointError(run_dir / MANIFEST_FILE, f"names an unexpected file {_brief(name)}")
    path = run_dir / name
    record = manifest["files"].get(name)
    if not isinstance(record, dict):
        raise CheckpointError(run_dir / MANIFEST_FILE, f"names no record for {name}")
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(path, "missing (the manifest names it)") from None
    except OSError as exc:
        raise CheckpointError(path, f"unreadable ({exc.strerror})") from None
    if len(data) != record.get("bytes") or hashlib.sha256(data).hexdigest() != record.get("sha256"):
        raise CheckpointError(
            path, "corrupt: its size or sha256 differs from manifest.json (truncated or edited?)"
        )
    return data


def read_header(run_dir: Path) -> tuple[ModelConfig, dict[str, Any], Vocab, dict[str, Any]]:
    """Verified config, training hyperparameters, vocabulary and manifest of a run folder."""
    run_dir = Path(run_dir)
    manifest = read_manifest(run_dir)
    config_name = manifest.get("config", CONFIG_FILE)
    vocab_name = manifest.get("vocab", VOCAB_FILE)
    raw = _read_verified(run_dir, manifest, config_name)
    path = run_dir / config_name
    header = _parse_json(path, raw, "the config")
    if not isinstance(header, dict) or header.get("format_version") != FORMAT_VERSION:
        version = header.get("format_version") if isinstance(header, dict) else None
        raise CheckpointError(
            path,
            f"unsupported format_version {_brief(version)} (this version reads {FORMAT_VERSION})",
        )
    try:
        config = ModelConfig.from_json(header.get("model"))
    except ConfigError as exc:
        raise CheckpointError(path, str(exc)) from None
    training = header.get("training") or {}
    if not isinstance(training, dict):
        raise CheckpointError(path, "'training' must be a JSON object")
    vocab_raw = _read_verified(run_dir, manifest, vocab_name)
    vocab_path = run_dir / vocab_name
    try:
        vocab = Vocab.loads(vocab_raw.decode("utf-8"))
    except (VocabError, UnicodeDecodeError) as exc:
        raise CheckpointError(vocab_path, str(exc)) from None
    except RecursionError:
        raise CheckpointError(vocab_path, "nested too deeply to be read") from None
    if len(vocab) != config.vocab_size:
        raise CheckpointError(
            vocab_path,
            f"holds {len(vocab)} tokens but config.json says vocab_size {config.vocab_size}",
        )
    return config, dict(training), vocab, manifest


def _load_tensors(path: Path, data: bytes) -> tuple[dict[str, Tensor], dict[str, str]]:
    try:
        tensors = safetensors.torch.load(data)
        with safetensors.safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as exc:  # safetensors raises several types for malformed files
        raise CheckpointError(path, f"not a readable safetensors file ({exc})") from None
    return tensors, meta


def check_state(model: WordRNN, tensors: Mapping[str, Tensor], path: Path) -> None:
    """Raise CheckpointError unless ``tensors`` match the model's names, shapes and dtypes and
    hold finite values only."""
    expected = weights_state(model)
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        raise CheckpointError(
            path,
            "tensor names do not match config.json "
            f"(missing: {', '.join(missing) or 'none'}; unexpected: {', '.join(extra) or 'none'})",
        )
    for name, tensor in expected.items():
        got = tensors[name]
        if got.shape != tensor.shape or got.dtype != tensor.dtype:
            raise CheckpointError(
                path,
                f"tensor {name} has shape {tuple(got.shape)} {got.dtype}, but config.json and "
                f"vocab.json need {tuple(tensor.shape)} {tensor.dtype}",
            )
        if not bool(got.isfinite().all()):  # a diverged run: it would only ever sample NaN
            raise CheckpointError(path, f"tensor {name} holds NaN or infinite values")


def _build(config: ModelConfig, config_path: Path, tensors: Mapping[str, Tensor]) -> WordRNN:
    """The network ``config`` describes, refused before it is built if the weights cannot fit it.

    A damaged config may ask for sizes no machine can hold, or for a million layers. Every size
    of a matching network is a dimension of some tensor in the file, and every layer has
    tensors of its own, so neither may exceed what the weights file holds.
    """
    largest = max((max(t.shape, default=1) for t in tensors.values()), default=0)
    for name in ("embed_dim", "hidden_dim"):
        size = getattr(config, name)
        if size > largest:
            raise CheckpointError(
                config_path, f"{name} {size} is larger than any tensor in the weights file"
            )
    if config.layers > len(tensors):
        raise CheckpointError(
            config_path, f"layers {config.layers} is more than the weights file holds tensors"
        )
    try:
        return WordRNN(config)
    except (ValueError, ArithmeticError, RuntimeError, MemoryError) as exc:
        raise CheckpointError(config_path, f"cannot build the network ({exc})") from None


def load(
    run_dir: Path | str, device: str | torch.device = "cpu", quantize: str = "off"
) -> Checkpoint:
    """Load and verify a run folder's best weights onto ``device``, in eval mode; with
    ``quantize`` ``"int8"``, as `network.quantized` makes them (the CPU only). An LSTM's
    input projections are worked out once (`WordRNN.tabulate_inputs`).

    Every file is checked against the sha256 in the manifest and every tensor against the
    shapes the config and the vocabulary imply, and for NaN or infinite values; any problem
    raises CheckpointError naming the file. Nothing is unpickled.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(run_dir, "no such folder")
    dev = device if isinstance(device, torch.device) else pick_device(device)
    if quantize not in QUANTIZATIONS:
        raise ValueError(f"quantize must be one of {', '.join(QUANTIZATIONS)} (got {quantize!r})")
    if quantize != "off" and dev.type != "cpu":
        raise DeviceError(f"quantize {quantize} runs on the CPU only (the device is {dev})")
    config, training, vocab, manifest = read_header(run_dir)
    name = manifest.get("weights")
    if not isinstance(name, str):
        raise CheckpointError(
            run_dir / MANIFEST_FILE,
            "names no weights yet (training has not finished a first evaluation)",
        )
    path = run_dir / name
    tensors, _ = _load_tensors(path, _read_verified(run_dir, manifest, name))
    model = _build(config, run_dir / manifest.get("config", CONFIG_FILE), tensors)
    check_state(model, tensors, path)
    model.load_state_dict(tensors, strict=not config.tie_weights)
    model.rnn.flatten_parameters()
    model.to(dev).eval()
    if quantize == "int8":
        model = quantized(model)
    model.tabulate_inputs()  # the model is frozen from here: its steps may read a table
    copies = _copies(run_dir, manifest)
    return Checkpoint(run_dir, model, vocab, config, training, manifest, dev, copies)


def _copies(run_dir: Path, manifest: Mapping[str, Any]) -> CopyIndex | None:
    """The verified copy index, or None where the folder has none."""
    name = manifest.get("copies")
    if name is None:
        return None
    try:
        return CopyIndex.from_bytes(_read_verified(run_dir, manifest, name))
    except CopyIndexError as exc:
        raise CheckpointError(run_dir / name, str(exc)) from None


def load_resume(run_dir: Path | str) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The last training state: its tensors and its JSON state (see ``commit(resume=...)``)."""
    run_dir = Path(run_dir)
    manifest = read_manifest(run_dir)
    name = manifest.get("resume")
    if not isinstance(name, str):
        raise CheckpointError(run_dir / MANIFEST_FILE, "holds no training state to resume")
    path = run_dir / name
    tensors, meta = _load_tensors(path, _read_verified(run_dir, manifest, name))
    if "state" not in meta:
        raise CheckpointError(path, "has no training state in its metadata")
    state = _parse_json(path, meta["state"], "the training state")
    if not isinstance(state, dict):
        raise CheckpointError(path, "the training state is not a JSON object")
    return tensors, state


# ---------------------------------------------------------------------------------------------
# The training state


@dataclass
class ResumeState:
    """What a resume file holds, in the trainer's terms. `pack_resume` and `unpack_resume` map it
    to and from the file's tensor names, so the format is defined here, with the rest of the
    run folder's, and the trainer only gathers and applies it."""

    weights: dict[str, Tensor]  # `weights_state(model)`
    optimizer: dict[str, Any]  # `optimizer.state_dict()`
    scheduler: dict[str, Any] | None
    progress: dict[str, Any]
    rng: Tensor  # torch's RNG state, one row per process
    cuda_rng: Tensor | None  # likewise on CUDA
    hidden: Hidden | None  # carried mid-epoch, every process's rows: (layers, batch_size, H)
    average: dict[str, Tensor] | None = None  # the weights' moving average, when kept


def pack_resume(state: ResumeState) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """``state`` as ``commit(resume=...)`` takes it: named tensors and a JSON-able dict."""
    tensors = {f"model.{k}": v for k, v in state.weights.items()}
    if state.average is not None:
        tensors.update({f"average.{k}": v for k, v in state.average.items()})
    for pid, values in state.optimizer["state"].items():
        for name, value in values.items():
            tensors[f"optim.{pid}.{name}"] = torch.as_tensor(value).detach().cpu()
    tensors["rng.torch"] = state.rng.cpu()
    if state.cuda_rng is not None:
        tensors["rng.cuda"] = state.cuda_rng.cpu()
    if state.hidden is not None:
        tensors.update({f"hidden.{k}": v for k, v in hidden_to_tensors(state.hidden).items()})
    meta = {
        "progress": state.progress,
        "optimizer": state.optimizer["param_groups"],
        "scheduler": state.scheduler,
    }
    return tensors, meta


def unpack_resume(tensors: Mapping[str, Tensor], meta: Mapping[str, Any]) -> ResumeState:
    """The `ResumeState` that ``load_resume``'s tensors and JSON state hold."""
    optim_state: dict[int, dict[str, Tensor]] = {}
    for key, tensor in tensors.items():
        if key.startswith("optim."):
            _, pid, name = key.split(".", 2)
            optim_state.setdefault(int(pid), {})[name] = tensor

    def part(prefix: str) -> dict[str, Tensor]:
        return {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}

    hidden, average = part("hidden."), part("average.")
    return ResumeState(
        weights=part("model."),
        optimizer={"state": optim_state, "param_groups": meta["optimizer"]},
        scheduler=meta["scheduler"],
        progress=meta["progress"],
        rng=tensors["rng.torch"],
        cuda_rng=tensors.get("rng.cuda"),
        hidden=hidden_from_tensors(hidden) if hidden else None,
        average=average or None,
    )
