"""Writers that let an index build stream: memory bounded by the batch, not by the corpus.

A build reads documents one at a time, cuts and embeds them in batches of a few thousand
chunks, and hands each batch to these writers:

- `TokenWriter` appends the batch's token ids to tokens.npy on disk (its .npy header is written
  first with room reserved, and rewritten with the final length when the build ends);
- `DenseWriter` adds the batch's vectors to the FAISS index. Indexes that need training (IVF,
  PQ...) first collect a bounded training sample (the first `train_vectors` vectors), train on it,
  and add every later batch directly. Flat and HNSW indexes keep their vectors in memory (that
  is what they are: 4 bytes x dim per chunk); `on_disk=True` keeps an IVF index's inverted lists
  in dense.ivfdata instead (see `DenseWriter`).

What stays O(corpus) in memory: the suffix array construction (`build_suffix_array`: 4 bytes
per token of symbols + 4 bytes per token of suffix array, 8 + 8 past 2^31 tokens), and a
memory-resident dense index (Flat / HNSW / IVF with in-memory lists).
"""

from __future__ import annotations

import logging
import resource
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ragspec.index.datastore import read_npy_header
from ragspec.index.encoders import c_stdout_silenced
from ragspec.index.store import DENSE_DATA_FILE, DENSE_TEMPLATE_FILE

log = logging.getLogger(__name__)

TRAIN_VECTORS = 100_000  # at most this many vectors are held for training (~150 MB at 384 dims)
SHARD_VECTORS = 100_000  # on-disk IVF: vectors per temporary shard before it is written out


@dataclass(frozen=True)
class PeakMemory:
    self_bytes: int  # peak resident set size of this process (ru_maxrss)
    children_bytes: int  # largest peak RSS of a waited-for child process (FAISS probes)

    @property
    def total_bytes(self) -> int:
        """Self + children: an upper bound on what the build held at once."""
        return self.self_bytes + self.children_bytes


def peak_memory() -> PeakMemory:
    """Peak RSS so far, from getrusage (kilobytes on Linux, bytes on macOS)."""
    scale = 1 if sys.platform == "darwin" else 1024
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * scale
    return PeakMemory(int(own), int(children))


def _npy_header(length: int) -> bytes:
    import io

    buffer = io.BytesIO()
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.int32)), "fortran_order": False, "shape": (length,)}
    np.lib.format.write_array_header_1_0(buffer, header)
    return buffer.getvalue()


class TokenWriter:
    """Appends int32 token ids to a .npy file; `close()` writes the final header.

    The .npy 1.0 header of a 1-D int32 array is padded to 128 bytes for any length below
    10^48, so the header written first (length 0) is overwritten in place at the end.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.length = 0
        self._header_bytes = len(_npy_header(0))
        self._handle = open(path, "wb")  # noqa: SIM115 (closed by close())
        self._handle.write(_npy_header(0))

    def append(self, tokens: np.ndarray) -> None:
        self._handle.write(np.ascontiguousarray(tokens, dtype=np.int32).tobytes())
        self.length += len(tokens)

    def copy_from(self, path: Path, block: int = 1 << 22) -> None:
        """Append every token of an existing tokens.npy, a block at a time."""
        with open(path, "rb") as source:
            shape, dtype = read_npy_header(source)
            if dtype != np.int32 or len(shape) != 1:
                raise ValueError(f"{path}: expected 1-D int32 tokens, got {dtype} {shape}")
            shutil.copyfileobj(source, self._handle, block)
        self.length += shape[0]

    def close(self) -> None:
        header = _npy_header(self.length)
        if len(header) != self._header_bytes:  # not reachable below 10^48 tokens
            raise ValueError(f"tokens.npy header of {len(header)} bytes, {self._header_bytes} reserved")
        self._handle.seek(0)
        self._handle.write(header)
        self._handle.close()


def train_size(factory: str, limit: int = TRAIN_VECTORS) -> int:
    """Vectors to collect before training: ~64 per IVF list, within [10k, limit]; 0 for
    factories that need no training (Flat, HNSW: vectors are added batch by batch)."""
    from ragspec.index.encoders import SAFE_UNTRAINED, ivf_lists

    if SAFE_UNTRAINED.fullmatch(factory):
        return 0
    lists = ivf_lists(factory) or 0
    return max(1, min(limit, max(10_000, 64 * lists)))


class DenseWriter:
    """A FAISS index built from batches of vectors, with a bounded training sample.

    `on_disk=True` (IVF factories only) keeps the inverted lists out of memory: each run of
    `shard_vectors` vectors is added to a copy of the trained, empty index and written to a
    temporary shard; at the end the shards' lists are merged into one `dense.ivfdata` file
    (FAISS OnDiskInvertedLists, the recipe of faiss.contrib.ondisk) that readers memory-map,
    touching only the lists a query probes. Chosen over `IndexShards`, whose shards are each
    a whole in-memory index: sharding splits the work across threads or GPUs but still holds
    every vector in RAM, so it does not let an index outgrow memory.
    """

    def __init__(self, factory: str, directory: Path, on_disk: bool = False, train_vectors: int = TRAIN_VECTORS,
                 shard_vectors: int = SHARD_VECTORS) -> None:
        from ragspec.errors import ConfigError
        from ragspec.index.encoders import ivf_lists

        if on_disk and ivf_lists(factory) is None:
            raise ConfigError(f"an on-disk dense index needs an IVF factory (e.g. IVF1024,Flat), not {factory!r}")
        self.factory, self.directory, self.on_disk = factory, directory, on_disk
        self.effective = factory
        self._wanted = 1 if on_disk and train_size(factory, train_vectors) == 0 else train_size(factory, train_vectors)
        self._shard_vectors = shard_vectors
        self._pending: list[np.ndarray] = []
        self._pending_count = 0
        self._index = None  # trained index (in-memory build) or trained empty template (on disk)
        self._shard = None
        self._shards: list[Path] = []
        self._base = None  # on-disk add: the previous version's index, whose lists are merged first
        self.ntotal = 0

    @classmethod
    def extend(cls, existing: Path, directory: Path, on_disk: bool, factory: str) -> DenseWriter:
        """A writer that continues an existing index (`ragspec index add`), never changing its files."""
        from ragspec.index.encoders import read_faiss

        writer = cls(factory, directory, on_disk)
        writer._wanted = 0
        if on_disk:
            import faiss

            writer._base = read_faiss(existing, mmap=True)
            writer._index = faiss.read_index(str(existing.parent / DENSE_TEMPLATE_FILE))
        else:
            writer._index = read_faiss(existing, mmap=False)
        writer.ntotal = writer._base.ntotal if on_disk else writer._index.ntotal
        return writer

    def add(self, vectors: np.ndarray) -> None:
        if self._index is None:
            self._pending.append(vectors)
            self._pending_count += len(vectors)
            if self._pending_count >= self._wanted:
                self._train()
            return
        self._add_trained(vectors)

    def _train(self) -> None:
        from ragspec.index.encoders import add_checked, empty_faiss

        sample = np.concatenate(self._pending)
        self._pending, self._pending_count = [], 0
        self._index, self.effective = empty_faiss(self.factory, sample)
        if self.on_disk:
            self._add_trained(sample)
        else:
            add_checked(self._index, sample, self.effective)
            self.ntotal = self._index.ntotal

    def _add_trained(self, vectors: np.ndarray) -> None:
        first, self.ntotal = self.ntotal, self.ntotal + len(vectors)
        if not self.on_disk:
            self._index.add(vectors)
            return
        import faiss

        if self._shard is None:  # a copy of the trained, empty index
            self._shard = faiss.deserialize_index(faiss.serialize_index(self._index))
        self._shard.add_with_ids(vectors, np.arange(first, self.ntotal, dtype=np.int64))  # row = chunk id
        if self._shard.ntotal >= self._shard_vectors:
            self._flush_shard()

    def _flush_shard(self) -> None:
        import faiss

        if self._shard is None or self._shard.ntotal == 0:
            return
        path = self.directory / f".shard-{len(self._shards):05d}.faiss"
        faiss.write_index(self._shard, str(path))
        self._shards.append(path)
        self._shard = None

    def finish(self, path: Path) -> str:
        """Write the index to `path` (and dense.ivfdata beside it when on disk); the effective factory."""
        import faiss

        if self._index is None and self._pending:
            self._train()
        if self._index is None:
            raise ValueError("no vectors were added")
        if not self.on_disk:
            faiss.write_index(self._index, str(path))
            return self.effective
        self._flush_shard()
        faiss.write_index(self._index, str(path.parent / DENSE_TEMPLATE_FILE))  # what `add` starts from
        with c_stdout_silenced():  # FAISS prints the file sizes it sets
            _merge_on_disk(self._index, self._base, self._shards, path.parent / DENSE_DATA_FILE)
        faiss.write_index(self._index, str(path))
        for shard in self._shards:
            shard.unlink()
        return self.effective


def _merge_on_disk(template, base, shards: list[Path], data_path: Path) -> None:
    """Merge the inverted lists of `base` (an existing on-disk index, or None) and the shard
    files into `data_path`, and make them the lists of `template` (which must be empty)."""
    import faiss

    kept = []  # the shard indexes must outlive the merge: their lists are memory-mapped views
    lists = faiss.InvertedListsPtrVector()
    for source in ([base] if base is not None else []) + [faiss.read_index(str(s), faiss.IO_FLAG_MMAP) for s in shards]:
        kept.append(source)
        lists.push_back(faiss.extract_index_ivf(source).invlists)
    ivf = faiss.extract_index_ivf(template)
    merged = faiss.OnDiskInvertedLists(ivf.nlist, ivf.code_size, str(data_path.resolve()))
    total = merged.merge_from_multiple(lists.data(), lists.size(), False, False) if lists.size() else 0
    ivf.replace_invlists(merged, True)
    merged.this.disown()
    template.ntotal = ivf.ntotal = total
    del kept
