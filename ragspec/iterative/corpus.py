"""The iterative-RAG corpus: real text on this machine, built once into a cached ragspec index.

Wikipedia-style passages come from the shared data (Spec-Bench rag passages, the NQ questions'
own neighbourhood), long documents from L-Eval and a Gutenberg book; the bulk (what makes exact
retrieval expensive) is the Python standard library's sources, then installed packages' sources,
until the corpus holds `target_chunks` chunks. Built with `nice -n 19` in the background:

    nice -n 19 python -m ragspec.iterative.corpus --chunks 500000 [--encoder minilm] [--overlap 48]

`--overlap` makes the passages sliding windows (64 tokens every 64 - overlap tokens, a separate
cached index): this machine holds ~15M tokens of real text, 236k disjoint passages, and a
retrieval corpus as large as the ones RaLMSpec targets (where exact search takes a large share
of the time) needs more passages than that text cuts into.

Encoders: `minilm` is the embedded all-MiniLM-L6-v2 (~9 chunks/s on this 2-core machine while
it is shared, so ~7 h for 240k chunks); `minilm-static` (the default) is the same model's
wordpiece embedding table, mean-pooled (sentence-transformers' StaticEmbedding, ~2000 chunks/s):
a weaker, mostly lexical retriever, but the same 384-dimensional vectors, so the FAISS search it
feeds, which is what RaLMSpec batches, costs exactly what MiniLM's would.

The index lives under `cache_dir()/iterative/` (never in the repository); a sub-corpus of the
first N chunks (for the crossover sweep) is a FAISS index over the first N stored vectors.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)

CORPUS_INDEX = "ralm-corpus"  # + "-" + encoder name
ENCODERS = ("minilm-static", "minilm")
CHUNK_TOKENS = 64  # short passages: cheap to embed and to re-prefill, as DPR's 100-word passages
CHARS_PER_TOKEN = 3.5  # measured (3.54) on Python sources under the SmolLM2 tokenizer


def corpus_home() -> Path:
    from ragspec.models import cache_dir

    return cache_dir() / "iterative"


def shared_passages(data_dir: Path) -> Iterator[tuple[str, str]]:
    """Spec-Bench rag passages (one per line before the question), L-Eval documents, the book."""
    spec = data_dir / "spec_bench" / "question.jsonl"
    if spec.is_file():
        for line in spec.read_text(encoding="utf-8").splitlines():
            record = json.loads(line)
            if record.get("category") == "rag":
                for number, passage in enumerate(record["turns"][0].split("\n")[:-1]):
                    if passage.strip():
                        yield f"spec_bench/{record['question_id']}/{number}", passage
    for path in sorted((data_dir / "longdoc").glob("*.jsonl")):
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
            yield f"longdoc/{path.stem}/{number}", json.loads(line)["input"]
    for path in sorted((data_dir / "corpus").glob("*.txt")):
        yield f"corpus/{path.name}", path.read_text(encoding="utf-8")


def python_sources(roots: list[Path]) -> Iterator[tuple[str, str]]:
    """Every readable .py file under the roots, in path order (sources and their docstrings)."""
    for root in roots:
        for path in sorted(root.rglob("*.py")):
            try:
                text = path.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue
            if text.strip():
                yield str(path), text


def default_roots() -> list[Path]:
    """This interpreter's standard library, the environment's installed packages, then the
    standard libraries of the other Python versions installed beside it (pyenv), newest first."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    purelib = Path(sysconfig.get_paths()["purelib"])
    roots = [stdlib] + ([purelib] if not purelib.is_relative_to(stdlib) else [])
    versions = stdlib.parent.parent.parent  # .../versions/3.11.7/lib/python3.11 -> .../versions
    others = sorted(versions.glob("*/lib/python3.*"), key=lambda p: int(p.name.split(".")[1]), reverse=True)
    return roots + [p for p in others if p.is_dir() and p.resolve() != stdlib.resolve()]


def collect_texts(data_dir: Path, target_chunks: int, roots: list[Path] | None = None) -> list[tuple[str, str]]:
    """Shared data first, then Python sources until ~target_chunks chunks of CHUNK_TOKENS."""
    budget_chars = target_chunks * CHUNK_TOKENS * CHARS_PER_TOKEN
    texts, total = [], 0
    seen: set[str] = set()
    for source, text in [*shared_passages(data_dir), *python_sources(roots or default_roots())]:
        if "site-packages" in source and "/.venv" not in source:
            continue  # a standard library's own site-packages (the environment's is its own root)
        if text in seen:
            continue
        seen.add(text)
        texts.append((source, text))
        total += len(text)
        if total >= budget_chars:
            break
    return texts


def corpus_name(encoder: str, overlap: int = 0) -> str:
    return f"{CORPUS_INDEX}-{encoder}" + (f"-overlap{overlap}" if overlap else "")


def encoder_path(encoder: str) -> str | None:
    """The embedder the index is built with: None (the embedded MiniLM) or a saved static model."""
    if encoder == "minilm":
        return None
    if encoder != "minilm-static":
        raise ValueError(f"encoder must be one of {', '.join(ENCODERS)}, got {encoder!r}")
    folder = corpus_home() / "encoders" / encoder
    if not (folder / "modules.json").is_file():
        from sentence_transformers import SentenceTransformer
        from sentence_transformers.sentence_transformer.modules import StaticEmbedding

        from ragspec.index.encoders import load_embedder

        minilm = load_embedder()
        table = minilm[0].auto_model.embeddings.word_embeddings.weight.detach().cpu().numpy()
        model = SentenceTransformer(modules=[StaticEmbedding(minilm.tokenizer, embedding_weights=table)], device="cpu")
        model.save(str(folder))
    return str(folder)


def build_corpus(data_dir: Path, target_chunks: int, encoder: str = "minilm-static", overlap: int = 0,
                 progress: bool = True):
    """Build (or rebuild) the cached corpus index; returns the opened Index."""
    from ragspec.index import build_index_from_texts

    if not 0 <= overlap < CHUNK_TOKENS:
        raise ValueError(f"overlap must be in [0, {CHUNK_TOKENS}), got {overlap}")
    texts = collect_texts(data_dir, target_chunks * (CHUNK_TOKENS - overlap) // CHUNK_TOKENS)
    log.info("corpus: %d texts, %.1f MB", len(texts), sum(len(t) for _, t in texts) / 1e6)
    index, stats = build_index_from_texts(texts, corpus_name(encoder, overlap), corpus_home(),
                                          embedder=encoder_path(encoder), chunk_tokens=CHUNK_TOKENS,
                                          overlap_tokens=overlap, progress=progress)
    log.info("built %s: %s", index.name, stats)
    return index


def open_corpus(encoder: str = "minilm-static", overlap: int = 0):
    """The cached corpus index; IndexNotFound (with the build command) when it is not built yet."""
    from ragspec.errors import IndexNotFound
    from ragspec.index import open_index

    try:
        return open_index(corpus_name(encoder, overlap), corpus_home())
    except IndexNotFound as exc:
        raise IndexNotFound(f"{exc}; build the iterative-RAG corpus first: nice -n 19 python -m "
                            f"ragspec.iterative.corpus --encoder {encoder} --overlap {overlap}") from exc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build the cached iterative-RAG corpus index.")
    parser.add_argument("--data", type=Path, default=Path("../shared/data"))
    parser.add_argument("--chunks", type=int, default=500_000, help="about this many chunks (>= 200k)")
    parser.add_argument("--encoder", choices=ENCODERS, default="minilm-static")
    parser.add_argument("--overlap", type=int, default=0, help=f"tokens shared by consecutive passages (< {CHUNK_TOKENS})")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    index = build_corpus(args.data, args.chunks, args.encoder, args.overlap)
    print(f"{index.path}: {index.num_chunks} chunks, {index.num_documents} documents", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
