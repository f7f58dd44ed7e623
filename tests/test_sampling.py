"""Priming, per-row sampling and session continuation: the generator behind previews and serving."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from model_store import checkpoint, sampling
from model_store.network import CELLS, Hidden, ModelConfig, WordRNN, hidden_parts, hidden_select
from model_store.sampling import (
    Draws,
    SamplingParams,
    SamplingPlan,
    advance,
    feed,
    generate,
    make_generator,
    next_logits,
    penalize,
    prime,
    sample,
    start_state,
    start_states,
    top_k,
)

VOCAB = 30
BOS = 1
BANNED = (0, 1)
FAST = settings(max_examples=50, deadline=None)
GREEDY = SamplingParams(temperature=0)


def make_model(seed: int = 0, **kwargs: Any) -> WordRNN:
    values: dict[str, Any] = {"vocab_size": VOCAB, "embed_dim": 8, "hidden_dim": 8}
    values.update(kwargs)
    torch.manual_seed(seed)
    return WordRNN(ModelConfig(**values)).eval()


def random_logits(seed: int, rows: int = 1) -> torch.Tensor:
    return torch.randn(rows, VOCAB, generator=make_generator(seed)) * 3  # (B, V)


def assert_same_hidden(a: Hidden, b: Hidden) -> None:
    for x, y in zip(hidden_parts(a), hidden_parts(b), strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-6)


def draws(logits: torch.Tensor, params: SamplingParams, seeds: range) -> list[int]:
    """One draw per seed, all rows of one batch: many fixed-seed draws in a single call."""
    batch = logits.expand(len(seeds), -1)
    return sample(batch, [params] * len(seeds), [make_generator(s) for s in seeds], BANNED)


CELL_AND_LAYERS = pytest.mark.parametrize(
    ("cell", "layers"), [(c, n) for c in CELLS for n in (1, 2)]
)


# ---------------------------------------------------------------------------------------------
# Priming


@CELL_AND_LAYERS
def test_prime_of_rows_of_different_lengths_equals_each_row_alone(cell: str, layers: int) -> None:
    model = make_model(cell=cell, layers=layers)
    seeds = [[2, 3, 4, 5, 6], [7], [8, 9, 10], []]
    batched = prime(model, seeds, BOS)
    for row, seed in enumerate(seeds):
        assert_same_hidden(hidden_select(batched, [row]), prime(model, [seed], BOS))


@CELL_AND_LAYERS
def test_rows_of_one_length_feed_as_when_packed_with_another(cell: str, layers: int) -> None:
    model = make_model(cell=cell, layers=layers)
    seeds = [[2, 3, 4], [5, 6, 7], [8, 9, 10]]
    packed = feed(model, [*seeds, [11]])  # lengths differ: the packed pass
    assert_same_hidden(feed(model, seeds), hidden_select(packed, [0, 1, 2]))
    start = prime(model, [[4], [5], [6], [7]], BOS)  # and on top of states
    packed = feed(model, [*seeds, [11]], start)
    on_states = feed(model, seeds, hidden_select(start, [0, 1, 2]))
    assert_same_hidden(on_states, hidden_select(packed, [0, 1, 2]))


@CELL_AND_LAYERS
def test_prime_equals_feeding_the_words_one_by_one(cell: str, layers: int) -> None:
    model = make_model(cell=cell, layers=layers)
    hidden = model.init_hidden(1)
    for word in [BOS, 5, 9, 2, 14]:  # a new text opens with <bos>, as in training
        hidden = advance(model, hidden, [word])
    assert_same_hidden(prime(model, [[5, 9, 2, 14]], BOS), hidden)


def test_an_empty_seed_is_the_start_of_a_text() -> None:
    model = make_model(cell="gru")
    assert_same_hidden(prime(model, [[]], BOS), feed(model, [[BOS]]))


def test_feed_continues_a_state() -> None:
    model = make_model(cell="lstm", layers=2)
    assert_same_hidden(
        feed(model, [[6, 7]], prime(model, [[4, 5]], BOS)), prime(model, [[4, 5, 6, 7]], BOS)
    )


@CELL_AND_LAYERS
def test_start_states_of_texts_and_sessions_in_one_pass_equal_each_row_alone(
    cell: str, layers: int
) -> None:
    model = make_model(cell=cell, layers=layers)
    session = prime(model, [[4, 5]], BOS)
    seeds = [[2, 3], [6, 7, 8], [], [], [9]]
    hiddens: list[Hidden | None] = [None, session, session, None, None]
    starts = start_states(model, seeds, BOS, hiddens)
    alone = [
        prime(model, [[2, 3]], BOS),
        prime(model, [[4, 5, 6, 7, 8]], BOS),
        session,  # a session without seed ids starts from its state as it is
        prime(model, [[]], BOS),
        prime(model, [[9]], BOS),
    ]
    assert len(starts) == len(alone)
    for got, seed, hidden, want in zip(starts, seeds, hiddens, alone, strict=True):
        assert_same_hidden(got, want)
        assert_same_hidden(got, start_state(model, seed, BOS, hidden))


@pytest.mark.parametrize("softmax", ["full", "adaptive"])
def test_next_logits_equal_the_forward_pass(softmax: str) -> None:
    model = make_model(cell="lstm", layers=2, softmax=softmax)
    ids = torch.tensor([[BOS, 4, 8, 15, 16, 23]])
    with torch.no_grad():
        logits, _ = model(ids)
    expected = logits[:, -1]
    seeds = ids[:, 1:].tolist()
    torch.testing.assert_close(next_logits(model, prime(model, seeds, BOS)), expected)


# ---------------------------------------------------------------------------------------------
# Sampling one word per row


@FAST
@given(
    st.integers(0, 2**31),
    st.lists(st.integers(1, 8), min_size=3, max_size=3),
    st.lists(st.floats(0.05, 5.0), min_size=3, max_size=3),
    st.lists(st.booleans(), min_size=3, max_size=3),
)
def test_sampled_ids_lie_in_the_rows_top_k(
    seed: int, ks: list[int], temperatures: list[float], uniform: list[bool]
) -> None:
    logits = random_logits(seed, rows=3)
    params = [
        SamplingParams(top_k=k, temperature=t, uniform=u)
        for k, t, u in zip(ks, temperatures, uniform, strict=True)
    ]
    ids = sample(logits, params, [make_generator(seed + i) for i in range(3)])
    for row, (word, k) in enumerate(zip(ids, ks, strict=True)):
        assert word in torch.topk(logits[row], k).indices.tolist()


def test_top_k_one_equals_greedy_equals_argmax() -> None:
    logits = random_logits(0, rows=64)
    gens = [make_generator(i) for i in range(64)]
    top_one = sample(logits, [SamplingParams(top_k=1)] * 64, gens)
    greedy = sample(logits, [SamplingParams(temperature=0, top_k=7)] * 64, gens)
    assert top_one == greedy == logits.argmax(-1).tolist()


def test_the_same_generator_seed_gives_the_same_ids() -> None:
    logits, params = random_logits(1), [SamplingParams(top_k=10)]
    runs = []
    for seed in (5, 5, 6):
        gen = make_generator(seed)
        runs.append([sample(logits, params, [gen])[0] for _ in range(30)])
    assert runs[0] == runs[1] != runs[2]


# Every way a row can be drawn: ranked top-k, the whole vocabulary unsorted (top_k 0), the
# whole vocabulary ranked (top_k 0 with a nucleus), uniform, greedy.
MIXED = [
    SamplingParams(top_k=3),
    SamplingParams(top_k=0, temperature=0.7),
    SamplingParams(top_k=0, top_p=0.8),
    SamplingParams(top_k=0, uniform=True),
    SamplingParams(top_k=12, uniform=True),
    SamplingParams(top_k=6, top_p=0.6),
    SamplingParams(temperature=0),
]


@FAST
@given(st.integers(0, 2**31), st.integers(0, len(MIXED) - 1))
def test_a_rows_word_does_not_depend_on_the_other_rows(seed: int, row: int) -> None:
    batch_gens = [make_generator(seed + i) for i in range(len(MIXED))]
    alone_gen = make_generator(seed + row)
    for step in range(5):
        logits = random_logits(seed + step, rows=len(MIXED))
        batched = sample(logits, MIXED, batch_gens, BANNED)
        alone = sample(logits[row : row + 1], [MIXED[row]], [alone_gen], BANNED)
        assert batched[row] == alone[0]


def test_a_small_top_p_keeps_only_the_top_word() -> None:
    logits = random_logits(2)
    picked = draws(logits, SamplingParams(top_k=0, top_p=1e-6), range(200))
    assert set(picked) == {int(logits.argmax())}


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(),
        SamplingParams(top_k=0),
        SamplingParams(top_k=0, temperature=5.0),
        SamplingParams(temperature=0),
        SamplingParams(top_k=5, uniform=True),
        SamplingParams(top_k=0, uniform=True),
    ],
    ids=["default", "whole-vocab", "hot", "greedy", "uniform-k5", "uniform-whole-vocab"],
)
def test_banned_ids_are_never_chosen(params: SamplingParams) -> None:
    logits = random_logits(3)
    logits[0, list(BANNED)] = 50.0  # the model's favourite words are the banned ones
    assert not set(draws(logits, params, range(300))) & set(BANNED)


def test_uniform_picks_each_of_the_top_k_equally_often() -> None:
    logits = torch.tensor([[9.0, 6.0, 4.0, 3.0, 2.0, 1.0, 0.0, -1.0]])
    picked = Counter(
        sample(
            logits.expand(4000, -1),
            [SamplingParams(top_k=4, uniform=True)] * 4000,
            [make_generator(s) for s in range(4000)],
        )
    )
    assert set(picked) == {0, 1, 2, 3}
    chi_square = sum((n - 1000) ** 2 / 1000 for n in picked.values())
    assert chi_square < 16.3  # df 3, p = 0.001


def test_sampling_follows_the_probabilities() -> None:
    logits = torch.tensor([[0.5, 0.3, 0.2]]).log()
    picked = Counter(
        sample(
            logits.expand(4000, -1),
            [SamplingParams(top_k=0)] * 4000,
            [make_generator(s) for s in range(4000)],
        )
    )
    shares = [picked[i] / 4000 for i in range(3)]
    assert shares == pytest.approx([0.5, 0.3, 0.2], abs=0.03)


# ---------------------------------------------------------------------------------------------
# Generating


@pytest.mark.parametrize("cell", CELLS)
def test_greedy_generation_continues_a_session(cell: str) -> None:
    model = make_model(cell=cell, layers=2)
    gen = make_generator(0)
    whole, _ = generate(model, [2, 3, 4], 20, GREEDY, gen, BOS, banned_ids=BANNED)
    first, hidden = generate(model, [2, 3, 4], 10, GREEDY, gen, BOS, banned_ids=BANNED)
    rest, _ = generate(model, [], 10, GREEDY, gen, BOS, hidden=hidden, banned_ids=BANNED)
    assert first + rest == whole


def test_sampled_generation_continues_a_session_with_its_generator() -> None:
    model, params = make_model(cell="lstm"), SamplingParams(top_k=8)
    whole, _ = generate(model, [5], 20, params, make_generator(4), BOS)
    gen = make_generator(4)
    first, hidden = generate(model, [5], 10, params, gen, BOS)
    rest, _ = generate(model, [], 10, params, gen, BOS, hidden=hidden)
    assert first + rest == whole


def test_should_stop_ends_generation_with_the_words_drawn_so_far() -> None:
    model, params = make_model(cell="lstm"), SamplingParams(top_k=8)
    whole, _ = generate(model, [5], 20, params, make_generator(4), BOS)
    asked: list[None] = []

    def after_seven_words() -> bool:
        asked.append(None)
        return len(asked) > 7

    cut, _ = generate(model, [5], 20, params, make_generator(4), BOS, should_stop=after_seven_words)
    assert cut == whole[:7]
    assert len(asked) == 8  # asked before each word, never again once it said stop


def test_new_seed_words_in_a_session_equal_generating_from_the_whole_history() -> None:
    model = make_model(cell="gru", layers=2)
    gen = make_generator(0)
    first, hidden = generate(model, [2, 3], 6, GREEDY, gen, BOS, banned_ids=BANNED)
    more, _ = generate(model, [7, 8], 6, GREEDY, gen, BOS, hidden=hidden, banned_ids=BANNED)
    history = [2, 3, *first, 7, 8]
    assert more == generate(model, history, 6, GREEDY, gen, BOS, banned_ids=BANNED)[0]


def test_batched_generation_equals_one_row_at_a_time() -> None:
    model = make_model(cell="lstm", layers=2)
    seeds = [[2, 3, 4], [5], [], [6, 7]]
    params = [SamplingParams(top_k=5), GREEDY, SamplingParams(top_k=0, top_p=0.8), MIXED[2]]
    gens = [make_generator(10 + i) for i in range(4)]
    hidden = prime(model, seeds, BOS)
    batched: list[list[int]] = [[] for _ in seeds]
    for _ in range(12):
        ids = sample(next_logits(model, hidden), params, gens, BANNED)
        for row, word in enumerate(ids):
            batched[row].append(word)
        hidden = advance(model, hidden, ids)
    alone = [
        generate(model, s, 12, p, make_generator(10 + i), BOS, banned_ids=BANNED)[0]
        for i, (s, p) in enumerate(zip(seeds, params, strict=True))
    ]
    assert batched == alone


# ---------------------------------------------------------------------------------------------
# Validation


@pytest.mark.parametrize(
    "kwargs",
    [
        {"top_k": -1},
        {"temperature": -0.5},
        {"top_p": 0.0},
        {"top_p": 1.01},
        {"top_p": float("nan")},
    ],
)
def test_params_reject_values_out_of_range(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        SamplingParams(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("temperature", [float("nan"), float("inf")])
def test_params_reject_a_non_finite_temperature(temperature: float) -> None:
    # nan (or inf, once a banned id is among the kept words) turns the scaled logits into nan,
    # and sample() then returns a banned id.
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=temperature)


def test_sample_needs_one_params_and_one_generator_per_row() -> None:
    with pytest.raises(ValueError, match="one SamplingParams and one generator per row"):
        sample(random_logits(0, rows=2), [SamplingParams()], [make_generator(0)])


@FAST
@given(st.integers(0, 2**31))
def test_a_kept_plan_draws_what_one_worked_out_each_call_draws(seed: int) -> None:
    """A caller keeps the rows' `SamplingPlan` while they stay the same (a server's batch):
    every step then draws the words a plan made for the step would."""
    plan = SamplingPlan(MIXED, VOCAB, torch.device("cpu"))
    kept = [make_generator(seed + i) for i in range(len(MIXED))]
    fresh = [make_generator(seed + i) for i in range(len(MIXED))]
    for step in range(5):
        logits = random_logits(seed + step, rows=len(MIXED))
        assert sample(logits, MIXED, kept, BANNED, plan) == sample(logits, MIXED, fresh, BANNED)


@FAST
@given(
    st.integers(0, 2**31),
    st.sampled_from([0.0, 1 - 2**-24]),  # the lowest and the highest draw a float32 holds
    st.sampled_from([SamplingParams(top_k=0), SamplingParams(top_k=5), SamplingParams(top_p=0.5)]),
)
def test_the_extreme_draws_pick_only_words_the_row_may_pick(
    seed: int, draw: float, params: SamplingParams
) -> None:
    logits = random_logits(seed, rows=8)
    barred = torch.rand(logits.shape, generator=make_generator(seed)) < 0.5
    barred[:, int(torch.randint(VOCAB, (1,), generator=make_generator(seed)))] = False
    logits = logits.masked_fill(barred, -math.inf)
    extreme = [Draws(0) for _ in range(8)]
    for generator in extreme:
        generator._block, generator._next = [draw], 0
    picked = sample(logits, [params] * 8, extreme)
    assert all(not barred[row, word] for row, word in enumerate(picked))
    # A row left no word at all still gets an id of the vocabulary (its caller's to refuse).
    nothing = torch.full((1, VOCAB), -math.inf)
    assert 0 <= sample(nothing, [params], extreme[:1])[0] < VOCAB


def test_a_plan_for_other_rows_is_refused() -> None:
    plan = SamplingPlan(MIXED[:2], VOCAB, torch.device("cpu"))
    with pytest.raises(ValueError, match="the plan is for another batch"):
        sample(random_logits(0, rows=3), MIXED[:3], [make_generator(i) for i in range(3)], (), plan)


def test_penalties_change_the_scores_as_defined() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0]])
    text, generated = [[0, 1, 0]], [2]  # the seed [0], then 1 and 0 were generated

    def penalized(**fields: Any) -> list[float]:
        return penalize(logits, [SamplingParams(**fields)], text, generated)[0].tolist()

    # CTRL: a positive score divided, a negative one multiplied, for every id in the text.
    assert penalized(repetition_penalty=2.0) == [1.0, -2.0, 0.5, 3.0]
    # OpenAI: the generated ids lose the presence penalty once, the frequency one per time.
    assert penalized(presence_penalty=0.5, frequency_penalty=0.25) == [1.25, -1.75, 0.5, 3.0]
    # After "0 1 0", "0" was followed by 1: no 2-gram "0 1" again.
    assert penalized(no_repeat_ngram_size=2) == [2.0, -math.inf, 0.5, 3.0]
    assert penalized(no_repeat_ngram_size=1) == [-math.inf, -math.inf, 0.5, 3.0]
    assert penalized() == logits[0].tolist()  # none asked: untouched


def test_greedy_with_no_repeat_ngrams_never_repeats_one(tiny_run: Path) -> None:
    loaded = checkpoint.load(tiny_run, "cpu")
    vocab = loaded.vocab
    seed = vocab.encode_lenient(["I", "can", "see"])[0]
    params = SamplingParams(top_k=0, temperature=0, no_repeat_ngram_size=3)
    ids, _ = generate(
        loaded.model, seed, 60, params, make_generator(0), vocab.bos_id,
        banned_ids=vocab.special_ids,
    )  # fmt: skip
    text = [*seed, *ids]
    trigrams = [tuple(text[i : i + 3]) for i in range(len(text) - 2)]
    assert len(trigrams) == len(set(trigrams))
    plain, _ = generate(
        loaded.model, seed, 60, SamplingParams(top_k=0, temperature=0), make_generator(0),
        vocab.bos_id, banned_ids=vocab.special_ids,
    )  # fmt: skip
    text = [*seed, *plain]
    assert len({tuple(text[i : i + 3]) for i in range(len(text) - 2)}) < len(text) - 2  # loops


@pytest.mark.parametrize(
    "fields",
    [
        {"repetition_penalty": 0.5},
        {"presence_penalty": 2.5},
        {"frequency_penalty": -3.0},
        {"no_repeat_ngram_size": -1},
    ],
)
def test_bad_penalties_are_refused(fields: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=next(iter(fields))):
        SamplingParams(**fields)


def test_bad_words_are_blocked_at_their_last_id() -> None:
    logits = torch.zeros(1, 5)
    params = SamplingParams(bad_words=((3,), (1, 2)))
    after_one = penalize(logits, [params], [[0, 1]], [0])[0].tolist()
    assert after_one == [0.0, 0.0, -math.inf, -math.inf, 0.0]  # "1 2" would complete there
    elsewhere = penalize(logits, [params], [[0, 4]], [0])[0].tolist()
    assert elsewhere == [0.0, 0.0, 0.0, -math.inf, 0.0]


def test_draws_a_block_at_a_time_are_the_numbers_of_one_call_a_step() -> None:
    draws, generator = Draws(17), make_generator(17)
    one_by_one = [torch.rand(1, generator=generator).item() for _ in range(3 * Draws.BLOCK + 5)]
    assert [draws.take() for _ in range(len(one_by_one))] == one_by_one
    draws.rewind(Draws.BLOCK + 2)  # back into the second block
    assert draws.take() == one_by_one[Draws.BLOCK + 2]


@pytest.mark.parametrize("size", [2999, 3000, 4003, 8192 + 37, 20_000])
@pytest.mark.parametrize("k", [1, 5, 40])
def test_top_k_finds_topks_values_in_large_vocabularies(size: int, k: int) -> None:
    """Above its threshold `top_k` looks only in the blocks with the best maxima: the same
    values as torch's topk, best first, each at its own id, ties and -inf rows included."""
    torch.manual_seed(size + k)
    logits = torch.randn(6, size)
    logits[0] = -torch.inf
    logits[0, size - 1] = 1.0  # one finite value, in the last (short) block
    logits[1] = 0.5  # all tied
    logits[2, 100:300] = 7.0  # a tie across the top, over several blocks
    logits[3, -5:] = 9.0  # the best at the very end
    values, ids = top_k(logits, k)
    assert torch.equal(values, logits.topk(k, dim=-1).values)
    assert torch.equal(logits.gather(1, ids), values)
    assert all(len(set(row)) == k for row in ids.tolist())


def test_sampling_a_large_vocabulary_draws_what_torchs_topk_would(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    torch.manual_seed(3)
    logits = torch.randn(16, 20_000) * 3
    params = [SamplingParams(top_k=k, top_p=p) for k in (5, 40) for p in (1.0, 0.9)] * 4

    def draw() -> list[int]:
        return sample(logits, params, [make_generator(i) for i in range(16)])

    ours = draw()
    monkeypatch.setattr(sampling, "top_k", lambda x, k: x.topk(k, dim=-1))
    assert draw() == ours
