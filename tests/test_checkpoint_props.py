"""Property tests of the checkpoint reader: whatever bytes a run folder holds, reading it
succeeds or raises `CheckpointError` whose one line names the file at fault, and never unpickles.

Each example copies a valid run folder, damages one of its files (arbitrary bytes, a
truncation, flipped bytes, another JSON document, one JSON field replaced) and, most of the
time, records the damaged file's true size and sha256 in the manifest, as a careful forger
would, so that the damage reaches the parsers instead of stopping at the checksum.
"""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import safetensors.torch
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from model_store import checkpoint
from model_store.checkpoint import CheckpointError
from tests.conftest import build_run

ROLES = ("manifest", "config", "vocab", "weights", "resume")
READERS: dict[str, Callable[[Path], object]] = {
    "read_manifest": checkpoint.read_manifest,
    "read_header": checkpoint.read_header,
    "load": checkpoint.load,
    "load_resume": checkpoint.load_resume,
}
PROPS = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()  # NaN and infinities too: json.loads reads them
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=12,
)


class Unpickled(BaseException):
    """Raised by any unpickling entry point; a BaseException, so no ``except Exception`` in the
    reader can turn it into a CheckpointError and hide it."""


def _refuse_unpickling(*args: object, **kwargs: object) -> None:
    raise Unpickled("the reader tried to unpickle")


class _RefusingUnpickler(pickle.Unpickler):
    """Stands in for ``pickle.Unpickler``; still a class, so modules may subclass it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        _refuse_unpickling()


@contextmanager
def no_unpickling() -> Iterator[None]:
    with (
        mock.patch.object(pickle, "load", _refuse_unpickling),
        mock.patch.object(pickle, "loads", _refuse_unpickling),
        mock.patch.object(pickle, "Unpickler", _RefusingUnpickler),
        mock.patch.object(torch, "load", _refuse_unpickling),
    ):
        yield


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A valid run folder holding weights and a resume state."""
    run_dir = build_run(tmp_path_factory.mktemp("props") / "run")
    tensors = {"optimizer.step": torch.tensor([3.0])}
    checkpoint.commit(run_dir, resume=(tensors, {"epoch": 1, "batch": 2}), iteration=1)
    return run_dir


def file_of(run_dir: Path, role: str) -> Path:
    if role == "manifest":
        return run_dir / checkpoint.MANIFEST_FILE
    manifest = json.loads((run_dir / checkpoint.MANIFEST_FILE).read_text(encoding="utf-8"))
    return run_dir / manifest[role]


def record_true_hash(run_dir: Path, path: Path) -> None:
    manifest_path = run_dir / checkpoint.MANIFEST_FILE
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    data = path.read_bytes()
    manifest["files"][path.name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    manifest_path.write_text(json.dumps(manifest), encoding="utf-8")


@st.composite
def truncations(draw: st.DrawFn, original: bytes) -> bytes:
    return original[: draw(st.integers(0, max(len(original) - 1, 0)))]


@st.composite
def byte_flips(draw: st.DrawFn, original: bytes) -> bytes:
    data = bytearray(original)
    for _ in range(draw(st.integers(1, 4))):
        position = draw(st.integers(0, len(data) - 1))
        data[position] ^= draw(st.integers(1, 255))
    return bytes(data)


def _key_paths(value: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """Every key path into a parsed JSON document (into objects and lists alike)."""
    children: list[tuple[Any, Any]] = []
    if isinstance(value, dict):
        children = list(value.items())
    elif isinstance(value, list):
        children = list(enumerate(value[:3]))  # a few items stand for all of a long list
    for key, child in children:
        yield (*prefix, key)
        yield from _key_paths(child, (*prefix, key))


@st.composite
def field_edits(draw: st.DrawFn, original: bytes) -> bytes:
    """The document with one value, at any depth, replaced by arbitrary JSON."""
    document = json.loads(original)
    path = draw(st.sampled_from(list(_key_paths(document))))
    parent = document
    for key in path[:-1]:
        parent = parent[key]
    parent[path[-1]] = draw(JSON_VALUES)
    return json.dumps(document).encode()


def damaged(original: bytes, is_json: bool) -> st.SearchStrategy[bytes]:
    kinds = [
        st.binary(max_size=200),
        truncations(original),
        byte_flips(original),
        JSON_VALUES.map(lambda value: json.dumps(value).encode()),
    ]
    if is_json:
        kinds.append(field_edits(original))
    return st.one_of(kinds)


def assert_clear(error: CheckpointError, run_dir: Path) -> None:
    message = str(error)
    assert message == f"{error.path}: {error.problem}"
    assert error.path == run_dir or error.path.parent == run_dir, message
    assert error.problem.strip(), message
    assert "\n" not in message, message


def read_every_way(run_dir: Path) -> None:
    """Run each reader; each may succeed or raise CheckpointError, nothing else."""
    for name, reader in READERS.items():
        try:
            with no_unpickling():
                reader(run_dir)
        except CheckpointError as error:
            assert_clear(error, run_dir)
        except Exception as error:
            raise AssertionError(f"{name} raised {type(error).__name__}: {error}") from error


@contextmanager
def copy_of(run_dir: Path) -> Iterator[Path]:
    with tempfile.TemporaryDirectory() as scratch:
        yield Path(shutil.copytree(run_dir, Path(scratch) / run_dir.name))


def test_the_pristine_folder_reads_every_way(pristine: Path) -> None:
    with no_unpickling():
        for reader in READERS.values():
            reader(pristine)


@PROPS
@given(role=st.sampled_from(ROLES), resign=st.booleans(), data=st.data())
def test_a_damaged_file_raises_only_checkpoint_error(
    pristine: Path, role: str, resign: bool, data: st.DataObject
) -> None:
    with copy_of(pristine) as run_dir:
        path = file_of(run_dir, role)
        original = path.read_bytes()
        path.write_bytes(data.draw(damaged(original, is_json=path.suffix == ".json")))
        if resign and role != "manifest":
            record_true_hash(run_dir, path)
        read_every_way(run_dir)


MODEL_KEYS = ("vocab_size", "cell", "embed_dim", "hidden_dim", "layers", "dropout")
MODEL_KEYS += ("tie_weights", "softmax", "cutoffs", "div_value")


def rewrite_json(run_dir: Path, role: str, edit: Callable[[Any], Any]) -> None:
    """Replace a JSON file with ``edit`` of its content, and record its true hash."""
    path = file_of(run_dir, role)
    path.write_text(json.dumps(edit(json.loads(path.read_text(encoding="utf-8")))))
    if role != "manifest":
        record_true_hash(run_dir, path)


def _set(document: dict[str, Any], keys: tuple[str, ...], value: Any) -> dict[str, Any]:
    parent = document
    for key in keys[:-1]:
        parent = parent[key]
    parent[keys[-1]] = value
    return document


@PROPS
@given(
    key=st.sampled_from(MODEL_KEYS),
    # Sizes far too large to allocate come first: reading must not try to build them.
    value=st.sampled_from([2**40, 10**6, 0, -1, 2.5, "8", True]) | JSON_VALUES,
)
def test_any_model_config_value_raises_only_checkpoint_error(
    pristine: Path, key: str, value: Any
) -> None:
    with copy_of(pristine) as run_dir:
        rewrite_json(run_dir, "config", lambda doc: _set(doc, ("model", key), value))
        read_every_way(run_dir)


@PROPS
@given(role=st.sampled_from(("manifest", "config", "vocab")), value=JSON_VALUES, data=st.data())
def test_any_top_level_field_raises_only_checkpoint_error(
    pristine: Path, role: str, value: Any, data: st.DataObject
) -> None:
    """Each known field (and a new one) of each JSON file set to any JSON value."""
    known = sorted(json.loads(file_of(pristine, role).read_text(encoding="utf-8")))
    key = data.draw(st.sampled_from(known) | st.text(max_size=12))
    with copy_of(pristine) as run_dir:
        rewrite_json(run_dir, role, lambda doc: {**doc, key: value})
        read_every_way(run_dir)


DEEP = "[" * 100_000 + "]" * 100_000


@pytest.mark.parametrize("role", ["manifest", "config", "vocab"])
def test_deeply_nested_json_is_a_checkpoint_error(pristine: Path, role: str) -> None:
    with copy_of(pristine) as run_dir:
        path = file_of(run_dir, role)
        path.write_text(DEEP)
        if role != "manifest":
            record_true_hash(run_dir, path)
        with pytest.raises(CheckpointError) as caught:
            checkpoint.load(run_dir)
        assert caught.value.path == path


@pytest.mark.parametrize(
    ("role", "keys", "value", "problem"),
    [
        ("manifest", ("vocab",), None, "unexpected file"),
        ("manifest", ("weights",), "x" * 10_000, "unexpected file"),
        ("manifest", ("format_version",), list(range(10_000)), "format_version"),
        ("config", ("model", "cutoffs"), 5, "cutoffs"),
        ("config", ("model", "hidden_dim"), 2**40, "hidden_dim"),
        ("config", ("model", "embed_dim"), 10**6, "embed_dim"),
        ("config", ("model", "layers"), 10**6, "layers"),
        ("config", ("training",), [1, 2], "training"),
    ],
)
def test_a_bad_field_is_named_in_a_short_message(
    pristine: Path, role: str, keys: tuple[str, ...], value: Any, problem: str
) -> None:
    with copy_of(pristine) as run_dir:
        rewrite_json(run_dir, role, lambda doc: _set(doc, keys, value))
        with no_unpickling(), pytest.raises(CheckpointError) as caught:
            checkpoint.load(run_dir)
        assert problem in caught.value.problem
        assert len(str(caught.value)) < 400


@pytest.mark.parametrize("state", ["[1, 2]", "3", DEEP, "{"])
def test_a_resume_state_that_is_not_a_json_object_is_a_checkpoint_error(
    pristine: Path, state: str
) -> None:
    with copy_of(pristine) as run_dir:
        path = file_of(run_dir, "resume")
        tensors, _ = checkpoint.load_resume(run_dir)
        path.write_bytes(safetensors.torch.save(tensors, metadata={"state": state}))
        record_true_hash(run_dir, path)
        with pytest.raises(CheckpointError) as caught:
            checkpoint.load_resume(run_dir)
        assert caught.value.path == path


def test_the_guard_stops_unpickling() -> None:
    data = pickle.dumps({"a": 1})
    with no_unpickling(), pytest.raises(Unpickled):
        pickle.loads(data)
    with no_unpickling(), pytest.raises(Unpickled):
        torch.load(io.BytesIO(data))


@pytest.mark.parametrize("role", ["weights", "resume"])
def test_a_pickle_in_place_of_safetensors_is_refused_unread(pristine: Path, role: str) -> None:
    with copy_of(pristine) as run_dir:
        path = file_of(run_dir, role)
        torch.save({"embedding.weight": torch.zeros(2, 2)}, path)
        record_true_hash(run_dir, path)
        with no_unpickling(), pytest.raises(CheckpointError) as caught:
            checkpoint.load(run_dir) if role == "weights" else checkpoint.load_resume(run_dir)
        assert caught.value.path == path
        assert "safetensors" in caught.value.problem
