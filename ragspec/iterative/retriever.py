"""The retriever of iterative RAG: one query embedding per stride, top-1 over chunk vectors.

Both methods (naive and RaLMSpec) embed every query alone, so a query's vector does not depend
on which other queries it is searched with; the batched verification only stacks those vectors
into one search call. The search answers each row of a batch exactly as it answers that row
alone, which is what makes the speculative output equal the naive one:

- `flat` (exact): `ExactFlat`. One BLAS pass scores every chunk for every query of the batch
  (the saving RaLMSpec batches for: over 973k chunks here 2/4/8 queries took ~60-85/65-110/
  110-185 ms through torch's gemm with the chunks as its rows, while numpy's gemm and FAISS's
  BLAS path cost 2-3x one query already at 2). Its float32 scores only shortlist the chunks
  within MARGIN of the best, and the shortlist is rescored exactly (float64 products of the
  float32 values, summed with math.fsum: the correctly rounded inner product), ties going to the
  lower chunk id. The top-1 is thus a property of (query, matrix), whatever BLAS kernel the batch
  size picked. (FAISS's flat index scans the matrix once per query below 20 queries, so it would
  not batch at all.)
- `hnsw`: FAISS HNSW, whose graph walks are independent per query.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ragspec.errors import ConfigError

log = logging.getLogger(__name__)

RETRIEVERS = ("flat", "hnsw")
MAX_BATCH = 16  # queries per batched search (OS3 stride bound)
HNSW_M = 32
MARGIN = 1e-4  # > twice float32's worst-case error on a 384-dim inner product of unit vectors (~2.3e-5)


class ExactFlat:
    """Exact inner-product search over a [num_chunks, dim] float32 matrix (see the module doc)."""

    def __init__(self, matrix: np.ndarray):
        self.matrix = np.ascontiguousarray(matrix, dtype=np.float32)  # [num_chunks, dim]
        self.ntotal, self.d = self.matrix.shape

    def reconstruct(self, chunk_id: int) -> np.ndarray:
        return self.matrix[chunk_id]

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores [nq, k], ids [nq, k]), best first. k == 1 is exact and batch-invariant; larger
        k (the prefetch) ranks by the float32 scores."""
        scores = self._scores(queries)  # [nq, num_chunks], one pass over the matrix
        if k == 1:
            best = [self._exact_top1(query, row) for query, row in zip(queries, scores)]
            return (np.array([[s] for s, _ in best], dtype=np.float32), np.array([[i] for _, i in best], dtype=np.int64))
        top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        order = np.take_along_axis(scores, top, 1).argsort(axis=1)[:, ::-1]
        ids = np.take_along_axis(top, order, 1)
        return np.take_along_axis(scores, ids, 1), ids.astype(np.int64)

    def _scores(self, queries: np.ndarray) -> np.ndarray:
        """Float32 scores [nq, num_chunks] through torch's gemm, whose threads are the model's: a
        numpy (OpenBLAS) search leaves its own threads spinning on both cores after each call, and
        the decoding that follows ran slower (naive iterative RAG over 60k chunks, 8 questions:
        24.0 s with a numpy search, 16.1 s with this one). A single query goes in as two identical
        columns: torch's gemv is single-threaded, ~2.5x slower than its two-column gemm."""
        import torch

        rows = torch.from_numpy(self.matrix)  # shares the memory
        columns = np.ascontiguousarray(queries if len(queries) > 1 else np.repeat(queries, 2, axis=0))
        return torch.mm(rows, torch.from_numpy(columns).T).numpy().T[: len(queries)]

    def _exact_top1(self, query: np.ndarray, approximate: np.ndarray) -> tuple[float, int]:
        shortlist = np.flatnonzero(approximate >= approximate.max() - MARGIN)  # ascending ids
        query64 = query.astype(np.float64)
        exact = [math.fsum(self.matrix[i].astype(np.float64) * query64) for i in shortlist]
        position = int(np.argmax(exact))  # the first maximum: the lowest id among ties
        return exact[position], int(shortlist[position])


@dataclass
class RetrievalClock:
    """Where retrieval time went (seconds), and how many search calls and query rows there were."""

    embed_s: float = 0.0
    search_s: float = 0.0  # search calls made on the calling thread
    calls: int = 0  # search calls (a batched verification is one)
    queries: int = 0  # query rows searched
    per_call_s: list[float] = field(default_factory=list)  # [calls] each search call's latency


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
        """(scores [n, k], chunk ids [n, k], seconds) for query vectors [n, dim], in one call.
        Thread-safe for concurrent readers (BLAS and FAISS release the GIL while they search)."""
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
        return ExactFlat(_stored_vectors(index, size))
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
