"""The text cache: its counts against a brute force, and one distribution on every path.

A probability the server reports (``/score``, a generated word's ``logprobs``,
``/next-words``, ``training.evaluate``, the trainer's validation) must be the one the sampler
draws from: each is checked here against the network's own probabilities mixed by hand.
"""

from __future__ import annotations

import math
import random
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from app.engine import GenerationJob, generate_alone
from app.text import SampleText
from model_store import checkpoint
from model_store.cache import (
    CacheSettings,
    TextCache,
    mix_terms,
    mixed_log_probs,
    stack,
    text_terms,
)
from model_store.network import ModelConfig, WordRNN, top_features
from model_store.sampling import SamplingParams, advance, start_state
from model_store.scoring import next_words, token_log_probs
from tests.conftest import TINY_TEXT, build_run
from tests.test_trainer import make_trainer
from training.data import eval_rows


def brute(
    s: CacheSettings,
    history: list[int],
    token: int,
    after: Sequence[int] = (),
    opens: Sequence[bool] | None = None,
) -> tuple[float, float]:
    """(weight, p_cache(token)) from the formulas in model_store.cache, counted afresh over
    ``history``, for the context that ``history`` and then ``after`` end with; ``opens``
    says which ids open a word (None: all)."""
    n = len(history)
    if n == 0:
        return 0.0, 0.0
    p = history.count(token) / n
    seen, types, inner = 0, 1, False
    recent = [*history, *after]
    for k in range(1, min(s.order, len(recent)) + 1):
        ctx = recent[len(recent) - k :]
        followers = [history[i + k] for i in range(n - k) if history[i : i + k] == ctx]
        if not followers:
            break
        seen, types = len(followers), len(set(followers))
        inner = opens is not None and not any(opens[i] for i in followers)
        p = (followers.count(token) + types * p) / (seen + types)
    confidence = s.inner_confidence if inner and s.inner_confidence is not None else s.confidence
    return s.weight * seen / (seen + confidence * types), p


cache_settings = st.builds(
    CacheSettings,
    order=st.integers(1, 4),
    weight=st.sampled_from([0.3, 0.9]),
    confidence=st.sampled_from([0.5, 4.0]),
    inner_confidence=st.sampled_from([None, 0.25]),
)
# Which of the ids 0..5 open a word (a subword vocabulary), or None: every one (words).
openings = st.none() | st.lists(st.booleans(), min_size=6, max_size=6)


@settings(max_examples=150, deadline=None)
@given(
    s=cache_settings,
    history=st.lists(st.integers(0, 4), max_size=40),
    written=st.lists(st.integers(0, 4), max_size=4),
    opens=openings,
)
def test_the_cache_counts_as_the_formulas_say(
    s: CacheSettings, history: list[int], written: list[int], opens: list[bool] | None
) -> None:
    cache = TextCache(s, history, opens)
    trial = [cache.next_ids(after=written)]  # what a search tries
    for token in written:  # what a sample writes: followed, not counted
        cache.follow(token)
    for nexts in ([cache.next_ids()], trial):
        if nexts[0] is None:  # no say: the weight is 0
            assert brute(s, history, 0, written, opens)[0] == 0
            continue
        weights, cols, probs = stack([nexts[0]])
        weight, dense = float(weights[0, 0]), torch.zeros(6).index_put_((cols,), probs[0])
        for token in range(6):
            want_weight, want = brute(s, history, token, written, opens)
            assert weight == pytest.approx(want_weight)
            assert cache.prob(token) == pytest.approx((want_weight, want))
            if weight:
                assert float(dense[token]) == pytest.approx(want, abs=1e-6)
        if weight:
            assert float(dense.sum()) == pytest.approx(1.0, abs=1e-5)


def mix(log_prob: float, weight: float, cached: float) -> float:
    """log((1 - weight) p + weight cached) for p = exp(log_prob), by hand."""
    return math.log((1 - weight) * math.exp(log_prob) + weight * cached)


def test_the_mixture_is_taken_in_log_space() -> None:
    own = torch.tensor([math.log(0.2), math.log(0.2), -2000.0, -2000.0])
    weights, cached = torch.tensor([0.5, 0.0, 0.5, 0.5]), torch.tensor([0.6, 0.6, 0.6, 0.0])
    terms = torch.stack([torch.log1p(-weights), torch.log(weights * cached)]).double()
    got = mix_terms(own, terms).tolist()
    assert got[0] == pytest.approx(math.log(0.5 * 0.2 + 0.5 * 0.6))
    assert got[1] == float(own[1])  # no weight: the network's own, exactly
    assert got[2] == pytest.approx(math.log(0.3))  # no underflow to -inf
    assert got[3] == pytest.approx(-2000.0 + math.log(0.5))


@settings(max_examples=50, deadline=None)
@given(s=cache_settings, ids=st.lists(st.integers(0, 3), min_size=1, max_size=30), opens=openings)
def test_mixed_log_probs_read_the_text_in_order(
    s: CacheSettings, ids: list[int], opens: list[bool] | None
) -> None:
    own = [math.log(0.1 + 0.05 * i) for i in ids]
    got = mixed_log_probs(s, ids, torch.tensor(own, dtype=torch.float64), opens).tolist()
    assert text_terms(s, ids, opens).shape == (2, len(ids))
    for t, token in enumerate(ids):
        weight, cached = brute(s, ids[:t], token, (), opens)
        assert got[t] == pytest.approx(mix(own[t], weight, cached))


# -- one distribution on every path ---------------------------------------------------------


@pytest.fixture(scope="module")
def cached(tmp_path_factory: pytest.TempPathFactory) -> checkpoint.Checkpoint:
    run_dir = tmp_path_factory.mktemp("cached") / "run"
    build_run(run_dir, cell="lstm", seed=7, cache_order=3, cache_confidence=0.5)
    return checkpoint.load(run_dir, "cpu")


def network_alone(model: WordRNN) -> WordRNN:
    """The same weights without the cache."""
    bare = WordRNN(replace(model.config, cache_order=0))
    bare.load_state_dict(model.state_dict())
    return bare.eval()


def sample_of(
    loaded: checkpoint.Checkpoint,
    seed: list[int],
    context: list[str],
    params: SamplingParams,
    max_words: int,
    random_seed: int = 0,
) -> SampleText:
    """One sample after ``seed`` (counted by the cache), with each word's log-probability."""
    job = GenerationJob(
        seed_ids=seed,
        context=context,
        params=params,
        history=seed,
        random_seed=random_seed,
        max_words=max_words,
        logprobs=0,
    )
    vocab = loaded.vocab
    with torch.inference_mode():
        (sample,) = generate_alone(loaded.model, vocab, job, vocab.special_ids).samples
    return sample


def test_scores_are_the_networks_mixed_with_the_cache(cached: checkpoint.Checkpoint) -> None:
    vocab = cached.vocab
    ids = vocab.encode_lenient(vocab.split_words(TINY_TEXT))[0][:80]
    own = token_log_probs(network_alone(cached.model), vocab, ids).tolist()
    got = token_log_probs(cached.model, vocab, ids).tolist()
    want = mixed_log_probs(cached.model.config.cache, ids, torch.tensor(own), None).tolist()
    assert got == pytest.approx(want, abs=1e-5)
    # The text repeats itself: the cache has its say, and it helps.
    assert sum(got) > sum(own) + 20


def test_generated_words_carry_the_probabilities_they_were_drawn_with(
    cached: checkpoint.Checkpoint,
) -> None:
    vocab = cached.vocab
    seed = vocab.encode_lenient(["I", "can", "see", "the", "sea", ".", "I", "can"])[0]
    context = [vocab.tokens[i] for i in seed]
    sample = sample_of(cached, seed, context, SamplingParams(top_k=3), 30, random_seed=11)
    generated = [vocab.id_of(w) for w in sample.words]
    text = [*seed, *generated]
    own = token_log_probs(network_alone(cached.model), vocab, text).tolist()
    cache = TextCache(cached.model.config.cache, seed)  # the prompt, counted
    want = []
    for t, token in enumerate(generated):
        want.append(mix(own[len(seed) + t], *cache.prob(token)))
        cache.follow(token)  # the sample's own words are not
    assert sample.log_probs == pytest.approx(want, abs=1e-4)
    assert want != pytest.approx(own[len(seed) :], abs=1e-3)  # the cache had its say
    # /score reads the prompt as generation started from it.
    scored = token_log_probs(cached.model, vocab, seed).tolist()
    assert token_log_probs(cached.model, vocab, text).tolist()[: len(seed)] == (
        pytest.approx(scored)
    )


def test_a_fork_shares_the_counts_and_follows_its_own_text() -> None:
    s = CacheSettings(order=2, weight=0.5, confidence=1.0)
    history = [0, 1, 2, 3, 0, 1, 3, 2, 0, 1]
    cache = TextCache(s, history)
    fork = cache.fork()
    fork.follow(2)
    cache.follow(3)
    for written, tested in (([3], cache), ([2], fork)):
        alone = TextCache(s, history)
        for token in written:
            alone.follow(token)
        assert [tested.prob(t) for t in range(4)] == [alone.prob(t) for t in range(4)]
    assert [fork.prob(t) for t in range(4)] != [cache.prob(t) for t in range(4)]


def test_the_samples_of_one_request_are_those_of_requests_of_one_sample(
    cached: checkpoint.Checkpoint,
) -> None:
    """A request's samples share one count of its history: each still writes what a
    request of its own with its seed would."""
    vocab = cached.vocab
    seed = vocab.encode_lenient(["I", "can", "see", "the", "sea", ".", "I", "can"])[0]
    context = [vocab.tokens[i] for i in seed]

    def samples(n: int, random_seed: int) -> list[SampleText]:
        job = GenerationJob(
            seed_ids=seed,
            context=context,
            params=SamplingParams(top_k=4),
            history=seed,
            random_seed=random_seed,
            max_words=20,
            n=n,
            logprobs=0,
        )
        with torch.inference_mode():
            return generate_alone(cached.model, vocab, job, vocab.special_ids).samples

    together = samples(3, 5)
    alone = [samples(1, 5 + i)[0] for i in range(3)]
    assert [s.words for s in together] == [s.words for s in alone]
    for a, b in zip(together, alone, strict=True):  # a step's numbers move with its rows
        assert a.log_probs == pytest.approx(b.log_probs, abs=1e-5)
    assert len({tuple(s.words) for s in together}) > 1


def test_next_words_are_the_mixed_distributions_best(cached: checkpoint.Checkpoint) -> None:
    vocab, model = cached.vocab, cached.model
    seed = vocab.encode_lenient(["the", "wind", "can", "hear", "the", "wind", ",", "and", "the"])[0]
    with torch.inference_mode():
        hidden = start_state(model, seed, vocab.bos_id)
        ranked = next_words(model, vocab, hidden, 5, history=seed)
        own = model.log_probs(top_features(hidden))[0].tolist()
    cache = TextCache(model.config.cache, seed)
    for word, p in ranked:
        token = vocab.id_of(word)
        assert p == pytest.approx(math.exp(mix(own[token], *cache.prob(token))), rel=1e-4)
    assert cache.prob(vocab.id_of("wind"))[0] > 0  # the cache had a say


# Made-up names, each twice: the pieces learned from it cannot spell most of them whole.
_draw = random.Random(0)
_names = ["".join(_draw.choices("aeioubdgklmnrstvz", k=_draw.randint(6, 9))) for _ in range(60)]
NAMES = " ".join(_names * 2) + "\n"


@pytest.fixture(scope="module")
def cached_subword(tmp_path_factory: pytest.TempPathFactory) -> checkpoint.Checkpoint:
    run_dir = tmp_path_factory.mktemp("cached-subword") / "run"
    build_run(
        run_dir,
        text=NAMES,
        tokenizer="subword",
        cell="lstm",
        seed=3,
        cache_order=3,
        cache_confidence=4.0,
        cache_inner_confidence=0.25,
    )
    return checkpoint.load(run_dir, "cpu")


def test_inside_a_word_scoring_and_sampling_take_the_inner_confidence(
    cached_subword: checkpoint.Checkpoint,
) -> None:
    """A subword model's cache reads a context inside a word (only ever followed by pieces
    that continue one) with its own confidence, on /score's path and the engine's alike."""
    vocab, model = cached_subword.vocab, cached_subword.model
    opens, settings, bare = vocab.starts_word(), model.config.cache, network_alone(model)
    ids = vocab.encode(vocab.tokenize(NAMES))
    own = token_log_probs(bare, vocab, ids)
    got = token_log_probs(model, vocab, ids).tolist()
    assert got == pytest.approx(mixed_log_probs(settings, ids, own, opens).tolist(), abs=1e-5)
    assert got != pytest.approx(mixed_log_probs(settings, ids, own, None).tolist(), abs=1e-3)

    words = vocab.split_words(NAMES)[:-3]
    seed, _, _ = vocab.encode_words(words)
    sample = sample_of(cached_subword, seed, words, SamplingParams(top_k=1), 1)
    with torch.inference_mode():

        def greedy(word_opens: Sequence[bool] | None) -> tuple[str, float]:
            """The first word by hand: the best piece of the mixed distribution until the
            next word would begin."""
            cache = TextCache(settings, seed, word_opens)
            hidden = start_state(bare, seed, vocab.bos_id)
            pieces, log_prob = [], 0.0
            for step in range(8):
                net = bare.log_probs(top_features(hidden))[0].tolist()
                allowed = [
                    i
                    for i in range(len(vocab))
                    if i not in vocab.special_ids and (opens[i] if step == 0 else True)
                ]
                mixed = {i: mix(net[i], *cache.prob(i)) for i in allowed}
                best = max(mixed, key=mixed.__getitem__)
                if step and opens[best]:
                    break
                pieces.append(vocab.tokens[best])
                log_prob += mixed[best]
                cache.follow(best)
                hidden = advance(bare, hidden, [best])
            return vocab.tokenizer.subword_model().word(pieces), log_prob

        (word, log_prob), (_, between_words) = greedy(opens), greedy(None)
    assert sample.words == [word]
    assert sample.log_probs[0] == pytest.approx(log_prob, abs=1e-4)
    assert between_words != pytest.approx(log_prob, abs=1e-3)  # inside a word it mattered


def test_the_trainer_validates_with_the_cache(tmp_path: Path) -> None:
    trainer = make_trainer(tmp_path / "run", cache_order=2, batch_size=3)
    model = trainer.model.eval()
    x, y = eval_rows(trainer.dataset.valid_ids, trainer.config.batch_size)
    for _ in range(2):  # the cache's say is kept from the first validation: still right after
        with torch.inference_mode():
            features, _ = model.features(x)  # each row read whole: the windows carry the state
            own = model.target_log_probs(features.reshape(-1, features.shape[-1]), y.reshape(-1))
        want = mixed_log_probs(model.config.cache, y.flatten().tolist(), own, None).tolist()
        got = trainer.validation_loss()
        assert got == pytest.approx(-math.fsum(want) / y.numel(), rel=1e-5)
        assert got < -float(own.mean()) - 0.1  # a text that repeats: the cache helps
        with torch.no_grad():
            model.embedding.weight.mul_(1.5)  # other weights, the same text


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--cache-order", "9"], "--cache-order must be an integer in [0, 8]"),
        (["--cache-weight", "1"], "--cache-weight must be in [0, 1)"),
        (["--cache-confidence", "0"], "--cache-confidence must be a positive number"),
        (["--cache-inner-confidence", "-1"], "--cache-inner-confidence must be a positive"),
    ],
)
def test_bad_cache_settings_are_named(
    tiny_corpus: Path, tmp_path: Path, flags: list[str], message: str
) -> None:
    command = [
        sys.executable, "-m", "training", "--corpus", str(tiny_corpus),
        "--out", str(tmp_path / "run"), *flags,
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True)
    assert done.returncode != 0
    assert message in done.stderr
    assert "Traceback" not in done.stderr


def test_a_config_with_a_bad_cache_is_refused() -> None:
    with pytest.raises(ValueError, match="cache_weight"):
        ModelConfig.from_json({"vocab_size": 10, "cache_order": 2, "cache_weight": "x"})
