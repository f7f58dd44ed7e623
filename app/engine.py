"""The engine: the one inference thread that owns the model, and the jobs it runs.

`Engine.start` loads and verifies the run folder on that thread (so CUDA work never leaves
it), warms it up with one generation, and from then on every piece of model work is a job on
the same single-worker executor, run under ``torch.inference_mode()``. The event loop only
submits jobs and awaits them, so it keeps answering (``/healthz``) while the model works.

A generation is submitted with `Engine.submit` and comes back as a `Generation` handle: iterate
its `events()` for each word as soon as it is sampled, or await its `result()`. Leaving the
iteration early (a client that disconnected) or calling `cancel()` stops the job at its next
step. Jobs run one after the other for now; the handle is what a batching engine would keep.

The sampling itself is ``model_store.sampling``: seed words in one forward pass, then per step
the top-k (after temperature and top-p) of every row, the chosen words fed back, the hidden
state carried. The ``n`` samples of a request are the rows of one batch, row ``i`` drawing
from its own generator seeded with ``random_seed + i``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import math
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch

from app.errors import StartupError
from app.text import Continuation, SampleText
from model_store import checkpoint
from model_store.checkpoint import Checkpoint, CheckpointError
from model_store.network import Hidden, hidden_select, top_features
from model_store.sampling import (
    SamplingParams,
    advance,
    feed,
    make_generator,
    next_logits,
    prime,
    sample,
)

T = TypeVar("T")

SCORE_CHUNK = 256  # positions per output-layer call when scoring: bounds the (T, V) tensor


class EngineBusy(Exception):
    """Too many model jobs are queued; the caller should retry later."""


class GenerationCancelled(Exception):
    """The generation was cancelled before it finished (its client went away)."""


@dataclass(frozen=True)
class GenerationJob:
    """What to generate: ids to feed, the words before them (for the text), how to sample.

    ``hidden`` is a session's state (on the CPU); the seed ids are fed on top of it, or from
    the start of a text when it is None. ``keep_state`` returns the state after the last kept
    word of sample 0, for the session to continue from.
    """

    seed_ids: Sequence[int]
    context: Sequence[str]
    params: SamplingParams
    random_seed: int
    max_words: int
    n: int = 1
    stop: Sequence[str] = ()
    hidden: Hidden | None = None
    keep_state: bool = False
    stream: bool = False


@dataclass(frozen=True)
class GenerationResult:
    samples: list[SampleText]
    state: Hidden | None  # on the CPU; set for keep_state jobs


@dataclass(frozen=True)
class WordEvent:
    """A word of sample ``index``, released to a stream, and the text it adds."""

    index: int
    word: str
    text: str


@dataclass
class EngineStats:
    """Counters written by the inference thread only (the warm-up counts as a generation)."""

    generations: int = 0
    words: int = 0
    cancelled: int = 0
    failed: int = 0


class Generation:
    """A submitted generation: its word events as they come, and its result."""

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._events: asyncio.Queue[WordEvent | None] = asyncio.Queue()
        self._cancel = threading.Event()
        self._future: asyncio.Future[GenerationResult] | None = None

    def _attach(self, future: asyncio.Future[GenerationResult]) -> None:
        self._future = future
        future.add_done_callback(self._finished)

    def _finished(self, future: asyncio.Future[GenerationResult]) -> None:
        if not future.cancelled():
            future.exception()  # retrieved here, raised again by result()
        self._events.put_nowait(None)  # after every event the job emitted

    def emit(self, event: WordEvent) -> None:
        """Hand a word to the loop; called from the inference thread."""
        self._loop.call_soon_threadsafe(self._events.put_nowait, event)

    @property
    def cancel_flag(self) -> threading.Event:
        """Set when the generation should stop; read by the inference thread at each step."""
        return self._cancel

    async def events(self) -> AsyncIterator[WordEvent]:
        """Each released word, in order; leaving early cancels the generation."""
        finished = False
        try:
            while (event := await self._events.get()) is not None:
                yield event
            finished = True
        finally:
            if not finished:
                self.cancel()

    async def result(self) -> GenerationResult:
        """The finished samples; raises GenerationCancelled if the job was stopped.

        If the awaiting task is cancelled (its client went away), the job is stopped too.
        """
        assert self._future is not None
        try:
            return await asyncio.shield(self._future)
        except asyncio.CancelledError:
            if self._future.cancelled():  # dropped from the queue by a closing engine
                raise GenerationCancelled from None
            self.cancel()
            raise

    def cancel(self) -> None:
        """Stop the job at its next step, or as soon as it starts if it is still queued."""
        self._cancel.set()


class Engine:
    """Owns the loaded checkpoint and the thread that runs every model job."""

    def __init__(
        self,
        loaded: Checkpoint,
        executor: concurrent.futures.ThreadPoolExecutor,
        max_pending: int,
    ) -> None:
        self.checkpoint = loaded
        self.model = loaded.model
        self.vocab = loaded.vocab
        self.device = loaded.device
        self.stats = EngineStats()
        self._executor = executor
        self._max_pending = max_pending
        self._pending = 0
        self._lock = threading.Lock()
        self._cancels: set[threading.Event] = set()
        self._banned = list(loaded.vocab.special_ids)

    @classmethod
    async def start(cls, run_dir: Path, device: str, max_pending: int) -> Engine:
        """Load and verify ``run_dir`` onto ``device`` on the inference thread, then warm up.

        Raises StartupError (one line naming the file or the device) when that fails.
        """
        executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="inference")
        loop = asyncio.get_running_loop()
        try:
            loaded = await loop.run_in_executor(executor, _load, run_dir, device)
        except (CheckpointError, ValueError) as exc:
            executor.shutdown(wait=False)
            raise StartupError(str(exc).splitlines()[0]) from None
        engine = cls(loaded, executor, max_pending)
        warmup = GenerationJob(
            seed_ids=[], context=[], params=SamplingParams(), random_seed=0, max_words=2
        )
        await engine.submit(warmup).result()
        return engine

    async def close(self) -> None:
        """Stop running generations at their next step and end the inference thread."""
        with self._lock:
            for cancel in self._cancels:
                cancel.set()
        await asyncio.to_thread(self._executor.shutdown, wait=True, cancel_futures=True)

    @property
    def pending(self) -> int:
        return self._pending

    # -- submitting ---------------------------------------------------------------------------

    def _reserve(self) -> None:
        with self._lock:
            if self._pending >= self._max_pending:
                raise EngineBusy(f"{self._pending} model jobs are already waiting")
            self._pending += 1

    def _release(self, _: object) -> None:
        with self._lock:
            self._pending -= 1

    def _run(self, fn: Callable[..., T], *args: Any) -> concurrent.futures.Future[T]:
        self._reserve()
        future = self._executor.submit(_inference, fn, *args)
        future.add_done_callback(self._release)
        return future

    def submit(self, job: GenerationJob) -> Generation:
        """Queue a generation; raises EngineBusy when too many jobs are waiting."""
        generation = Generation()
        future = self._run(self._generate, job, generation)
        generation._attach(asyncio.wrap_future(future))
        return generation

    async def prime(self, seed_ids: Sequence[int], hidden: Hidden | None) -> Hidden:
        """The state (on the CPU) after feeding ``seed_ids`` on ``hidden`` or a new text."""
        return await asyncio.wrap_future(self._run(self._prime, seed_ids, hidden))

    async def next_words(
        self, seed_ids: Sequence[int], hidden: Hidden | None, top_k: int
    ) -> list[tuple[str, float]]:
        """The ``top_k`` most likely next words and their probabilities, best first."""
        return await asyncio.wrap_future(self._run(self._next_words, seed_ids, hidden, top_k))

    async def score(self, ids: Sequence[int]) -> list[float]:
        """The log-probability of each id given those before it, from the start of a text."""
        return await asyncio.wrap_future(self._run(self._score, ids))

    # -- on the inference thread --------------------------------------------------------------

    def _feed(self, seed_ids: Sequence[int], hidden: Hidden | None) -> Hidden:
        """The state after ``seed_ids``, all fed in one forward pass."""
        if hidden is None:
            return prime(self.model, [seed_ids], self.vocab.bos_id)
        hidden = _move(hidden, self.device)
        return feed(self.model, [seed_ids], hidden) if seed_ids else hidden

    def _prime(self, seed_ids: Sequence[int], hidden: Hidden | None) -> Hidden:
        return _move(self._feed(seed_ids, hidden), torch.device("cpu"))

    def _generate(self, job: GenerationJob, generation: Generation) -> GenerationResult:
        cancel = generation.cancel_flag
        with self._lock:
            self._cancels.add(cancel)
        try:
            self.stats.generations += 1
            result = self._sample(job, generation if job.stream else None, cancel)
        except GenerationCancelled:
            self.stats.cancelled += 1
            raise
        except Exception:
            self.stats.failed += 1
            raise
        finally:
            with self._lock:
                self._cancels.discard(cancel)
        self.stats.words += sum(len(s.words) for s in result.samples)
        return result

    def _sample(
        self, job: GenerationJob, stream: Generation | None, cancel: threading.Event
    ) -> GenerationResult:
        if cancel.is_set():
            raise GenerationCancelled
        model, vocab = self.model, self.vocab
        hidden = self._feed(job.seed_ids, job.hidden)  # (layers, 1, H)
        if job.n > 1:
            hidden = hidden_select(hidden, [0] * job.n)  # (layers, n, H): one row per sample
        generators = [make_generator(job.random_seed + i) for i in range(job.n)]
        texts = [Continuation(vocab, job.context, job.stop) for _ in range(job.n)]
        states = [hidden]  # after each word, to end a session on its last kept word
        rows = list(range(job.n))  # the samples still going, in batch order
        for _ in range(job.max_words):
            if not rows:
                break
            if cancel.is_set():
                raise GenerationCancelled
            logits = next_logits(model, hidden)  # (B, V)
            params = [job.params] * len(rows)
            ids = sample(logits, params, [generators[r] for r in rows], self._banned)
            hidden = advance(model, hidden, ids)
            if job.keep_state and job.stop:
                states.append(hidden)
            going = []
            for pos, (row, word_id) in enumerate(zip(rows, ids, strict=True)):
                texts[row].push(vocab.tokens[word_id])
                if stream is not None:
                    for piece in texts[row].release():
                        stream.emit(WordEvent(row, piece.word, piece.text))
                if not texts[row].stopped:
                    going.append(pos)
            if len(going) < len(rows):
                rows = [rows[pos] for pos in going]
                if rows:
                    hidden = hidden_select(hidden, going)
        samples = []
        for row, text in enumerate(texts):
            if stream is not None:
                for piece in text.release(final=True):
                    stream.emit(WordEvent(row, piece.word, piece.text))
            samples.append(text.finish())
        state = None
        if job.keep_state:
            final = states[len(samples[0].words)] if job.stop else hidden
            state = _move(final, torch.device("cpu"))
        return GenerationResult(samples, state)

    def _next_words(
        self, seed_ids: Sequence[int], hidden: Hidden | None, top_k: int
    ) -> list[tuple[str, float]]:
        state = self._feed(seed_ids, hidden)
        log_probs = self.model.log_probs(top_features(state))[0]  # (V,)
        banned = torch.tensor(self._banned, device=log_probs.device)
        log_probs = log_probs.index_fill(0, banned, -math.inf)
        values, ids = log_probs.topk(min(top_k, len(self.vocab) - len(self._banned)))
        return [
            (self.vocab.tokens[i], math.exp(v))
            for v, i in zip(values.tolist(), ids.tolist(), strict=True)
        ]

    def _score(self, ids: Sequence[int]) -> list[float]:
        inputs = torch.tensor([[self.vocab.bos_id, *ids[:-1]]], device=self.device)  # (1, T)
        targets = torch.tensor(list(ids), device=self.device)  # (T,)
        features, _ = self.model.features(inputs)  # (1, T, H), from the zero state
        out = []
        for start in range(0, len(ids), SCORE_CHUNK):
            part = slice(start, start + SCORE_CHUNK)
            log_probs = self.model.log_probs(features[0, part])  # (chunk, V)
            out.append(log_probs.gather(1, targets[part].unsqueeze(1)).squeeze(1))
        return torch.cat(out).tolist()  # type: ignore[no-any-return]


def _load(run_dir: Path, device: str) -> Checkpoint:
    return checkpoint.load(run_dir, checkpoint.pick_device(device))


def _inference(fn: Callable[..., T], *args: Any) -> T:
    with torch.inference_mode():
        return fn(*args)


def _move(hidden: Hidden, device: torch.device) -> Hidden:
    if isinstance(hidden, tuple):
        return (hidden[0].to(device), hidden[1].to(device))
    return hidden.to(device)
