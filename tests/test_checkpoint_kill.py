"""kill -9 at random moments while a run folder is being saved: it always loads, and the
last checkpoint committed before the kill is never lost."""

from __future__ import annotations

import multiprocessing
import os
import random
import signal
import time
from multiprocessing.connection import Connection
from pathlib import Path

import torch

from model_store import checkpoint
from model_store.network import ModelConfig, WordRNN
from model_store.vocab import Vocab, tokenize

KILLS = 20  # at least this many kills...
MID_WRITE = 3  # ...and more (up to MAX_KILLS) until this many landed while a file was written
MAX_KILLS = 80


def _save_forever(run_dir: Path, start: int, conn: Connection) -> None:
    """Commit new weights and resume states as fast as possible, reporting each iteration."""
    torch.set_num_threads(1)
    config = checkpoint.read_header(run_dir)[0]
    model = WordRNN(config)
    iteration = start
    while True:
        iteration += 1
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(float(iteration))
        state = checkpoint.weights_state(model)
        checkpoint.commit(
            run_dir,
            weights=state,
            resume=(state, {"it": iteration}),
            iteration=iteration,
            info={"iterations": iteration},
        )
        conn.send(iteration)


def _drain(receiver: Connection) -> list[int]:
    """Every iteration the killed process reported (the pipe ends at its death)."""
    reported = []
    while True:
        try:
            reported.append(receiver.recv())
        except EOFError:
            return reported


def test_kill_9_during_saves_never_loses_the_last_checkpoint(tmp_path: Path) -> None:
    vocab = Vocab.build(tokenize("a b c d e f g " * 50))
    config = ModelConfig(vocab_size=len(vocab), embed_dim=64, hidden_dim=64)
    run_dir = tmp_path / "run"
    model = WordRNN(config)
    checkpoint.commit(
        run_dir,
        config=config,
        training={},
        vocab=vocab,
        weights=checkpoint.weights_state(model),
        iteration=0,
        info={"iterations": 0},
    )
    rng = random.Random(1234)
    ctx = multiprocessing.get_context("fork")
    committed = 0
    mid_write = 0  # kills that left a half-written temp file behind
    kills = 0
    # Where a kill lands depends on the machine's pace: go on until enough landed mid-write.
    while kills < KILLS or (mid_write < MID_WRITE and kills < MAX_KILLS):
        kills += 1
        receiver, sender = ctx.Pipe(duplex=False)
        child = ctx.Process(target=_save_forever, args=(run_dir, committed, sender))
        child.start()
        sender.close()
        assert receiver.poll(30), "the saving process never committed"
        time.sleep(rng.uniform(0.0, 0.05))  # a random moment, mid-save most of the time
        assert child.pid is not None
        os.kill(child.pid, signal.SIGKILL)
        child.join(10)
        committed = max([committed, *_drain(receiver)])
        mid_write += any(".tmp-" in p.name for p in run_dir.iterdir())
        loaded = checkpoint.load(run_dir)
        iteration = loaded.manifest["iterations"]
        assert iteration >= committed  # the last reported commit survived
        assert torch.all(loaded.model.embedding.weight == float(iteration))
        _, state = checkpoint.load_resume(run_dir)
        assert state["it"] == iteration
        committed = iteration
    assert mid_write >= MID_WRITE, f"{kills} kills, {mid_write} inside saves: this proves nothing"
    checkpoint.commit(run_dir, info={})  # a later save cleans up what the kills left
    assert not [p for p in run_dir.iterdir() if ".tmp-" in p.name]
