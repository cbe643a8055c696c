"""Build an index, or add documents to one, atomically.

Every build writes a new version into a temporary directory inside the index folder and
publishes it by flipping the folder's CURRENT pointer (ragspec.index.versions), so an
interrupted build (Ctrl-C, SIGKILL, a full disk) leaves the previous index as it was, and a
reader sees the old version or the new one, whole. `add` embeds and tokenizes only documents not indexed yet, appends their vectors and
tokens, and rebuilds the suffix array (seconds for millions of tokens).
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from ragspec.errors import ConfigError, EmptyCorpus
from ragspec.index import store, versions
from ragspec.index.corpus import Chunk, Corpus, Document, check_chunking, chunk_document, read_corpus
from ragspec.index.datastore import SEPARATOR, build_suffix_array
from ragspec.index.encoders import (
    create_faiss, embed, load_embedder, load_tokenizer, read_faiss, resolve_embedder, tokenizer_fingerprint,
)
from ragspec.index.index import BuildStats, Index, check_name, index_home, open_index

log = logging.getLogger(__name__)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _chunk_all(documents: list[Document], tokenizer, chunk_tokens: int, overlap_tokens: int,
               progress: bool) -> list[Chunk]:
    from tqdm.auto import tqdm

    chunks: list[Chunk] = []
    for number, document in enumerate(tqdm(documents, desc="tokenizing", unit="doc", disable=not progress)):
        chunks.extend(chunk_document(number, document.text, tokenizer, chunk_tokens, overlap_tokens))
    return chunks


def _token_layout(chunks: list[Chunk], offset: int) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Chunk tokens each followed by SEPARATOR, and each chunk's [start, end) from `offset`."""
    sizes = np.array([len(c.token_ids) for c in chunks], dtype=np.int64)
    ends = offset + np.cumsum(sizes + 1) - 1
    starts = ends - sizes
    tokens = np.full(int((sizes + 1).sum()), SEPARATOR, dtype=np.int32)
    for chunk, start in zip(chunks, starts - offset):
        tokens[start:start + len(chunk.token_ids)] = chunk.token_ids
    return tokens, list(zip(starts.tolist(), ends.tolist()))


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


def _write_arrays(tmp: Path, tokens: np.ndarray, dense, progress: bool) -> None:
    import faiss
    from tqdm.auto import tqdm

    np.save(tmp / store.TOKENS_FILE, tokens)
    faiss.write_index(dense, str(tmp / store.DENSE_FILE))
    with tqdm(total=len(tokens), desc="suffix array", unit="tok", unit_scale=True, disable=not progress) as bar:
        np.save(tmp / store.SUFFIX_FILE, build_suffix_array(tokens))
        bar.update(len(tokens))


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
    tmp, lease = versions.start_build(folder)
    try:
        yield tmp
        versions.publish(folder, tmp, lease, keep)
    finally:
        lease.release()
        shutil.rmtree(tmp, ignore_errors=True)


def _stats(started: float, files: Path, documents: int, chunks: int, tokens: int, corpus: Corpus,
           total_tokens: int) -> BuildStats:
    seconds = max(time.perf_counter() - started, 1e-9)
    size = sum(p.stat().st_size for p in files.iterdir() if p.is_file())
    return BuildStats(seconds, documents, chunks, tokens, tokens / seconds, chunks / seconds,
                      size / max(total_tokens, 1), tuple(corpus.skipped))


def _no_text(corpus: Corpus, where: str) -> EmptyCorpus:
    skipped = f"; skipped {len(corpus.skipped)} file(s), e.g. {corpus.skipped[0][0]}: {corpus.skipped[0][1]}" \
        if corpus.skipped else ""
    return EmptyCorpus(f"no text to index in {where}{skipped}: give .txt, .md, .rst, .html or .jsonl files")


def _manifest(model_name: str, tokenizer, embedder_name: str, embedder_path: str | None, dim: int,
              faiss_factory: str, effective: str, chunk_tokens: int, overlap_tokens: int) -> dict:
    return {
        "format_version": store.FORMAT_VERSION, "created_at": _now(),
        "model_name": str(Path(model_name).resolve()) if Path(model_name).exists() else str(model_name),
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer), "vocab_size": len(tokenizer),
        "embedder_name": embedder_name, "embedder_path": embedder_path, "embedding_dim": int(dim),
        "faiss_factory": faiss_factory, "faiss_factory_effective": effective, "metric": "inner_product",
        "chunk_tokens": chunk_tokens, "overlap_tokens": overlap_tokens, "separator": SEPARATOR,
    }


def _build_corpus(corpus: Corpus, name: str, home, tokenizer, model_name: str, embedder: str | None,
                  faiss_factory: str, chunk_tokens: int, overlap_tokens: int, progress: bool,
                  where: str) -> Index:
    started = time.perf_counter()
    check_name(name)
    check_chunking(chunk_tokens, overlap_tokens)
    if not corpus.documents:
        raise _no_text(corpus, where)
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(model_name)
    chunks = _chunk_all(corpus.documents, tokenizer, chunk_tokens, overlap_tokens, progress)
    if not chunks:
        raise _no_text(corpus, where)
    embedder_name, embedder_path = resolve_embedder(embedder)
    vectors = embed(load_embedder(embedder_path), [c.text for c in chunks], progress)
    dense, effective = create_faiss(faiss_factory, vectors)
    tokens, spans = _token_layout(chunks, 0)
    root = index_home(home)
    _check_target(root / name)
    with _new_version(root / name) as tmp:
        db = store.connect(tmp / store.META_FILE, writable=True)
        store.create_tables(db)
        _insert_rows(db, corpus.documents, chunks, spans, 0, 0)
        _write_arrays(tmp, tokens, dense, progress)
        manifest = _manifest(model_name, tokenizer, embedder_name, embedder_path, vectors.shape[1],
                             faiss_factory, effective, chunk_tokens, overlap_tokens)
        manifest.update(num_documents=len(corpus.documents), num_chunks=len(chunks), num_tokens=len(tokens))
        _finish(tmp, db, manifest)
    index = open_index(name, root)
    index.build_stats = _stats(started, index.files, len(corpus.documents), len(chunks), len(tokens), corpus,
                               len(tokens))
    log.info("built index %s: %s", name, index.build_stats)
    return index


def build_index(paths: list[Path], name: str, *, home=None, tokenizer=None,
                model_name: str = "smollm2-135m-instruct", embedder: str | None = None,
                faiss_factory: str = "Flat", chunk_tokens: int = 256, overlap_tokens: int = 32,
                progress: bool = True) -> Index:
    """Build index `name` from files/directories; replaces an existing one only when complete.

    `tokenizer`: the target model's HF tokenizer (None: load the one of `model_name`, which is
    the embedded model's name or an HF dir / .gguf path). `index.build_stats` holds timings.
    """
    corpus = read_corpus([Path(p) for p in paths], progress)
    where = ", ".join(str(p) for p in paths)
    return _build_corpus(corpus, name, home, tokenizer, model_name, embedder, faiss_factory,
                         chunk_tokens, overlap_tokens, progress, where)


def build_index_from_texts(texts: list[tuple[str, str]], name: str, home=None, *, tokenizer=None,
                           model_name: str = "smollm2-135m-instruct", embedder: str | None = None,
                           faiss_factory: str = "Flat", chunk_tokens: int = 256, overlap_tokens: int = 32,
                           progress: bool = False) -> tuple[Index, BuildStats]:
    """Build from in-memory (source label, text) pairs (benchmarks); returns (index, stats)."""
    corpus = Corpus(documents=[Document(source, text) for source, text in texts if text.strip()])
    index = _build_corpus(corpus, name, home, tokenizer, model_name, embedder, faiss_factory,
                          chunk_tokens, overlap_tokens, progress, f"{len(texts)} texts")
    return index, index.build_stats


def _new_documents(index: Index, corpus: Corpus) -> list[Document]:
    known = {row["sha256"] for row in index.documents()}
    fresh: list[Document] = []
    for document in corpus.documents:
        if document.sha256 in known:
            log.info("%s is already indexed (same text); not adding it again", document.source)
        else:
            known.add(document.sha256)
            fresh.append(document)
    return fresh


def add_to_index(name: str, paths: list[Path], home=None, tokenizer=None, progress: bool = True) -> Index:
    """Add the documents under `paths` that the index does not hold yet (by text sha256)."""
    started = time.perf_counter()
    index = open_index(name, home)
    corpus = read_corpus([Path(p) for p in paths], progress)
    if not corpus.documents:
        raise _no_text(corpus, ", ".join(str(p) for p in paths))
    manifest = dict(index.manifest)
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(manifest["model_name"])
    index.check_tokenizer(tokenizer_fingerprint(tokenizer))
    documents = _new_documents(index, corpus)
    chunks = _chunk_all(documents, tokenizer, manifest["chunk_tokens"], manifest["overlap_tokens"], progress)
    if not chunks:
        index.build_stats = _stats(started, index.files, 0, 0, 0, corpus, len(index.datastore))
        return index
    vectors = embed(load_embedder(manifest["embedder_path"]), [c.text for c in chunks], progress)
    dense = read_faiss(index.files / store.DENSE_FILE, mmap=False)
    dense.add(vectors)
    new_tokens, spans = _token_layout(chunks, len(index.datastore))
    tokens = np.concatenate([np.asarray(index.datastore.tokens), new_tokens])
    with _new_version(index.path, keep=(store.PAST_RESPONSES_FILE,)) as tmp:
        shutil.copy2(index.files / store.META_FILE, tmp / store.META_FILE)
        db = store.connect(tmp / store.META_FILE, writable=True)
        _insert_rows(db, documents, chunks, spans, index.num_documents, index.num_chunks)
        _write_arrays(tmp, tokens, dense, progress)
        manifest.update(num_documents=index.num_documents + len(documents),
                        num_chunks=index.num_chunks + len(chunks), num_tokens=len(tokens))
        _finish(tmp, db, manifest)
        index.close()
    updated = open_index(index.path)
    updated.build_stats = _stats(started, updated.files, len(documents), len(chunks), len(new_tokens), corpus,
                                 len(tokens))
    return updated
