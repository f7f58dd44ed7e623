"""Tokenizers, the vocabulary and its JSON file.

`tokenize` is the only tokenizer of the project: the trainer splits the corpus with it and the
server splits prompts with it, using the tokenizer settings recorded in ``vocab.json``, so a
prompt is always cut exactly as the training text was.

Two tokenizers:

* ``whitespace``: the lab's ``text.split()``, exactly (punctuation stays glued to words).
* ``words`` (default): words (with inner apostrophes and hyphens: ``don't``, ``stuff'd``,
  ``well-a-day``) and each punctuation mark as separate tokens, case kept, and every line
  break as the token ``<nl>`` (blank lines give two), so verse and lyrics keep their shape.
  `detokenize` turns such tokens back into natural text.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

VOCAB_FORMAT_VERSION = 1

UNK = "<unk>"
BOS = "<bos>"
NEWLINE = "<nl>"
SPECIAL_TOKENS: tuple[str, ...] = (UNK, BOS)

TokenizerName = Literal["whitespace", "words"]
TOKENIZERS: tuple[str, ...] = ("whitespace", "words")

# A word: letters/digits, optionally joined by apostrophes or hyphens; else one symbol.
_WORD_RE = re.compile(r"\n|[^\W_]+(?:['’\-][^\W_]+)*|[^\s]", re.UNICODE)
# More than one blank line carries no more shape than one.
_MANY_NEWLINES_RE = re.compile(r"\n(?:[^\S\n]*\n)+")

_NO_SPACE_BEFORE = frozenset(".,;:!?)]}%…’”»")
_NO_SPACE_AFTER = frozenset("([{¿¡‘“«$#")
_QUOTES = frozenset("\"'")


class VocabError(ValueError):
    """A vocabulary file or tokenizer setting that cannot be used."""


@dataclass(frozen=True)
class TokenizerSpec:
    """How text is cut into tokens; stored in ``vocab.json``."""

    name: TokenizerName = "words"
    lowercase: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "lowercase": self.lowercase}

    @classmethod
    def from_json(cls, data: Any) -> TokenizerSpec:
        if not isinstance(data, dict) or data.get("name") not in TOKENIZERS:
            raise VocabError(f"unknown tokenizer {data!r}; expected one of {TOKENIZERS}")
        return cls(name=data["name"], lowercase=bool(data.get("lowercase", False)))


def tokenize(text: str, spec: TokenizerSpec | None = None) -> list[str]:
    """Cut ``text`` into tokens as training did (see the module docstring)."""
    spec = spec or TokenizerSpec()
    if spec.lowercase:
        text = text.lower()
    if spec.name == "whitespace":
        return text.split()
    text = _MANY_NEWLINES_RE.sub("\n\n", text.replace("\r\n", "\n").replace("\r", "\n"))
    return [NEWLINE if tok == "\n" else tok for tok in _WORD_RE.findall(text)]


class Detokenizer:
    """Text of a token stream built one token at a time: ``push`` returns the characters the
    token adds (``" sea"``, ``"."``, ``"\\n"``), so streaming costs the same per word however
    long the text. ``detokenize`` is this applied to a whole list."""

    def __init__(self, spec: TokenizerSpec | None = None) -> None:
        self._whitespace = (spec or TokenizerSpec()).name == "whitespace"
        self._open_quotes: set[str] = set()
        self._glue_next = True  # at the start of the text and of each line

    def push(self, tok: str) -> str:
        if self._whitespace:
            piece = tok if self._glue_next else " " + tok
            self._glue_next = False
            return piece
        if tok == NEWLINE:
            self._glue_next = True
            return "\n"
        if tok in _QUOTES:
            closing = tok in self._open_quotes
            self._open_quotes.symmetric_difference_update({tok})
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


def detokenize(tokens: Sequence[str], spec: TokenizerSpec | None = None) -> str:
    """Join tokens into natural text: no space before punctuation, ``<nl>`` as a line break."""
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
            "format_version": VOCAB_FORMAT_VERSION,
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
        if version != VOCAB_FORMAT_VERSION:
            raise VocabError(
                f"unsupported vocabulary format_version {version!r} "
                f"(this version reads {VOCAB_FORMAT_VERSION})"
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
        return cls(
            tokens=tokens,
            counts=counts,
            tokenizer=TokenizerSpec.from_json(data.get("tokenizer")),
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
