"""ragspec demo: build a RAG index, answer questions with speculative decoding, compare with
plain decoding of the same model.

Run with `make demo`. The index is built from the Spec-Bench RAG passages (Wikipedia) with the
embedded all-MiniLM-L6-v2 embedder and the embedded SmolLM2-135M-Instruct tokenizer. The first
run also dequantises the model (~20 s) and profiles its verify-latency curve (~10 s); both are
cached, and the index is reused from ./indexes/demo.
"""

from __future__ import annotations

import argparse
import json
import textwrap
from pathlib import Path

from ragspec import Engine
from ragspec.bench.workloads import split_spec_bench_rag
from ragspec.errors import IndexNotFound
from ragspec.index import build_index_from_texts, open_index

INDEX_NAME = "demo"


def rag_questions(data_dir: Path) -> tuple[list[str], list[str]]:
    """(all passages, questions) of Spec-Bench's rag category."""
    path = data_dir / "spec_bench" / "question.jsonl"
    if not path.is_file():
        raise SystemExit(f"Error: {path} not found: pass --data-dir pointing at the shared data folder")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    passages, questions = [], []
    for row in rows:
        if row["category"] == "rag":
            row_passages, question = split_spec_bench_rag(row["turns"][0])
            passages += row_passages
            questions.append(question)
    return list(dict.fromkeys(passages)), questions


def demo_index(engine: Engine, passages: list[str], home: Path):
    try:
        return open_index(INDEX_NAME, home=home)
    except IndexNotFound:
        print(f"building index '{INDEX_NAME}' from {len(passages)} passages ...", flush=True)
        texts = [(f"passage-{i}", text) for i, text in enumerate(passages)]
        index, stats = build_index_from_texts(texts, INDEX_NAME, home, tokenizer=engine.tokenizer,
                                              model_name=engine.target.name, chunk_tokens=128, overlap_tokens=16)
        print(f"  {stats.num_tokens} tokens, {stats.num_chunks} chunks in {stats.seconds:.1f} s\n")
        return index


def agreement(plain: list[int], spec: list[int]) -> str:
    if plain == spec:
        return "identical to plain"
    first = next((i for i, (a, b) in enumerate(zip(plain, spec)) if a != b), min(len(plain), len(spec)))
    return f"same as plain up to token {first}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=Path("../shared/data"))
    parser.add_argument("--home", type=Path, default=Path("indexes"))
    parser.add_argument("--questions", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    args = parser.parse_args()

    print("loading the embedded model ...", flush=True)
    # Learned drafter state stays in memory: a rerun must not draft these answers from the last run.
    # No prefix cache: both runs of a question prefill the whole prompt, as a new question would.
    engine = Engine(index_home=args.home, persist_state=False, prefix_cache=False)
    engine.budget()  # profile the verify-latency curve now, not inside the first timing
    print(f"model {engine.target.name} on {engine.target.device}, {engine.target.dtype}\n")
    passages, questions = rag_questions(args.data_dir)
    index = demo_index(engine, passages, args.home)
    plain_s = spec_s = plain_tokens = spec_tokens = 0
    for question in questions[: args.questions]:
        plain = engine.generate(question, index=index, k=5, max_new_tokens=args.max_new_tokens, speculative=False)
        spec = engine.generate(question, index=index, k=5, max_new_tokens=args.max_new_tokens)
        plain_s, spec_s = plain_s + plain.stats.total_s, spec_s + spec.stats.total_s
        plain_tokens, spec_tokens = plain_tokens + len(plain.token_ids), spec_tokens + len(spec.token_ids)
        print(f"Q: {question}")
        print(textwrap.indent(textwrap.fill(spec.text[:400], 96), "   "))
        print(f"   plain {plain.stats.tokens_per_s:5.1f} tok/s | ragspec {spec.stats.tokens_per_s:5.1f} tok/s | "
              f"mean acceptance length {spec.stats.mean_acceptance_length:.2f} | "
              f"accepted per source {spec.stats.accepted_per_source} | "
              f"{agreement(plain.token_ids, spec.token_ids)}\n")
    print(f"overall: plain {plain_tokens / plain_s:.1f} tok/s, ragspec {spec_tokens / spec_s:.1f} tok/s, "
          f"speedup {(spec_tokens / spec_s) / (plain_tokens / plain_s):.2f}x")
    if str(engine.target.dtype) != "torch.float32":
        print("(bf16: a tree forward and a one-token forward round differently, so a near-tie can "
              "flip a token; in float32 the outputs are identical)")


if __name__ == "__main__":
    main()
