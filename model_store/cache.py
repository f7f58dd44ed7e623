"""The text cache: what the text so far says about its next token, mixed into the network's.

A play names its characters hundreds of times, a diary its people and places, a song repeats
its chorus; a network trained on other text gives each such word the small probability of a
rare spelling, every time. The cache counts the n-grams of the text so far (its ids, whatever
the tokenizer) and predicts the next id with interpolated Witten-Bell estimates over the
contexts of order 1 to ``order`` (Kuhn and De Mori's cache, on n-grams):

    p_0(w) = c(w) / t                                   (t ids so far)
    p_k(w) = (c(ctx_k, w) + u_k * p_(k-1)(w)) / (n_k + u_k)

for the last k ids ``ctx_k``, seen ``n_k`` times with ``u_k`` distinct followers, up to the
longest context seen before. The model's distribution is then

    p(w) = (1 - l) * p_network(w) + l * p_cache(w),    l = weight * n / (n + confidence * u)

with ``n`` and ``u`` of that longest context: the cache speaks up when its context has been
seen often with few different followers, and not at all before any context repeats. Inside
a word (a context every follower of which continues a word: a subword model spelling a name
it has seen in this text) one sighting says much more than between words, so such a context
has its own, smaller ``inner_confidence``. The settings were chosen on held-out plays
(`bench/quality.py`; the README has the figures).

The cache is part of the model, and counts the text the model is given: a text to score
(`model_store.scoring`: ``/score``, ``training.evaluate``, the trainer's validation), a prompt
and a session's text (the batched engine, ``/next-words``, training previews). The words a
sample writes move the context on but are not counted (`TextCache.follow`): counting them let
a sample feed on its own words (its repeated trigrams in `bench/generation_quality.py` grew
several times over), while what the text to continue says is kept. A
sample's ``logprobs`` are the probabilities it was drawn with; ``/score`` of the prompt and the
sample together counts the sample's words too, so it may give them more.
"""

from __future__ import annotations

import copy
import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import cast

import numpy as np
import torch
from numpy.typing import NDArray
from torch import Tensor


@dataclass(frozen=True)
class CacheSettings:
    """``order`` 0 turns the cache off (the lab's model, and every model trained before it)."""

    order: int = 0
    weight: float = 0.9
    confidence: float = 4.0
    inner_confidence: float | None = None  # inside a word; None: ``confidence``

    def problems(self) -> list[str]:
        out = []
        if type(self.order) is not int or not 0 <= self.order <= 8:
            out.append(f"cache_order must be an integer in [0, 8] (got {self.order!r})")
        if type(self.weight) not in (int, float) or not 0 <= self.weight < 1:
            out.append(f"cache_weight must be in [0, 1) (got {self.weight!r})")
        confidence = self.confidence
        if type(confidence) not in (int, float) or not (
            math.isfinite(confidence) and confidence > 0
        ):
            out.append(f"cache_confidence must be a positive number (got {confidence!r})")
        inner = self.inner_confidence
        if inner is not None and (
            type(inner) not in (int, float) or not (math.isfinite(inner) and inner > 0)
        ):
            out.append(f"cache_inner_confidence must be a positive number (got {inner!r})")
        return out

    @property
    def enabled(self) -> bool:
        return self.order > 0 and self.weight > 0


class TextCache:
    """The n-gram counts of a text (`add`), and the context the next id follows: the last
    ``order`` ids, counted (`add`) or not (`follow`: the words a sample writes)."""

    def __init__(
        self,
        settings: CacheSettings,
        ids: Iterable[int] = (),
        opens: Sequence[bool] | None = None,
    ) -> None:
        """``opens`` says which ids open a word (`Vocab.starts_word`), None that every id
        does."""
        self.settings = settings
        self._opens = opens if settings.inner_confidence is not None else None
        self.counted = 0
        # context (the ids before, oldest first; () for order 0) -> followers and their counts
        self._followers: dict[tuple[int, ...], Counter[int]] = {(): Counter()}
        self._totals: Counter[tuple[int, ...]] = Counter()
        self._unigram: tuple[NDArray[np.int64], NDArray[np.float32]] | None = None
        self._recent: tuple[int, ...] = ()  # the last ``order`` ids
        self._next: list[tuple[int, ...]] | None = [()]  # see _current
        for i in ids:
            self.add(i)

    def fork(self) -> TextCache:
        """A cache that shares these counts and follows a text of its own from here: the
        samples of one request continue one history, whose counting is the dear part (a
        session's 2,000 words took 25 ms a sample). Only ever `follow` a fork: an `add`
        would change its siblings' counts too."""
        return copy.copy(self)

    def _contexts(self, recent: tuple[int, ...]) -> list[tuple[int, ...]]:
        """(), then the last 1, 2, ... ``order`` ids of ``recent``."""
        n = len(recent)
        return [recent[n - k :] if k else () for k in range(n + 1)]

    def _current(self) -> list[tuple[int, ...]]:
        """The contexts the next id follows, worked out once per id (and only when asked)."""
        if self._next is None:
            self._next = self._contexts(self._recent)
        return self._next

    def add(self, token: int) -> None:
        """Count ``token`` after the current context, then move the context on."""
        for ctx in self._current():
            followers = self._followers.get(ctx)
            if followers is None:
                followers = self._followers[ctx] = Counter()
            followers[token] += 1
            self._totals[ctx] += 1
        self._unigram = None
        self.counted += 1
        self.follow(token)

    def follow(self, token: int) -> None:
        """Move the context on without counting ``token``."""
        order = self.settings.order
        self._recent = (*self._recent, token)[-order:] if order else ()
        self._next = None

    def _levels(self, after: Sequence[int] = ()) -> list[tuple[int, Counter[int]]]:
        """(count, followers) of each context the next id follows (after ``after`` more ids,
        followed), order 0 first, up to the longest context seen before."""
        contexts = (
            self._contexts((*self._recent, *after)[-self.settings.order :])
            if after
            else self._current()
        )
        levels = [(self.counted, self._followers[()])]
        for ctx in contexts[1:]:
            total = self._totals.get(ctx, 0)
            if not total:
                break
            levels.append((total, self._followers[ctx]))
        return levels

    def _weight(self, levels: list[tuple[int, Counter[int]]]) -> float:
        """l: from the longest context's count and its number of distinct followers."""
        if len(levels) == 1:
            return 0.0
        seen, followers = levels[-1]
        confidence = self.settings.confidence
        opens = self._opens
        if opens is not None and not any(opens[i] for i in followers):
            confidence = cast(float, self.settings.inner_confidence)
        return self.settings.weight * seen / (seen + confidence * len(followers))

    def terms(self, after: Sequence[int] = ()) -> tuple[float, list[tuple[float, Counter[int]]]]:
        """``(l, [(a_k, followers_k), ...])`` with p_cache(w) = sum of a_k * followers_k[w]
        (order 0 first): the mixing weight and the cache's distribution of the next id (after
        ``after`` more ids, followed)."""
        if not self.counted:
            return 0.0, []
        (n, unigram), *higher = self._levels(after)
        terms: list[tuple[float, Counter[int]]] = [(1.0 / n, unigram)]
        for total, followers in higher:
            types = len(followers)
            terms = [(a * types / (total + types), c) for a, c in terms]
            terms.append((1.0 / (total + types), followers))
        return self._weight([(n, unigram), *higher]), terms

    def prob(self, token: int) -> tuple[float, float]:
        """``(l, p_cache(token))`` for the next id: `terms` for one id, without the list
        (scoring asks it for every id of a text)."""
        if not self.counted:
            return 0.0, 0.0
        levels = self._levels()
        p = levels[0][1].get(token, 0) / levels[0][0]
        for total, followers in levels[1:]:
            types = len(followers)
            p = (followers.get(token, 0) + types * p) / (total + types)
        return self._weight(levels), p

    def next_ids(self, after: Sequence[int] = ()) -> NextIds | None:
        """The cache's say on the next id (after ``after`` more ids, followed), for
        `mix_rows`; None when it has none."""
        if not after and not self._totals.get(self._recent[-1:]):
            return None  # the last id never came before: asked of every row at every step
        weight, terms = self.terms(after)
        if weight == 0.0:
            return None
        ids: list[int] = []
        values: list[float] = []
        for a, followers in terms[1:]:
            ids += followers.keys()
            values += [a * count for count in followers.values()]
        return NextIds(weight, *self._unigram_counts(), terms[0][0], ids, values)

    def _unigram_counts(self) -> tuple[NDArray[np.int64], NDArray[np.float32]]:
        """The ids counted and their counts: a sample counts no words of its own, so they are
        made once for all its steps (and again only after an `add`)."""
        if self._unigram is None:
            counts = self._followers[()]
            self._unigram = (
                np.fromiter(counts, np.int64, len(counts)),
                np.fromiter(counts.values(), np.float32, len(counts)),
            )
        return self._unigram


@dataclass(frozen=True)
class NextIds:
    """A cache's distribution of the next id, ``scale`` times the ``counts`` of the ids
    counted (``counted``) plus ``values`` at ``ids`` (the higher orders' counts, already
    weighted), and its share ``weight`` of the mixture."""

    weight: float
    counted: NDArray[np.int64]  # (K,) the ids of the text so far, each once
    counts: NDArray[np.float32]  # (K,) how often each came
    scale: float
    ids: list[int]
    values: list[float]


def stack(nexts: Sequence[NextIds]) -> tuple[Tensor, Tensor, Tensor]:
    """(N, 1) weights, the (C,) ids that any of ``nexts`` gives a probability, and (N, C)
    those probabilities, for all rows of a batch at once and over those ids only (the cache
    knows only the ids of its text). Built with numpy: a few small arrays a step, where
    each torch operation would cost more than its work and let go of the interpreter lock."""
    sizes = [len(n.counted) for n in nexts]
    scales = np.repeat(np.array([n.scale for n in nexts], np.float32), sizes)
    rows = [np.repeat(np.arange(len(nexts)), sizes)]
    ids = [n.counted for n in nexts]
    values = [np.concatenate([n.counts for n in nexts]) * scales]
    higher = [row for row, n in enumerate(nexts) for _ in n.ids]
    if higher:
        rows.append(np.array(higher, np.int64))
        ids.append(np.array([i for n in nexts for i in n.ids], np.int64))
        values.append(np.array([v for n in nexts for v in n.values], np.float32))
    cols, at = np.unique(np.concatenate(ids), return_inverse=True)
    probs = np.zeros((len(nexts), len(cols)), np.float32)
    # Added in order: a row's scaled count of an id, then its higher orders' values.
    np.add.at(probs, (np.concatenate(rows), at), np.concatenate(values))
    weights = np.array([[n.weight] for n in nexts], np.float32)
    return torch.from_numpy(weights), torch.from_numpy(cols), torch.from_numpy(probs)


def mix_rows(scores: Tensor, nexts: Sequence[NextIds | None]) -> Tensor:
    """(B, V) next-id ``scores`` (logits or log-probabilities) with each row's cache mixed in
    (``nexts[i]``, or None for a row without one): log-probabilities for the rows whose cache
    has a say, the rows as they were otherwise. Float32 ``scores`` are changed in place and
    returned (callers pass the model's fresh output): copying all B rows to change a few
    cost more than the mixing."""
    rows = [row for row, n in enumerate(nexts) if n is not None]
    if not rows:
        return scores
    weights, cols, probs = stack([n for n in nexts if n is not None])
    device = scores.device
    index, cols = torch.tensor(rows, device=device), cols.to(device)
    lam, probs = weights.to(device), probs.to(device)
    with torch.inference_mode():
        out = scores.float()
        mixed = torch.log_softmax(out[index], dim=-1) + torch.log1p(-lam)
        # The cache's ids are the few the given text holds: the logarithms are taken there.
        cached = torch.log(probs * lam)
        mixed.index_copy_(1, cols, torch.logaddexp(mixed.index_select(1, cols), cached))
        return out.index_copy_(0, index, mixed)


def text_terms(settings: CacheSettings, ids: Sequence[int], opens: Sequence[bool] | None) -> Tensor:
    """(2, T) float64: for each id of the text ``ids``, read in order from an empty cache,
    log(1 - l) and log(l * p_cache(id)) (-inf where the cache gives it nothing); ``opens`` as
    for `TextCache`. They depend on the text alone, not on the network: the trainer works them
    out once for its validation text, and each validation is then one `mix_terms`."""
    cache = TextCache(settings, opens=opens)
    weights, probs = [], []
    for token in ids:
        weight, p = cache.prob(token)
        weights.append(weight)
        probs.append(p)
        cache.add(token)
    weight_t = torch.tensor(weights, dtype=torch.float64)
    prob_t = torch.tensor(probs, dtype=torch.float64)
    return torch.stack([torch.log1p(-weight_t), torch.log(weight_t * prob_t)])


def mix_terms(own: Tensor, terms: Tensor) -> Tensor:
    """(T,) float64 log((1 - l) p_network + l p_cache) of each id of a text, from ``own``, the
    network's (T,) log-probabilities, and the text's `text_terms`."""
    return torch.logaddexp(own.double() + terms[0], terms[1])


def mixed_log_probs(
    settings: CacheSettings, ids: Sequence[int], own: Tensor, opens: Sequence[bool] | None
) -> Tensor:
    """Each id's log-probability under the model with its cache, given ``own``, the network's
    log-probability of each id of the text ``ids`` (the cache starts empty at the text's
    start; ``opens`` as for `TextCache`); ``own`` itself when the cache is off."""
    if not settings.enabled:
        return own
    return mix_terms(own, text_terms(settings, ids, opens))
