"""Read documents from files and directories, and cut them into token-window chunks.

Readable types: .txt .md .rst (as is), .html/.htm (tags stripped), .jsonl (one document per
line with a "text" field). Anything else, or a file that cannot be read, is skipped with a
warning (collected in `Corpus.skipped` so the CLI can show it).
"""

from __future__ import annotations

import hashlib
import json
import logging
import numbers
from collections.abc import Iterator
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

from ragspec.errors import ConfigError, CorpusNotFound

log = logging.getLogger(__name__)

TEXT_SUFFIXES = {".txt", ".md", ".markdown", ".rst", ".text"}
HTML_SUFFIXES = {".html", ".htm", ".xhtml"}
JSONL_SUFFIXES = {".jsonl"}


@dataclass(frozen=True)
class Document:
    source: str  # file path, "path#line" for JSONL, or a caller's label
    text: str

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()


@dataclass(frozen=True)
class Chunk:
    doc_index: int  # position of its document in the list being chunked
    text: str
    char_start: int
    char_end: int
    token_ids: tuple[int, ...]  # target-tokenizer ids of this chunk


@dataclass
class Corpus:
    documents: list[Document] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason + fix)
    seen: int = 0  # documents read (a streaming build does not keep them in `documents`)

    def skip(self, path: Path | str, reason: str) -> None:
        log.warning("skipped %s: %s", path, reason)
        self.skipped.append((str(path), reason))


class _TextExtractor(HTMLParser):
    _SKIP = {"script", "style", "head", "template", "noscript"}
    _BLOCK = {"p", "div", "br", "li", "tr", "h1", "h2", "h3", "h4", "h5", "h6", "pre",
              "section", "article", "blockquote", "table", "ul", "ol", "hr", "title"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._skipping = 0

    def handle_starttag(self, tag, attrs):
        if tag in self._SKIP:
            self._skipping += 1
        elif tag in self._BLOCK:
            self.parts.append("\n")

    def handle_endtag(self, tag):
        if tag in self._SKIP:
            self._skipping = max(self._skipping - 1, 0)
        elif tag in self._BLOCK:
            self.parts.append("\n")

    def handle_data(self, data):
        if not self._skipping:
            self.parts.append(data)


def html_to_text(html: str) -> str:
    parser = _TextExtractor()
    parser.feed(html)
    parser.close()
    lines = (" ".join(line.split()) for line in "".join(parser.parts).splitlines())
    return "\n".join(line for line in lines if line)


def _iter_files(paths: list[Path]) -> list[Path]:
    files: list[Path] = []
    for path in paths:
        path = Path(path).expanduser()
        if path.is_dir():
            files.extend(sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")))
        elif path.is_file():
            files.append(path)
        else:
            raise CorpusNotFound(f"no such file or directory: {path} (check the path)")
    return files


def _read_file(path: Path, corpus: Corpus) -> Iterator[Document]:
    suffix = path.suffix.lower()
    if suffix not in TEXT_SUFFIXES | HTML_SUFFIXES | JSONL_SUFFIXES:
        corpus.skip(path, f"unknown file type {suffix or '(none)'}: use .txt, .md, .rst, .html or .jsonl")
        return
    if suffix in JSONL_SUFFIXES:
        yield from _read_jsonl(path, corpus)
        return
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        corpus.skip(path, "not UTF-8 text: convert it to UTF-8")
        return
    except OSError as exc:
        corpus.skip(path, f"cannot read it ({exc.strerror or exc}): check its permissions")
        return
    text = html_to_text(raw) if suffix in HTML_SUFFIXES else raw
    if text.strip():
        yield Document(str(path), text)
    else:
        corpus.skip(path, "no text in it")


def _read_jsonl(path: Path, corpus: Corpus) -> Iterator[Document]:
    """One document per line, read line by line (a JSONL file may be larger than memory)."""
    number = 0
    try:
        with open(path, encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                document = _jsonl_document(path, number, line, corpus)
                if document is not None:
                    yield document
    except UnicodeDecodeError:
        corpus.skip(f"{path}#{number + 1}" if number else path, "not UTF-8 text: convert it to UTF-8")
    except OSError as exc:
        corpus.skip(path, f"cannot read it ({exc.strerror or exc}): check its permissions")


def _jsonl_document(path: Path, number: int, line: str, corpus: Corpus) -> Document | None:
    if not line.strip():
        return None
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        corpus.skip(f"{path}#{number}", f"invalid JSON ({exc.msg}): one JSON object per line")
        return None
    text = record.get("text") if isinstance(record, dict) else None
    if not isinstance(text, str) or not text.strip():
        corpus.skip(f"{path}#{number}", 'no "text" string field in this line')
        return None
    return Document(f"{path}#{number}", text)


def iter_documents(paths: list[Path], corpus: Corpus, progress: bool = True) -> Iterator[Document]:
    """The documents under `paths`, one at a time (files read one by one, JSONL line by line);
    skipped files are recorded in `corpus.skipped`. Missing paths raise CorpusNotFound at once."""
    return _documents(_iter_files(paths), corpus, progress)


def _documents(files: list[Path], corpus: Corpus, progress: bool) -> Iterator[Document]:
    from tqdm.auto import tqdm

    for path in tqdm(files, desc="reading", unit="file", disable=not progress):
        for document in _read_file(path, corpus):
            corpus.seen += 1
            yield document


def read_corpus(paths: list[Path], progress: bool = True) -> Corpus:
    """Every supported file under `paths` (files or directories, recursively), in memory."""
    corpus = Corpus()
    corpus.documents.extend(iter_documents(paths, corpus, progress))
    return corpus


def check_chunking(chunk_tokens: int, overlap_tokens: int) -> None:
    for value in (chunk_tokens, overlap_tokens):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise ConfigError(f"chunk and overlap sizes are whole numbers of tokens, got {value!r}")
    if chunk_tokens < 1 or not 0 <= overlap_tokens < chunk_tokens:
        raise ConfigError(
            f"chunk size {chunk_tokens} / overlap {overlap_tokens} tokens: need chunk >= 1 and "
            "0 <= overlap < chunk (e.g. --chunk-tokens 256 --overlap-tokens 32)"
        )


def chunk_document(doc_index: int, text: str, tokenizer, chunk_tokens: int, overlap_tokens: int) -> list[Chunk]:
    """Windows of `chunk_tokens` target tokens, `overlap_tokens` shared between neighbours."""
    if not getattr(tokenizer, "is_fast", False):
        raise ConfigError("building an index needs a fast (Rust) tokenizer with offset mapping")
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    ids, offsets = encoding["input_ids"], encoding["offset_mapping"]
    stride = chunk_tokens - overlap_tokens
    chunks = []
    for start in range(0, max(len(ids) - overlap_tokens, 1), stride):
        end = min(start + chunk_tokens, len(ids))
        if end <= start:
            break
        char_start, char_end = offsets[start][0], offsets[end - 1][1]
        chunks.append(Chunk(doc_index, text[char_start:char_end], char_start, char_end, tuple(ids[start:end])))
    return chunks
