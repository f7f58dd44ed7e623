"""The engines: batched equals one-at-a-time, shared steps, drops, the queue, shutdown.

`Batch` is driven step by step here, without threads, against `generate_alone` (the naive
engine's loop, the lab's way); the engines themselves are driven through their handles, with
a gate that holds the inference thread inside a step and a fake clock for deadlines, so
nothing waits on time.
"""

from __future__ import annotations

import asyncio
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.engine import (
    Batch,
    Engine,
    EngineBusy,
    EngineClosed,
    Generation,
    GenerationCancelled,
    GenerationFailed,
    GenerationJob,
    GenerationResult,
    GenerationTimeout,
    WordEvent,
    generate_alone,
)
from app.engine import batch as batch_module
from app.text import Continuation
from model_store import checkpoint
from model_store.checkpoint import Checkpoint
from model_store.copies import CopyGuard
from model_store.network import hidden_parts
from model_store.sampling import Draws, SamplingParams, prime
from model_store.subword import NEWLINE
from tests.app_helpers import Gate
from tests.conftest import build_run

KINDS = pytest.mark.parametrize("kind", ["batched", "naive"])


@pytest.fixture(scope="module")
def lstm_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_run(tmp_path_factory.mktemp("lstm") / "run", cell="lstm", layers=2, seed=3)


@pytest.fixture(scope="module")
def cached_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An LSTM with a text cache that speaks up after a context is seen once."""
    run_dir = tmp_path_factory.mktemp("cached") / "run"
    return build_run(run_dir, cell="lstm", seed=5, cache_order=2, cache_confidence=0.5)


@pytest.fixture(scope="module")
def models(tiny_run: Path, lstm_run: Path, cached_run: Path) -> dict[str, Checkpoint]:
    return {
        "rnn": checkpoint.load(tiny_run, "cpu"),
        "lstm": checkpoint.load(lstm_run, "cpu"),
        "cached": checkpoint.load(cached_run, "cpu"),
        "int8": checkpoint.load(lstm_run, "cpu", "int8"),
    }


def job(**fields: Any) -> GenerationJob:
    """A generation job from the start of a text, with the API's sampling defaults."""
    values: dict[str, Any] = {
        "seed_ids": [],
        "context": [],
        "params": SamplingParams(),
        "random_seed": 0,
        "max_words": 5,
    }
    values.update(fields)
    return GenerationJob(**values)


# -- batched equals one at a time ----------------------------------------------------------


@dataclass(frozen=True)
class Arrival:
    step: int  # joins before this step of the batch
    job: GenerationJob


SEED_WORDS = ["I", "can", "see", "the", "sea", ".", "wind", "<nl>", "you", "blue"]
STOPS = [(), ("e",), ("the",), (" sea", "!"), ("n t",)]


@st.composite
def arrivals(draw: st.DrawFn, loaded: Checkpoint) -> list[Arrival]:
    vocab, model = loaded.vocab, loaded.model
    out = []
    for _ in range(draw(st.integers(1, 7))):
        seed = draw(st.lists(st.sampled_from(SEED_WORDS), max_size=5))
        session = draw(st.booleans())
        history = draw(st.lists(st.sampled_from(SEED_WORDS), max_size=4)) if session else []
        hidden = prime(model, [vocab.encode_lenient(history)[0]], vocab.bos_id)
        params = SamplingParams(
            top_k=draw(st.integers(0, 6)),
            temperature=draw(st.sampled_from([0.0, 0.5, 1.0, 3.0])),
            top_p=draw(st.sampled_from([0.3, 0.9, 1.0])),
            uniform=draw(st.booleans()),
            repetition_penalty=draw(st.sampled_from([1.0, 1.3])),
            presence_penalty=draw(st.sampled_from([0.0, 0.8])),
            frequency_penalty=draw(st.sampled_from([0.0, -0.5])),
            no_repeat_ngram_size=draw(st.sampled_from([0, 2])),
            max_copy_words=draw(st.sampled_from([0, 1, 3])),
            bad_words=draw(
                st.sampled_from(
                    [(), ((vocab.id_of("the"),),), ((vocab.id_of("the"), vocab.id_of("sea")),)]
                )
            ),
        )
        seed_ids = vocab.encode_lenient(seed)[0]
        generation = GenerationJob(
            seed_ids=seed_ids,
            context=[*history, *seed],
            params=params,
            history=[*vocab.encode_lenient(history)[0], *seed_ids],
            random_seed=draw(st.integers(0, 2**53 - 1)),
            max_words=draw(st.integers(0, 12)),
            n=1 if session else draw(st.integers(1, 3)),
            stop=draw(st.sampled_from(STOPS)),
            hidden=hidden if session else None,
            keep_state=session,
            stream=draw(st.booleans()),
            min_words=draw(st.integers(0, 3)),
        )
        out.append(Arrival(draw(st.integers(0, 6)), generation))
    return out


def run_batched(
    loaded: Checkpoint, plan: list[Arrival]
) -> tuple[dict[int, GenerationResult], dict[int, list[WordEvent]], list[int]]:
    """Step a `Batch` by hand: each job joins before its arrival step, in the drawn order."""
    batch = Batch(loaded.model, loaded.vocab, loaded.vocab.special_ids, guard_of(loaded))
    results: dict[Hashable, GenerationResult] = {}
    events: dict[Hashable, list[WordEvent]] = {i: [] for i in range(len(plan))}
    sizes = []
    step = 0
    with torch.inference_mode():
        while len(results) < len(plan):
            joining = [(i, a.job) for i, a in enumerate(plan) if a.step == step]
            updates = batch.join(joining) if joining else []
            if batch.size:
                sizes.append(batch.size)
                updates += batch.step()
            for update in updates:
                events[update.key] += update.events
                if update.result is not None:
                    results[update.key] = update.result
            step += 1
    assert batch.size == 0
    assert batch.hidden is None
    return results, events, sizes  # type: ignore[return-value]


def run_alone(loaded: Checkpoint, generation: GenerationJob) -> tuple[GenerationResult, list[Any]]:
    events: list[WordEvent] = []
    with torch.inference_mode():
        result = generate_alone(
            loaded.model,
            loaded.vocab,
            generation,
            loaded.vocab.special_ids,
            events.extend,
            copies=guard_of(loaded),
        )
    return result, events


def guard_of(loaded: Checkpoint) -> CopyGuard | None:
    return CopyGuard(loaded.copies, loaded.vocab) if loaded.copies is not None else None


def by_sample(events: list[WordEvent]) -> dict[int, list[WordEvent]]:
    out: dict[int, list[WordEvent]] = {}
    for event in events:
        out.setdefault(event.index, []).append(event)
    return out


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), cell=st.sampled_from(["rnn", "lstm", "cached", "int8"]))
def test_batched_generation_equals_one_at_a_time(
    models: dict[str, Checkpoint], data: st.DataObject, cell: str
) -> None:
    loaded = models[cell]
    plan = data.draw(arrivals(loaded))
    results, events, sizes = run_batched(loaded, plan)
    for i, arrival in enumerate(plan):
        alone, alone_events = run_alone(loaded, arrival.job)
        assert results[i].samples == alone.samples, i
        # The same words stream for each sample; samples of one request may interleave.
        assert by_sample(events[i]) == by_sample(alone_events), i
        if arrival.job.keep_state:
            assert results[i].state is not None
            assert alone.state is not None
            for got, want in zip(
                hidden_parts(results[i].state), hidden_parts(alone.state), strict=True
            ):
                assert got.device.type == "cpu"
                torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    rows = sum(a.job.n * a.job.max_words for a in plan)
    assert sum(sizes) <= rows  # never a step for a row that had finished


def test_new_texts_join_from_the_state_after_bos_fed_once(
    models: dict[str, Checkpoint], monkeypatch: pytest.MonkeyPatch
) -> None:
    loaded = models["lstm"]
    model, vocab = loaded.model, loaded.vocab
    fed: list[tuple[int, int]] = []  # (rows, steps) of each pass through the cell
    feed = model.feed

    def counting(ids: torch.Tensor, hidden: Any = None) -> Any:
        fed.append((ids.shape[0], ids.shape[1]))
        return feed(ids, hidden)

    monkeypatch.setattr(model, "feed", counting)
    seed = vocab.encode_words(["I", "can", "see"])[0]
    batch = Batch(model, vocab, vocab.special_ids)
    first = [job(seed_ids=seed, keep_state=True, max_words=0, random_seed=i) for i in range(2)]
    with torch.inference_mode():
        done = batch.join(list(enumerate(first)))
        batch.join([(2, job(seed_ids=seed, max_words=3))])
    # <bos> once, then each join's seed: never <bos> and the seed again.
    assert fed == [(1, 1), (2, 3), (1, 3)]
    monkeypatch.undo()
    want = prime(model, [seed], vocab.bos_id)
    for update in done:
        assert update.result is not None
        assert update.result.state is not None
        for got, expected in zip(
            hidden_parts(update.result.state), hidden_parts(want), strict=True
        ):
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_rows_of_different_requests_share_each_step(models: dict[str, Checkpoint]) -> None:
    loaded = models["lstm"]
    plan = [
        Arrival(0, job(max_words=6, random_seed=1, n=2)),
        Arrival(0, job(max_words=3, random_seed=2)),
        Arrival(2, job(max_words=4, random_seed=3)),
    ]
    _, _, sizes = run_batched(loaded, plan)
    # Steps 0-1: 2 + 1 rows; step 2: the third joins (4) and the short one leaves after it.
    assert sizes == [3, 3, 4, 3, 3, 3]


def test_rows_that_come_and_go_draw_with_their_own_parameters_in_one_call(
    models: dict[str, Checkpoint], caplog: pytest.LogCaptureFixture
) -> None:
    """The batch works out how its rows draw once while they stay the same: each row that
    joins or leaves must give a new plan (a stale one would fail the batch's one sampling
    call, whose fallback samples each row alone, with a warning)."""
    loaded = models["lstm"]
    plan = [
        Arrival(0, job(max_words=1, random_seed=1, params=SamplingParams(temperature=0))),
        Arrival(0, job(max_words=8, random_seed=2, params=SamplingParams(top_k=3))),
        Arrival(1, job(max_words=8, random_seed=3, params=SamplingParams(top_k=0, temperature=3))),
    ]
    results, _, sizes = run_batched(loaded, plan)
    assert sizes[:3] == [2, 2, 2]  # the third joined where the first left
    for i, arrival in enumerate(plan):
        assert results[i].samples == run_alone(loaded, arrival.job)[0].samples, i
    assert "failed; sampling each alone" not in caplog.text


# -- the engines, on their thread ------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, timeout=60))


async def start(run_dir: Path, kind: str, **kwargs: Any) -> Engine:
    return await Engine.start(run_dir, "cpu", kind=kind, **kwargs)


@KINDS
def test_a_client_that_goes_away_is_dropped_at_the_next_step(tiny_run: Path, kind: str) -> None:
    async def scenario() -> None:
        engine = await start(tiny_run, kind)
        try:
            endless = engine.submit(job(max_words=10**9, stream=True))
            words = endless.events()
            assert isinstance(await anext(words), WordEvent)
            await words.aclose()  # what the stream does when its client disconnects
            with pytest.raises(GenerationCancelled):
                await endless.result()
            stats = engine.stats()
            assert stats.active_rows == stats.active_requests == 0
            assert stats.cancelled == 1
            assert engine.pending == 0
            assert len((await engine.submit(job(max_words=3)).result()).samples[0].words) == 3
        finally:
            await engine.close()

    run(scenario())


@KINDS
def test_a_request_past_its_deadline_is_dropped_at_the_next_step(
    tiny_run: Path, kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = FakeClock()

    async def scenario() -> None:
        engine = await start(tiny_run, kind, timeout_seconds=10, clock=clock)
        try:
            gate = Gate(monkeypatch)
            slow = engine.submit(job(max_words=10**9, random_seed=1))
            await gate.wait_entered()
            clock.now += 11  # past the deadline of the running one only
            quick = engine.submit(job(max_words=4, random_seed=2))
            gate.open()
            with pytest.raises(GenerationTimeout, match="within 10 s"):
                await slow.result()
            assert len((await quick.result()).samples[0].words) == 4
            stats = engine.stats()
            assert stats.expired == 1
            assert stats.active_rows == 0
            assert engine.pending == 0
        finally:
            await engine.close()

    run(scenario())


@KINDS
def test_a_queued_request_past_its_deadline_never_starts(
    tiny_run: Path, kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = FakeClock()

    async def scenario() -> None:
        engine = await start(tiny_run, kind, timeout_seconds=10, clock=clock, max_batch=1)
        try:
            gate = Gate(monkeypatch)
            first = engine.submit(job(max_words=3))
            await gate.wait_entered()
            queued = engine.submit(job(max_words=3))  # no room: max_batch 1 (or naive)
            generations = engine.stats().generations
            clock.now += 11  # both have waited 11 s
            later = engine.submit(job(max_words=3))
            gate.open()
            for expired in (first, queued):
                with pytest.raises(GenerationTimeout):
                    await expired.result()
            assert len((await later.result()).samples[0].words) == 3
            assert engine.stats().generations == generations + 1  # queued never started
            assert engine.stats().expired == 2
        finally:
            await engine.close()

    run(scenario())


@KINDS
def test_a_full_queue_refuses_at_once(
    tiny_run: Path, kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def scenario() -> None:
        engine = await start(tiny_run, kind, max_pending=3)
        try:
            gate = Gate(monkeypatch)
            held = [engine.submit(job(max_words=2, random_seed=i)) for i in range(2)]
            await gate.wait_entered()
            held.append(engine.submit(job(max_words=2)))
            with pytest.raises(EngineBusy, match="3 requests"):
                engine.submit(job())
            with pytest.raises(EngineBusy):
                await engine.score([2, 3])
            assert engine.stats().rejected == 2
            assert engine.stats().pending == 3
            gate.open()
            for generation in held:
                assert len((await generation.result()).samples[0].words) == 2
            assert engine.pending == 0
        finally:
            await engine.close()

    run(scenario())


@KINDS
def test_closing_drains_what_is_in_flight_and_refuses_new_work(
    tiny_run: Path, kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def scenario() -> None:
        engine = await start(tiny_run, kind)
        gate = Gate(monkeypatch)
        running = [engine.submit(job(max_words=20, random_seed=i, stream=True)) for i in range(3)]
        await gate.wait_entered()
        engine.stop_accepting()
        closing = asyncio.create_task(engine.close())
        with pytest.raises(EngineClosed):
            engine.submit(job())
        with pytest.raises(EngineClosed):
            await engine.next_words([], None, 3)
        gate.open()
        for generation in running:
            streamed = [event.word async for event in generation.events()]
            result = await generation.result()
            assert result.samples[0].words == streamed
            assert len(streamed) == 20
        await closing
        assert engine.pending == 0

    run(scenario())


def test_concurrent_generations_are_stepped_together(
    tiny_run: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    jobs = [job(max_words=8 + i, random_seed=i, n=1 + i % 2) for i in range(5)]

    async def scenario() -> tuple[list[GenerationResult], dict[str, Any]]:
        engine = await start(tiny_run, "batched")
        try:
            gate = Gate(monkeypatch)
            handles: list[Generation] = [engine.submit(jobs[0])]
            await gate.wait_entered()
            handles += [engine.submit(j) for j in jobs[1:]]
            assert engine.stats().queue_length == 4
            gate.open()
            return [await h.result() for h in handles], engine.stats()
        finally:
            await engine.close()

    results, stats = run(scenario())
    rows = sum(j.n for j in jobs)
    assert max(stats.step_batch_sizes) == rows
    # After the warm-up's 2 steps: the first alone, then every row at the next step.
    assert stats.recent_batch_sizes[2:4] == [jobs[0].n, rows]
    loaded = checkpoint.load(tiny_run, "cpu")
    for got, generation in zip(results, jobs, strict=True):
        assert got.samples == run_alone(loaded, generation)[0].samples


@pytest.mark.parametrize("tokenizer", ["words", "subword"])
def test_a_first_word_takes_a_round_per_token_and_one_more_on_a_subword_model(
    tmp_path: Path, tokenizer: str
) -> None:
    """As `app.engine.scheduler` and the README say: the round that joins draws the first
    token, one round each draws the word's other tokens, and on a subword model the word is
    released by the round whose token opens the next one (a line break ends at once)."""
    loaded = checkpoint.load(build_run(tmp_path / "run", tokenizer=tokenizer))
    vocab = loaded.vocab
    seed = vocab.split_words("the sea")
    batch = Batch(loaded.model, vocab, vocab.special_ids)
    with torch.inference_mode():
        for random_seed in range(20):
            job = GenerationJob(
                seed_ids=vocab.encode_words(seed)[0],
                context=seed,
                params=SamplingParams(),
                random_seed=random_seed,
                max_words=5,
                stream=True,
            )
            batch.join([("job", job)])
            text = batch.rows[0].seq.texts[0]
            rounds, events = 0, []
            while not events:
                rounds += 1
                events = [event for update in batch.step() for event in update.events]
            first = events[0].word
            later = tokenizer == "subword" and first != NEWLINE
            assert rounds == text.kept_tokens + later, (first, rounds)
            batch.clear()


def test_stats_name_what_metrics_read(tiny_run: Path) -> None:
    async def scenario() -> dict[str, Any]:
        engine = await start(tiny_run, "batched", max_batch=16)
        try:
            await engine.submit(job(max_words=3, n=2)).result()
            return engine.stats()
        finally:
            await engine.close()

    stats = run(scenario())
    assert stats.engine == "batched"
    assert stats.queue_length == stats.active_rows == stats.pending == 0
    assert stats.max_batch == 16
    # The warm-up (1 row, 2 steps), then 2 rows for 3 steps.
    assert stats.steps_total == 5
    assert stats.rows_stepped_total == 8
    assert stats.step_batch_sizes == {1: 2, 2: 3}
    assert stats.recent_batch_sizes == [1, 1, 2, 2, 2]
    assert stats.generations == 2
    assert stats.words == 8
    assert sum(stats.queue_wait_seconds.counts) == 2  # each generation's wait, once
    assert sum(stats.round_seconds.counts) == 5  # a round each step: none here was empty
    assert 0 < stats.round_seconds.total < 60


def test_an_unknown_engine_is_refused(tiny_run: Path) -> None:
    with pytest.raises(ValueError, match="batched, naive"):
        run(start(tiny_run, "turbo"))


# -- one request's failure stays its own -----------------------------------------------------

POISON = 666  # the random seed of the request whose own work fails
FAULT_AT = 3  # the failing row has this many words when its fault strikes
MARK = "poisoned"  # a context word that tells the faulty text its request


def poison_sampling(monkeypatch: pytest.MonkeyPatch) -> None:
    """Sampling raises for calls holding the row seeded POISON once it has drawn FAULT_AT
    numbers, after every row of the call has drawn: the rows that share the step must be
    put back to where they were."""
    real = batch_module.sample
    draws: dict[Draws, int] = {}

    def faulty(logits: torch.Tensor, params: Any, generators: Any, banned: Any = ()) -> Any:
        ids = real(logits, params, generators, banned)
        for generator in generators:
            if generator.seed == POISON:
                draws[generator] = draws.get(generator, 0) + 1
                if draws[generator] > FAULT_AT:
                    raise RuntimeError("poisoned sampling")
        return ids

    monkeypatch.setattr(batch_module, "sample", faulty)


def poison_text(monkeypatch: pytest.MonkeyPatch) -> None:
    """The text of a sample whose context holds MARK raises at its word FAULT_AT + 1."""

    class Faulty(Continuation):
        def __init__(
            self,
            vocab: Any,
            context: Sequence[str],
            stops: Sequence[str] = (),
            max_words: int | None = None,
            min_words: int = 0,
        ) -> None:
            super().__init__(vocab, context, stops, max_words, min_words)
            self.poisoned = MARK in context

        def push(self, word: str, *score: Any) -> None:
            if self.poisoned and len(self.words) == FAULT_AT:
                raise RuntimeError("poisoned text")
            super().push(word, *score)

    monkeypatch.setattr(batch_module, "Continuation", Faulty)


FAULTS = {"sampling": poison_sampling, "text": poison_text}

# The healthy requests: several samples, stop strings, a stream; none seeded POISON(+1).
HEALTHY = [
    job(max_words=12, random_seed=1, n=2),
    job(max_words=9, random_seed=5, stop=("e",), stream=True),
    job(max_words=15, random_seed=9, params=SamplingParams(top_k=0, temperature=0.7)),
]


async def start_together(
    engine: Engine, monkeypatch: pytest.MonkeyPatch, jobs: Sequence[GenerationJob]
) -> list[Generation]:
    """Submit ``jobs`` while the inference thread is held in a step, so that the batched
    engine steps all of them together from the next step on."""
    gate = Gate(monkeypatch)
    handles = [engine.submit(jobs[0])]
    await gate.wait_entered()
    handles += [engine.submit(j) for j in jobs[1:]]
    gate.open()
    return handles


async def streamed(generation: Generation) -> list[WordEvent]:
    return [event async for event in generation.events()]


async def healthy_afterwards(engine: Engine) -> None:
    """The engine goes on serving, and nothing of the failed request is left in it."""
    assert len((await engine.submit(job(max_words=3)).result()).samples[0].words) == 3
    stats = engine.stats()
    assert stats.active_rows == stats.active_requests == 0
    assert engine.pending == 0


@KINDS
@pytest.mark.parametrize("fault", list(FAULTS))
def test_a_row_that_fails_fails_its_request_alone(
    tiny_run: Path, kind: str, fault: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    loaded = checkpoint.load(tiny_run, "cpu")
    expected = [run_alone(loaded, j) for j in HEALTHY]  # before any fault is injected
    poisoned = job(max_words=20, random_seed=POISON, n=2, context=[MARK], stream=True)

    async def scenario() -> None:
        engine = await start(tiny_run, kind)
        try:
            FAULTS[fault](monkeypatch)
            bad, *good = await start_together(engine, monkeypatch, [poisoned, *HEALTHY])
            events = [await streamed(g) for g in (bad, *good)]
            with pytest.raises(GenerationFailed, match=f"poisoned {fault}"):
                await bad.result()
            assert 0 < len(events[0]) <= 2 * FAULT_AT  # it streamed until its fault
            for handle, (result, alone_events), got in zip(good, expected, events[1:], strict=True):
                assert (await handle.result()).samples == result.samples
                assert by_sample(got) == by_sample(alone_events)
            stats = engine.stats()
            assert stats.failed == 1
            if kind == "batched":  # the fault struck inside a step shared with the others
                rows = poisoned.n + sum(j.n for j in HEALTHY)
                assert max(stats.step_batch_sizes) == rows
            await healthy_afterwards(engine)
        finally:
            await engine.close()

    run(scenario())


@KINDS
def test_a_seed_id_outside_the_vocabulary_fails_its_request_alone(
    tiny_run: Path, kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    loaded = checkpoint.load(tiny_run, "cpu")
    expected = [run_alone(loaded, j)[0] for j in HEALTHY]
    bad_ids = job(seed_ids=[2, len(loaded.vocab) + 7])

    async def scenario() -> None:
        engine = await start(tiny_run, kind)
        try:
            first, bad, *good = await start_together(
                engine, monkeypatch, [HEALTHY[0], bad_ids, *HEALTHY[1:]]
            )
            with pytest.raises(GenerationFailed):
                await bad.result()
            for handle, result in zip([first, *good], expected, strict=True):
                assert (await handle.result()).samples == result.samples
            assert engine.stats().failed == 1
            await healthy_afterwards(engine)
        finally:
            await engine.close()

    run(scenario())


def test_a_delivery_that_fails_ends_its_request_alone(
    tiny_run: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    loaded = checkpoint.load(tiny_run, "cpu")
    expected = [run_alone(loaded, j)[0] for j in HEALTHY]
    endless = job(max_words=10**9, random_seed=POISON, stream=True)
    real = Generation._accept

    def faulty(self: Generation, events: Any, outcome: Any) -> None:
        if self.job.random_seed == POISON:
            raise RuntimeError("poisoned delivery")
        real(self, events, outcome)

    async def scenario() -> None:
        engine = await start(tiny_run, "batched")
        try:
            monkeypatch.setattr(Generation, "_accept", faulty)
            # The failing one comes first in every wake-up's deliveries.
            bad, *good = await start_together(engine, monkeypatch, [endless, *HEALTHY])
            with pytest.raises(GenerationFailed, match="poisoned delivery"):
                await bad.result()
            assert await streamed(bad) == []
            for handle, result in zip(good, expected, strict=True):
                assert (await handle.result()).samples == result.samples
            await healthy_afterwards(engine)  # the endless one was dropped: it was cancelled
            assert engine.stats().cancelled == 1
        finally:
            await engine.close()

    run(scenario())
