"""Helpers for the app tests: settings for a run folder, an SSE parser, and a model replayer.

`Replay` reloads the run folder with ``model_store`` alone and walks a text through the
network, so tests check the service's words against the model itself, not against the app.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

from app.engine import batch as batch_module
from app.settings import Settings
from model_store import checkpoint
from model_store.network import Hidden, top_features
from model_store.sampling import advance, next_logits, prime
from model_store.subword import NEWLINE

# A manifest.json nested deeper than the json module can recurse: it raises RecursionError.
NESTED_MANIFEST = b"[" * 100_000 + b"]" * 100_000


def write_nested_manifest(run_dir: Path) -> Path:
    """Give ``run_dir`` (made if missing) a manifest that cannot be parsed; its path."""
    run_dir.mkdir(parents=True, exist_ok=True)
    manifest = run_dir / "manifest.json"
    manifest.write_bytes(NESTED_MANIFEST)
    return manifest


def settings_for(run_dir: Path, **overrides: Any) -> Settings:
    return Settings(model_dir=run_dir, **{"device": "cpu", **overrides})


def http_scope(path: str, headers: Sequence[tuple[bytes, bytes]] = ()) -> dict[str, Any]:
    """The ASGI scope of a POST to ``path``, for tests that drive the app by hand."""
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"content-type", b"application/json"), *headers],
        "client": ("127.0.0.1", 50000),
        "server": ("testserver", 80),
    }


def parse_sse(body: str) -> list[tuple[str, Any]]:
    """``event: NAME`` / ``data: JSON`` frames separated by a blank line -> (name, data)."""
    events = []
    for frame in body.split("\n\n"):
        lines = [line for line in frame.split("\n") if line and not line.startswith(":")]
        if not lines:
            continue
        fields = dict(line.split(": ", 1) for line in lines)
        events.append((fields.get("event", "message"), json.loads(fields["data"])))
    return events


class Replay:
    """The run folder's model, stepped by hand."""

    def __init__(self, run_dir: Path) -> None:
        self.loaded = checkpoint.load(run_dir, "cpu")
        self.model = self.loaded.model
        self.vocab = self.loaded.vocab
        self.banned = list(self.vocab.special_ids)

    def ids(self, words: Sequence[str]) -> list[int]:
        return self.vocab.encode_lenient(words)[0]

    def state(self, seed: Sequence[str]) -> Hidden:
        return prime(self.model, [self.ids(seed)], self.vocab.bos_id)

    def scores(self, hidden: Hidden) -> torch.Tensor:
        """(V,) next-word scores with the words generation never emits masked out."""
        logits = next_logits(self.model, hidden)[0].clone()
        logits[self.banned] = -torch.inf
        return logits

    def log_probs(self, hidden: Hidden) -> torch.Tensor:
        with torch.inference_mode():
            return self.model.log_probs(top_features(hidden))[0]

    def step(self, hidden: Hidden, word: str) -> Hidden:
        return advance(self.model, hidden, [self.vocab.id_of(word)])

    def greedy(self, seed: Sequence[str], n_words: int) -> list[str]:
        hidden, out = self.state(seed), []
        for _ in range(n_words):
            word = self.vocab.tokens[int(self.scores(hidden).argmax())]
            out.append(word)
            hidden = self.step(hidden, word)
        return out

    def ranks(self, seed: Sequence[str], words: Sequence[str]) -> list[int]:
        """Each word's rank (0 = most likely) among the words allowed at its step."""
        hidden, out = self.state(seed), []
        for word in words:
            scores = self.scores(hidden)
            out.append(int((scores > scores[self.vocab.id_of(word)]).sum()))
            hidden = self.step(hidden, word)
        return out


class Gate:
    """Holds the inference thread inside its next model step until the test opens it.

    ``install=False`` leaves the model alone until ``install()`` (e.g. after the warm-up).
    """

    def __init__(self, monkeypatch: pytest.MonkeyPatch, install: bool = True) -> None:
        self._monkeypatch = monkeypatch
        self.entered = threading.Event()
        self.opened = threading.Event()
        real = batch_module.next_logits

        def gated(model: Any, hidden: Hidden) -> Any:
            self.entered.set()
            if not self.opened.wait(timeout=30):
                raise RuntimeError("the test never opened the gate")
            return real(model, hidden)

        self._gated = gated
        if install:
            self.install()

    def install(self) -> None:
        self._monkeypatch.setattr(batch_module, "next_logits", self._gated)

    async def wait_entered(self) -> None:
        assert await asyncio.to_thread(self.entered.wait, 30), "no step started"

    def open(self) -> None:
        self.opened.set()


def longest_copy(training: Sequence[str], words: Sequence[str]) -> int:
    """Brute force: the most words of ``words`` in a row that occur in a row in ``training``
    (line breaks left out of both), tried for every start and every length."""
    text = [w for w in training if w != NEWLINE]
    ws = [w for w in words if w != NEWLINE]
    best = 0
    for i in range(len(ws)):
        for j in range(i + best + 1, len(ws) + 1):
            run = ws[i:j]
            if not any(text[k : k + len(run)] == run for k in range(len(text))):
                break
            best = j - i
    return best
