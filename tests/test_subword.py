"""The open vocabulary: subword pieces, whole words in and out, and text that round-trips."""

from __future__ import annotations

import math
import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from model_store import checkpoint, scoring
from model_store.sampling import advance, prime
from model_store.subword import (
    NEWLINE,
    SubwordModel,
    case_marked,
    case_unmarked,
    group_words,
    split_words,
)
from model_store.vocab import TokenizerSpec, Vocab, VocabError, detokenize, tokenize
from tests.conftest import TINY_TEXT, MakeRun
from training.evaluate import evaluate

FAST = settings(max_examples=60, deadline=None)
WHITESPACE = TokenizerSpec(name="whitespace")
SPEC = TokenizerSpec(
    name="subword", model=SubwordModel.train(split_words(TINY_TEXT + "Ünïcödé 日本語 —"), 320)
)
VOCAB = Vocab.build(tokenize(TINY_TEXT, SPEC), tokenizer=SPEC)


def normalized(text: str) -> str:
    """The README's whitespace normalisation: each line's words joined by one space, lines
    (``\\n``, ``\\r\\n`` or ``\\r``) kept."""
    return "\n".join(" ".join(line.split()) for line in re.split(r"\r\n|\r|\n", text))


@FAST
@given(st.text())
def test_subword_text_round_trips_up_to_whitespace(text: str) -> None:
    assert detokenize(tokenize(text, SPEC), SPEC) == normalized(text)
    assert VOCAB.join_words(split_words(text)) == normalized(text)


@FAST
@given(st.text())
def test_whitespace_text_round_trips_up_to_whitespace(text: str) -> None:
    assert detokenize(tokenize(text, WHITESPACE), WHITESPACE) == " ".join(text.split())


@FAST
@given(st.text())
def test_words_tokens_survive_a_round_trip(text: str) -> None:
    tokens = tokenize(text)
    assert tokenize(detokenize(tokens)) == tokens


@pytest.mark.parametrize(
    "text",
    [
        "Wait -- what?",
        "'Tis true. She said: 'no.'",
        'So... then?\nAnd then: "yes".',
    ],
)
def test_words_tokenizer_gives_back_dashes_quotes_and_ellipses(text: str) -> None:
    assert detokenize(tokenize(text)) == text


@FAST
@given(st.text())
def test_a_subword_vocabulary_never_needs_unk(text: str) -> None:
    ids, unknown, sizes = VOCAB.encode_words(VOCAB.split_words(text))
    assert VOCAB.unk_id not in ids
    assert unknown == []
    assert sum(sizes) == len(ids)
    assert VOCAB.unk_id not in VOCAB.encode(tokenize(text, SPEC))


@FAST
@given(st.lists(st.text(min_size=1).filter(lambda w: not any(c.isspace() for c in w))))
def test_pieces_spell_their_word_back(words: list[str]) -> None:
    for word in words:
        ids, _, _ = VOCAB.encode_words([word])
        assert VOCAB.spell(ids) == word
        assert VOCAB.starts_word()[ids[0]]
        assert not any(VOCAB.starts_word()[i] for i in ids[1:])


@FAST
@given(st.text())
def test_case_marks_give_every_word_back(word: str) -> None:
    assert case_unmarked(case_marked(word)) == word


def test_a_word_in_capitals_is_spelled_in_lower_case_after_its_mark() -> None:
    model = SubwordModel.train(["SEA", "Sea", "sea", "SEE", "See"] * 10, 300)
    caps, title = model.word_pieces("SEA"), model.word_pieces("Sea")
    assert caps[0] != title[0]  # the marks differ
    assert caps[1:] == title[1:]  # the letters do not
    assert model.word(caps) == "SEA"
    assert model.word(title) == "Sea"


def test_every_word_opens_with_one_start_piece() -> None:
    pieces = tokenize("I can see\n\nthe sea.", SPEC)
    groups = group_words(pieces)
    assert [SPEC.subword_model().word(g) for g in groups] == [
        "I", "can", "see", NEWLINE, NEWLINE, "the", "sea.",
    ]  # fmt: skip


def test_vocab_json_keeps_the_subword_model(tmp_path: Path) -> None:
    loaded = Vocab.loads(VOCAB.dumps())
    assert loaded.tokens == VOCAB.tokens
    assert loaded.encode_words(["Ünïcödé"]) == VOCAB.encode_words(["Ünïcödé"])
    pieces = len(SPEC.subword_model().pieces)
    assert pieces > 256  # the bytes, then pieces learned from the text
    assert loaded.tokenizer.describe() == {"name": "subword", "lowercase": False, "pieces": pieces}


def test_a_vocabulary_missing_pieces_of_its_model_is_refused() -> None:
    with pytest.raises(VocabError, match="not in the vocabulary"):
        Vocab(VOCAB.tokens[:-1], VOCAB.counts[:-1], tokenizer=SPEC)
    other = replace(SPEC, name="words")
    with pytest.raises(VocabError, match="format_version"):
        Vocab.from_json({**VOCAB.to_json(), "tokenizer": other.to_json()})


# ---------------------------------------------------------------------------------------------
# Scores: bits per character and whole next words


def test_bits_per_char_equal_a_hand_computation(make_run: MakeRun) -> None:
    loaded = checkpoint.load(make_run(tokenizer="subword", cell="lstm"), torch.device("cpu"))
    text = "I can see the moon,\nthe zebra cannot."
    vocab, model = loaded.vocab, loaded.model
    ids = vocab.encode(tokenize(text, vocab.tokenizer))
    total, hidden = 0.0, None
    with torch.inference_mode():
        for prev, target in zip([vocab.bos_id, *ids[:-1]], ids, strict=True):
            features, hidden = model.features(torch.tensor([[prev]]), hidden)
            total += float(model.log_probs(features[0, -1])[target])
    result = evaluate(loaded, text)
    assert result["bits_per_char"] == pytest.approx(-total / math.log(2) / len(text), rel=1e-5)
    assert result["characters"] == len(text)
    assert result["words"] == 8
    assert result["unknown_word_share"] == 0.0


def test_next_words_are_whole_words_with_their_probability(make_run: MakeRun) -> None:
    loaded = checkpoint.load(make_run(tokenizer="subword", seed=3), torch.device("cpu"))
    vocab, model = loaded.vocab, loaded.model
    seed, _, _ = vocab.encode_words(["I", "can"])
    with torch.inference_mode():
        state = prime(model, [seed], vocab.bos_id)
        ranked = scoring.next_words(model, vocab, state, 5)
        assert len(ranked) == 5
        assert [p for _, p in ranked] == sorted((p for _, p in ranked), reverse=True)
        starts = torch.tensor(vocab.starts_word())
        for word, probability in ranked:
            # By hand: the word's own pieces, then any start piece (the word has ended).
            ids, _, _ = vocab.encode_words([word])
            hidden, log_p = state, 0.0
            for piece in ids:
                log_probs = model.log_probs(hidden[-1])[0]
                log_p += float(log_probs[piece])
                hidden = advance(model, hidden, [piece])
            if word != NEWLINE:
                log_probs = model.log_probs(hidden[-1])[0]
                log_p += float(log_probs.masked_fill(~starts, -math.inf).logsumexp(0))
            assert probability >= math.exp(log_p) * (1 - 1e-5)  # other spellings may add
            assert not word.startswith("Ġ")


def test_next_words_survive_probabilities_that_underflow(make_run: MakeRun) -> None:
    loaded = checkpoint.load(make_run(tokenizer="subword", seed=3), torch.device("cpu"))
    vocab, model = loaded.vocab, loaded.model
    with torch.inference_mode():
        assert model.decoder is not None
        model.decoder.weight.mul_(1e4)  # scores so far apart that most words get exp(...) = 0
        state = prime(model, [vocab.encode_words(["I"])[0]], vocab.bos_id)
        ranked = scoring.next_words(model, vocab, state, 40)
    assert len(ranked) == 40
    assert all(0 <= p <= 1 for _, p in ranked)
