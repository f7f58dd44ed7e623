"""Open-vocabulary pieces: a byte-level BPE learned from the training words.

The ``subword`` tokenizer cuts text into whitespace-separated words (line breaks kept as
``<nl>``) and each word into pieces of a byte-level BPE (Hugging Face ``tokenizers``) learned
from the training words. Every word's first piece starts with ``Ġ``, the byte-level image of
a space (a word is cut as GPT-2 cuts `` word``: letters, digits and other symbols apart), so
where a word begins is a property of one piece, not of its neighbours: a model
writes a word by a start piece and zero or more continuation pieces. The base alphabet is
all 256 bytes, so any UTF-8 text encodes and ``<unk>`` never occurs.

Case is written apart from spelling: a capitalised word (``Cassius``) or one in capitals
(``CASSIUS:``) is cut as a case mark followed by its lower-case letters, so that a name seen
only in capitals is spelled from the same well-trained pieces as ordinary words (measured on
held-out plays: an unseen speaker's name costs 45 bits instead of 56). Only marks that give
the word back exactly are used; other words (``McDonald``) are cut as they are.

Words, not pieces, are what users see: `split_words` and the vocabulary's ``Detokenizer``
turn text into words and back (spaces and tabs between words become one space, spaces at
line ends are dropped, line breaks are kept), and `SubwordModel.word` spells a word from its
pieces.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterable, Sequence
from typing import Any

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

NEWLINE = "<nl>"
WORD_START = "Ġ"  # the byte-level image of the space byte that opens every word
_LINE_BREAK_RE = re.compile(r"\r\n|\r|\n")


# Private-use characters, so no text means them: capitals, a capital first letter, and an
# escape for a word that really starts with one of the three.
CAPS, TITLE, ESCAPE = "\ue000", "\ue001", "\ue002"
_MARKS = (CAPS, TITLE, ESCAPE)


def case_marked(word: str) -> str:
    """``word`` as the BPE sees it: its case mark and lower-case letters where they give it
    back exactly (`case_unmarked`), else the word itself."""
    if word[:1] in _MARKS:
        return ESCAPE + word
    lower = word.lower()
    if lower == word or len(lower) != len(word):
        return word
    if lower[:1].upper() + lower[1:] == word:
        return TITLE + lower
    if lower.upper() == word:
        return CAPS + lower
    return word


def case_unmarked(text: str) -> str:
    """The word a (possibly model-written) marked text stands for."""
    mark, rest = text[:1], text[1:]
    if mark == CAPS:
        return rest.upper()
    if mark == TITLE:
        return rest[:1].upper() + rest[1:]
    return rest if mark == ESCAPE else text


class SubwordError(ValueError):
    """A subword model that cannot be read."""


def split_words(text: str) -> list[str]:
    """Whitespace-separated words, each line break as ``<nl>``."""
    words: list[str] = []
    for i, line in enumerate(_LINE_BREAK_RE.split(text)):
        if i:
            words.append(NEWLINE)
        words.extend(line.split())
    return words


class SubwordModel:
    """A trained byte-level BPE: words to pieces and pieces back to words."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._decoder = decoders.ByteLevel()
        vocab = tokenizer.get_vocab()
        self.pieces: tuple[str, ...] = tuple(sorted(vocab, key=vocab.__getitem__))  # id order
        # Per model, bounded: prompts may bring any number of new words, and a server spells
        # the same few thousand words over and over.
        self.word_pieces = functools.lru_cache(maxsize=65536)(self._word_pieces)
        self._spelled = functools.lru_cache(maxsize=65536)(self._spell)

    @classmethod
    def train(cls, words: Iterable[str], vocab_size: int) -> SubwordModel:
        """Learn ``vocab_size`` pieces (the 256 bytes included) from a stream of words."""
        tokenizer = Tokenizer(models.BPE())
        # GPT-2's split inside a word: letters, digits and other symbols apart ("Ġlord" ","),
        # so that punctuation glued to a word does not multiply its pieces.
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        marked = (" " + case_marked(w) for w in words if w != NEWLINE)
        tokenizer.train_from_iterator(marked, trainer)
        return cls(tokenizer)

    @classmethod
    def from_json(cls, data: Any) -> SubwordModel:
        return _load(json.dumps(data, ensure_ascii=False, sort_keys=True))

    def to_json(self) -> dict[str, Any]:
        return json.loads(self._tokenizer.to_str())  # type: ignore[no-any-return]

    def _word_pieces(self, word: str) -> tuple[str, ...]:
        """The pieces of one word (no whitespace in it); ``<nl>`` is a piece of its own."""
        if word == NEWLINE:
            return (NEWLINE,)
        # The space makes the word's first piece a start piece, and only that one: a word
        # holds no space, and only the space byte's image is "Ġ".
        marked = " " + case_marked(word)
        return tuple(self._tokenizer.encode(marked, add_special_tokens=False).tokens)

    def pieces_of(self, words: Iterable[str]) -> list[str]:
        out: list[str] = []
        for word in words:
            out.extend(self.word_pieces(word))
        return out

    def word(self, pieces: Sequence[str]) -> str:
        """The word spelled by ``pieces`` (a start piece and its continuations). Bytes that
        do not decode become U+FFFD, and so does whitespace inside a word, so that a word
        never holds whitespace whatever a model writes."""
        return self._spelled(tuple(pieces))

    def _spell(self, pieces: tuple[str, ...]) -> str:
        if pieces == (NEWLINE,):
            return NEWLINE
        text = case_unmarked(self._decoder.decode(list(pieces)).removeprefix(" "))
        return "".join("\ufffd" if c.isspace() else c for c in text)


@functools.lru_cache(maxsize=8)
def _load(text: str) -> SubwordModel:
    try:
        tokenizer = Tokenizer.from_str(text)
    except Exception as exc:  # tokenizers raises its own Exception type for bad JSON
        raise SubwordError(f"the subword model cannot be read: {exc}") from None
    return SubwordModel(tokenizer)


def starts_word(piece: str) -> bool:
    return piece == NEWLINE or piece.startswith(WORD_START)


def group_words(pieces: Iterable[str]) -> list[list[str]]:
    """Pieces grouped by word: a group opens at each start piece (a leading run of
    continuation pieces, which no model of ours writes first, forms a group of its own)."""
    groups: list[list[str]] = []
    for piece in pieces:
        if starts_word(piece) or not groups or groups[-1] == [NEWLINE]:
            groups.append([piece])
        else:
            groups[-1].append(piece)
    return groups
