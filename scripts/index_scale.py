"""Build a >=10M-token index from real text on this machine and measure it (issue 14 item 4).

Text: the shared data (Spec-Bench rag passages, L-Eval documents, the Gutenberg book), then the
Python standard library's and installed packages' sources (as ragspec.iterative.corpus), read
lazily until about --tokens target tokens. Encoder: `minilm-static` (all-MiniLM-L6-v2's
wordpiece table, mean-pooled; ~2000 chunks/s) because full MiniLM embeds ~10 chunks/s on 2
shared cores (~4 h for 10M tokens). The build streams (ragspec.index.build), so its peak memory
is what this script reports; the index goes to a cache folder, never the repository.

    python scripts/index_scale.py --out /tmp/index_scale.json   # also writes /tmp/index_scale.md

Reports build time, peak RSS (getrusage, this process + its largest child, sampled right after
the build), tokens, chunks, dense query latency (encoder + FAISS + chunk rows, k=5, NQ-open
questions; FAISS alone separately) and datastore lookup latency (DatastoreDrafter.propose over
contexts cut from Spec-Bench prompts, whole-index scope), p50 / p99.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

CHARS_PER_TOKEN = 3.5  # measured on Python sources under the SmolLM2 tokenizer (ragspec.iterative.corpus)


def iter_texts(data_dir: Path, target_tokens: int) -> Iterator[tuple[str, str]]:
    """(source, text) pairs, read one at a time, until about target_tokens tokens of text."""
    from ragspec.iterative.corpus import default_roots, python_sources, shared_passages

    budget, total, seen = target_tokens * CHARS_PER_TOKEN, 0, set()
    for source, text in _chain(shared_passages(data_dir), python_sources(default_roots())):
        if "site-packages" in source and "/.venv" not in source:
            continue  # another Python's own site-packages
        digest = hashlib.blake2b(text.encode(), digest_size=16).digest()
        if digest in seen:
            continue
        seen.add(digest)
        yield source, text
        total += len(text)
        if total >= budget:
            return


def _chain(*iterators):
    for iterator in iterators:
        yield from iterator


def percentiles(seconds: list[float]) -> dict:
    values = np.asarray(seconds) * 1000
    return {"p50_ms": round(float(np.percentile(values, 50)), 3), "p99_ms": round(float(np.percentile(values, 99)), 3),
            "mean_ms": round(float(values.mean()), 3), "n": len(values)}


def nq_questions(data_dir: Path, count: int) -> list[str]:
    lines = (data_dir / "nq_open" / "NQ-open.dev.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line)["question"] for line in lines[:count]]


def lookup_contexts(data_dir: Path, tokenizer, count: int, seed: int = 0) -> list[np.ndarray]:
    """Contexts ending at random points of Spec-Bench prompts (every category), <= 512 tokens."""
    rng = np.random.default_rng(seed)
    prompts = [json.loads(line)["turns"][0] for line in
               (data_dir / "spec_bench" / "question.jsonl").read_text(encoding="utf-8").splitlines()]
    encoded = [np.asarray(tokenizer(p, add_special_tokens=False)["input_ids"], dtype=np.int64) for p in prompts]
    encoded = [e for e in encoded if len(e) >= 4]
    contexts = []
    for _ in range(count):
        ids = encoded[rng.integers(len(encoded))]
        end = int(rng.integers(2, len(ids) + 1))
        contexts.append(ids[max(0, end - 512):end])
    return contexts


def measure_dense(index, questions: list[str], k: int) -> dict:
    from ragspec.index.encoders import embed, tune_faiss

    index.search(questions[0], k)  # load the embedder and FAISS index
    whole, faiss_only = [], []
    for question in questions:
        started = time.perf_counter()
        index.search(question, k)
        whole.append(time.perf_counter() - started)
    vectors = embed(index.embedder(), questions)
    tune_faiss(index.dense, k)
    for row in range(len(vectors)):
        started = time.perf_counter()
        index.dense.search(vectors[row:row + 1], k)
        faiss_only.append(time.perf_counter() - started)
    return {"search": percentiles(whole), "faiss_only": percentiles(faiss_only)}


def measure_lookup(index, contexts: list[np.ndarray]) -> dict:
    from ragspec.drafting.base import DraftContext
    from ragspec.drafting.datastore import DatastoreDrafter

    started = time.perf_counter()
    index.datastore.prepare()
    prepare_s = time.perf_counter() - started
    drafter = DatastoreDrafter(index.datastore)
    times, drafted = [], 0
    for tokens in contexts:
        started = time.perf_counter()
        tree = drafter.propose(DraftContext(tokens=tokens, max_nodes=64))
        times.append(time.perf_counter() - started)
        drafted += int(len(tree.token_ids) > 0)
    return {"propose": percentiles(times), "contexts_with_a_draft": drafted, "prepare_s": round(prepare_s, 3)}


def markdown(result: dict) -> str:
    build, dense, lookup = result["build"], result["dense_query"], result["datastore_lookup"]
    return "\n".join([
        f"# Index scale: {build['num_tokens']:,} tokens, {build['num_chunks']:,} chunks",
        "",
        f"Command: `{result['command']}`",
        f"Machine: {result['machine']}",
        "",
        "| measure | value | target |",
        "|---|---|---|",
        f"| build time | {build['seconds']:.0f} s | |",
        f"| build peak RSS (self + largest child) | {build['peak_rss_bytes'] / 2**30:.2f} GiB | < 4 GB |",
        (f"| dense query p50 / p99 (embed + {result['faiss']} + rows, k={result['k']}) | "
         f"{dense['search']['p50_ms']:.2f} / {dense['search']['p99_ms']:.2f} ms | p50 < 20 ms |"),
        f"| FAISS search alone p50 / p99 | {dense['faiss_only']['p50_ms']:.2f} / {dense['faiss_only']['p99_ms']:.2f} ms | |",
        (f"| datastore lookup p50 / p99 (DatastoreDrafter.propose) | {lookup['propose']['p50_ms']:.3f} / "
         f"{lookup['propose']['p99_ms']:.3f} ms | p50 < 1 ms |"),
        f"| contexts with a draft | {lookup['contexts_with_a_draft']} / {lookup['propose']['n']} | |",
        f"| datastore key preparation (once per open) | {lookup['prepare_s']:.2f} s | |",
        f"| index size on disk | {result['index_bytes'] / 2**30:.2f} GiB | |",
        "",
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON result path (Markdown beside it, .md)")
    parser.add_argument("--tokens", type=int, default=12_000_000,
                        help="stop reading text at about this many tokens (3.5 chars each; prose has more)")
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    parser.add_argument("--home", type=Path, default=None, help="index home (default: cache_dir()/index-scale)")
    parser.add_argument("--faiss", default="IVF1024,Flat", help="FAISS factory (default IVF1024,Flat, nprobe 16)")
    parser.add_argument("--on-disk", action=argparse.BooleanOptionalAction, default=True,
                        help="IVF inverted lists on disk, memory-mapped (default: on)")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--contexts", type=int, default=1000)
    parser.add_argument("--reuse", action="store_true", help="measure the index already built there")
    args = parser.parse_args(argv)

    from ragspec.index import build_index_from_texts, open_index
    from ragspec.index.encoders import load_tokenizer
    from ragspec.iterative.corpus import CHUNK_TOKENS, encoder_path
    from ragspec.models import cache_dir

    home = args.home or cache_dir() / "index-scale"
    tokenizer = load_tokenizer()
    if args.reuse:
        index = open_index("scale", home)
        build = dict(index.manifest.get("last_build", {}), num_tokens=len(index.datastore),
                     num_chunks=index.num_chunks, num_documents=index.num_documents, reused=True)
    else:
        index, stats = build_index_from_texts(
            iter_texts(args.data, args.tokens), "scale", home, tokenizer=tokenizer,
            embedder=encoder_path("minilm-static"), faiss_factory=args.faiss, on_disk=args.on_disk,
            chunk_tokens=CHUNK_TOKENS, overlap_tokens=0, progress=sys.stderr.isatty(),
        )
        build = {"seconds": round(stats.seconds, 1), "peak_rss_bytes": stats.peak_rss_bytes,
                 "peak_rss_self_bytes": stats.peak_rss_self_bytes, "num_tokens": stats.num_tokens,
                 "num_chunks": stats.num_chunks, "num_documents": stats.num_documents}
    print(f"built: {build}", file=sys.stderr, flush=True)
    k = 5
    result = {
        "command": " ".join(["python", *sys.argv]), "machine": _machine(), "index": str(index.files),
        "faiss": index.manifest["faiss_factory_effective"] + (" on disk" if index.manifest.get("dense_on_disk") else ""),
        "k": k, "build": build,
        "index_bytes": sum(p.stat().st_size for p in index.files.iterdir() if p.is_file()),
        "dense_query": measure_dense(index, nq_questions(args.data, args.queries), k),
        "dense_type": type(index.dense).__name__,
        "datastore_lookup": measure_lookup(index, lookup_contexts(args.data, tokenizer, args.contexts)),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    return 0


def _machine() -> str:
    import os
    import platform

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load {load:.1f} at the end"


if __name__ == "__main__":
    sys.exit(main())
