"""Open, search, list, verify and remove built indexes."""

from __future__ import annotations

import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from ragspec.errors import ConfigError, IndexCorrupt, IndexNotFound, TokenizerMismatch
from ragspec.index import store, versions
from ragspec.index.datastore import TokenDatastore

log = logging.getLogger(__name__)

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


@dataclass(frozen=True)
class RetrievedChunk:
    chunk_id: int
    doc_id: int
    source: str
    text: str
    score: float  # inner product of normalised embeddings (cosine); higher is closer
    token_start: int  # chunk tokens are datastore.tokens[token_start:token_end]
    token_end: int


@dataclass(frozen=True)
class BuildStats:
    seconds: float
    num_documents: int  # documents indexed by this build / add
    num_chunks: int
    num_tokens: int  # datastore tokens written by this build / add (separators included)
    tokens_per_s: float
    chunks_per_s: float
    bytes_per_token: float  # whole index directory size / datastore length
    skipped: tuple[tuple[str, str], ...] = ()  # (path, reason) of files not indexed
    peak_rss_bytes: int = 0  # getrusage peak RSS, this process + its largest child (an upper bound)
    peak_rss_self_bytes: int = 0  # this process alone (its whole life, so a library caller's too)


def index_home(home: str | os.PathLike | None = None) -> Path:
    """`home`, else $RAGSPEC_INDEX_HOME, else ./indexes."""
    if home is not None:
        return Path(home).expanduser()
    return Path(os.environ.get("RAGSPEC_INDEX_HOME") or Path.cwd() / "indexes")


def check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ConfigError(f"index name {name!r}: use letters, digits, '.', '_' or '-' (e.g. docs-v1)")
    return name


def resolve(name_or_path: str | os.PathLike, home: str | os.PathLike | None = None) -> Path:
    """The index folder: a name under the home, or a directory path; IndexNotFound if there is none."""
    text = str(name_or_path)
    if os.sep in text or text.startswith(".") or Path(text).is_absolute():
        path = Path(text).expanduser()
    else:
        path = index_home(home) / check_name(text)
    if not path.is_dir() or not versions.is_index_folder(path):
        raise _not_found(path, home)
    return path


def _not_found(path: Path, home) -> IndexNotFound:
    known = ", ".join(list_indexes(home)) or "none"
    hint = f"build it with `ragspec index build PATH --name {path.name}`"
    aside = sorted(path.parent.glob(f".old-{path.name}-*/{path.name}"))
    if aside:  # an older ragspec stopped between the two renames of its swap
        hint = f"an interrupted build of an older ragspec left it in {aside[0]}: move it back, or {hint}"
    return IndexNotFound(f"no index at {path} (indexes here: {known}): {hint}")


class Index:
    """A built index: dense retrieval over chunks plus the token datastore for drafting.

    `path` is the index folder (learned state such as past_responses.npy lives there); `files`
    the version directory holding the build's files, leased (kept from deletion by a rebuild)
    until `close()` or until the Index is garbage-collected.
    """

    def __init__(self, path: Path, db, manifest: dict, datastore: TokenDatastore, files: Path | None = None,
                 lease: versions.Lease | None = None) -> None:
        self.path = path
        self.files = files if files is not None else path
        self._lease = lease
        self._ids_checked = False
        self.manifest = manifest
        self.datastore = datastore
        self.build_stats: BuildStats | None = None
        self._db = db
        self._dense = None
        self.embedder_device: str | None = None

    def __repr__(self) -> str:
        return f"Index({str(self.path)!r}, chunks={self.num_chunks}, tokens={len(self.datastore)})"

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def num_chunks(self) -> int:
        return int(self.manifest["num_chunks"])

    @property
    def num_documents(self) -> int:
        return int(self.manifest["num_documents"])

    def check_tokenizer(self, fingerprint: str) -> None:
        """Refuse a model whose tokenizer differs from the one the datastore was built with."""
        built = self.manifest["tokenizer_fingerprint"]
        if fingerprint != built:
            raise TokenizerMismatch(
                f"index {self.name} was built with tokenizer {built} ({self.manifest.get('model_name')}) "
                f"but the model in use has tokenizer {fingerprint}: rebuild it with "
                f"`ragspec index build ... --name {self.name} --model <your model>`"
            )
        if not self._ids_checked:  # once per Index: the drafter feeds these ids to the model
            store.check_token_ids(self.files / store.TOKENS_FILE, self.datastore.tokens, self.manifest["vocab_size"])
            self._ids_checked = True

    @property
    def dense(self):
        if self._dense is None:
            from ragspec.index.encoders import on_gpu_if_available, read_faiss

            self._dense = on_gpu_if_available(read_faiss(self.files / store.DENSE_FILE))
        return self._dense

    def embedder(self):
        from ragspec.index.encoders import load_embedder

        return load_embedder(self.manifest.get("embedder_path"), self.embedder_device)

    def search(self, query: str, k: int = 5) -> list[RetrievedChunk]:
        """The k chunks closest to `query`, best first."""
        from ragspec.index.encoders import embed, tune_faiss

        if k <= 0 or self.num_chunks == 0:
            return []
        vector = embed(self.embedder(), [query])
        tune_faiss(self.dense, k)
        scores, ids = self.dense.search(vector, min(k, self.num_chunks))
        hits = [(int(i), float(s)) for i, s in zip(ids[0], scores[0]) if i >= 0]
        rows = self.chunks([i for i, _ in hits])
        return [
            RetrievedChunk(chunk_id=i, doc_id=rows[i]["doc_id"], source=rows[i]["source"], text=rows[i]["text"],
                           score=score, token_start=rows[i]["token_start"], token_end=rows[i]["token_end"])
            for i, score in hits if i in rows
        ]

    def chunks(self, ids: list[int]) -> dict[int, dict]:
        """Chunk rows (with their document's source) by chunk id."""
        if not ids:
            return {}
        marks = ",".join("?" * len(ids))
        cursor = self._db.execute(
            "select c.id, c.doc_id, c.text, c.token_start, c.token_end, c.char_start, c.char_end, d.source "
            f"from chunks c join documents d on d.id = c.doc_id where c.id in ({marks})",
            [int(i) for i in ids],
        )
        names = [column[0] for column in cursor.description]
        return {row[0]: dict(zip(names, row)) for row in cursor.fetchall()}

    def documents(self) -> list[dict]:
        return list(self._db["documents"].rows_where(order_by="id"))

    def close(self) -> None:
        self._db.conn.close()
        self._dense = None
        if self._lease is not None:
            self._lease.release()


def open_index(name_or_path: str | os.PathLike, home: str | os.PathLike | None = None, *,
               checksums: bool = False) -> Index:
    """Open an index by name (under the home) or directory, memory-mapping its arrays.

    Checks the format version, that every file is there with its recorded size, and the
    array lengths; `checksums=True` also hashes every file and checks that every token id is
    inside the vocabulary (what `ragspec index verify` does). The version opened stays whole
    while a rebuild publishes another one (see ragspec.index.versions).
    """
    folder = resolve(name_or_path, home)
    leased = versions.lease_current(folder)
    if leased is None:
        raise _not_found(folder, home)
    files, lease = leased
    try:
        return _open_files(folder, files, lease, checksums)
    except BaseException:
        lease.release()
        raise


def _open_files(folder: Path, files: Path, lease: versions.Lease, checksums: bool) -> Index:
    db, manifest = store.read_manifest(files)
    store.check_manifest(files, manifest)
    store.check_files(files, manifest, checksums)
    if checksums:
        store.check_sqlite(files, db)
    tokens = store.load_array(files / store.TOKENS_FILE, manifest["num_tokens"], "tokens")
    suffix = store.load_array(files / store.SUFFIX_FILE, manifest["num_tokens"], "suffix-array rows")
    if checksums:
        store.check_token_ids(files / store.TOKENS_FILE, tokens, manifest["vocab_size"])
    index = Index(folder, db, manifest, TokenDatastore(tokens=tokens, suffix_array=suffix), files, lease)
    if checksums and index.dense.ntotal != index.num_chunks:
        raise IndexCorrupt(
            f"{files / store.DENSE_FILE} holds {index.dense.ntotal} vectors for {index.num_chunks} chunks; "
            f"{store.REBUILD_HINT}"
        )
    return index


def verify_index(name_or_path: str | os.PathLike, home: str | os.PathLike | None = None) -> Index:
    """Open with every checksum checked; raises IndexCorrupt naming the first bad file."""
    return open_index(name_or_path, home, checksums=True)


def list_indexes(home: str | os.PathLike | None = None) -> list[str]:
    """Names of the index folders under the home (temporary and hidden folders excluded)."""
    root = index_home(home)
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir()
                  if p.is_dir() and not p.name.startswith(".") and versions.is_index_folder(p))


def remove_index(name: str, home: str | os.PathLike | None = None) -> Path:
    """Delete an index folder; returns its path. A folder that is a symbolic link: only the
    link is removed, never what it points to."""
    path = resolve(name, home)
    if path.is_symlink():
        path.unlink()
        return path
    with versions.writer_lock(path):  # not while a build publishes into it
        trash = path.with_name(f".trash-{path.name}-{os.getpid()}")
        os.replace(path, trash)
    shutil.rmtree(trash)
    return path
