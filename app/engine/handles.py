"""A generation seen from the event loop: the job, its `Generation` handle, how it can end.

A generation is submitted with `Engine.submit` and comes back as a `Generation` handle:
iterate its `events()` for each word as soon as it is sampled, or await its `result()`.
Leaving the iteration early (a client that went away) or calling `cancel()` drops its rows at
the next step, and so does passing its deadline (``timeout_seconds`` after it was submitted):
the result then raises `GenerationCancelled` or `GenerationTimeout`. A request whose own part
fails ends alone with `GenerationFailed`. A full queue refuses new work with `EngineBusy` (a
503 with ``Retry-After``), a stopping engine with `EngineClosed`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

from app.text import Alternatives, SampleText
from model_store.network import Hidden
from model_store.sampling import SamplingParams

log = logging.getLogger("app")


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


def failure(exc: Exception) -> GenerationFailed:
    """``exc`` as the failure of one generation, keeping it as the cause for the logs."""
    failed = GenerationFailed(f"the generation failed: {exc!r}")
    failed.__cause__ = exc
    return failed


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
    logprobs: int | None = None  # each word's log-probability and this many alternatives
    history: Sequence[int] = ()  # the ids up to the seed's end: repetition controls, text cache
    min_words: int = 0  # stop strings count only after this many words


@dataclass(frozen=True)
class GenerationResult:
    samples: list[SampleText]
    state: Hidden | None  # on the CPU; set for keep_state jobs


@dataclass(frozen=True)
class WordEvent:
    """A word of sample ``index``, released to a stream, and the text it adds; with its
    log-probability and alternatives when the job asked for them."""

    index: int
    word: str
    text: str
    log_prob: float | None = None
    top: Alternatives = ()


Outcome = GenerationResult | BaseException


class Generation:
    """A submitted generation, seen from the event loop: its words as they come, its result."""

    def __init__(self, job: GenerationJob, deadline: float | None, *, queued_at: float) -> None:
        self.job = job
        self.deadline = deadline
        self.queued_at = queued_at  # on the engine's clock
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
                self._future.set_exception(failure(exc))
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
