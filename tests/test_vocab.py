"""Tokenizers, detokenizing, the frequency-sorted vocabulary and its JSON file."""

from __future__ import annotations

import contextlib
import json
from collections import Counter
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from model_store.vocab import (
    BOS,
    NEWLINE,
    SPECIAL_TOKENS,
    UNK,
    TokenizerSpec,
    Vocab,
    VocabError,
    detokenize,
    tokenize,
)

WHITESPACE = TokenizerSpec(name="whitespace")
FAST = settings(max_examples=50, deadline=None)

# Texts built from words (with inner apostrophes and hyphens), punctuation, spaces and line breaks.
_WORD = st.from_regex(r"[A-Za-z0-9]{1,6}(['’-][A-Za-z]{1,4})?", fullmatch=True)
_PUNCT = st.sampled_from(list(".,;:!?()[]{}\"'-…’‘“”«»$#%&*/_¿¡—"))
_SPACE = st.sampled_from([" ", "  ", "\t"])
_NEWLINE = st.sampled_from(["\n", "\r\n", "\r", "\n\n", "\n \n\n", "\n\t\n"])
TEXTS = st.lists(st.one_of(_WORD, _PUNCT, _SPACE, _NEWLINE), max_size=40).map("".join)

# Words from a small alphabet, so that repeats and ties in frequency are common.
CORPORA = st.lists(st.sampled_from(["a", "b", "c", "d", "e", "f", "The", "the", "x."]), max_size=60)


def words_vocab(text: str, **kwargs: Any) -> Vocab:
    return Vocab.build(tokenize(text), **kwargs)


# ---------------------------------------------------------------------------------------------
# Tokenizers


@FAST
@given(st.text())
def test_whitespace_tokenizer_is_str_split(text: str) -> None:
    assert tokenize(text, WHITESPACE) == text.split()


def test_words_tokenizer_splits_punctuation_and_keeps_case() -> None:
    assert tokenize('Hello, World! "Stop" (now); OK?') == [
        "Hello",
        ",",
        "World",
        "!",
        '"',
        "Stop",
        '"',
        "(",
        "now",
        ")",
        ";",
        "OK",
        "?",
    ]


def test_words_tokenizer_keeps_inner_apostrophes_and_hyphens() -> None:
    assert tokenize("Don't, well-a-day: stuff'd") == ["Don't", ",", "well-a-day", ":", "stuff'd"]


def test_words_tokenizer_turns_a_line_break_into_nl() -> None:
    assert tokenize("one line\nanother") == ["one", "line", NEWLINE, "another"]


def test_words_tokenizer_turns_a_blank_line_into_two_nl() -> None:
    assert tokenize("verse one\n\nverse two") == ["verse", "one", NEWLINE, NEWLINE, "verse", "two"]


@pytest.mark.parametrize("gap", ["\n\n\n", "\n\n\n\n\n", "\n  \n\t\n", "\r\n\r\n\r\n"])
def test_words_tokenizer_collapses_many_blank_lines_to_two_nl(gap: str) -> None:
    assert tokenize(f"a{gap}b") == ["a", NEWLINE, NEWLINE, "b"]


def test_words_tokenizer_handles_crlf_and_lone_cr() -> None:
    tokens = tokenize("a\r\nb\r\n\r\nc\rd")
    assert tokens == ["a", NEWLINE, "b", NEWLINE, NEWLINE, "c", NEWLINE, "d"]


def test_lowercase_spec_lowers_before_splitting() -> None:
    assert tokenize("The CAT.", TokenizerSpec(lowercase=True)) == ["the", "cat", "."]


# ---------------------------------------------------------------------------------------------
# Detokenizing


@pytest.mark.parametrize(
    "text",
    [
        "I can see the sea.",
        "Well, I said: yes; and then (quietly) no!",
        'He said "stop" and left.',
        "She wrote 'maybe' twice, didn't she?",
        "It costs $5, or 10%.",
        "First line,\nsecond line.\n\nA new verse.",
        "“Curly quotes,” she said… ‘and more.’",
    ],
)
def test_detokenize_gives_natural_text(text: str) -> None:
    assert detokenize(tokenize(text)) == text


def test_detokenize_whitespace_tokens_joins_with_spaces() -> None:
    assert detokenize(["a,", "b."], WHITESPACE) == "a, b."


@FAST
@given(TEXTS)
def test_tokenize_detokenize_round_trip(text: str) -> None:
    tokens = tokenize(text)
    assert tokenize(detokenize(tokens)) == tokens


def test_round_trip_of_blank_lines_holding_unicode_spaces() -> None:
    # A line holding only a no-break space is blank, like one holding only ASCII spaces;
    # three line breaks around such lines must collapse to two <nl> as well.
    tokens = tokenize("a\n\u00a0\n\u00a0\nb")
    assert tokenize(detokenize(tokens)) == tokens


# ---------------------------------------------------------------------------------------------
# Building the vocabulary


@FAST
@given(CORPORA)
def test_build_orders_words_like_the_lab(words: list[str]) -> None:
    counts = Counter(words)
    lab = sorted(counts, key=counts.get, reverse=True)  # type: ignore[arg-type]
    assert Vocab.build(words).tokens == [*SPECIAL_TOKENS, *lab]


def test_build_breaks_ties_by_first_appearance() -> None:
    vocab = Vocab.build(["b", "c", "a", "c", "a", "b", "d"])
    assert vocab.tokens[len(SPECIAL_TOKENS) :] == ["b", "c", "a", "d"]


def test_build_puts_special_tokens_first_with_their_ids() -> None:
    vocab = Vocab.build(["x", "y", "x"])
    assert (vocab.tokens[:2], vocab.unk_id, vocab.bos_id, vocab.special_ids) == (
        [UNK, BOS],
        0,
        1,
        (0, 1),
    )


def test_build_records_counts_aligned_with_tokens() -> None:
    vocab = Vocab.build(["a", "b", "a", "c", "a", "b"])
    assert dict(zip(vocab.tokens, vocab.counts, strict=True)) == {
        UNK: 0,
        BOS: 0,
        "a": 3,
        "b": 2,
        "c": 1,
    }


def test_min_count_maps_rare_words_to_unk() -> None:
    vocab = Vocab.build(["a", "a", "a", "b", "b", "c", "d"], min_count=2)
    assert (vocab.tokens, vocab.counts[vocab.unk_id]) == ([UNK, BOS, "a", "b"], 2)


def test_max_vocab_keeps_the_most_frequent_words() -> None:
    vocab = Vocab.build(["a", "a", "a", "b", "b", "c", "d"], max_vocab=4)
    assert (vocab.tokens, vocab.counts[vocab.unk_id]) == ([UNK, BOS, "a", "b"], 2)


@FAST
@given(CORPORA, st.integers(1, 4), st.one_of(st.none(), st.integers(3, 8)))
def test_counts_equal_the_encoded_corpus(
    words: list[str], min_count: int, max_vocab: int | None
) -> None:
    vocab = Vocab.build(words, min_count=min_count, max_vocab=max_vocab)
    ids = Counter(vocab.encode(words))
    assert [ids[i] for i in range(len(vocab))] == vocab.counts


def test_unk_count_includes_unk_tokens_already_in_the_corpus() -> None:
    # Corpora such as the Penn Treebank already hold <unk>; with the whitespace tokenizer it
    # is a corpus token like any other, and encoding maps it to <unk>.
    words = ["a", "<unk>", "b", "<unk>", "a"]
    vocab = Vocab.build(words, tokenizer=WHITESPACE)
    assert vocab.counts[vocab.unk_id] == Counter(vocab.encode(words))[vocab.unk_id]


@pytest.mark.parametrize("kwargs", [{"min_count": 0}, {"max_vocab": len(SPECIAL_TOKENS)}])
def test_build_rejects_bad_limits(kwargs: dict[str, int]) -> None:
    with pytest.raises(VocabError):
        Vocab.build(["a"], **kwargs)


# ---------------------------------------------------------------------------------------------
# Encoding


def test_encode_decode_round_trip(tiny_text: str) -> None:
    tokens = tokenize(tiny_text)
    vocab = Vocab.build(tokens)
    assert vocab.decode(vocab.encode(tokens)) == tokens


def test_encode_maps_unknown_words_to_unk() -> None:
    vocab = Vocab.build(["a", "b"])
    assert vocab.encode(["a", "zzz", "A"]) == [vocab.id_of("a"), vocab.unk_id, vocab.unk_id]


def test_encode_lenient_prefers_an_exact_match() -> None:
    vocab = Vocab.build(["the", "the", "the", "The"])
    assert vocab.encode_lenient(["The"]) == ([vocab.id_of("The")], [])


def test_encode_lenient_falls_back_to_the_most_frequent_spelling() -> None:
    vocab = Vocab.build(["Rome", "ROME", "rome", "ROME", "ROME", "rome"])
    assert vocab.encode_lenient(["rOmE"]) == ([vocab.id_of("ROME")], ["rOmE"])


def test_encode_lenient_maps_unknown_words_to_unk_and_lists_them_once() -> None:
    vocab = Vocab.build(["a", "b"])
    ids, unknown = vocab.encode_lenient(["zz", "a", "B", "zz", "yy"])
    assert (ids, unknown) == (
        [vocab.unk_id, vocab.id_of("a"), vocab.id_of("b"), vocab.unk_id, vocab.unk_id],
        ["zz", "B", "yy"],
    )


# ---------------------------------------------------------------------------------------------
# The JSON file


def test_json_round_trip(tiny_text: str) -> None:
    vocab = Vocab.build(
        tokenize(tiny_text), tokenizer=TokenizerSpec(lowercase=True), min_count=2, max_vocab=9
    )
    assert Vocab.loads(vocab.dumps()) == vocab


def test_to_json_records_the_format_and_tokenizer() -> None:
    data = Vocab.build(["a"], tokenizer=WHITESPACE).to_json()
    assert (data["format_version"], data["tokenizer"], data["size"]) == (
        1,
        {"name": "whitespace", "lowercase": False},
        3,
    )


def _valid_json() -> dict[str, Any]:
    return Vocab.build(["a", "b", "a"]).to_json()


def _with(**changes: Any) -> str:
    return json.dumps({**_valid_json(), **changes})


@pytest.mark.parametrize(
    "text",
    [
        "",
        "{not json",
        "[]",
        "null",
        _with(format_version=2),
        _with(format_version="1"),
        _with(tokens="abc"),
        _with(tokens=[UNK, BOS, 3]),
        _with(counts=[0, 0, -1, 1]),
        _with(counts=[0, 0, True, 1]),
        _with(counts=[0, 0, 1.5, 1]),
        _with(counts=[0, 0, 2]),
        _with(tokens=["a", BOS, UNK, "b"]),
        _with(tokens=[UNK, BOS, "a", "a"]),
        _with(tokenizer={"name": "bpe"}),
        _with(tokenizer="words"),
        _with(min_count="1"),
        _with(max_vocab=2.5),
        _with(tokens=[UNK, BOS, "a", ""]),  # no tokenizer makes an empty token...
        _with(tokens=[UNK, BOS, "a", "b c"]),  # ...or one with whitespace in it
    ],
)
def test_loads_rejects_bad_files(text: str) -> None:
    with pytest.raises(VocabError):
        Vocab.loads(text)


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner),
    max_leaves=10,
)


@FAST
@given(st.text(max_size=40) | JSON_VALUES.map(json.dumps))
def test_loads_raises_only_vocab_error_on_arbitrary_json(text: str) -> None:
    with contextlib.suppress(VocabError):
        Vocab.loads(text)


@FAST
@given(st.sampled_from(sorted(_valid_json())), JSON_VALUES)
def test_loads_raises_only_vocab_error_on_a_corrupted_field(key: str, value: Any) -> None:
    with contextlib.suppress(VocabError):
        Vocab.loads(_with(**{key: value}))
