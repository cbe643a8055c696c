"""The on-disk format of one index directory (see indexes/README.md); nothing is pickled.

    meta.sqlite   tables documents, chunks, manifest (key -> JSON value), via sqlite-utils
    dense.faiss   FAISS index; row i is chunk id i
    tokens.npy    int32 target-tokenizer ids of every chunk, SEPARATOR (-1) after each chunk
    suffix.npy    suffix array over tokens.npy
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from pathlib import Path

import numpy as np

from ragspec.errors import IndexCorrupt, IndexVersionMismatch

FORMAT_VERSION = 1
META_FILE = "meta.sqlite"
DENSE_FILE = "dense.faiss"
TOKENS_FILE = "tokens.npy"
SUFFIX_FILE = "suffix.npy"
CHECKSUMMED_FILES = (DENSE_FILE, TOKENS_FILE, SUFFIX_FILE)  # meta.sqlite: PRAGMA integrity_check
DENSE_DATA_FILE = "dense.ivfdata"  # only in indexes built with an on-disk IVF dense index
DENSE_TEMPLATE_FILE = "dense.trained.faiss"  # its trained, empty IVF index (quantizer only), for `add`
OPTIONAL_FILES = (DENSE_DATA_FILE, DENSE_TEMPLATE_FILE)  # checksummed too when present
# Learned state, not part of the build (so not checksummed): answers given through the index,
# written by engines with persist_state; `add` carries it over, a rebuild starts without it.
PAST_RESPONSES_FILE = "past_responses.npy"
REBUILD_HINT = "rebuild it with `ragspec index build`"


def sha256_file(path: Path, block: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def file_records(directory: Path) -> dict[str, dict]:
    """{file name: {"sha256", "bytes"}} of the checksummed index files."""
    present = CHECKSUMMED_FILES + tuple(name for name in OPTIONAL_FILES if (directory / name).is_file())
    return {
        name: {"sha256": sha256_file(directory / name), "bytes": (directory / name).stat().st_size}
        for name in present
    }


def create_tables(db) -> None:
    db["documents"].create(
        {"id": int, "source": str, "sha256": str, "num_chars": int, "num_tokens": int, "num_chunks": int},
        pk="id",
    )
    db["chunks"].create(
        {"id": int, "doc_id": int, "text": str, "char_start": int, "char_end": int,
         "token_start": int, "token_end": int},
        pk="id", foreign_keys=[("doc_id", "documents", "id")],
    )
    db["manifest"].create({"key": str, "value": str}, pk="key")
    db["chunks"].create_index(["doc_id"])
    db["documents"].create_index(["sha256"])


def write_manifest(db, manifest: dict) -> None:
    rows = [{"key": key, "value": json.dumps(value)} for key, value in manifest.items()]
    db["manifest"].upsert_all(rows, pk="key")


def connect(path: Path, writable: bool = False):
    """A sqlite-utils Database on meta.sqlite (read-only unless writable)."""
    import sqlite_utils

    if writable:
        return sqlite_utils.Database(path)
    connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False)
    return sqlite_utils.Database(connection)


def read_manifest(directory: Path) -> tuple[object, dict]:
    """Open meta.sqlite and return (db, manifest); IndexCorrupt / IndexVersionMismatch if bad."""
    path = directory / META_FILE
    if not path.is_file():
        raise IndexCorrupt(f"{path} is missing: the index is incomplete; {REBUILD_HINT}")
    try:
        db = connect(path)
        manifest = {row["key"]: json.loads(row["value"]) for row in db["manifest"].rows}
    except (sqlite3.Error, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise IndexCorrupt(f"{path} is damaged ({type(exc).__name__}: {exc}); {REBUILD_HINT}") from exc
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise IndexVersionMismatch(
            f"{directory} has index format version {version}; this ragspec reads version "
            f"{FORMAT_VERSION}: {REBUILD_HINT}"
        )
    return db, manifest


_COUNTS = ("num_documents", "num_chunks", "num_tokens", "vocab_size")


def check_manifest(directory: Path, manifest: dict) -> None:
    """The manifest keys readers rely on, with the right types; IndexCorrupt naming the first bad one."""
    def bad(what: str) -> IndexCorrupt:
        return IndexCorrupt(f"{directory / META_FILE}: the manifest {what}; {REBUILD_HINT}")

    for key in _COUNTS:
        value = manifest.get(key)
        if type(value) is not int or value < 0:
            raise bad(f"has {key} = {value!r}, not a count" if key in manifest else f"lacks {key}")
    if not isinstance(manifest.get("tokenizer_fingerprint"), str):
        raise bad("lacks tokenizer_fingerprint")
    files = manifest.get("files")
    if not isinstance(files, dict) or not set(CHECKSUMMED_FILES) <= set(files) <= {*CHECKSUMMED_FILES, *OPTIONAL_FILES}:
        raise bad(f"lists files {sorted(files) if isinstance(files, dict) else files!r}, not {list(CHECKSUMMED_FILES)}")
    for name, record in files.items():
        if not (isinstance(record, dict) and type(record.get("bytes")) is int and isinstance(record.get("sha256"), str)):
            raise bad(f"has no size and sha256 for {name}")


def check_token_ids(path: Path, tokens: np.ndarray, vocab_size: int) -> None:
    """Every datastore entry a token id of the vocabulary or the separator (-1)."""
    if len(tokens) and (int(tokens.min()) < -1 or int(tokens.max()) >= vocab_size):
        raise IndexCorrupt(
            f"{path} holds token ids outside [0, {vocab_size}) other than the separator -1 "
            f"(min {int(tokens.min())}, max {int(tokens.max())}); {REBUILD_HINT}"
        )


def check_files(directory: Path, manifest: dict, checksums: bool) -> None:
    """Every file present with its recorded size (and sha256 when `checksums`)."""
    for name, record in manifest.get("files", {}).items():
        path = directory / name
        if not path.is_file():
            raise IndexCorrupt(f"{path} is missing; {REBUILD_HINT}")
        size = path.stat().st_size
        if size != record["bytes"]:
            raise IndexCorrupt(
                f"{path} has {size} bytes, the manifest says {record['bytes']} (truncated?); {REBUILD_HINT}"
            )
        if checksums and sha256_file(path) != record["sha256"]:
            raise IndexCorrupt(f"{path} fails its sha256 checksum; {REBUILD_HINT}")


def check_sqlite(directory: Path, db) -> None:
    try:
        result = db.execute("PRAGMA integrity_check").fetchone()[0]
    except sqlite3.Error as exc:
        result = str(exc)
    if result != "ok":
        raise IndexCorrupt(f"{directory / META_FILE} fails its integrity check ({result}); {REBUILD_HINT}")


def load_array(path: Path, length: int, what: str) -> np.ndarray:
    """np.load with a memory map, checked against the manifest's length."""
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise IndexCorrupt(f"cannot read {path} ({exc}); {REBUILD_HINT}") from exc
    if array.dtype.kind not in "iu":
        raise IndexCorrupt(f"{path} holds {array.dtype} values, not integers; {REBUILD_HINT}")
    if array.ndim != 1 or len(array) != length:
        raise IndexCorrupt(f"{path} holds {array.shape} {what}, the manifest says {length}; {REBUILD_HINT}")
    return array
