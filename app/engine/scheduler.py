"""The scheduler: the one inference thread that owns the model, and how it schedules the work.

`Engine.start` loads and verifies the run folder on that thread (so CUDA work never leaves
it), warms it up with one generation, and from then on runs every piece of model work there,
under ``torch.inference_mode()``. The event loop only queues work and is handed the results,
so it keeps answering (``/healthz``) while the model works. Three engines share that frame:

- ``batched`` (`BatchedEngine`, the default): continuous batching. Each step advances every
  active sequence of a `Batch` in one forward pass; requests that arrive join at the next
  step, and rows that finish leave at once.
- ``naive`` (`NaiveEngine`): each generation runs alone from its first word to its last, the
  lab's way (`generate_alone`); the baseline of ``bench/serve_load.py`` and a fallback.
- ``noop`` (`NoopEngine`): no model at all, one word repeated: the benchmark's ceiling.

Admission is bounded: with ``max_pending`` requests queued or running, `Engine.submit` raises
`EngineBusy` at once instead of letting latency grow. `Engine.stats` gives the queue length,
the active rows, the step batch sizes, how long generations waited in the queue and how long
the batched engine's rounds take, for metrics: a stream's first word comes after its wait,
one round that feeds its seed words and draws the word's first token, one more for each of
its other tokens and, for a subword model, one more whose token opens the next word (a word
ends only when the next one begins; a line break at once). A request whose own part fails
ends alone (`GenerationFailed`), and the thread keeps serving the others.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
import time
from bisect import bisect_left
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch

from app.engine.batch import Batch, Update, generate_alone
from app.engine.handles import (
    EngineBusy,
    EngineClosed,
    Generation,
    GenerationCancelled,
    GenerationFailed,
    GenerationJob,
    GenerationResult,
    GenerationTimeout,
    Outcome,
    WordEvent,
    failure,
)
from app.errors import StartupError
from app.text import SampleText
from model_store import checkpoint, scoring
from model_store.checkpoint import Checkpoint, CheckpointError
from model_store.copies import CopyGuard
from model_store.network import Hidden, hidden_to
from model_store.sampling import SamplingParams, start_state

log = logging.getLogger("app")

T = TypeVar("T")
Clock = Callable[[], float]

RECENT_STEPS = 1024  # step batch sizes kept for stats()
# Upper bounds of the durations kept, in seconds: from a round on an idle machine (under a
# millisecond) to a wait in a queue under a flood.
SECONDS_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


@dataclass
class Durations:
    """Durations counted in `SECONDS_BUCKETS` (one count each: at most that bound and over
    the one before; the last, over them all) and their sum: a histogram that the inference
    thread keeps and `Engine.stats` copies, under the engine's lock."""

    counts: list[int] = field(default_factory=lambda: [0] * (len(SECONDS_BUCKETS) + 1))
    total: float = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(SECONDS_BUCKETS, seconds)] += 1
        self.total += seconds

    def copy(self) -> Durations:
        return Durations(list(self.counts), self.total)


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


@dataclass(frozen=True)
class EngineStats:
    """What the engine is doing and has done, as the metrics read it."""

    engine: str  # the kind
    queue_length: int  # generations and calls waiting
    active_requests: int
    active_rows: int
    pending: int  # queued or running
    max_pending: int
    max_batch: int
    steps_total: int
    rows_stepped_total: int
    step_batch_sizes: dict[int, int]  # rows in a step -> steps run at that size
    recent_batch_sizes: list[int]  # the last steps' sizes, oldest first
    queue_wait_seconds: Durations  # from submit to the start of a generation
    round_seconds: Durations  # the batched engine's rounds: joining requests fed, one step
    generations: int
    words: int
    cancelled: int
    expired: int
    failed: int
    rejected: int


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
        self._copies = CopyGuard(loaded.copies, loaded.vocab) if loaded.copies is not None else None
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
        self._waits = Durations()
        self._rounds = Durations()
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
        quantize: str = "off",
        clock: Clock = time.monotonic,
    ) -> Engine:
        """Load and verify ``run_dir`` onto ``device`` on the inference thread, then warm up.

        ``threads`` sets torch's intra-op threads for the process (0 leaves torch's default);
        ``quantize`` ``"int8"`` serves the int8 copy of the model (`network.quantized`).
        Raises StartupError (one line naming the file or the device) when that fails.
        """
        engine_cls: type[Engine] | None = cls if cls.kind else ENGINES.get(kind)
        if engine_cls is None:
            raise ValueError(f"engine must be one of {', '.join(ENGINES)} (got {kind!r})")
        if max_pending < 1 or max_batch < 1 or not timeout_seconds > 0:
            raise ValueError("max_pending and max_batch must be >= 1, timeout_seconds > 0")
        executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="inference")
        loop = asyncio.get_running_loop()
        try:
            loaded = await loop.run_in_executor(executor, _load, run_dir, device, threads, quantize)
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

    def stats(self) -> EngineStats:
        """A snapshot for metrics (``app/metrics.py`` exports every field)."""
        c = self.counters
        with self._cond:
            return EngineStats(
                engine=self.kind,
                queue_length=len(self._waiting) + len(self._calls),
                active_requests=self._active_requests,
                active_rows=self._active_rows,
                pending=self._pending,
                max_pending=self.max_pending,
                max_batch=self.max_batch,
                steps_total=c.steps,
                rows_stepped_total=c.rows_stepped,
                step_batch_sizes=dict(sorted(self._sizes.items())),
                recent_batch_sizes=list(self._recent),
                queue_wait_seconds=self._waits.copy(),
                round_seconds=self._rounds.copy(),
                generations=c.generations,
                words=c.words,
                cancelled=c.cancelled,
                expired=c.expired,
                failed=c.failed,
                rejected=c.rejected,
            )

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
        now = self._clock()
        generation = Generation(job, now + self.timeout_seconds, queued_at=now)
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
        self,
        seed_ids: Sequence[int],
        hidden: Hidden | None,
        top_k: int,
        history: Sequence[int] = (),
    ) -> list[tuple[str, float]]:
        """The ``top_k`` most likely next words and their probabilities, best first (whole
        words, for a subword model too: `model_store.scoring.next_words`). ``history``: the
        ids of the text so far, seed included, for the model's text cache."""
        return await self._call(self._next_words, seed_ids, hidden, top_k, history)

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
            if joining:
                now = self._clock()
                for generation in joining:
                    self._waits.observe(now - generation.queued_at)
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
        return start_state(self.model, seed_ids, self.vocab.bos_id, hidden)

    def _prime(self, seed_ids: Sequence[int], hidden: Hidden | None) -> Hidden:
        return hidden_to(self._feed(seed_ids, hidden), torch.device("cpu"))

    def _next_words(
        self,
        seed_ids: Sequence[int],
        hidden: Hidden | None,
        top_k: int,
        history: Sequence[int],
    ) -> list[tuple[str, float]]:
        state = self._feed(seed_ids, hidden)
        return scoring.next_words(self.model, self.vocab, state, top_k, history=history)

    def _score(self, ids: Sequence[int]) -> list[float]:
        return scoring.token_log_probs(self.model, self.vocab, ids).tolist()  # type: ignore[no-any-return]


class BatchedEngine(Engine):
    """Continuous batching: every active row advances in each step's one forward pass."""

    kind = "batched"

    def __init__(self, loaded: Checkpoint, *args: Any, **kwargs: Any) -> None:
        super().__init__(loaded, *args, **kwargs)
        self.batch = Batch(self.model, self.vocab, self._banned, self._copies)

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
        if not (joining or self.batch.size):
            return
        started = self._clock()
        self._round(joining, started)
        seconds = self._clock() - started
        with self._cond:
            self._rounds.observe(seconds)

    def _round(self, joining: list[Generation], now: float) -> None:
        batch = self.batch
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
                    self._finish(generation, failure(exc))
        if batch.size:
            size = batch.size
            try:
                updates = batch.step()
            except Exception as exc:
                log.exception("a step of %d rows failed", size)
                for key in batch.clear():
                    assert isinstance(key, Generation)
                    self._finish(key, failure(exc))
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
                    self._copies,
                )
            except (GenerationCancelled, GenerationTimeout) as exc:
                self._finish(generation, exc)
            except Exception as exc:
                log.exception("a generation failed")
                self._finish(generation, exc if isinstance(exc, GenerationFailed) else failure(exc))
            else:
                self._finish(generation, result)
            finally:
                self._active_rows = self._active_requests = 0


class NoopEngine(Engine):
    """Every generation answered at once with ``max_words`` copies of one word, without the
    model: what HTTP, the checks and the queue cost on their own (the ceiling of
    ``bench/serve_load.py``). Sessions keep their state; calls (scores, sessions) still run
    the model. Not for serving text."""

    kind = "noop"

    def _take(self) -> list[Generation]:
        joining = list(self._waiting)
        self._waiting.clear()
        return joining

    def _work(self, joining: list[Generation]) -> None:
        join, word = self.vocab.join_words, self.vocab.spell([len(self.vocab) - 1])
        again = join([word, word])[len(join([word])) :]  # what the word adds after itself
        for generation in joining:
            self.counters.generations += 1
            job = generation.job
            context = list(job.context)
            first = join([*context, word])[len(join(context)) :]
            pieces = [first, *[again] * (job.max_words - 1)][: job.max_words]
            sample = SampleText(
                [word] * job.max_words,
                "".join(pieces),
                "length",
                pieces,
                [None] * job.max_words,
                [()] * job.max_words,
            )
            events = (
                [WordEvent(i, word, p) for i in range(job.n) for p in pieces] if job.stream else []
            )
            result = GenerationResult([sample] * job.n, job.hidden if job.keep_state else None)
            self._finish(generation, result, events)


ENGINES: dict[str, type[Engine]] = {
    "batched": BatchedEngine,
    "naive": NaiveEngine,
    "noop": NoopEngine,
}


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


def _load(run_dir: Path, device: str, threads: int = 0, quantize: str = "off") -> Checkpoint:
    if threads:
        torch.set_num_threads(threads)
    return checkpoint.load(run_dir, checkpoint.pick_device(device), quantize)
