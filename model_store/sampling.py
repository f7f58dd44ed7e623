"""Stateful hidden-state sampling: the one implementation behind training previews and serving.

The lab's sampler feeds the seed words through the network to build up the hidden state, then
repeatedly picks one of the top-k next words, feeds it back and carries the hidden state on.
Here the same is done on a batch of independent rows:

    hidden = prime(model, seeds)                 # all seed words, one forward pass
    loop:
        logits = next_logits(model, hidden)      # (B, V), read from the top layer's state
        ids = sample(logits, params, generators) # each row: its own top-k/top-p/temperature/RNG
        hidden = advance(model, hidden, ids)     # feed the chosen words back

Where a generation starts is said once, by `start_state` (`start_states` for many requests in
one forward pass): a new text from ``<bos>`` and its seed, a session from its state.

A generation state is the hidden state alone (the last word is already folded into it), so a
session that continues later needs nothing else. Every row draws exactly one uniform number per
step from its own ``torch.Generator``, so a row's words depend only on its seed and parameters,
never on which other rows share its batch.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch
from torch import Tensor
from torch.nn.utils.rnn import pack_sequence

from model_store.cache import TextCache, mix_rows
from model_store.network import (
    Hidden,
    WordRNN,
    hidden_cat,
    hidden_select,
    hidden_to,
    top_features,
)


@dataclass(frozen=True)
class SamplingParams:
    """How one row picks its next word.

    ``top_k``: keep the k most likely words (0 = the whole vocabulary); ``temperature``: divide
    the logits by it (0 = greedy: always the most likely word); ``top_p``: then keep the
    smallest set of words whose probability reaches ``top_p``; ``uniform``: pick uniformly among
    the kept words instead of by probability, as the lab's ``np.random.choice`` does.
    """

    top_k: int = 5
    temperature: float = 1.0
    top_p: float = 1.0
    uniform: bool = False
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    no_repeat_ngram_size: int = 0
    bad_words: tuple[tuple[int, ...], ...] = ()  # id sequences never generated
    max_copy_words: int = 0  # no run of the training text longer than this (0: no limit)

    def __post_init__(self) -> None:
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0 (0 means the whole vocabulary)")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError("temperature must be a finite number >= 0 (0 means greedy)")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError("top_p must be in (0, 1]")
        if not (math.isfinite(self.repetition_penalty) and self.repetition_penalty >= 1):
            raise ValueError("repetition_penalty must be a finite number >= 1 (1: none)")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2] (0: none)")
        if self.no_repeat_ngram_size < 0:
            raise ValueError("no_repeat_ngram_size must be >= 0 (0: none)")
        if self.max_copy_words < 0:
            raise ValueError("max_copy_words must be >= 0 (0: no limit)")
        if any(not phrase for phrase in self.bad_words):
            raise ValueError("bad_words must not hold an empty phrase")

    @cached_property
    def penalizes(self) -> bool:
        """Whether the text so far changes this row's scores (`penalize`); asked every step."""
        return (
            self.repetition_penalty != 1.0
            or self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
            or self.no_repeat_ngram_size > 0
            or bool(self.bad_words)
        )


def penalize(
    logits: Tensor,
    params: Sequence[SamplingParams],
    texts: Sequence[Sequence[int]],
    generated: Sequence[int],
) -> Tensor:
    """(B, V) ``logits`` after each row's repetition controls; rows without any keep theirs.

    ``texts[i]`` holds row i's ids so far (what it continues, then what it generated: the
    last ``generated[i]`` of them). ``repetition_penalty`` (CTRL) divides a positive score
    and multiplies a negative one of every id in the text; ``presence_penalty`` and
    ``frequency_penalty`` (OpenAI's) subtract, from each id generated so far, the penalty
    once and the penalty times its count; ``no_repeat_ngram_size`` n forbids the ids that
    would complete an n-gram the text already holds; a ``bad_words`` phrase is blocked at its
    last id, once the text ends with the ids before it.
    """
    rows = [i for i, p in enumerate(params) if p.penalizes]
    if not rows:
        return logits
    logits = logits.float().clone()
    # Each control gathers (row, id, value) over all rows first: a few tensor operations a
    # step, not a few per row.
    rep_rows: list[int] = []
    rep_ids: list[int] = []
    rep_by: list[float] = []
    sub_rows: list[int] = []
    sub_ids: list[int] = []
    sub_by: list[float] = []
    ban_rows: list[int] = []
    ban_ids: list[int] = []
    for i in rows:
        p, text = params[i], texts[i]
        if p.repetition_penalty != 1.0 and text:
            seen = set(text)
            rep_rows += [i] * len(seen)
            rep_ids += seen
            rep_by += [p.repetition_penalty] * len(seen)
        recent = text[len(text) - generated[i] :] if generated[i] else []
        if (p.presence_penalty or p.frequency_penalty) and recent:
            for word, times in Counter(recent).items():
                sub_rows.append(i)
                sub_ids.append(word)
                sub_by.append(times * p.frequency_penalty + p.presence_penalty)
        if p.no_repeat_ngram_size or p.bad_words:
            banned = _banned(p, list(text))
            ban_rows += [i] * len(banned)
            ban_ids += banned
    device = logits.device
    if rep_rows:
        at = (torch.tensor(rep_rows, device=device), torch.tensor(rep_ids, device=device))
        scores, by = logits[at], torch.tensor(rep_by, device=device)
        logits[at] = torch.where(scores > 0, scores / by, scores * by)
    if sub_rows:
        at = (torch.tensor(sub_rows, device=device), torch.tensor(sub_ids, device=device))
        logits[at] -= torch.tensor(sub_by, device=device)
    if ban_rows:
        at = (torch.tensor(ban_rows, device=device), torch.tensor(ban_ids, device=device))
        logits[at] = -torch.inf
    return logits


def _banned(p: SamplingParams, text: list[int]) -> set[int]:
    """The ids ``no_repeat_ngram_size`` and ``bad_words`` forbid after ``text``."""
    banned: set[int] = set()
    n = p.no_repeat_ngram_size
    if n and len(text) >= n - 1:
        prefix = text[len(text) - (n - 1) :] if n > 1 else []
        banned |= {
            text[j + n - 1] for j in range(len(text) - n + 1) if text[j : j + n - 1] == prefix
        }
    for phrase in p.bad_words:
        head = list(phrase[:-1])
        if not head or text[len(text) - len(head) :] == head:
            banned.add(phrase[-1])
    return banned


def make_generator(seed: int) -> torch.Generator:
    """A CPU generator: the same seed gives the same words on every device."""
    gen = torch.Generator(device="cpu")
    gen.manual_seed(seed)
    return gen


class Draws:
    """One row's uniform numbers from a generator of its own, drawn a block at a time.

    For ``torch.rand(n)`` a CPU generator gives the numbers of n calls to ``torch.rand(1)``,
    so a row that takes its numbers one a step from blocks draws exactly what it would draw
    one call a step, while a batch makes one call every `BLOCK` steps instead of one a row
    each step (each call releases and takes back the interpreter lock).
    """

    BLOCK = 64

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.rewind(0)

    def take(self) -> float:
        if self._next == len(self._block):
            self._block = torch.rand(self.BLOCK, generator=self._generator).tolist()
            self._next = 0
        self._next += 1
        return self._block[self._next - 1]  # type: ignore[no-any-return]

    def rewind(self, drawn: int) -> None:
        """Back to where the row was after ``drawn`` numbers."""
        self._generator = make_generator(self.seed)
        self._block: list[float] = []
        self._next = 0
        for _ in range(drawn):
            self.take()


def feed(model: WordRNN, seqs: Sequence[Sequence[int]], hidden: Hidden | None = None) -> Hidden:
    """Feed each row's ids (at least one each) on top of ``hidden`` (zeros when None) in one
    forward pass; rows may differ in length (they are packed). Returns the new hidden state.

    Rows of one length, the usual case of a server's joining requests (often one), skip the
    packing: for a short seed it cost a fifth of the pass (the same numbers come out)."""
    device = model.embedding.weight.device
    lists = [list(s) for s in seqs]
    with torch.inference_mode():
        if len({len(ids) for ids in lists}) == 1:
            ids = torch.tensor(lists, dtype=torch.long, device=device)  # (B, T)
            return model.feed(ids, hidden)
        emb = [model.embedding(torch.tensor(ids, device=device)) for ids in lists]  # (T_i, E)
        _, hidden = model.rnn(pack_sequence(emb, enforce_sorted=False), hidden)
    return hidden  # type: ignore[no-any-return]


def prime(
    model: WordRNN,
    seeds: Sequence[Sequence[int]],
    bos_id: int,
    hiddens: Sequence[Hidden | None] | None = None,
) -> Hidden:
    """The state after each row's seed ids, all rows fed in one forward pass.

    A row without a state (every row when ``hiddens`` is None) starts a new text: ``<bos>``
    and its seed, fed from a zero state, as every document began in training. A row with one
    (a session's, on any device) has its seed, at least one id, fed on top of it.
    """
    rows = hiddens if hiddens is not None else [None] * len(seeds)
    seqs = [[bos_id, *seed] if h is None else seed for seed, h in zip(seeds, rows, strict=True)]
    start: Hidden | None = None  # new texts only: the zero state, exactly as feed() makes it
    if any(h is not None for h in rows):
        device = model.embedding.weight.device
        start = hidden_cat(
            [model.init_hidden(1) if h is None else hidden_to(h, device) for h in rows]
        )
    return feed(model, seqs, start)


def start_states(
    model: WordRNN,
    seeds: Sequence[Sequence[int]],
    bos_id: int,
    hiddens: Sequence[Hidden | None],
) -> list[Hidden]:
    """Each row's state after its seed ids, (layers, 1, H) each, from one forward pass.

    The rows that have ids to feed are fed together by `prime` (a new text from ``<bos>``, a
    session on its state), so that a server starts many requests for the cost of one; a
    session without seed ids starts from its state as it is (moved to the model's device).
    """
    device = model.embedding.weight.device
    out: list[Hidden | None] = [
        hidden_to(hidden, device) if hidden is not None and not seed else None
        for seed, hidden in zip(seeds, hiddens, strict=True)
    ]
    fed = [row for row, state in enumerate(out) if state is None]
    if fed:
        hidden = prime(model, [seeds[r] for r in fed], bos_id, [hiddens[r] for r in fed])
        for pos, row in enumerate(fed):
            out[row] = hidden_select(hidden, [pos]) if len(fed) > 1 else hidden
    return [state for state in out if state is not None]


def start_state(
    model: WordRNN, seed_ids: Sequence[int], bos_id: int, hidden: Hidden | None = None
) -> Hidden:
    """The state after ``seed_ids``, (layers, 1, H): from the start of a text when ``hidden``
    is None, else fed on top of ``hidden`` (a session's state, on any device)."""
    return start_states(model, [seed_ids], bos_id, [hidden])[0]


def next_logits(model: WordRNN, hidden: Hidden) -> Tensor:
    """(B, V) scores of the next word given the state after the last fed word."""
    with torch.inference_mode():
        return model.logits(top_features(hidden))


def advance(model: WordRNN, hidden: Hidden, ids: Sequence[int] | Tensor) -> Hidden:
    """Feed one word per row; return the new hidden state."""
    device = model.embedding.weight.device
    step = torch.as_tensor(ids, dtype=torch.long, device=device).view(-1)  # (B,)
    with torch.inference_mode():
        return model.step(step, hidden)


class SamplingPlan:
    """How the rows of a batch draw, from their `SamplingParams`: rows grouped by the
    candidates they rank (`_candidates`), and, in each group, the tensors of the limits some
    row sets (its own top-k below the group's, its temperature, ``uniform``, ``top_p``).

    Worked out once for as long as the rows stay the same: a server's batch keeps its rows
    for many steps, and asking each row's parameters at every step was a good part of the
    Python around the sampling's few tensor operations.
    """

    def __init__(
        self, params: Sequence[SamplingParams], vocab_size: int, device: torch.device
    ) -> None:
        self.rows = len(params)
        groups: dict[int, list[int]] = {}  # k (0: the whole vocabulary, unsorted) -> rows
        for row, p in enumerate(params):
            groups.setdefault(_candidates(p, vocab_size), []).append(row)
        self.groups = [
            _Group.of(k, [params[r] for r in rows], rows, len(params), device)
            for k, rows in groups.items()
        ]


@dataclass(frozen=True)
class _Group:
    """Rows that rank the same number of candidates ``k``, and their own limits as tensors,
    each None where no row of the group needs it."""

    k: int
    rows: Tensor | None  # their positions in the batch; None: all of its rows
    limits: Tensor | None  # (R, 1) each row's top_k, where one is below k
    temps: Tensor | None  # (R, 1) each row's temperature, where one is not 1
    uniform: Tensor | None  # (R, 1) which rows pick uniformly, where one does
    top_ps: Tensor | None  # (R, 1) each row's top_p, where one is below 1 (k > 0)

    @classmethod
    def of(
        cls, k: int, params: list[SamplingParams], rows: list[int], batch: int, device: torch.device
    ) -> _Group:
        def column(values: list[Any]) -> Tensor:
            return torch.tensor(values, device=device).unsqueeze(1)

        ks = [min(p.top_k or k, k) for p in params]
        temps = [p.temperature or 1.0 for p in params]
        return cls(
            k,
            None if len(rows) == batch else torch.tensor(rows, device=device),
            column(ks) if k and min(ks) < k else None,
            column(temps) if any(t != 1.0 for t in temps) else None,
            column([p.uniform for p in params]) if any(p.uniform for p in params) else None,
            column([p.top_p for p in params]) if k and any(p.top_p < 1 for p in params) else None,
        )


def sample(
    logits: Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | Draws],
    banned_ids: Sequence[int] = (),
    plan: SamplingPlan | None = None,
) -> list[int]:
    """Pick one id per row of (B, V) ``logits``, each row with its own params and generator
    (or `Draws`, the same numbers drawn a block at a time); ``plan`` is these params'
    `SamplingPlan`, when the caller keeps one (else it is worked out here).

    ``banned_ids`` (typically <unk> and <bos>) are never picked. Never a softmax plus a
    multinomial over the whole vocabulary: a row draws by ``cumsum`` + ``searchsorted``, far
    cheaper at large V. A row that keeps the whole vocabulary (``top_k`` 0, ``top_p`` 1) draws
    from it unsorted; the others rank their top-k candidates, in groups, so that one row's
    sort of the whole vocabulary (``top_k`` 0 with ``top_p`` < 1) is never imposed on rows
    that keep a few words. A row's word depends only on its logits, params and generator.
    """
    batch, vocab_size = logits.shape
    if not (len(params) == len(generators) == batch):
        raise ValueError("one SamplingParams and one generator per row")
    if plan is None:
        plan = SamplingPlan(params, vocab_size, logits.device)
    elif plan.rows != batch:
        raise ValueError("the plan is for another batch")
    with torch.inference_mode():
        logits = logits.float()
        if banned_ids:
            logits = logits.index_fill(
                1, torch.tensor(banned_ids, device=logits.device), -torch.inf
            )
        draws = torch.tensor(
            [
                g.take() if isinstance(g, Draws) else torch.rand(1, generator=g).item()
                for g in generators
            ],
            device=logits.device,
        )
        if len(plan.groups) == 1:
            return _draw(logits, draws, plan.groups[0]).tolist()  # type: ignore[no-any-return]
        ids = torch.empty(batch, dtype=torch.long, device=logits.device)
        for group in plan.groups:
            assert group.rows is not None
            ids[group.rows] = _draw(logits[group.rows], draws[group.rows], group)
        return ids.tolist()  # type: ignore[no-any-return]


def _candidates(p: SamplingParams, vocab_size: int) -> int:
    """How many best words a row must rank: 1 for greedy, 0 when it needs no ranking at all
    (the whole vocabulary, no nucleus), else its top-k (the vocabulary for ``top_k`` 0)."""
    if p.temperature == 0:
        return 1
    k = min(p.top_k or vocab_size, vocab_size)
    return 0 if k == vocab_size and p.top_p >= 1.0 else k


BLOCK = 64  # the columns `top_k` takes a maximum of in its first pass


def top_k(logits: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Each row's ``k`` best values of (B, V) ``logits``, best first, and their ids: those
    of ``logits.topk(k)`` (ties may be taken in another order).

    On a CPU torch's topk costs about thirteen times an ``amax`` of the same tensor, which a
    large vocabulary makes a large share of a step. A row's k best values lie in its k
    blocks of `BLOCK` columns with the best maxima (each of those maxima is a distinct value
    at least as large as any value outside them), so for several rows of a vocabulary of
    some thousands of ids the blocks' maxima are ranked first and the best k are taken
    among those k blocks only (on a 2-core CPU at 64 rows and k 5: about 1.5x faster for
    4,000 ids, 2x for 8,000, 2.5x for 17,000; for 2,000 ids topk is the faster).
    """
    rows, size = logits.shape
    if logits.device.type != "cpu" or rows < 4 or size < 3000 or k * BLOCK * 4 > size:
        return logits.topk(k, dim=-1)
    whole = size - size % BLOCK
    blocks = logits[:, :whole].reshape(rows, whole // BLOCK, BLOCK)
    best = blocks.amax(-1).topk(k, dim=-1).indices  # (B, k) the blocks to look in
    candidates = blocks.gather(1, best.unsqueeze(-1).expand(-1, -1, BLOCK)).view(rows, -1)
    candidates = torch.cat([candidates, logits[:, whole:]], 1)  # and the last, short block
    values, at = candidates.topk(k, dim=-1)
    in_blocks = at < k * BLOCK
    block = best.gather(1, (at // BLOCK).clamp(max=k - 1))
    return values, torch.where(in_blocks, block * BLOCK + at % BLOCK, at - k * BLOCK + whole)


def _draw(logits: Tensor, draws: Tensor, group: _Group) -> Tensor:
    """One id per row: among the top ``group.k`` of each row's ranked logits, or among all
    of them unsorted when it is 0. ``draws`` holds each row's uniform number."""
    k = group.k
    if k == 0:
        vals, idx = logits, None
    else:
        vals, idx = top_k(logits, k)  # (B, k) sorted descending
        if group.limits is not None:
            vals = vals.masked_fill(torch.arange(k, device=vals.device) >= group.limits, -torch.inf)
    device = vals.device
    # Shift so the best score is 0 before dividing: a tiny temperature then sends the others
    # to -inf instead of overflowing every score to inf.
    scaled = vals - vals.amax(dim=-1, keepdim=True)
    if group.temps is not None:  # dividing by 1 would change nothing
        scaled = scaled / group.temps
    if group.uniform is not None:
        scaled = torch.where(group.uniform & vals.isfinite(), torch.zeros_like(scaled), scaled)
    weights = scaled.exp()  # (B, K), unnormalised; 0 for the words a row may not pick
    if group.top_ps is not None:
        probs = weights / weights.sum(-1, keepdim=True)
        before = probs.cumsum(-1) - probs  # mass of the better-ranked words
        rank = torch.arange(k, device=device).unsqueeze(0)
        weights = weights.masked_fill((before >= group.top_ps) & (rank > 0), 0.0)
    cdf = weights.cumsum(-1)
    # A draw below 1 puts the target below the total (a float product by a number below 1
    # never rounds up to the other factor), so the first place the running sum passes it is
    # a word the row may pick: its weight is what took the sum past. A row left no word at
    # all (every score -inf, its weights NaN) finds no such place: it takes the last column.
    target = (draws * cdf[:, -1]).unsqueeze(1)  # (B, 1)
    choice = torch.searchsorted(cdf, target, right=True).squeeze(1).clamp_(max=cdf.shape[1] - 1)
    return choice if idx is None else idx.gather(1, choice.unsqueeze(1)).squeeze(1)


def generate(
    model: WordRNN,
    seed_ids: Sequence[int],
    n_words: int,
    params: SamplingParams,
    generator: torch.Generator,
    bos_id: int,
    hidden: Hidden | None = None,
    banned_ids: Sequence[int] = (),
    opens: Sequence[bool] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> tuple[list[int], Hidden]:
    """One row, one word at a time: the lab's ``predict``. Returns the new ids and the state.

    With ``hidden`` given (a session), generation continues from it after feeding ``seed_ids``.
    The model's text cache, if it has one, counts ``seed_ids``; the words written move its
    context on without being counted (`model_store.cache`). ``opens`` says which ids open a
    word (`Vocab.starts_word`; None: all of them): the others, a subword model's continuation
    pieces, are banned from the first word (the seed's last word is whole), and the cache reads
    words by it. ``should_stop`` is asked before each word; once it
    says yes, the words so far are returned (a training preview must not outlive a Ctrl-C, a
    SIGTERM or the time budget). It draws nothing, so the words are those of a shorter run.
    """
    hidden = start_state(model, seed_ids, bos_id, hidden)
    settings = model.config.cache
    cache = TextCache(settings, seed_ids, opens) if settings.enabled else None
    continuing = [i for i, o in enumerate(opens) if not o] if opens is not None else []
    out: list[int] = []
    for step in range(n_words):
        if should_stop is not None and should_stop():
            break
        banned = [*banned_ids, *continuing] if step == 0 else banned_ids
        logits = next_logits(model, hidden)
        if cache is not None:
            logits = mix_rows(logits, [cache.next_ids()])
        logits = penalize(logits, [params], [[*seed_ids, *out]], [len(out)])
        (word,) = sample(logits, [params], [generator], banned)
        out.append(word)
        if cache is not None:
            cache.follow(word)
        hidden = advance(model, hidden, [word])
    return out, hidden
