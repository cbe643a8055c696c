"""Build an index, or add documents to one, atomically.

Every build writes a new version into a temporary directory inside the index folder and
publishes it by flipping the folder's CURRENT pointer (ragspec.index.versions), so an
interrupted build (Ctrl-C, SIGKILL, a full disk) leaves the previous index as it was, and a
reader sees the old version or the new one, whole. `add` embeds and tokenizes only documents
not indexed yet, appends their vectors and tokens, and rebuilds the suffix array (seconds for
millions of tokens). Both stream (ragspec.index.stream): memory is bounded by a batch of
chunks, not by the corpus, except for the suffix array construction and a memory-resident
dense index.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from ragspec.errors import ConfigError, EmptyCorpus
from ragspec.index import store, versions
from ragspec.index.corpus import (
    Chunk,
    Corpus,
    Document,
    check_chunking,
    chunk_document,
    iter_documents,
)
from ragspec.index.datastore import SEPARATOR, build_suffix_array
from ragspec.index.encoders import (
    embed,
    load_embedder,
    load_tokenizer,
    resolve_embedder,
    tokenizer_fingerprint,
)
from ragspec.index.index import BuildStats, Index, check_name, index_home, open_index
from ragspec.index.stream import DenseWriter, TokenWriter, peak_memory

log = logging.getLogger(__name__)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


BATCH_TOKENS = 1 << 16  # target tokens cut, embedded and written per batch: what bounds a build's memory


@dataclass
class _Batch:
    documents: list[Document]
    chunks: list[Chunk]  # chunk.doc_index: position in `documents`


def _batches(documents: Iterator[Document], tokenizer, chunk_tokens: int, overlap_tokens: int,
             batch_tokens: int = BATCH_TOKENS) -> Iterator[_Batch]:
    """Documents cut into chunks, grouped into batches of about `batch_tokens` chunk tokens (a
    batch holds its documents whole: one document larger than that is one batch)."""
    batch, size = _Batch([], []), 0
    for document in documents:
        chunks = chunk_document(len(batch.documents), document.text, tokenizer, chunk_tokens, overlap_tokens)
        batch.chunks.extend(chunks)
        batch.documents.append(document)
        size += sum(len(c.token_ids) for c in chunks)
        if size >= batch_tokens:
            yield batch
            batch, size = _Batch([], []), 0
    if batch.documents:
        yield batch


def _token_layout(chunks: list[Chunk], offset: int) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Chunk tokens each followed by SEPARATOR, and each chunk's [start, end) from `offset`."""
    sizes = np.array([len(c.token_ids) for c in chunks], dtype=np.int64)
    ends = offset + np.cumsum(sizes + 1) - 1
    starts = ends - sizes
    tokens = np.full(int((sizes + 1).sum()), SEPARATOR, dtype=np.int32)
    for chunk, start in zip(chunks, starts - offset):
        tokens[start:start + len(chunk.token_ids)] = chunk.token_ids
    return tokens, list(zip(starts.tolist(), ends.tolist()))


@dataclass
class _Written:
    documents: int = 0
    chunks: int = 0
    tokens: int = 0
    dim: int = 0  # embedding dimension


def _write_batches(batches: Iterator[_Batch], db, tokens: TokenWriter, dense: DenseWriter, embedder,
                   first_doc: int, first_chunk: int, progress: bool) -> _Written:
    """Embed and write each batch: rows into SQLite, tokens appended to disk, vectors to FAISS."""
    from tqdm.auto import tqdm

    written = _Written()
    with tqdm(desc="indexing", unit="chunk", disable=not progress) as bar:
        for batch in batches:
            if not batch.chunks:
                continue
            vectors = embed(embedder, [c.text for c in batch.chunks])
            layout, spans = _token_layout(batch.chunks, tokens.length)
            _insert_rows(db, batch.documents, batch.chunks, spans, first_doc + written.documents,
                         first_chunk + written.chunks)
            tokens.append(layout)
            dense.add(vectors)
            written.documents += len(batch.documents)
            written.chunks += len(batch.chunks)
            written.tokens += len(layout)
            written.dim = vectors.shape[1]
            bar.update(len(batch.chunks))
    return written


def _insert_rows(db, documents: list[Document], chunks: list[Chunk], spans: list[tuple[int, int]],
                 first_doc: int, first_chunk: int) -> None:
    per_doc = np.bincount([c.doc_index for c in chunks], minlength=len(documents))
    tokens_per_doc = np.bincount([c.doc_index for c in chunks], weights=[len(c.token_ids) for c in chunks],
                                 minlength=len(documents))
    db["documents"].insert_all(
        {"id": first_doc + i, "source": d.source, "sha256": d.sha256, "num_chars": len(d.text),
         "num_tokens": int(tokens_per_doc[i]), "num_chunks": int(per_doc[i])}
        for i, d in enumerate(documents)
    )
    db["chunks"].insert_all(
        ({"id": first_chunk + i, "doc_id": first_doc + c.doc_index, "text": c.text, "char_start": c.char_start,
          "char_end": c.char_end, "token_start": start, "token_end": end}
         for i, (c, (start, end)) in enumerate(zip(chunks, spans))),
        batch_size=1000,
    )


def _write_arrays(tmp: Path, tokens: TokenWriter, dense: DenseWriter, progress: bool) -> str:
    """Close tokens.npy, write the dense index and the suffix array; the effective FAISS factory."""
    from tqdm.auto import tqdm

    tokens.close()
    effective = dense.finish(tmp / store.DENSE_FILE)
    with tqdm(total=tokens.length, desc="suffix array", unit="tok", unit_scale=True, disable=not progress) as bar:
        np.save(tmp / store.SUFFIX_FILE, build_suffix_array(tmp / store.TOKENS_FILE))
        bar.update(tokens.length)
    return effective


def _finish(tmp: Path, db, manifest: dict) -> None:
    manifest["files"] = store.file_records(tmp)
    manifest["updated_at"] = _now()
    store.write_manifest(db, manifest)
    db.conn.close()


def _check_target(folder: Path) -> None:
    """Never build into (and so never garbage-collect in) a folder that holds something else."""
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"{folder} exists and is not an index folder: choose another --name or --home")
    if folder.is_dir() and not versions.is_index_folder(folder):
        foreign = [p.name for p in folder.iterdir() if p.name != versions.LOCK and not p.name.startswith(".tmp-")]
        if foreign:
            raise ConfigError(f"{folder} exists and is not an index (it holds {foreign[0]}, ...): "
                              "choose another --name or --home")


@contextlib.contextmanager
def _new_version(folder: Path, keep: tuple[str, ...] = ()):
    """Yield a private build directory; publish it as the index's version if the block succeeds."""
    existed = folder.exists()
    tmp, lease = versions.start_build(folder)
    try:
        yield tmp
        versions.publish(folder, tmp, lease, keep)
    finally:
        lease.release()
        shutil.rmtree(tmp, ignore_errors=True)
        if not existed:  # a failed first build leaves no empty index folder behind
            with contextlib.suppress(OSError):
                folder.rmdir()


def _stats(started: float, files: Path, written: _Written, corpus: Corpus, total_tokens: int) -> BuildStats:
    seconds = max(time.perf_counter() - started, 1e-9)
    size = sum(p.stat().st_size for p in files.iterdir() if p.is_file())
    peak = peak_memory()
    return BuildStats(seconds, written.documents, written.chunks, written.tokens, written.tokens / seconds,
                      written.chunks / seconds, size / max(total_tokens, 1), tuple(corpus.skipped),
                      peak.total_bytes, peak.self_bytes)


def _no_text(corpus: Corpus, where: str) -> EmptyCorpus:
    skipped = f"; skipped {len(corpus.skipped)} file(s), e.g. {corpus.skipped[0][0]}: {corpus.skipped[0][1]}" \
        if corpus.skipped else ""
    return EmptyCorpus(f"no text to index in {where}{skipped}: give .txt, .md, .rst, .html or .jsonl files")


def _manifest(model_name: str, tokenizer, embedder_name: str, embedder_path: str | None, dim: int,
              faiss_factory: str, effective: str, chunk_tokens: int, overlap_tokens: int,
              on_disk: bool = False) -> dict:
    return {
        "format_version": store.FORMAT_VERSION, "created_at": _now(),
        "model_name": str(Path(model_name).resolve()) if Path(model_name).exists() else str(model_name),
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer), "vocab_size": len(tokenizer),
        "embedder_name": embedder_name, "embedder_path": embedder_path, "embedding_dim": int(dim),
        "faiss_factory": faiss_factory, "faiss_factory_effective": effective, "metric": "inner_product",
        "dense_on_disk": on_disk, "chunk_tokens": chunk_tokens, "overlap_tokens": overlap_tokens,
        "separator": SEPARATOR,
    }


def _last_build(started: float) -> dict:
    """Build time and peak memory so far, kept in the manifest (before its own write)."""
    peak = peak_memory()
    return {"seconds": round(time.perf_counter() - started, 3), "peak_rss_bytes": peak.total_bytes,
            "peak_rss_self_bytes": peak.self_bytes}


def _build_stream(documents: Iterator[Document], corpus: Corpus, name: str, home, tokenizer, model_name: str,
                  embedder: str | None, faiss_factory: str, chunk_tokens: int, overlap_tokens: int,
                  progress: bool, where: str, on_disk: bool = False) -> Index:
    started = time.perf_counter()
    check_name(name)
    check_chunking(chunk_tokens, overlap_tokens)
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(model_name)
    embedder_name, embedder_path = resolve_embedder(embedder)
    model = load_embedder(embedder_path)
    root = index_home(home)
    _check_target(root / name)
    with _new_version(root / name) as tmp:
        db = store.connect(tmp / store.META_FILE, writable=True)
        store.create_tables(db)
        tokens = TokenWriter(tmp / store.TOKENS_FILE)
        dense = DenseWriter(faiss_factory, tmp, on_disk)
        written = _write_batches(_batches(documents, tokenizer, chunk_tokens, overlap_tokens), db, tokens, dense,
                                 model, 0, 0, progress)
        if written.chunks == 0:
            db.conn.close()
            raise _no_text(corpus, where)
        effective = _write_arrays(tmp, tokens, dense, progress)
        manifest = _manifest(model_name, tokenizer, embedder_name, embedder_path, written.dim, faiss_factory,
                             effective, chunk_tokens, overlap_tokens, on_disk)
        manifest.update(num_documents=written.documents, num_chunks=written.chunks, num_tokens=written.tokens,
                        last_build=_last_build(started))
        _finish(tmp, db, manifest)
    index = open_index(name, root)
    index.build_stats = _stats(started, index.files, written, corpus, written.tokens)
    log.info("built index %s: %s", name, index.build_stats)
    return index


def build_index(paths: list[Path], name: str, *, home=None, tokenizer=None,
                model_name: str = "smollm2-135m-instruct", embedder: str | None = None,
                faiss_factory: str = "Flat", chunk_tokens: int = 256, overlap_tokens: int = 32,
                progress: bool = True, on_disk: bool = False) -> Index:
    """Build index `name` from files/directories; replaces an existing one only when complete.

    Streams: files are read one at a time (JSONL line by line) and cut, embedded and written in
    batches of BATCH_TOKENS tokens, so memory does not grow with the corpus beyond the suffix
    array construction (8 bytes/token) and a memory-resident dense index (see
    ragspec.index.stream). `on_disk=True` (an IVF `faiss_factory`) keeps the dense index's
    inverted lists on disk. `tokenizer`: the target model's HF tokenizer (None: load the one of
    `model_name`, the embedded model's name or an HF dir / .gguf path). `index.build_stats`
    holds timings and peak memory.
    """
    corpus = Corpus()
    documents = iter_documents([Path(p) for p in paths], corpus, progress)
    where = ", ".join(str(p) for p in paths)
    return _build_stream(documents, corpus, name, home, tokenizer, model_name, embedder, faiss_factory,
                         chunk_tokens, overlap_tokens, progress, where, on_disk)


def build_index_from_texts(texts: Iterable[tuple[str, str]], name: str, home=None, *, tokenizer=None,
                           model_name: str = "smollm2-135m-instruct", embedder: str | None = None,
                           faiss_factory: str = "Flat", chunk_tokens: int = 256, overlap_tokens: int = 32,
                           progress: bool = False, on_disk: bool = False) -> tuple[Index, BuildStats]:
    """Build from (source label, text) pairs, a list or any iterator (streamed); returns (index, stats)."""
    documents = (Document(source, text) for source, text in texts if text.strip())
    index = _build_stream(documents, Corpus(), name, home, tokenizer, model_name, embedder, faiss_factory,
                          chunk_tokens, overlap_tokens, progress, "the texts given", on_disk)
    return index, index.build_stats


def _only_new(documents: Iterator[Document], db) -> Iterator[Document]:
    """Documents whose text (sha256) the index being written does not hold yet.

    Asks meta.sqlite (indexed on sha256), which holds the old documents and every batch
    written so far, plus the batch being cut now: no in-memory set of every hash."""
    def last_id():
        return db.execute("select max(id) from documents").fetchone()[0]

    pending: set[str] = set()
    written = last_id()
    for document in documents:
        if last_id() != written:  # a batch was written: its hashes are in SQLite now
            pending, written = set(), last_id()
        digest = document.sha256
        if digest in pending or db.execute("select 1 from documents where sha256 = ? limit 1", [digest]).fetchone():
            log.info("%s is already indexed (same text); not adding it again", document.source)
            continue
        pending.add(digest)
        yield document


class _NothingNew(Exception):
    """Every document is indexed already: no new version is published."""


def add_to_index(name: str, paths: list[Path], home=None, tokenizer=None, progress: bool = True) -> Index:
    """Add the documents under `paths` that the index does not hold yet (by text sha256), streamed
    as `build_index` does; the previous version's files are read, never changed."""
    started = time.perf_counter()
    index = open_index(name, home)
    corpus = Corpus()
    documents = iter_documents([Path(p) for p in paths], corpus, progress)
    manifest = dict(index.manifest)
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(manifest["model_name"])
    index.check_tokenizer(tokenizer_fingerprint(tokenizer))
    model = load_embedder(manifest["embedder_path"])
    on_disk = bool(manifest.get("dense_on_disk", False))
    try:
        with _new_version(index.path, keep=(store.PAST_RESPONSES_FILE,)) as tmp:
            shutil.copy2(index.files / store.META_FILE, tmp / store.META_FILE)
            db = store.connect(tmp / store.META_FILE, writable=True)
            tokens = TokenWriter(tmp / store.TOKENS_FILE)
            tokens.copy_from(index.files / store.TOKENS_FILE)
            dense = DenseWriter.extend(index.files / store.DENSE_FILE, tmp, on_disk, manifest["faiss_factory"])
            fresh = _only_new(documents, db)
            written = _write_batches(_batches(fresh, tokenizer, manifest["chunk_tokens"], manifest["overlap_tokens"]),
                                     db, tokens, dense, model, index.num_documents, index.num_chunks, progress)
            if written.chunks == 0:
                db.conn.close()
                raise _NothingNew
            _write_arrays(tmp, tokens, dense, progress)
            manifest.update(num_documents=index.num_documents + written.documents,
                            num_chunks=index.num_chunks + written.chunks, num_tokens=tokens.length,
                            last_build=_last_build(started))
            _finish(tmp, db, manifest)
            index.close()
    except _NothingNew:
        if corpus.seen == 0:
            raise _no_text(corpus, ", ".join(str(p) for p in paths)) from None
        index.build_stats = _stats(started, index.files, _Written(), corpus, len(index.datastore))
        return index
    updated = open_index(index.path)
    updated.build_stats = _stats(started, updated.files, written, corpus, len(updated.datastore))
    return updated
