"""The retriever of iterative RAG: one query embedding per stride, FAISS top-1 over chunk vectors.

Both methods (naive and RaLMSpec) embed every query alone, so a query's vector does not depend
on which other queries it is searched with; the batched verification only stacks those vectors
into one FAISS call. FAISS answers each row of a batch exactly as it answers that row alone
(flat: per-query scans below `faiss.cvar.distance_compute_blas_threshold`, 20 rows, so batches
stay under MAX_BATCH; HNSW: independent per-query graph walks), which is what makes the
speculative output equal the naive one.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ragspec.errors import ConfigError

log = logging.getLogger(__name__)

RETRIEVERS = ("flat", "hnsw")
MAX_BATCH = 16  # queries per FAISS call: below FAISS's BLAS threshold (20), rows searched one by one
HNSW_M = 32


@dataclass
class RetrievalClock:
    """Where retrieval time went (seconds), and how many FAISS calls and query rows there were."""

    embed_s: float = 0.0
    search_s: float = 0.0  # FAISS calls made on the calling thread
    calls: int = 0  # FAISS search calls (a batched verification is one)
    queries: int = 0  # query rows searched
    per_call_s: list[float] = field(default_factory=list)  # [calls] each FAISS call's latency


class Retriever:
    """Embeds queries and searches a FAISS index of chunk vectors; chunk texts come from `texts`.

    `dense`: a FAISS index whose ids are chunk ids; `texts(ids) -> {id: text}`.
    """

    def __init__(self, embedder, dense, texts, kind: str = "flat"):
        self.embedder = embedder
        self.dense = dense
        self._texts = texts
        self.kind = kind
        self._text_cache: dict[int, str] = {}

    @property
    def num_chunks(self) -> int:
        return int(self.dense.ntotal)

    def embed(self, query: str, clock: RetrievalClock | None = None) -> np.ndarray:
        """The L2-normalised query vector [dim] (one query per encoder call, always)."""
        from ragspec.index.encoders import embed

        start = time.perf_counter()
        vector = embed(self.embedder, [query])[0]
        if clock is not None:
            clock.embed_s += time.perf_counter() - start
        return vector

    def search(self, vectors: np.ndarray, k: int = 1) -> tuple[np.ndarray, np.ndarray, float]:
        """(scores [n, k], chunk ids [n, k], seconds) for query vectors [n, dim], in one FAISS call.
        Thread-safe for concurrent readers (FAISS releases the GIL while it searches)."""
        vectors = np.ascontiguousarray(np.atleast_2d(vectors), dtype=np.float32)
        if len(vectors) > MAX_BATCH:
            raise ConfigError(f"at most {MAX_BATCH} queries per batched search, got {len(vectors)}")
        start = time.perf_counter()
        scores, ids = self.dense.search(vectors, min(k, self.num_chunks))
        return scores, ids, time.perf_counter() - start

    def vectors(self, ids: Sequence[int]) -> np.ndarray:
        """Stored chunk vectors [len(ids), dim] (what the speculation cache scores queries against)."""
        return np.stack([self.dense.reconstruct(int(i)) for i in ids]).astype(np.float32)

    def text(self, chunk_id: int) -> str:
        if chunk_id not in self._text_cache:
            self._text_cache.update(self._texts([chunk_id]))
        return self._text_cache[chunk_id]


def retriever_for_index(index, kind: str = "flat", limit: int | None = None) -> Retriever:
    """A Retriever over an opened ragspec Index: its stored vectors (the first `limit` chunks, for
    corpus-size sweeps) in an exact flat index, or an HNSW graph built over them once and cached
    next to nothing in the repository (in cache_dir()/iterative/hnsw)."""
    if kind not in RETRIEVERS:
        raise ConfigError(f"retriever must be one of {', '.join(RETRIEVERS)}, got {kind!r}")
    size = index.num_chunks if limit is None else min(limit, index.num_chunks)
    dense = _dense_for(index, kind, size)
    return Retriever(index.embedder(), dense, lambda ids: {i: row["text"] for i, row in index.chunks(ids).items()},
                     kind)


def _stored_vectors(index, size: int) -> np.ndarray:
    base = index.dense
    return base.reconstruct_n(0, size).astype(np.float32) if size else np.zeros((0, base.d), np.float32)


def _dense_for(index, kind: str, size: int):
    import faiss

    if kind == "flat":
        if size == index.num_chunks and isinstance(faiss.downcast_index(index.dense), faiss.IndexFlat):
            return index.dense
        flat = faiss.IndexFlatIP(index.dense.d)
        flat.add(_stored_vectors(index, size))
        return flat
    cached = _hnsw_path(index, size)
    if cached.is_file():
        graph = faiss.read_index(str(cached))
    else:
        graph = faiss.IndexHNSWFlat(index.dense.d, HNSW_M, faiss.METRIC_INNER_PRODUCT)
        graph.hnsw.efConstruction = 80
        graph.add(_stored_vectors(index, size))
        cached.parent.mkdir(parents=True, exist_ok=True)
        faiss.write_index(graph, str(cached) + ".tmp")
        Path(str(cached) + ".tmp").replace(cached)
    graph.hnsw.efSearch = 64
    return graph


def _hnsw_path(index, size: int) -> Path:
    from ragspec.models import cache_dir

    version = Path(index.files).name
    return cache_dir() / "iterative" / "hnsw" / f"{index.name}-{version}-{size}-M{HNSW_M}.faiss"
