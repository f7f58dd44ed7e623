"""Tokenizers, the vocabulary and its JSON file.

`tokenize` is the only tokenizer of the project: the trainer splits the corpus with it and the
server splits prompts with it, using the tokenizer settings recorded in ``vocab.json``, so a
prompt is always cut exactly as the training text was.

Three tokenizers:

* ``whitespace``: the lab's ``text.split()``, exactly (punctuation stays glued to words).
* ``words`` (default): words (with inner apostrophes and hyphens: ``don't``, ``stuff'd``,
  ``well-a-day``) and each punctuation mark as separate tokens, case kept, and every line
  break as the token ``<nl>`` (blank lines give two), so verse and lyrics keep their shape.
  `detokenize` turns such tokens back into natural text.
* ``subword``: an open vocabulary (``model_store.subword``). Users still see words (the
  text's whitespace-separated words, line breaks as ``<nl>``); the model sees their pieces,
  so no word is ever ``<unk>``.

A vocabulary's *tokens* are what the model reads and writes; its *words* are what the API
takes and returns. They are the same for the first two tokenizers; for ``subword`` a word is
one or more pieces (`Vocab.split_words`, `Vocab.join_words`, `Vocab.encode_words`).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from model_store import subword
from model_store.subword import NEWLINE, SubwordModel

VOCAB_FORMAT_VERSION = 1
SUBWORD_FORMAT_VERSION = 2  # what older readers must refuse: their words are not its tokens

UNK = "<unk>"
BOS = "<bos>"
SPECIAL_TOKENS: tuple[str, ...] = (UNK, BOS)

TokenizerName = Literal["whitespace", "words", "subword"]
TOKENIZERS: tuple[str, ...] = ("whitespace", "words", "subword")

# A word: letters/digits, optionally joined by apostrophes or hyphens; else one symbol.
_WORD_RE = re.compile(r"\n|[^\W_]+(?:['’\-][^\W_]+)*|[^\s]", re.UNICODE)
# More than one blank line carries no more shape than one.
_MANY_NEWLINES_RE = re.compile(r"\n(?:[^\S\n]*\n)+")

_NO_SPACE_BEFORE = frozenset(".,;:!?)]}%…’”»")
_NO_SPACE_AFTER = frozenset("([{¿¡‘“«$#")
_QUOTES = frozenset("\"'")
_QUOTE_OPENERS = frozenset(":;([{")
_DASHES = frozenset("-–—")


class VocabError(ValueError):
    """A vocabulary file or tokenizer setting that cannot be used."""


@dataclass(frozen=True)
class TokenizerSpec:
    """How text is cut into tokens; stored in ``vocab.json``."""

    name: TokenizerName = "words"
    lowercase: bool = False
    model: SubwordModel | None = field(default=None, compare=False)  # ``subword``: its pieces

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"name": self.name, "lowercase": self.lowercase}
        if self.model is not None:
            data["model"] = self.model.to_json()
        return data

    def describe(self) -> dict[str, Any]:
        """What a user needs to know (the model card), without the subword model's merges."""
        data: dict[str, Any] = {"name": self.name, "lowercase": self.lowercase}
        if self.model is not None:
            data["pieces"] = len(self.model.pieces)
        return data

    @classmethod
    def from_json(cls, data: Any) -> TokenizerSpec:
        if not isinstance(data, dict) or data.get("name") not in TOKENIZERS:
            raise VocabError(f"unknown tokenizer {data!r:.80}; expected one of {TOKENIZERS}")
        model = None
        if data["name"] == "subword":
            try:
                model = SubwordModel.from_json(data.get("model"))
            except subword.SubwordError as exc:
                raise VocabError(str(exc)) from None
        return cls(name=data["name"], lowercase=bool(data.get("lowercase", False)), model=model)

    def words(self, text: str) -> list[str]:
        """The words of ``text`` as users see them (the tokens, but for ``subword``)."""
        if self.lowercase:
            text = text.lower()
        if self.name == "subword":
            return subword.split_words(text)
        return tokenize(text, TokenizerSpec(self.name))

    def subword_model(self) -> SubwordModel:
        if self.model is None:
            raise VocabError("a subword tokenizer needs its trained model")
        return self.model


def tokenize(text: str, spec: TokenizerSpec | None = None) -> list[str]:
    """Cut ``text`` into tokens as training did (see the module docstring)."""
    spec = spec or TokenizerSpec()
    if spec.name == "subword":
        return spec.subword_model().pieces_of(spec.words(text))
    if spec.lowercase:
        text = text.lower()
    if spec.name == "whitespace":
        return text.split()
    text = _MANY_NEWLINES_RE.sub("\n\n", text.replace("\r\n", "\n").replace("\r", "\n"))
    return [NEWLINE if tok == "\n" else tok for tok in _WORD_RE.findall(text)]


class Detokenizer:
    """Text of a word stream built one word at a time: ``push`` returns the characters the
    word adds (``" sea"``, ``"."``, ``"\\n"``), so streaming costs the same per word however
    long the text. ``detokenize`` is this applied to a whole list of tokens."""

    def __init__(self, spec: TokenizerSpec | None = None) -> None:
        name = (spec or TokenizerSpec()).name
        self._whitespace = name == "whitespace"
        self._subword = name == "subword"
        self._open_quotes: set[str] = set()
        self._glue_next = True  # at the start of the text and of each line
        self._last = ""

    def push(self, tok: str) -> str:
        last, self._last = self._last, tok
        if self._whitespace or (self._subword and tok != NEWLINE):
            piece = tok if self._glue_next else " " + tok
            self._glue_next = False
            return piece
        if tok == NEWLINE:
            self._glue_next = True
            self._open_quotes.clear()  # a quote left open does not run on to the next line
            return "\n"
        if tok in _DASHES and tok == last:  # "--", not "- -"
            return tok
        if tok in _QUOTES:
            # After ":" or ";" a quote opens ("She said: 'no.'"), whatever came before.
            closing = tok in self._open_quotes and last not in _QUOTE_OPENERS
            if closing:
                self._open_quotes.discard(tok)
            else:
                self._open_quotes.add(tok)
            if closing:
                self._glue_next = False
                return tok
            piece = tok if self._glue_next else " " + tok
            self._glue_next = True
            return piece
        piece = tok if self._glue_next or tok[0] in _NO_SPACE_BEFORE else " " + tok
        self._glue_next = tok in _NO_SPACE_AFTER
        return piece

    def feed(self, tokens: Iterable[str]) -> str:
        return "".join(self.push(tok) for tok in tokens)


def _subword_tokens(spec: TokenizerSpec) -> list[str]:
    """What a subword vocabulary must hold besides its special tokens: every piece."""
    return [NEWLINE, *spec.subword_model().pieces]


def detokenize(tokens: Sequence[str], spec: TokenizerSpec | None = None) -> str:
    """Join tokens into natural text: no space before punctuation, ``<nl>`` as a line break
    (for ``subword``, the pieces are spelled into words first)."""
    if spec is not None and spec.name == "subword":
        model = spec.subword_model()
        tokens = [model.word(group) for group in subword.group_words(tokens)]
    return Detokenizer(spec).feed(tokens)


@dataclass
class Vocab:
    """Frequency-sorted vocabulary: the special tokens first, then words by count.

    Ties keep the order of first appearance in the corpus (the lab's ``sorted(Counter, key=
    counter.get, reverse=True)`` does the same, because Python's sort is stable).
    """

    tokens: list[str]
    counts: list[int]
    tokenizer: TokenizerSpec = field(default_factory=TokenizerSpec)
    min_count: int = 1
    max_vocab: int | None = None

    def __post_init__(self) -> None:
        if len(self.tokens) != len(self.counts):
            raise VocabError("tokens and counts differ in length")
        if tuple(self.tokens[: len(SPECIAL_TOKENS)]) != SPECIAL_TOKENS:
            raise VocabError(f"the vocabulary must start with {list(SPECIAL_TOKENS)}")
        self._index = {tok: i for i, tok in enumerate(self.tokens)}
        if len(self._index) != len(self.tokens):
            raise VocabError("the vocabulary holds a token twice")
        self._folded: dict[str, int] | None = None
        self._starts: list[bool] | None = None
        if self.tokenizer.name == "subword":
            missing = [p for p in _subword_tokens(self.tokenizer) if p not in self._index]
            if missing:
                raise VocabError(
                    f"{len(missing)} pieces of the subword model are not in the vocabulary "
                    f"(first: {missing[0]!r:.40})"
                )

    @classmethod
    def build(
        cls,
        tokens: Iterable[str],
        tokenizer: TokenizerSpec | None = None,
        min_count: int = 1,
        max_vocab: int | None = None,
    ) -> Vocab:
        """Count ``tokens``; words rarer than ``min_count`` or past ``max_vocab`` become <unk>."""
        if min_count < 1:
            raise VocabError("min_count must be at least 1")
        if max_vocab is not None and max_vocab <= len(SPECIAL_TOKENS):
            raise VocabError(f"max_vocab must be larger than {len(SPECIAL_TOKENS)}")
        counter = Counter(tokens)
        literal_unk = counter.pop(UNK, 0)  # a corpus may be pre-processed with <unk> already
        bos_count = counter.pop(BOS, 0)
        ranked = sorted(counter, key=counter.__getitem__, reverse=True)
        keep = [tok for tok in ranked if counter[tok] >= min_count]
        if max_vocab is not None:
            keep = keep[: max_vocab - len(SPECIAL_TOKENS)]
        unk_count = literal_unk + sum(counter.values()) - sum(counter[tok] for tok in keep)
        if tokenizer is not None and tokenizer.name == "subword":
            # Every piece, seen or not, so that any text encodes: the open vocabulary.
            kept = set(keep)
            keep += [piece for piece in _subword_tokens(tokenizer) if piece not in kept]
        return cls(
            tokens=[*SPECIAL_TOKENS, *keep],
            counts=[unk_count, bos_count, *(counter[tok] for tok in keep)],
            tokenizer=tokenizer or TokenizerSpec(),
            min_count=min_count,
            max_vocab=max_vocab,
        )

    def __len__(self) -> int:
        return len(self.tokens)

    def __contains__(self, token: object) -> bool:
        return token in self._index

    @property
    def unk_id(self) -> int:
        return self._index[UNK]

    @property
    def bos_id(self) -> int:
        return self._index[BOS]

    @property
    def special_ids(self) -> tuple[int, ...]:
        """Ids that generation must never emit (<unk>, <bos>)."""
        return tuple(self._index[tok] for tok in SPECIAL_TOKENS)

    @property
    def is_subword(self) -> bool:
        """Whether a word is one or more pieces (the ``subword`` tokenizer)."""
        return self.tokenizer.name == "subword"

    def starts_word(self) -> list[bool]:
        """For each id, whether it can open a word (for ``subword``: a start piece)."""
        if self._starts is None:
            self._starts = [not self.is_subword or subword.starts_word(tok) for tok in self.tokens]
        return self._starts

    def split_words(self, text: str) -> list[str]:
        """The words of ``text``, as the API takes and returns them."""
        return self.tokenizer.words(text)

    def join_words(self, words: Sequence[str]) -> str:
        """The text of words (for the first two tokenizers, their `detokenize`)."""
        return Detokenizer(self.tokenizer).feed(words)

    def encode_words(self, words: Iterable[str]) -> tuple[list[int], list[str], list[int]]:
        """Ids for words: each word's ids, the words that had no exact match (see
        `encode_lenient`; none for ``subword``) and how many ids each word took."""
        if not self.is_subword:
            ids, unknown = self.encode_lenient(words)
            return ids, unknown, [1] * len(ids)
        model = self.tokenizer.subword_model()
        ids, sizes = [], []
        for word in words:
            pieces = model.word_pieces(word.lower() if self.tokenizer.lowercase else word)
            ids += self.encode(pieces)
            sizes.append(len(pieces))
        return ids, [], sizes

    def spell(self, ids: Sequence[int]) -> str:
        """The word one group of ids writes: the token itself, or its pieces spelled out."""
        tokens = self.decode(ids)
        return self.tokenizer.subword_model().word(tokens) if self.is_subword else tokens[0]

    def id_of(self, token: str) -> int:
        return self._index.get(token, self.unk_id)

    def encode(self, tokens: Iterable[str]) -> list[int]:
        """Token ids; unknown tokens become <unk> (exact match, as in training)."""
        index, unk = self._index, self.unk_id
        return [index.get(tok, unk) for tok in tokens]

    def encode_lenient(self, tokens: Iterable[str]) -> tuple[list[int], list[str]]:
        """Ids for prompt words: exact match, then case-insensitive, then <unk>.

        Returns the ids and the words that had no exact match (in order, repeats kept once).
        """
        ids: list[int] = []
        unknown: list[str] = []
        for tok in tokens:
            idx = self._index.get(tok)
            if idx is None:
                if tok not in unknown:
                    unknown.append(tok)
                idx = self._folded_index().get(tok.casefold(), self.unk_id)
            ids.append(idx)
        return ids, unknown

    def decode(self, ids: Iterable[int]) -> list[str]:
        return [self.tokens[i] for i in ids]

    def detokenize(self, tokens: Sequence[str]) -> str:
        return detokenize(tokens, self.tokenizer)

    def tokenize(self, text: str) -> list[str]:
        return tokenize(text, self.tokenizer)

    def _folded_index(self) -> dict[str, int]:
        # The most frequent spelling wins: iterate from rare to frequent so it overwrites.
        if self._folded is None:
            self._folded = {
                tok.casefold(): i
                for i, tok in reversed(list(enumerate(self.tokens)))
                if tok not in SPECIAL_TOKENS
            }
        return self._folded

    def to_json(self) -> dict[str, Any]:
        return {
            "format_version": SUBWORD_FORMAT_VERSION if self.is_subword else VOCAB_FORMAT_VERSION,
            "tokenizer": self.tokenizer.to_json(),
            "special_tokens": {"unk": UNK, "bos": BOS, "newline": NEWLINE},
            "min_count": self.min_count,
            "max_vocab": self.max_vocab,
            "size": len(self.tokens),
            "tokens": self.tokens,
            "counts": self.counts,
        }

    def dumps(self) -> str:
        return json.dumps(self.to_json(), ensure_ascii=False, indent=1) + "\n"

    @classmethod
    def from_json(cls, data: Any) -> Vocab:
        if not isinstance(data, dict):
            raise VocabError("expected a JSON object")
        version = data.get("format_version")
        if version not in (VOCAB_FORMAT_VERSION, SUBWORD_FORMAT_VERSION):
            raise VocabError(
                f"unsupported vocabulary format_version {version!r:.20} "
                f"(this version reads {VOCAB_FORMAT_VERSION} and {SUBWORD_FORMAT_VERSION})"
            )
        tokens, counts = data.get("tokens"), data.get("counts")
        if not (isinstance(tokens, list) and all(isinstance(t, str) for t in tokens)):
            raise VocabError("'tokens' must be a list of strings")
        bad = next((t for t in tokens if not t or any(c.isspace() for c in t)), None)
        if bad is not None:
            raise VocabError(
                f"token {bad!r:.40} is empty or holds whitespace; no tokenizer makes one"
            )
        if not (isinstance(counts, list) and all(type(c) is int and c >= 0 for c in counts)):
            raise VocabError("'counts' must be a list of non-negative integers")
        min_count, max_vocab = data.get("min_count", 1), data.get("max_vocab")
        if type(min_count) is not int or not (max_vocab is None or type(max_vocab) is int):
            raise VocabError("'min_count' and 'max_vocab' must be integers")
        tokenizer = TokenizerSpec.from_json(data.get("tokenizer"))
        if (tokenizer.name == "subword") != (version == SUBWORD_FORMAT_VERSION):
            raise VocabError(
                f"format_version {version} does not go with the {tokenizer.name} tokenizer"
            )
        return cls(
            tokens=tokens,
            counts=counts,
            tokenizer=tokenizer,
            min_count=min_count,
            max_vocab=max_vocab,
        )

    @classmethod
    def loads(cls, text: str) -> Vocab:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise VocabError(f"not valid JSON: {exc}") from exc
        return cls.from_json(data)
