"""A long document split into overlapping token windows, embedded, and searched in memory.

The RAPID drafter reads only the few chunks of a document that answer the question, so that its
cost does not grow with the document (the target still reads all of it). Chunking reuses the
index builder's `chunk_document` (windows of the target tokenizer's tokens, so a chunk's size in
the draft prompt is known), embedding reuses the process-wide sentence-transformers encoder
(`load_embedder`, loaded once per process), and search is FAISS flat inner product over
L2-normalised vectors (exact cosine; a document has tens of chunks, nothing to approximate).

`DocumentChunks.of` keeps the last few documents in memory, keyed by the document's checksum and
everything else that shapes the chunks, so several questions on one document chunk and embed it once.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from ragspec.errors import ConfigError
from ragspec.index.corpus import Chunk, check_chunking, chunk_document

CHUNK_TOKENS = 192  # target tokens per chunk
OVERLAP_TOKENS = 24  # tokens shared by neighbouring chunks (a sentence cut at a border survives)
MEMORY_ENTRIES = 8  # documents kept in memory per process


def document_checksum(text: str) -> str:
    """sha256 of the document's UTF-8 text (hex)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass
class DocumentChunks:
    """`text` cut into `chunks` (document order), their embeddings `vectors` [chunks, dim] float32
    (L2-normalised) and a FAISS flat inner-product index over them."""

    text: str
    checksum: str  # document_checksum(text)
    chunks: list[Chunk]  # [chunks] in document order, char spans into `text`
    vectors: np.ndarray  # [chunks, dim] float32
    embedder_path: str | None = None  # None: the embedded encoder
    _faiss: object = field(default=None, repr=False)

    @classmethod
    def of(cls, text: str, tokenizer, *, chunk_tokens: int = CHUNK_TOKENS, overlap_tokens: int = OVERLAP_TOKENS,
           embedder_path: str | None = None) -> DocumentChunks:
        """The chunks of `text` (chunked and embedded on first use, then kept in memory)."""
        if not isinstance(text, str) or not text.strip():
            raise ConfigError("a document to chunk must be a non-empty text")
        check_chunking(chunk_tokens, overlap_tokens)
        from ragspec.index.encoders import tokenizer_fingerprint

        checksum = document_checksum(text)
        key = (checksum, tokenizer_fingerprint(tokenizer), chunk_tokens, overlap_tokens, embedder_path)
        with _MEMORY_LOCK:
            found = _MEMORY.get(key)
            if found is not None:
                _MEMORY.move_to_end(key)
                return found
        chunks = chunk_document(0, text, tokenizer, chunk_tokens, overlap_tokens)
        made = cls.from_parts(text, chunks, embed_texts([c.text for c in chunks], embedder_path), embedder_path)
        with _MEMORY_LOCK:
            _MEMORY[key] = made
            while len(_MEMORY) > MEMORY_ENTRIES:
                _MEMORY.popitem(last=False)
        return made

    @classmethod
    def from_parts(cls, text: str, chunks: list[Chunk], vectors: np.ndarray,
                   embedder_path: str | None = None) -> DocumentChunks:
        """From chunks and vectors made earlier (an on-disk cache); checks that they match."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or len(vectors) != len(chunks) or not chunks:
            raise ConfigError(f"{len(chunks)} chunks need one embedding each, got vectors of shape {vectors.shape}")
        return cls(text, document_checksum(text), list(chunks), vectors, embedder_path)

    def __len__(self) -> int:
        return len(self.chunks)

    def search(self, question: str, k: int) -> list[int]:
        """Indices of the `k` chunks closest to `question`, best first."""
        if k < 1:
            return []
        if self._faiss is None:
            import faiss

            index = faiss.IndexFlatIP(self.vectors.shape[1])
            index.add(self.vectors)
            self._faiss = index
        query = embed_texts([question], self.embedder_path)
        _, found = self._faiss.search(query, min(k, len(self.chunks)))
        return [int(i) for i in found[0] if i >= 0]

    def top_chunks(self, question: str, k: int) -> list[str]:
        """The texts of the `k` chunks closest to `question`, in document order; chunks that
        overlap or touch are merged into one text (their shared tokens appear once)."""
        spans = sorted((self.chunks[i].char_start, self.chunks[i].char_end) for i in self.search(question, k))
        merged: list[list[int]] = []
        for start, end in spans:
            if merged and start <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], end)
            else:
                merged.append([start, end])
        return [self.text[start:end] for start, end in merged]


def embed_texts(texts: list[str], embedder_path: str | None = None) -> np.ndarray:
    """Embeddings [len(texts), dim] float32 with the process-wide encoder (loaded once)."""
    from ragspec.index.encoders import embed, load_embedder

    return embed(load_embedder(embedder_path), texts)


_MEMORY: OrderedDict[tuple, DocumentChunks] = OrderedDict()
_MEMORY_LOCK = threading.Lock()
