"""The engine: the one inference thread that owns the model, and how it schedules the work.

`Engine.start` loads and verifies the run folder on that thread (so CUDA work never leaves
it), warms it up with one generation, and from then on runs every piece of model work there,
under ``torch.inference_mode()``. The event loop only queues work and is handed the results,
so it keeps answering (``/healthz``) while the model works. Two engines share that frame:

- ``batched`` (`BatchedEngine`, the default): continuous batching. Each step advances every
  active sequence in one forward pass (embedding, RNN cell and output layer for all rows at
  once), then samples each row with its own parameters and generator (`Batch`). Requests that
  arrive join at the next step, after their seed words are fed, all arrivals of a step in one
  packed forward pass; rows that finish leave at once. The ``n`` samples of a request and
  session continuations are rows like any other.
- ``naive`` (`NaiveEngine`): each generation runs alone from its first word to its last, the
  lab's way (`generate_alone`); the baseline of ``bench/serve_load.py`` and a fallback.

A generation is submitted with `Engine.submit` and comes back as a `Generation` handle:
iterate its `events()` for each word as soon as it is sampled, or await its `result()`.
Leaving the iteration early (a client that went away) or calling `cancel()` drops its rows at
the next step, and so does passing its deadline (``timeout_seconds`` after it was submitted).
Admission is bounded: with ``max_pending`` requests queued or running, `submit` raises
`EngineBusy` at once (a 503 with ``Retry-After``) instead of letting latency grow. `stats()`
gives the queue length, the active rows and the step batch sizes for metrics.

A request whose own part fails (its seed ids, its sampling, its text, the delivery of its
words) ends alone with `GenerationFailed`; the rows that share its steps go on with the
words they would have had without it, and the thread keeps serving.

Sampling is ``model_store.sampling``, for both engines: every row draws one number per step
from its own generator (row ``i`` of a request is seeded with ``random_seed + i``), so a
row's words do not depend on the rows that share its steps.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import math
import threading
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable, Hashable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

import torch

from app.errors import StartupError
from app.text import Continuation, SampleText
from model_store import checkpoint, scoring
from model_store.checkpoint import Checkpoint, CheckpointError
from model_store.network import Hidden, WordRNN, hidden_cat, hidden_select
from model_store.sampling import (
    SamplingParams,
    advance,
    feed,
    make_generator,
    next_logits,
    prime,
    sample,
)
from model_store.vocab import Vocab

log = logging.getLogger("app")

T = TypeVar("T")
Clock = Callable[[], float]
EngineKind = Literal["batched", "naive"]
ENGINE_KINDS: tuple[str, ...] = ("batched", "naive")

RECENT_STEPS = 1024  # step batch sizes kept for stats()


class EngineBusy(Exception):
    """Too many requests are queued or running; the caller should retry later."""


class EngineClosed(Exception):
    """The engine is stopping and takes no new work."""


class GenerationCancelled(Exception):
    """The generation was stopped before it finished (its client went away, or the server is
    stopping)."""


class GenerationTimeout(Exception):
    """The generation passed its deadline and was dropped."""


class GenerationFailed(Exception):
    """Something went wrong with this generation alone (its sampling, its text, its
    delivery); the other requests were not touched. ``__cause__`` is the original error."""


def _failure(exc: Exception) -> GenerationFailed:
    failure = GenerationFailed(f"the generation failed: {exc!r}")
    failure.__cause__ = exc
    return failure


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
class EngineCounters:
    """What the engine has done (the warm-up counts). The inference thread writes them all
    but ``rejected``, which the event loop counts under the engine's lock."""

    generations: int = 0
    words: int = 0
    cancelled: int = 0
    expired: int = 0
    failed: int = 0
    rejected: int = 0
    steps: int = 0
    rows_stepped: int = 0


Outcome = GenerationResult | BaseException


class Generation:
    """A submitted generation, seen from the event loop: its words as they come, its result."""

    def __init__(self, job: GenerationJob, deadline: float | None) -> None:
        self.job = job
        self.deadline = deadline
        self._cancelled = False  # read by the inference thread at each step
        self._events: asyncio.Queue[WordEvent | None] = asyncio.Queue()
        self._future: asyncio.Future[GenerationResult] = asyncio.get_running_loop().create_future()
        self._future.add_done_callback(_retrieve)

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    def cancel(self) -> None:
        """Drop the generation at its next step (or from the queue, if it has not started)."""
        self._cancelled = True

    def _deliver(self, events: Sequence[WordEvent], outcome: Outcome | None) -> None:
        """On the event loop: words from one step, then the outcome once it is known.

        If that fails, this generation alone ends (cancelled, its result the error): the
        deliveries of the other requests, run after it in the same wake-up, still happen.
        """
        try:
            self._accept(events, outcome)
        except Exception as exc:
            log.exception("delivering to a generation failed; it is dropped")
            self.cancel()
            if not self._future.done():
                self._future.set_exception(_failure(exc))
            self._events.put_nowait(None)

    def _accept(self, events: Sequence[WordEvent], outcome: Outcome | None) -> None:
        for event in events:
            self._events.put_nowait(event)
        if outcome is None or self._future.done():
            return
        if isinstance(outcome, BaseException):
            self._future.set_exception(outcome)
        else:
            self._future.set_result(outcome)
        self._events.put_nowait(None)  # after every word the engine sent

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
        """The finished samples; raises GenerationCancelled or GenerationTimeout when it was
        dropped. If the awaiting task is cancelled (its client went away), so is the job."""
        try:
            return await asyncio.shield(self._future)
        except asyncio.CancelledError:
            self.cancel()
            raise


def _retrieve(future: asyncio.Future[Any]) -> None:
    """Mark an exception as seen: nobody may await a dropped generation's result."""
    if not future.cancelled():
        future.exception()


# -- one request's rows, stepped alone (the naive engine, and the reference for tests) -------


def generate_alone(
    model: WordRNN,
    vocab: Vocab,
    job: GenerationJob,
    banned: Sequence[int],
    emit: Callable[[list[WordEvent]], None] | None = None,
    check: Callable[[], None] | None = None,
    on_step: Callable[[int], None] | None = None,
) -> GenerationResult:
    """Generate ``job`` by itself: its ``n`` samples are the rows of its own batch.

    ``emit`` receives the words released by each step (streams); ``check`` runs before each
    step and may raise to stop the job; ``on_step`` is told each step's batch size.
    """
    device = model.embedding.weight.device
    if job.hidden is None:
        hidden = prime(model, [job.seed_ids], vocab.bos_id)  # (layers, 1, H)
    else:
        hidden = _move(job.hidden, device)
        if job.seed_ids:
            hidden = feed(model, [job.seed_ids], hidden)
    if job.n > 1:
        hidden = hidden_select(hidden, [0] * job.n)  # (layers, n, H): one row per sample
    generators = [make_generator(job.random_seed + i) for i in range(job.n)]
    texts = [Continuation(vocab, job.context, job.stop, job.max_words) for _ in range(job.n)]
    states = [hidden]  # after each token, to end a session on its last kept word
    state = hidden  # sample 0's state after its last accepted token
    rows = list(range(job.n)) if job.max_words else []  # the samples going, in batch order
    opening = _word_openings(vocab, device)
    while rows:
        if check is not None:
            check()
        logits = next_logits(model, hidden)  # (B, V)
        if opening is not None and texts[rows[0]].tokens == 0:  # every row is at its start
            logits = logits.masked_fill(~opening, -math.inf)
        ids = sample(logits, [job.params] * len(rows), [generators[r] for r in rows], banned)
        before, hidden = hidden, advance(model, hidden, ids)
        if on_step is not None:
            on_step(len(rows))
        if job.keep_state and job.stop:
            states.append(hidden)
        going, events = [], []
        for pos, (row, word_id) in enumerate(zip(rows, ids, strict=True)):
            accepted = texts[row].push_token(vocab.tokens[word_id])
            if row == 0 and job.keep_state:
                state = hidden_select(hidden if accepted else before, [pos])
            if job.stream:
                events += [
                    WordEvent(row, p.word, p.text)
                    for p in texts[row].release(final=texts[row].done)
                ]
            if not texts[row].done:
                going.append(pos)
        if emit is not None and events:
            emit(events)
        if len(going) < len(rows):
            rows = [rows[pos] for pos in going]
            if rows:
                hidden = hidden_select(hidden, going)
    events = []
    samples = []
    for row, text in enumerate(texts):
        if job.stream:
            events += [WordEvent(row, p.word, p.text) for p in text.release(final=True)]
        samples.append(text.finish())
    if emit is not None and events:
        emit(events)
    if job.keep_state:
        final = states[texts[0].kept_tokens] if job.stop else state
        return GenerationResult(samples, _move(final, torch.device("cpu")))
    return GenerationResult(samples, None)


# -- many requests' rows, stepped together (the batched engine) ------------------------------


@dataclass(eq=False)
class _Sequence:
    """One request in the batch: its samples' texts and how many of its rows still run."""

    key: Hashable
    job: GenerationJob
    texts: list[Continuation]
    running: int
    state: Hidden | None = None  # sample 0's state to keep, once known (keep_state jobs)


@dataclass(eq=False)
class _Row:
    seq: _Sequence
    index: int  # the sample's index in its request
    generator: torch.Generator
    states: list[Hidden] | None  # after each word (a session with stop strings), else None


@dataclass(frozen=True)
class Update:
    """What one `Batch` call produced for one request: words to stream, and its result once
    all its rows have finished, or the error that ended it alone (`GenerationFailed`)."""

    key: Hashable
    events: list[WordEvent] = field(default_factory=list)
    result: GenerationResult | None = None
    error: GenerationFailed | None = None


class Batch:
    """The sequences being generated, stepped together: one row per sample.

    Pure bookkeeping around ``model_store.sampling`` with no threads or clocks, so tests can
    drive it step by step: `join` adds requests, `step` advances every row by one word,
    `drop` removes a request's rows. ``hidden`` is (layers, B, H) (a pair for an LSTM), row
    ``i`` of it belonging to ``rows[i]``.

    A request whose own work fails (a bad seed id, its sampling, its text) leaves with an
    error `Update`; the other rows go on with the words they would have had without it.
    """

    def __init__(self, model: WordRNN, vocab: Vocab, banned: Sequence[int]) -> None:
        self.model = model
        self.vocab = vocab
        self.banned = list(banned)
        self.hidden: Hidden | None = None
        self.rows: list[_Row] = []
        self._seqs: dict[Hashable, _Sequence] = {}
        self._opening = _word_openings(vocab, model.embedding.weight.device)

    @property
    def size(self) -> int:
        return len(self.rows)

    @property
    def keys(self) -> list[Hashable]:
        return list(self._seqs)

    def join(self, entries: Sequence[tuple[Hashable, GenerationJob]]) -> list[Update]:
        """Add requests: feed all their seed words in one packed forward pass, then add one
        row per sample. A request with ``max_words`` 0 finishes here."""
        updates: list[Update] = []
        valid: list[tuple[Hashable, GenerationJob]] = []
        for key, job in entries:
            if (problem := _check_ids(job.seed_ids, len(self.vocab))) is None:
                valid.append((key, job))
            else:
                updates.append(_failed(key, problem))
        starts = _starts_each(self.model, self.vocab, [job for _, job in valid])
        parts: list[Hidden] = []
        rows: list[_Row] = []
        seqs: list[_Sequence] = []
        for (key, job), start in zip(valid, starts, strict=True):
            if isinstance(start, Exception):
                updates.append(_failed(key, start))
                continue
            try:
                seq, new = self._sequence(key, job, start)
                if not new:
                    updates.append(Update(key, result=self._result(seq)))
                    continue
            except Exception as exc:
                updates.append(_failed(key, exc))
                continue
            rows += new
            parts.append(start if job.n == 1 else hidden_select(start, [0] * job.n))
            seqs.append(seq)
        if parts:  # nothing above changed the batch: a failure leaves it as it was
            joined = hidden_cat([self.hidden, *parts] if self.hidden is not None else parts)
            self.hidden = joined
            self.rows += rows
            self._seqs.update((seq.key, seq) for seq in seqs)
        return updates

    def _sequence(
        self, key: Hashable, job: GenerationJob, start: Hidden
    ) -> tuple[_Sequence, list[_Row]]:
        """A joining request and its rows (none when it asks for no words)."""
        texts = [
            Continuation(self.vocab, job.context, job.stop, job.max_words) for _ in range(job.n)
        ]
        seq = _Sequence(key, job, texts, running=job.n)
        if job.max_words == 0:
            seq.state = start
            return seq, []
        keep = job.keep_state and bool(job.stop)
        rows = [
            _Row(seq, i, make_generator(job.random_seed + i), [start] if keep else None)
            for i in range(job.n)
        ]
        return seq, rows

    def step(self) -> list[Update]:
        """Advance every row by one word, in one forward pass; finished rows leave, and so do
        the rows of a request whose own work failed."""
        assert self.hidden is not None, "step() on an empty batch"
        rows = self.rows
        logits = next_logits(self.model, self.hidden)  # (B, V)
        if self._opening is not None:
            starting = [pos for pos, row in enumerate(rows) if row.seq.texts[row.index].tokens == 0]
            if starting:  # a sample's first piece opens a word: the seed's last one is whole
                index = torch.tensor(starting, device=logits.device)
                logits = logits.index_copy(
                    0, index, logits[index].masked_fill(~self._opening, -math.inf)
                )
        ids, failed = self._sample(logits)
        before, hidden = self.hidden, advance(self.model, self.hidden, ids)
        events: dict[_Sequence, list[WordEvent]] = {}
        finished: list[_Sequence] = []
        keep: list[int] = []
        for pos, (row, word_id) in enumerate(zip(rows, ids, strict=True)):
            seq = row.seq
            if seq in failed:
                continue
            try:
                done = self._push(row, pos, word_id, before, hidden, events)
            except Exception as exc:
                failed[seq] = exc
                continue
            if not done:
                keep.append(pos)
                continue
            seq.running -= 1
            if seq.running == 0:
                finished.append(seq)
        keep = [pos for pos in keep if rows[pos].seq not in failed]  # a sibling row failed
        if len(keep) < len(rows):
            self.rows = [rows[pos] for pos in keep]
            hidden = hidden_select(hidden, keep) if keep else None
        self.hidden = hidden
        updates = [Update(seq.key, words) for seq, words in events.items() if seq not in failed]
        for seq in finished:
            del self._seqs[seq.key]
            try:
                updates.append(Update(seq.key, result=self._result(seq)))
            except Exception as exc:
                updates.append(_failed(seq.key, exc))
        for seq, exc in failed.items():
            del self._seqs[seq.key]
            updates.append(_failed(seq.key, exc))
        return updates

    def _sample(self, logits: torch.Tensor) -> tuple[list[int], dict[_Sequence, Exception]]:
        """Each row's next id from its (B, V) ``logits``, all rows in one call.

        When that call fails, each row is sampled alone, its generator first rewound to where
        it was before this step, so that the rows that do not fail draw exactly what they
        would have drawn; the requests whose rows fail are returned with their error, and
        their rows get a placeholder id (they leave after this step).
        """
        rows = self.rows
        params = [row.seq.job.params for row in rows]
        try:
            return sample(logits, params, [row.generator for row in rows], self.banned), {}
        except Exception:
            log.warning("sampling %d rows at once failed; sampling each alone", len(rows))
        ids: list[int] = []
        failed: dict[_Sequence, Exception] = {}
        for pos, row in enumerate(rows):
            try:
                _rewind(row.generator, row.seq.texts[row.index].tokens)
                ids += sample(logits[pos : pos + 1], [params[pos]], [row.generator], self.banned)
            except Exception as exc:
                failed.setdefault(row.seq, exc)
                ids.append(self.vocab.bos_id)
        return ids, failed

    def _push(
        self,
        row: _Row,
        pos: int,
        word_id: int,
        before: Hidden,
        hidden: Hidden,
        events: dict[_Sequence, list[WordEvent]],
    ) -> bool:
        """Add row ``pos``'s new token to its text (and its words to stream to ``events``);
        whether the row is done. ``before`` and ``hidden`` are the states before and after
        the token was fed: a refused token leaves the row's state at ``before``."""
        seq = row.seq
        text = seq.texts[row.index]
        accepted = text.push_token(self.vocab.tokens[word_id])
        if not accepted:
            hidden = before
        elif row.states is not None:
            row.states.append(hidden_select(hidden, [pos]))
        done = text.done
        if seq.job.stream:
            pieces = text.release(final=done)
            if pieces:
                events.setdefault(seq, []).extend(
                    WordEvent(row.index, p.word, p.text) for p in pieces
                )
        if done and seq.job.keep_state and row.index == 0:
            seq.state = (
                row.states[text.kept_tokens]
                if row.states is not None
                else hidden_select(hidden, [pos])
            )
        return done

    def drop(self, keys: set[Hashable]) -> None:
        """Remove every row of these requests."""
        if not keys:
            return
        keep = [pos for pos, row in enumerate(self.rows) if row.seq.key not in keys]
        if len(keep) < len(self.rows):
            self.rows = [self.rows[pos] for pos in keep]
            assert self.hidden is not None
            self.hidden = hidden_select(self.hidden, keep) if keep else None
        for key in keys:
            self._seqs.pop(key, None)

    def clear(self) -> list[Hashable]:
        keys = self.keys
        self.hidden, self.rows, self._seqs = None, [], {}
        return keys

    def _result(self, seq: _Sequence) -> GenerationResult:
        state = None
        if seq.job.keep_state:
            assert seq.state is not None
            state = _move(seq.state, torch.device("cpu"))
        return GenerationResult([text.finish() for text in seq.texts], state)


def _failed(key: Hashable, exc: Exception) -> Update:
    return Update(key, error=_failure(exc))


def _check_ids(ids: Sequence[int], vocab_size: int) -> ValueError | None:
    """Why ``ids`` cannot be fed, if they cannot: checked before any model work, since an
    id past the embedding would fail the whole packed pass (and, on a GPU, the device)."""
    bad = [i for i in ids if not 0 <= i < vocab_size]
    return (
        ValueError(f"seed ids {bad[:5]} are outside the vocabulary (0..{vocab_size - 1})")
        if bad
        else None
    )


def _word_openings(vocab: Vocab, device: torch.device) -> torch.Tensor | None:
    """(V,) which ids may open a sample (a subword start piece), or None when any may."""
    if not vocab.is_subword:
        return None
    return torch.tensor(vocab.starts_word(), dtype=torch.bool, device=device)


def _rewind(generator: torch.Generator, drawn: int) -> None:
    """Put ``generator`` back to its state after ``drawn`` draws: a row draws one number per
    step (``model_store.sampling``), so that state is its seed and its token count."""
    generator.manual_seed(generator.initial_seed())
    for _ in range(drawn):
        torch.rand(1, generator=generator)


def _starts_each(
    model: WordRNN, vocab: Vocab, jobs: Sequence[GenerationJob]
) -> list[Hidden | Exception]:
    """`_starts`, or when its one forward pass fails, each job's start fed alone, so that a
    job that cannot be fed fails by itself (its entry is the error)."""
    try:
        return list(_starts(model, vocab, jobs))
    except Exception as exc:
        if len(jobs) == 1:
            return [exc]
    return [_starts_each(model, vocab, [job])[0] for job in jobs]


def _starts(model: WordRNN, vocab: Vocab, jobs: Sequence[GenerationJob]) -> list[Hidden]:
    """Each job's state after its seed words, (layers, 1, H) each, from one forward pass.

    A new text feeds ``<bos>`` and its seed from the zero state (as `prime` does), a session
    its seed on its own state; a session without seed words starts from its state as it is.
    """
    device = model.embedding.weight.device
    out: list[Hidden | None] = [
        _move(job.hidden, device) if job.hidden is not None and not job.seed_ids else None
        for job in jobs
    ]
    fed = [j for j, state in enumerate(out) if state is None]
    if fed:
        seqs = [
            [vocab.bos_id, *jobs[j].seed_ids] if jobs[j].hidden is None else jobs[j].seed_ids
            for j in fed
        ]
        sessions = [jobs[j].hidden for j in fed]
        start: Hidden | None = None  # all new texts: the zero state, exactly as prime() has it
        if any(h is not None for h in sessions):
            start = hidden_cat(
                [model.init_hidden(1) if h is None else _move(h, device) for h in sessions]
            )
        hidden = feed(model, seqs, start)  # (layers, F, H)
        for pos, j in enumerate(fed):
            out[j] = hidden_select(hidden, [pos]) if len(fed) > 1 else hidden
    return [h for h in out if h is not None]


# -- the engines -------------------------------------------------------------------------------


@dataclass(eq=False)
class _Call:
    """One-off model work (priming a session, next words, scoring) and its future."""

    fn: Callable[..., Any]
    args: tuple[Any, ...]
    future: asyncio.Future[Any]


class Engine:
    """Owns the loaded checkpoint and the thread that runs every model job.

    Start one with `Engine.start(run_dir, device, kind=...)`; the subclasses differ only in
    how they schedule generations (`_take` and `_work`, on the inference thread).
    """

    kind: ClassVar[str] = ""

    def __init__(
        self,
        loaded: Checkpoint,
        executor: concurrent.futures.ThreadPoolExecutor,
        *,
        max_pending: int,
        max_batch: int,
        timeout_seconds: float,
        clock: Clock = time.monotonic,
    ) -> None:
        self.checkpoint = loaded
        self.model = loaded.model
        self.vocab = loaded.vocab
        self.device = loaded.device
        self.max_pending = max_pending
        self.max_batch = max_batch
        self.timeout_seconds = timeout_seconds
        self.counters = EngineCounters()
        self._clock = clock
        self._banned = list(loaded.vocab.special_ids)
        self._executor = executor
        self._loop = asyncio.get_running_loop()
        # Shared with the event loop, under the lock: the queues and the counts read by stats().
        self._cond = threading.Condition()
        self._calls: deque[_Call] = deque()
        self._waiting: deque[Generation] = deque()
        self._pending = 0  # calls and generations queued or running
        self._closing = False
        self._abort = False
        self._active_rows = 0
        self._active_requests = 0
        self._sizes: Counter[int] = Counter()  # step batch size -> steps
        self._recent: deque[int] = deque(maxlen=RECENT_STEPS)
        # The inference thread's own: deliveries for the event loop, sent once per step.
        self._outbox: list[Callable[[], None]] = []
        self._main: concurrent.futures.Future[None] | None = None

    @classmethod
    async def start(
        cls,
        run_dir: Path,
        device: str,
        *,
        kind: str = "batched",
        max_pending: int = 256,
        max_batch: int = 128,
        timeout_seconds: float = 60.0,
        threads: int = 0,
        clock: Clock = time.monotonic,
    ) -> Engine:
        """Load and verify ``run_dir`` onto ``device`` on the inference thread, then warm up.

        ``threads`` sets torch's intra-op threads for the process (0 leaves torch's default).
        Raises StartupError (one line naming the file or the device) when that fails.
        """
        engine_cls: type[Engine] | None = cls if cls.kind else ENGINES.get(kind)
        if engine_cls is None:
            raise ValueError(f"engine must be one of {', '.join(ENGINE_KINDS)} (got {kind!r})")
        if max_pending < 1 or max_batch < 1 or not timeout_seconds > 0:
            raise ValueError("max_pending and max_batch must be >= 1, timeout_seconds > 0")
        executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="inference")
        loop = asyncio.get_running_loop()
        try:
            loaded = await loop.run_in_executor(executor, _load, run_dir, device, threads)
        except (CheckpointError, ValueError) as exc:
            executor.shutdown(wait=False)
            raise StartupError(str(exc).splitlines()[0]) from None
        engine = engine_cls(
            loaded,
            executor,
            max_pending=max_pending,
            max_batch=max_batch,
            timeout_seconds=timeout_seconds,
            clock=clock,
        )
        engine._main = executor.submit(engine._serve)  # the same thread that loaded the model
        warmup = GenerationJob(
            seed_ids=[], context=[], params=SamplingParams(), random_seed=0, max_words=2
        )
        try:
            await engine.submit(warmup).result()
        except BaseException:
            await engine.close()
            raise
        return engine

    def stop_accepting(self) -> None:
        """Refuse new work from now on (`EngineClosed`); what was accepted still runs."""
        with self._cond:
            self._closing = True
            self._cond.notify()

    async def close(self) -> None:
        """Take no new work, let what is queued or running finish, then end the thread.

        Every generation ends by its deadline, so the drain ends too; if it has not after
        ``timeout_seconds`` (a stuck model), what is left is cancelled.
        """
        self.stop_accepting()
        if self._main is not None:
            main = asyncio.wrap_future(self._main)
            try:
                await asyncio.wait_for(asyncio.shield(main), self.timeout_seconds + 5)
            except TimeoutError:
                with self._cond:
                    self._abort = True
                    self._cond.notify()
                await asyncio.gather(main, return_exceptions=True)
            except Exception:  # the thread has logged why it ended
                pass
        await asyncio.to_thread(self._executor.shutdown, wait=True)

    @property
    def pending(self) -> int:
        """Requests and calls queued or running."""
        return self._pending

    def stats(self) -> dict[str, Any]:
        """A snapshot for metrics: the queue, the active rows, the steps and their sizes.

        ``step_batch_sizes`` maps a batch size to the number of steps run at that size since
        the start; ``recent_batch_sizes`` lists the sizes of the last steps, oldest first.
        """
        c = self.counters
        with self._cond:
            return {
                "engine": self.kind,
                "queue_length": len(self._waiting) + len(self._calls),
                "active_requests": self._active_requests,
                "active_rows": self._active_rows,
                "pending": self._pending,
                "max_pending": self.max_pending,
                "max_batch": self.max_batch,
                "steps_total": c.steps,
                "rows_stepped_total": c.rows_stepped,
                "step_batch_sizes": dict(sorted(self._sizes.items())),
                "recent_batch_sizes": list(self._recent),
                "generations": c.generations,
                "words": c.words,
                "cancelled": c.cancelled,
                "expired": c.expired,
                "failed": c.failed,
                "rejected": c.rejected,
            }

    # -- submitting (on the event loop) -------------------------------------------------------

    def _admit(self) -> None:
        """Under the lock: refuse new work when stopping or when the queue is full."""
        if self._closing:
            raise EngineClosed("the server is stopping")
        if self._pending >= self.max_pending:
            self.counters.rejected += 1
            raise EngineBusy(f"{self._pending} requests are already queued or running")
        self._pending += 1

    def refuse_if_full(self) -> bool:
        """Whether new work would be refused now for a full queue (counted as refused if so):
        lets the HTTP layer answer before reading a request that `submit` would refuse."""
        with self._cond:
            full = self._pending >= self.max_pending
            self.counters.rejected += full
        return full

    def submit(self, job: GenerationJob) -> Generation:
        """Queue a generation; raises EngineBusy when the queue is full, EngineClosed when
        the engine is stopping. Its deadline is ``timeout_seconds`` from now."""
        generation = Generation(job, self._clock() + self.timeout_seconds)
        with self._cond:
            self._admit()
            self._waiting.append(generation)
            self._cond.notify()
        return generation

    def _call(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        future: asyncio.Future[T] = self._loop.create_future()
        with self._cond:
            self._admit()
            self._calls.append(_Call(fn, args, future))
            self._cond.notify()
        return future

    async def prime(self, seed_ids: Sequence[int], hidden: Hidden | None) -> Hidden:
        """The state (on the CPU) after feeding ``seed_ids`` on ``hidden`` or a new text."""
        return await self._call(self._prime, seed_ids, hidden)

    async def next_words(
        self, seed_ids: Sequence[int], hidden: Hidden | None, top_k: int
    ) -> list[tuple[str, float]]:
        """The ``top_k`` most likely next words and their probabilities, best first (whole
        words, for a subword model too: `model_store.scoring.next_words`)."""
        return await self._call(self._next_words, seed_ids, hidden, top_k)

    async def score(self, ids: Sequence[int]) -> list[float]:
        """The log-probability of each id given those before it, from the start of a text."""
        return await self._call(self._score, ids)

    # -- the inference thread -----------------------------------------------------------------

    def _serve(self) -> None:
        try:
            with torch.inference_mode():
                while self._serve_once():
                    pass
        except BaseException:
            log.exception("the inference thread failed")
            raise
        finally:
            with self._cond:
                self._closing = True  # nobody would serve new work: refuse it (503)
            self._cancel_everything()
            self._flush()

    def _serve_once(self) -> bool:
        """One round: wait for work, run the calls, then one scheduling step of generations."""
        with self._cond:
            while not (self._calls or self._waiting or self._running() or self._closing):
                self._cond.wait()
            if self._abort:
                return False
            if self._closing and not (self._calls or self._waiting or self._running()):
                return False
            calls = list(self._calls)
            self._calls.clear()
            self._drop_waiting()
            joining = self._take()
        for call in calls:
            self._run_call(call)
        self._work(joining)
        self._flush()
        return True

    def _running(self) -> bool:
        """Whether generations are active between rounds (they need steps without new work)."""
        return False

    def _take(self) -> list[Generation]:
        """Under the lock: the queued generations to start this round (popped from the queue)."""
        raise NotImplementedError

    def _work(self, joining: list[Generation]) -> None:
        """Start ``joining`` and advance the generations (outside the lock)."""
        raise NotImplementedError

    def _drop_waiting(self) -> None:
        """Under the lock: answer queued generations that were cancelled or expired."""
        now = self._clock()
        if not any(self._stopped(g, now) for g in self._waiting):
            return
        still: deque[Generation] = deque()
        for generation in self._waiting:
            reason = self._stopped(generation, now)
            if reason is None:
                still.append(generation)
            else:
                self._finish(generation, reason)
        self._waiting = still

    def _stopped(self, generation: Generation, now: float) -> BaseException | None:
        """Why ``generation`` must stop now (cancelled, past its deadline), if it must."""
        if generation.cancelled or self._abort:
            return GenerationCancelled()
        if generation.deadline is not None and now >= generation.deadline:
            return GenerationTimeout(
                f"the generation did not finish within {self.timeout_seconds:g} s"
            )
        return None

    def _run_call(self, call: _Call) -> None:
        outcome: Any
        try:
            outcome = call.fn(*call.args)
        except Exception as exc:
            outcome = exc
        with self._cond:
            self._pending -= 1
        self._outbox.append(lambda: _settle(call.future, outcome))

    def _finish(
        self, generation: Generation, outcome: Outcome, events: Sequence[WordEvent] = ()
    ) -> None:
        c = self.counters
        if isinstance(outcome, GenerationResult):
            c.words += sum(len(s.words) for s in outcome.samples)
        elif isinstance(outcome, GenerationCancelled):
            c.cancelled += 1
        elif isinstance(outcome, GenerationTimeout):
            c.expired += 1
        else:
            c.failed += 1
        with self._cond:
            self._pending -= 1
        self._send(generation, events, outcome)

    def _send(
        self, generation: Generation, events: Sequence[WordEvent], outcome: Outcome | None = None
    ) -> None:
        self._outbox.append(lambda: generation._deliver(events, outcome))

    def _record_step(self, size: int) -> None:
        self.counters.steps += 1
        self.counters.rows_stepped += size
        with self._cond:
            self._sizes[size] += 1
            self._recent.append(size)

    def _flush(self) -> None:
        """Hand this round's deliveries to the event loop in one wake-up."""
        if not self._outbox:
            return
        items, self._outbox = self._outbox, []
        # A closed event loop (RuntimeError) has nobody waiting for these any more.
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(_run_all, items)

    def _cancel_everything(self) -> None:
        """As the thread ends: answer whatever is left (an abort, or a failure)."""
        with self._cond:
            waiting, self._waiting = list(self._waiting), deque()
            calls, self._calls = list(self._calls), deque()
        for generation in [*waiting, *self._drop_active()]:
            self._finish(generation, GenerationCancelled())
        for call in calls:
            with self._cond:
                self._pending -= 1
            self._outbox.append(lambda call=call: _settle(call.future, GenerationCancelled()))

    def _drop_active(self) -> list[Generation]:
        return []

    # -- one-off model work -------------------------------------------------------------------

    def _feed(self, seed_ids: Sequence[int], hidden: Hidden | None) -> Hidden:
        """The state after ``seed_ids``, all fed in one forward pass."""
        if hidden is None:
            return prime(self.model, [seed_ids], self.vocab.bos_id)
        hidden = _move(hidden, self.device)
        return feed(self.model, [seed_ids], hidden) if seed_ids else hidden

    def _prime(self, seed_ids: Sequence[int], hidden: Hidden | None) -> Hidden:
        return _move(self._feed(seed_ids, hidden), torch.device("cpu"))

    def _next_words(
        self, seed_ids: Sequence[int], hidden: Hidden | None, top_k: int
    ) -> list[tuple[str, float]]:
        return scoring.next_words(self.model, self.vocab, self._feed(seed_ids, hidden), top_k)

    def _score(self, ids: Sequence[int]) -> list[float]:
        return scoring.token_log_probs(self.model, ids, self.vocab.bos_id).tolist()  # type: ignore[no-any-return]


class BatchedEngine(Engine):
    """Continuous batching: every active row advances in each step's one forward pass."""

    kind = "batched"

    def __init__(self, loaded: Checkpoint, *args: Any, **kwargs: Any) -> None:
        super().__init__(loaded, *args, **kwargs)
        self.batch = Batch(self.model, self.vocab, self._banned)

    def _running(self) -> bool:
        return self.batch.size > 0

    def _take(self) -> list[Generation]:
        # First come, first served: the head of the queue joins once its rows fit (a request
        # with more samples than max_batch joins an empty batch alone).
        room = self.max_batch - self.batch.size
        joining: list[Generation] = []
        while self._waiting:
            n = self._waiting[0].job.n
            if n > room and (self.batch.size or joining):
                break
            joining.append(self._waiting.popleft())
            room -= n
        return joining

    def _work(self, joining: list[Generation]) -> None:
        batch = self.batch
        now = self._clock()
        gone: dict[Generation, BaseException] = {}
        for key in batch.keys:
            assert isinstance(key, Generation)
            if (reason := self._stopped(key, now)) is not None:
                gone[key] = reason
        if gone:
            batch.drop(set(gone))
            for generation, reason in gone.items():
                self._finish(generation, reason)
        if joining:
            self.counters.generations += len(joining)
            try:
                self._apply(batch.join([(g, g.job) for g in joining]))
            except Exception as exc:
                log.exception("feeding the seed words of %d requests failed", len(joining))
                for generation in joining:
                    self._finish(generation, _failure(exc))
        if batch.size:
            size = batch.size
            try:
                updates = batch.step()
            except Exception as exc:
                log.exception("a step of %d rows failed", size)
                for key in batch.clear():
                    assert isinstance(key, Generation)
                    self._finish(key, _failure(exc))
            else:
                self._record_step(size)
                self._apply(updates)
        self._active_rows, self._active_requests = batch.size, len(batch.keys)

    def _apply(self, updates: list[Update]) -> None:
        for update in updates:
            generation = update.key
            assert isinstance(generation, Generation)
            if update.error is not None:
                log.error("a generation failed; the others go on", exc_info=update.error)
                self._finish(generation, update.error)
            elif update.result is not None:
                self._finish(generation, update.result, update.events)
            elif update.events:
                self._send(generation, update.events)

    def _drop_active(self) -> list[Generation]:
        keys = self.batch.clear()
        self._active_rows = self._active_requests = 0
        return [k for k in keys if isinstance(k, Generation)]


class NaiveEngine(Engine):
    """Each generation alone, from its first word to its last, one after the other."""

    kind = "naive"

    def _take(self) -> list[Generation]:
        return [self._waiting.popleft()] if self._waiting else []

    def _work(self, joining: list[Generation]) -> None:
        for generation in joining:
            self.counters.generations += 1
            self._active_rows, self._active_requests = generation.job.n, 1

            def emit(events: list[WordEvent], generation: Generation = generation) -> None:
                self._send(generation, events)
                self._flush()

            def check(generation: Generation = generation) -> None:
                if (reason := self._stopped(generation, self._clock())) is not None:
                    raise reason

            try:
                result = generate_alone(
                    self.model,
                    self.vocab,
                    generation.job,
                    self._banned,
                    emit,
                    check,
                    self._record_step,
                )
            except (GenerationCancelled, GenerationTimeout) as exc:
                self._finish(generation, exc)
            except Exception as exc:
                log.exception("a generation failed")
                self._finish(generation, _failure(exc))
            else:
                self._finish(generation, result)
            finally:
                self._active_rows = self._active_requests = 0


ENGINES: dict[str, type[Engine]] = {"batched": BatchedEngine, "naive": NaiveEngine}


def _run_all(items: list[Callable[[], None]]) -> None:
    for item in items:
        item()


def _settle(future: asyncio.Future[Any], outcome: Any) -> None:
    if future.done():  # its caller went away
        return
    if isinstance(outcome, BaseException):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)


def _load(run_dir: Path, device: str, threads: int = 0) -> Checkpoint:
    if threads:
        torch.set_num_threads(threads)
    return checkpoint.load(run_dir, checkpoint.pick_device(device))


def _move(hidden: Hidden, device: torch.device) -> Hidden:
    if isinstance(hidden, tuple):
        return (hidden[0].to(device), hidden[1].to(device))
    return hidden.to(device)
