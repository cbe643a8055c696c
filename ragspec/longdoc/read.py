"""Reading a long document's text from a file: .txt / .md (as written), .html / .htm (the visible
text; scripts, styles and the head dropped, block tags turned into line breaks) and .pdf (the text
layer, through pypdf: `pip install 'ragspec[pdf]'`).

Every failure (missing, a folder, empty, unsupported type, undecodable, damaged, encrypted, a PDF
with no text layer) raises DocumentUnreadable naming the file and the fix, before anything is
indexed or prefilled.
"""

from __future__ import annotations

import io
import os
import re
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

from ragspec.errors import DocumentUnreadable

TEXT_SUFFIXES = (".txt", ".text", ".md", ".markdown")
HTML_SUFFIXES = (".html", ".htm")
PDF_SUFFIXES = (".pdf",)
SUPPORTED_SUFFIXES = TEXT_SUFFIXES + HTML_SUFFIXES + PDF_SUFFIXES


@dataclass(frozen=True)
class Document:
    """A document's text and where it came from (a file name, or "text N" for text passed in)."""

    name: str
    text: str

    @property
    def checksum(self) -> str:
        """sha256 of the text: the key its chunks and embeddings are cached under."""
        from ragspec.longdoc.chunks import document_checksum

        return document_checksum(self.text)


def read_document(path: str | os.PathLike) -> Document:
    """The text of the file at `path` (see the module doc for the types read)."""
    path = Path(path)
    if not path.exists():
        raise DocumentUnreadable(f"document not found: {path}")
    if path.is_dir():
        raise DocumentUnreadable(f"{path} is a folder: pass a document file (.txt, .md, .html or .pdf)")
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED_SUFFIXES:
        raise DocumentUnreadable(
            f"{path}: unsupported document type {suffix or '(no extension)'!r}: "
            f"ragspec reads {', '.join(SUPPORTED_SUFFIXES)}"
        )
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DocumentUnreadable(f"cannot read {path}: {exc.strerror or exc}") from exc
    if not data.strip():
        raise DocumentUnreadable(f"{path} is empty")
    if suffix in PDF_SUFFIXES:
        text = pdf_text(data, path)
    elif suffix in HTML_SUFFIXES:
        text = html_text(_decode(data, path, _declared_charset(data)))
    else:
        text = _decode(data, path)
    text = _tidy(text)
    if not text:
        raise DocumentUnreadable(f"{path} holds no text")
    return Document(name=path.name, text=text)


def _decode(data: bytes, path: Path, declared: str | None = None) -> str:
    """UTF-8 (a BOM allowed), UTF-16 with its BOM, or the charset an HTML file declares."""
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        encoding = "utf-16"
    else:
        encoding = declared or "utf-8-sig"
    try:
        text = data.decode(encoding)
    except (UnicodeDecodeError, LookupError) as exc:
        raise DocumentUnreadable(
            f"{path} is not {encoding} text ({exc}): convert it to UTF-8, or pass a .pdf/.html as such"
        ) from exc
    if "\x00" in text:
        raise DocumentUnreadable(f"{path} holds binary data, not text")
    return text


_CHARSET = re.compile(rb"""<meta[^>]+charset\s*=\s*["']?([A-Za-z0-9_.:-]+)""", re.IGNORECASE)


def _declared_charset(data: bytes) -> str | None:
    match = _CHARSET.search(data[:4096])
    return match.group(1).decode("ascii").lower() if match else None


def _tidy(text: str) -> str:
    """Unix line ends, no trailing spaces, at most one blank line in a row, no blank ends."""
    lines = [line.rstrip() for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


class _VisibleText(HTMLParser):
    """Collects the text a browser shows: not scripts, styles, templates or the head (the
    <title> is kept, as the document's first line); block elements start new lines."""

    HIDDEN = {"script", "style", "noscript", "template", "head", "svg"}
    BLOCKS = {
        "p", "div", "br", "li", "ul", "ol", "tr", "table", "section", "article", "header", "footer",
        "h1", "h2", "h3", "h4", "h5", "h6", "pre", "blockquote", "hr", "dt", "dd", "title", "main",
        "nav", "aside", "figure", "figcaption",
    }

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._hidden = 0  # depth inside hidden elements
        self._in_title = False

    def handle_starttag(self, tag, attrs) -> None:
        if tag == "title":
            self._in_title = True
        elif tag in self.HIDDEN:
            self._hidden += 1
        if tag in self.BLOCKS:
            self.parts.append("\n")

    def handle_endtag(self, tag) -> None:
        if tag == "title":
            self._in_title = False
        elif tag in self.HIDDEN and self._hidden:
            self._hidden -= 1
        if tag in self.BLOCKS:
            self.parts.append("\n")

    def handle_data(self, data) -> None:
        if self._in_title or not self._hidden:
            self.parts.append(re.sub(r"[ \t\r\n\f]+", " ", data))


def html_text(html: str) -> str:
    """The visible text of an HTML page (see _VisibleText)."""
    parser = _VisibleText()
    parser.feed(html)
    parser.close()
    lines = (line.strip() for line in "".join(parser.parts).split("\n"))
    return "\n".join(lines)


def pdf_text(data: bytes, path: Path) -> str:
    """The text layer of a PDF, page after page (pypdf, imported here: an optional dependency)."""
    try:
        from pypdf import PdfReader
    except ImportError as exc:
        raise DocumentUnreadable(f"reading {path} needs pypdf: pip install 'ragspec[pdf]'") from exc
    try:
        reader = PdfReader(io.BytesIO(data))
        if reader.is_encrypted and not reader.decrypt(""):
            raise DocumentUnreadable(f"{path} is an encrypted PDF: decrypt it first")
        pages = [page.extract_text() or "" for page in reader.pages]
    except DocumentUnreadable:
        raise
    except Exception as exc:  # pypdf raises many types on damaged input: all mean "unreadable"
        raise DocumentUnreadable(f"{path} is not a readable PDF ({type(exc).__name__}: {exc})") from exc
    text = "\n\n".join(page.strip() for page in pages)
    if not text.strip():
        raise DocumentUnreadable(
            f"{path}: its {len(pages)} page(s) hold no text layer (a scanned or image-only PDF?): "
            "run OCR on it first"
        )
    return text
