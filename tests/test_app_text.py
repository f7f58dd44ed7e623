"""The text of a sample: pieces, stop strings, and what streaming may release when."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from app.text import Continuation, Piece
from model_store.vocab import NEWLINE, Vocab, tokenize

WORDS = ["I", "can", "see", "the", "sea", ".", ",", "!", '"', "'", NEWLINE, "sea.", "(", ")"]
VOCAB = Vocab.build(WORDS)


def run(context: list[str], words: list[str], stops: list[str]) -> tuple[Continuation, list[Piece]]:
    text = Continuation(VOCAB, context, stops)
    released: list[Piece] = []
    for word in words:
        text.push(word)
        released += text.release()
        if text.stopped:
            break
    released += text.release(final=True)
    return text, released


def test_pieces_add_up_to_the_text_after_the_context() -> None:
    context = tokenize("I can see")
    words = ["the", "sea", ".", NEWLINE, "I", "can", "(", "see", ")"]
    text, released = run(context, words, [])
    result = text.finish()
    assert result.text == " the sea.\nI can (see)"
    assert result.words == words
    assert result.finish_reason == "length"
    assert [p.text for p in released] == [" the", " sea", ".", "\n", "I", " can", " (", "see", ")"]
    assert [p.word for p in released] == words


def test_quotes_and_lines_lay_out_as_in_one_text() -> None:
    context = ["I", '"', "can", NEWLINE, "'"]
    words = ["see", "'", '"', "the", '"', "sea", NEWLINE, "'", "!"]
    text, released = run(context, words, [])
    whole = VOCAB.detokenize(context + words)
    assert text.finish().text == whole[len(VOCAB.detokenize(context)) :]
    assert "".join(p.text for p in released) == text.finish().text


def test_a_stop_at_a_word_start_drops_the_space_before_it() -> None:
    text, released = run(["I"], ["can", "see", "the", "sea"], ["the"])
    result = text.finish()
    assert result.text == " can see"
    assert result.words == ["can", "see"]
    assert result.finish_reason == "stop"
    assert "".join(p.text for p in released) == result.text


def test_a_stop_inside_a_word_cuts_that_words_text() -> None:
    text, released = run([], ["I", "see", "sea.", "the"], ["."])
    result = text.finish()
    assert result.text == "I see sea"
    assert result.words == ["I", "see", "sea."]
    assert released[-1] == Piece("sea.", " sea")


def test_words_that_may_start_a_stop_are_held_back_until_decided() -> None:
    text = Continuation(VOCAB, ["I"], [" see the sea"])
    text.push("can")
    assert text.release() == [Piece("can", " can")]
    text.push("see")
    text.push("the")
    assert text.release() == []  # " see the" may still become " see the sea"
    text.push("can")
    assert text.release() == [Piece("see", " see"), Piece("the", " the"), Piece("can", " can")]
    text.push("see")
    text.push("the")
    text.push("sea")
    assert text.stopped
    assert text.release() == []
    assert text.finish().text == " can see the can"


def test_a_held_back_tail_is_released_when_the_sample_ends_without_the_stop() -> None:
    text = Continuation(VOCAB, [], ["sea!"])
    for word in ["I", "see", "sea"]:
        text.push(word)
    assert [p.word for p in text.release()] == ["I", "see"]
    assert text.release(final=True) == [Piece("sea", " sea")]
    assert text.finish().finish_reason == "length"


def test_the_first_stop_to_complete_wins_and_the_earliest_start_among_those() -> None:
    text, _ = run([], ["I", "can", "see", "the", "sea"], ["the sea", "can see"])
    assert text.finish().text == "I"


@settings(max_examples=200, deadline=None)
@given(
    context=st.lists(st.sampled_from(WORDS), max_size=12),
    words=st.lists(st.sampled_from(WORDS), max_size=25),
    stops=st.lists(
        st.text(alphabet='Icanseth.,!" \n()', min_size=1, max_size=6), min_size=0, max_size=3
    ),
)
def test_released_text_is_the_final_text_and_holds_no_stop(
    context: list[str], words: list[str], stops: list[str]
) -> None:
    text, released = run(context, words, stops)
    result = text.finish()
    full = VOCAB.detokenize(context + words)[len(VOCAB.detokenize(context)) :]
    assert "".join(p.text for p in released) == result.text
    assert [p.word for p in released] == result.words
    assert full.startswith(result.text)
    assert words[: len(result.words)] == result.words
    assert not any(stop in result.text for stop in stops)
    if result.finish_reason == "length":
        assert result.text == full
        assert result.words == words


def test_no_words_give_no_text() -> None:
    text = Continuation(VOCAB, ["I", "can"])
    assert text.finish().text == ""
    assert text.release(final=True) == []
