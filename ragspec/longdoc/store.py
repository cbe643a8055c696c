"""The chunks and embeddings of documents read before, on disk by checksum, so that asking about
the same document again (another process, another day) skips chunking and embedding.

One `.npz` per document and chunking setting under `cache_dir()/documents/` (plain arrays,
loaded with allow_pickle=False: nothing in the file can run code). A file that is damaged or
does not match its document is ignored and rewritten; writes go through a temporary file and an
atomic rename, so a reader never sees half a file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from ragspec.errors import RagspecError
from ragspec.index.corpus import Chunk
from ragspec.longdoc.chunks import CHUNK_TOKENS, OVERLAP_TOKENS, DocumentChunks, document_checksum
from ragspec.models import cache_dir

log = logging.getLogger("ragspec.longdoc")
FORMAT = 1  # bump when the arrays below change meaning


def documents_dir() -> Path:
    return cache_dir() / "documents"


def cached_chunks(text: str, tokenizer, *, chunk_tokens: int = CHUNK_TOKENS, overlap_tokens: int = OVERLAP_TOKENS,
                  embedder_path: str | None = None) -> DocumentChunks:
    """`text`'s DocumentChunks: from the disk cache when there, else chunked, embedded and stored."""
    path = _cache_path(text, tokenizer, chunk_tokens, overlap_tokens, embedder_path)
    found = _load(path, text, embedder_path)
    if found is not None:
        return found
    made = DocumentChunks.of(text, tokenizer, chunk_tokens=chunk_tokens, overlap_tokens=overlap_tokens,
                             embedder_path=embedder_path)
    _save(path, made)
    return made


def _cache_path(text: str, tokenizer, chunk_tokens: int, overlap_tokens: int, embedder_path: str | None) -> Path:
    """`<document checksum>-<settings hash>.npz`: the tokenizer, the chunk sizes and the encoder
    all shape the arrays, so each combination has its own file."""
    from ragspec.index.encoders import tokenizer_fingerprint

    settings = json.dumps([FORMAT, tokenizer_fingerprint(tokenizer), chunk_tokens, overlap_tokens, embedder_path])
    return documents_dir() / f"{document_checksum(text)}-{hashlib.sha256(settings.encode()).hexdigest()[:16]}.npz"


def _save(path: Path, chunks: DocumentChunks) -> None:
    """Arrays: spans [chunks, 2] (char start, end), token_counts [chunks], token_ids [sum of
    counts] (the chunks' ids one after another), vectors [chunks, dim] float32, and the
    document checksum as bytes."""
    spans = np.array([(c.char_start, c.char_end) for c in chunks.chunks], dtype=np.int64).reshape(-1, 2)
    counts = np.array([len(c.token_ids) for c in chunks.chunks], dtype=np.int64)
    flat = np.array([t for c in chunks.chunks for t in c.token_ids], dtype=np.int64)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as out:
            np.savez(out, spans=spans, token_counts=counts, token_ids=flat, vectors=chunks.vectors,
                     checksum=np.frombuffer(chunks.checksum.encode("ascii"), dtype=np.uint8))
        os.replace(temporary, path)
    except OSError as exc:  # a read-only or full cache dir costs the next run an embedding, no more
        log.warning("could not cache document chunks at %s: %s", path, exc)
        Path(temporary).unlink(missing_ok=True)


def _load(path: Path, text: str, embedder_path: str | None) -> DocumentChunks | None:
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as arrays:
            spans, counts, flat = arrays["spans"], arrays["token_counts"], arrays["token_ids"]
            vectors, checksum = arrays["vectors"], arrays["checksum"].tobytes().decode("ascii")
        if checksum != document_checksum(text) or len(spans) != len(counts) or counts.sum() != len(flat):
            raise ValueError("arrays do not match the document")
        if len(spans) and (spans.min() < 0 or spans.max() > len(text)):
            raise ValueError("chunk spans outside the document")
        ends = np.cumsum(counts)
        chunks = [
            Chunk(0, text[start:end], int(start), int(end), tuple(int(t) for t in flat[stop - count : stop]))
            for (start, end), count, stop in zip(spans.tolist(), counts.tolist(), ends.tolist())
        ]
        return DocumentChunks.from_parts(text, chunks, vectors, embedder_path)
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, RagspecError) as exc:  # RagspecError:
        # from_parts' check of the shapes
        log.warning("ignoring the damaged document cache %s (%s): chunking again", path, exc)
        return None
