"""Thread-free batch stepping: the rows of many requests advanced together, one word a step.

`Batch` holds the sequences being generated, one row per sample. Each step advances every
active row in one forward pass (embedding, RNN cell and output layer for all rows at once),
then samples each row with its own parameters and generator. Requests that arrive join at the
next step, after their seed words are fed, all arrivals of a step in one packed forward pass
(`model_store.sampling.start_states`); rows that finish leave at once. The ``n`` samples of a
request and session continuations are rows like any other. `generate_alone` steps one request
in a batch of its own: the naive engine's way, and the reference the tests compare with.

A request whose own part fails (its seed ids, its sampling, its text) ends alone with
`GenerationFailed`; the rows that share its steps go on with the words they would have had
without it.

Sampling is ``model_store.sampling``: every row draws one number per step from its own
generator (row ``i`` of a request is seeded with ``random_seed + i``), so a row's words do not
depend on the rows that share its steps.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field

import torch

from app.engine.handles import (
    GenerationFailed,
    GenerationJob,
    GenerationResult,
    WordEvent,
    failure,
)
from app.text import Alternatives, Continuation
from model_store.cache import TextCache, mix_rows
from model_store.copies import CopyGuard
from model_store.network import Hidden, WordRNN, hidden_cat, hidden_select, hidden_to
from model_store.sampling import (
    Draws,
    SamplingParams,
    SamplingPlan,
    advance,
    next_logits,
    penalize,
    sample,
    start_state,
    start_states,
)
from model_store.vocab import Vocab

log = logging.getLogger("app")
_UNSCORED: tuple[None, Alternatives] = (None, ())  # a row's score when no row asked for one


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
    sample: Continuation  # its text: ``seq.texts[index]``
    generator: Draws
    states: list[Hidden] | None  # after each word (a session with stop strings), else None
    text: list[int] = field(default_factory=list)  # ids so far, kept for repetition controls
    generated: int = 0  # how many of them this row drew
    cache: TextCache | None = None  # the model's text cache: the history counted


class _Plan:
    """What the batch's rows ask of a step, worked out once while they stay the same (a
    row's parameters asked at every step by each control cost more than the controls)."""

    def __init__(self, rows: Sequence[_Row], vocab_size: int, device: torch.device) -> None:
        self.params: list[SamplingParams] = [row.seq.job.params for row in rows]
        self.generators = [row.generator for row in rows]
        self.sampling = SamplingPlan(self.params, vocab_size, device)
        self.caches = any(row.cache is not None for row in rows)
        self.logprobs = any(row.seq.job.logprobs is not None for row in rows)
        self.penalizes = any(p.penalizes for p in self.params)
        self.copies = any(p.max_copy_words for p in self.params)


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

    def __init__(
        self,
        model: WordRNN,
        vocab: Vocab,
        banned: Sequence[int],
        copies: CopyGuard | None = None,
    ) -> None:
        self.model = model
        self.vocab = vocab
        self.copies = copies  # the training text's index, for `max_copy_words`
        self.hidden: Hidden | None = None
        self.rows: list[_Row] = []
        self._plan: _Plan | None = None  # the rows', while they stay the same
        self._seqs: dict[Hashable, _Sequence] = {}
        device = model.embedding.weight.device
        self._banned = torch.tensor(list(banned), dtype=torch.long, device=device)  # never drawn
        self._continuing = _continuations(vocab, device)  # barred from a sample's first piece
        self._fresh: Hidden | None = None  # the state after <bos>: where every new text starts

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
        starts = _starts_each(self.model, self.vocab, [job for _, job in valid], self._fresh_state)
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
            self._set_rows(self.rows + rows)
            self._seqs.update((seq.key, seq) for seq in seqs)
        return updates

    def _fresh_state(self) -> Hidden:
        """The state after ``<bos>`` from the zero state, (layers, 1, H): every new text's
        first step, the same for all. Fed once, it spares each joining request one step of
        the recurrent cell (a joining request's seed is a few ids, each a sequential step)."""
        if self._fresh is None:
            self._fresh = start_state(self.model, [], self.vocab.bos_id)
        return self._fresh

    def _sequence(
        self, key: Hashable, job: GenerationJob, start: Hidden
    ) -> tuple[_Sequence, list[_Row]]:
        """A joining request and its rows (none when it asks for no words)."""
        texts = [
            Continuation(self.vocab, job.context, job.stop, job.max_words, job.min_words)
            for _ in range(job.n)
        ]
        seq = _Sequence(key, job, texts, running=job.n)
        if job.max_words == 0:
            seq.state = start
            return seq, []
        keep = job.keep_state and bool(job.stop)
        history = list(job.history) if job.params.penalizes else []
        settings = self.model.config.cache
        cache = (
            TextCache(settings, job.history, self.vocab.starts_word()) if settings.enabled else None
        )
        rows = [
            _Row(
                seq,
                i,
                texts[i],
                Draws(job.random_seed + i),
                [start] if keep else None,
                history[:],
                cache=cache.fork() if cache is not None and i else cache,
            )
            for i in range(job.n)
        ]
        return seq, rows

    def step(self) -> list[Update]:
        """Advance every row by one word, in one forward pass; finished rows leave, and so do
        the rows of a request whose own work failed."""
        assert self.hidden is not None, "step() on an empty batch"
        rows, plan = self.rows, self._planned()
        logits = raw = next_logits(self.model, self.hidden)  # (B, V)
        if plan.caches:
            nexts = [row.cache.next_ids() if row.cache is not None else None for row in rows]
            logits = raw = mix_rows(raw, nexts)
        # The scores are changed in place from here (each copy of all B rows, and the wait
        # for torch's threads that comes with it, cost more than the change): on a copy when
        # `_scores` is to read the model's own.
        if plan.logprobs:
            logits = raw.clone()
        if self._continuing is not None:
            starting = [pos for pos, row in enumerate(rows) if row.sample.tokens == 0]
            if starting:  # a sample's first piece opens a word: the seed's last one is whole
                index = torch.tensor(starting, device=logits.device)
                logits.index_copy_(0, index, logits[index].masked_fill(self._continuing, -math.inf))
        if plan.penalizes:
            texts, counts = [row.text for row in rows], [row.generated for row in rows]
            logits = penalize(logits, plan.params, texts, counts)
        if self.copies is not None and plan.copies:
            logits = self._forbid_copies(logits)
        logits.index_fill_(1, self._banned, -math.inf)
        ids, failed = self._sample(logits, plan)
        scores = self._scores(raw, ids) if plan.logprobs else None
        before, hidden = self.hidden, advance(self.model, self.hidden, ids)
        events: dict[_Sequence, list[WordEvent]] = {}
        finished: list[_Sequence] = []
        keep: list[int] = []
        for pos, (row, word_id) in enumerate(zip(rows, ids, strict=True)):
            seq = row.seq
            if seq in failed:
                continue
            try:
                score = scores[pos] if scores is not None else _UNSCORED
                done = self._push(row, pos, word_id, score, before, hidden, events)
            except Exception as exc:
                failed[seq] = exc
                continue
            if not done:
                keep.append(pos)
                continue
            seq.running -= 1
            if seq.running == 0:
                finished.append(seq)
        if failed:  # a sibling row failed
            keep = [pos for pos in keep if rows[pos].seq not in failed]
        if len(keep) < len(rows):
            self._set_rows([rows[pos] for pos in keep])
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

    def _forbid_copies(self, logits: torch.Tensor) -> torch.Tensor:
        """Each guarded row's ``logits`` without the tokens that would make a run of the
        training text longer than its ``max_copy_words``."""
        assert self.copies is not None
        logits = logits.float().clone()
        for pos, row in enumerate(self.rows):
            limit = row.seq.job.params.max_copy_words
            if not limit:
                continue
            text = row.sample
            banned = self.copies.banned(row.seq.job.context, text.words, text.pending_word, limit)
            if banned:
                logits[pos, torch.tensor(banned, device=logits.device)] = -math.inf
        return logits

    def _set_rows(self, rows: list[_Row]) -> None:
        self.rows, self._plan = rows, None

    def _planned(self) -> _Plan:
        if self._plan is None:
            self._plan = _Plan(self.rows, len(self.vocab), self.model.embedding.weight.device)
        return self._plan

    def _sample(
        self, logits: torch.Tensor, plan: _Plan
    ) -> tuple[list[int], dict[_Sequence, Exception]]:
        """Each row's next id from its (B, V) ``logits`` (the banned ids already -inf), all
        rows in one call.

        When that call fails, each row is sampled alone, its generator first rewound to where
        it was before this step, so that the rows that do not fail draw exactly what they
        would have drawn; the requests whose rows fail are returned with their error, and
        their rows get a placeholder id (they leave after this step).
        """
        rows, params = self.rows, plan.params
        try:
            return sample(logits, params, plan.generators, plan=plan.sampling), {}
        except Exception:
            log.warning("sampling %d rows at once failed; sampling each alone", len(rows))
        ids: list[int] = []
        failed: dict[_Sequence, Exception] = {}
        for pos, row in enumerate(rows):
            try:
                row.generator.rewind(row.sample.tokens)
                ids += sample(logits[pos : pos + 1], [params[pos]], [row.generator])
            except Exception as exc:
                failed.setdefault(row.seq, exc)
                ids.append(self.vocab.bos_id)
        return ids, failed

    def _scores(self, logits: torch.Tensor, ids: Sequence[int]) -> list[tuple[float, Alternatives]]:
        """Each row's drawn token's log-probability under the model (before temperature and
        truncation, as ``/score`` gives it) and its alternatives, asked when any row asked for
        them: the likeliest tokens that open a word (never a special one)."""
        wanted = [row.seq.job.logprobs for row in self.rows]
        log_probs = torch.log_softmax(logits.float(), dim=-1)
        chosen = log_probs.gather(1, torch.tensor(ids, device=logits.device).unsqueeze(1))
        top = max(w or 0 for w in wanted)
        alternatives: list[Alternatives] = [()] * len(ids)
        if top:
            allowed = log_probs.index_fill(1, self._banned, -math.inf)
            if self._continuing is not None:
                allowed = allowed.masked_fill(self._continuing, -math.inf)
            values, top_ids = allowed.topk(min(top, allowed.shape[1]), dim=1)
            for pos, (row_values, row_ids) in enumerate(
                zip(values.tolist(), top_ids.tolist(), strict=True)
            ):
                n = wanted[pos] or 0
                alternatives[pos] = tuple(
                    (self.vocab.spell([i]), v)
                    for i, v in zip(row_ids[:n], row_values[:n], strict=True)
                    if v > -math.inf
                )
        return [(lp, alt) for lp, alt in zip(chosen.squeeze(1).tolist(), alternatives, strict=True)]

    def _push(
        self,
        row: _Row,
        pos: int,
        word_id: int,
        score: tuple[float | None, Alternatives],
        before: Hidden,
        hidden: Hidden,
        events: dict[_Sequence, list[WordEvent]],
    ) -> bool:
        """Add row ``pos``'s new token to its text (and its words to stream to ``events``);
        whether the row is done. ``before`` and ``hidden`` are the states before and after
        the token was fed: a refused token leaves the row's state at ``before``."""
        seq, text = row.seq, row.sample
        accepted = text.push_token(self.vocab.tokens[word_id], *score)
        if accepted and seq.job.params.penalizes:
            row.text.append(word_id)
            row.generated += 1
        if accepted and row.cache is not None:
            row.cache.follow(word_id)
        if not accepted:
            hidden = before
        elif row.states is not None:
            row.states.append(hidden_select(hidden, [pos]))
        done = text.done
        if seq.job.stream:
            pieces = text.release(final=done)
            if pieces:
                events.setdefault(seq, []).extend(
                    WordEvent(row.index, p.word, p.text, p.log_prob, p.top) for p in pieces
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
            self._set_rows([self.rows[pos] for pos in keep])
            assert self.hidden is not None
            self.hidden = hidden_select(self.hidden, keep) if keep else None
        for key in keys:
            self._seqs.pop(key, None)

    def clear(self) -> list[Hashable]:
        keys = self.keys
        self.hidden, self._seqs = None, {}
        self._set_rows([])
        return keys

    def _result(self, seq: _Sequence) -> GenerationResult:
        state = None
        if seq.job.keep_state:
            assert seq.state is not None
            state = hidden_to(seq.state, torch.device("cpu"))
        return GenerationResult([text.finish() for text in seq.texts], state)


def _failed(key: Hashable, exc: Exception) -> Update:
    return Update(key, error=failure(exc))


def _check_ids(ids: Sequence[int], vocab_size: int) -> ValueError | None:
    """Why ``ids`` cannot be fed, if they cannot: checked before any model work, since an
    id past the embedding would fail the whole packed pass (and, on a GPU, the device)."""
    bad = [i for i in ids if not 0 <= i < vocab_size]
    return (
        ValueError(f"seed ids {bad[:5]} are outside the vocabulary (0..{vocab_size - 1})")
        if bad
        else None
    )


def _continuations(vocab: Vocab, device: torch.device) -> torch.Tensor | None:
    """(V,) which ids continue a word (a subword vocabulary's pieces that open none), or None
    when every id opens one."""
    if not vocab.is_subword:
        return None
    return ~torch.tensor(vocab.starts_word(), dtype=torch.bool, device=device)


def _starts_each(
    model: WordRNN, vocab: Vocab, jobs: Sequence[GenerationJob], fresh: Callable[[], Hidden]
) -> list[Hidden | Exception]:
    """Each job's state after its seed words, (layers, 1, H) each, from one packed forward
    pass (`start_states`): a session's on its state, a new text's on ``fresh()``, the state
    after ``<bos>``. When that pass fails, each job's start is fed alone, so that a job that
    cannot be fed fails by itself (its entry is the error)."""
    seeds = [job.seed_ids for job in jobs]
    try:
        hiddens = [fresh() if job.hidden is None else job.hidden for job in jobs]
        return list(start_states(model, seeds, vocab.bos_id, hiddens))
    except Exception as exc:
        if len(jobs) == 1:
            return [exc]
    return [_starts_each(model, vocab, [job], fresh)[0] for job in jobs]


def generate_alone(
    model: WordRNN,
    vocab: Vocab,
    job: GenerationJob,
    banned: Sequence[int],
    emit: Callable[[list[WordEvent]], None] | None = None,
    check: Callable[[], None] | None = None,
    on_step: Callable[[int], None] | None = None,
    copies: CopyGuard | None = None,
) -> GenerationResult:
    """Generate ``job`` by itself: its ``n`` samples are the rows of a `Batch` of its own,
    stepped until they are done, so that its words are those it gets in any batch.

    ``emit`` receives the words released by each step (streams); ``check`` runs before each
    step and may raise to stop the job; ``on_step`` is told each step's batch size. When the
    job's own work fails, its `GenerationFailed` is raised (the original error its cause).
    """
    batch = Batch(model, vocab, banned, copies)
    updates = batch.join([(None, job)])  # its one request: the key does not matter
    while True:
        for update in updates:
            if update.error is not None:
                raise update.error
            if emit is not None and update.events:
                emit(update.events)
            if update.result is not None:
                return update.result
        if check is not None:
            check()
        size = batch.size
        updates = batch.step()
        if on_step is not None:
            on_step(size)
