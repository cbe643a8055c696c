"""ragspec demo: three things people ask a small model for, each answered twice, with plain
decoding and with speculative decoding, on the same loaded model.

  RAG answer        a Spec-Bench RAG question over an index of its Wikipedia passages
  summary           a Spec-Bench news article to summarise (summaries quote their source)
  multi-turn edit   an MT-Redundant conversation: turn 2 rewrites turn 1's answer, with turn 1's
                    KV cache reused (the prefix cache is on, as a chat user has it)

Run with `make demo`. The index is built with the embedded all-MiniLM-L6-v2 embedder and the
embedded SmolLM2-135M-Instruct tokenizer, and reused from ./indexes/demo. The first run also
dequantises the model (~20 s) and profiles its verify-latency curve (~10 s); both are cached.
Times are whole requests (prefill included); the prefill share says how much of plain decoding's
time the prompt took, so long answers keep the figure about decoding.
"""

from __future__ import annotations

import argparse
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

from ragspec import Engine
from ragspec.bench.runner import prepare_messages
from ragspec.bench.workloads import load_workload
from ragspec.engine import Generation
from ragspec.errors import IndexNotFound, RagspecError
from ragspec.index import build_index_from_texts, open_index

INDEX_NAME = "demo"


@dataclass
class UseCase:
    """One use case's requests, timed plain and speculative."""

    name: str
    plain: list[Generation] = field(default_factory=list)
    spec: list[Generation] = field(default_factory=list)

    def tokens_per_s(self, runs: list[Generation]) -> float:
        return sum(len(r.token_ids) for r in runs) / sum(r.stats.total_s for r in runs)

    @property
    def speedup(self) -> float:
        return self.tokens_per_s(self.spec) / self.tokens_per_s(self.plain)

    @property
    def mean_acceptance_length(self) -> float:
        tokens = sum(r.stats.num_accepted_tokens + r.stats.num_steps for r in self.spec)
        return tokens / sum(r.stats.num_steps for r in self.spec)

    @property
    def prefill_share(self) -> float:
        return sum(r.stats.prefill_s for r in self.plain) / sum(r.stats.total_s for r in self.plain)

    @property
    def identical(self) -> int:
        return sum(p.token_ids == s.token_ids for p, s in zip(self.plain, self.spec))


def demo_index(engine: Engine, data_dir: Path, home: Path):
    """The demo index over the passages of Spec-Bench's RAG questions (built once)."""
    try:
        return open_index(INDEX_NAME, home=home)
    except IndexNotFound:
        corpus = load_workload("rag:spec_bench", data_dir, limit=None).rag.corpus
        print(f"building index '{INDEX_NAME}' from {len(corpus)} passages ...", flush=True)
        index, stats = build_index_from_texts(list(corpus), INDEX_NAME, home, tokenizer=engine.tokenizer,
                                              model_name=engine.target.name, chunk_tokens=128, overlap_tokens=16)
        print(f"  {stats.num_tokens} tokens, {stats.num_chunks} chunks in {stats.seconds:.1f} s\n")
        return index


def run_both(engine: Engine, case: UseCase, messages, history: list | None = None, **options) -> None:
    """Plain, then speculative. Each run starts with only `history` in the prefix cache."""
    for speculative, runs in ((False, case.plain), (True, case.spec)):
        engine.forget_prefix()
        if history:
            engine.cache_prefix(history)
        runs.append(engine.generate(messages, speculative=speculative, **options))
    plain, spec = case.plain[-1], case.spec[-1]
    print(textwrap.indent(textwrap.fill(spec.text[:300].replace("\n", " "), 96), "   "))
    print(f"   plain {plain.stats.tokens_per_s:5.1f} tok/s | ragspec {spec.stats.tokens_per_s:5.1f} tok/s "
          f"({spec.stats.tokens_per_s / plain.stats.tokens_per_s:.2f}x) | mean acceptance length "
          f"{spec.stats.mean_acceptance_length:.2f} | {agreement(plain.token_ids, spec.token_ids)}\n", flush=True)


def agreement(plain: list[int], spec: list[int]) -> str:
    if plain == spec:
        return "identical to plain"
    first = next((i for i, (a, b) in enumerate(zip(plain, spec)) if a != b), min(len(plain), len(spec)))
    return f"same as plain up to token {first}"


def print_summary(cases: list[UseCase], dtype: str) -> None:
    print(f"{'use case':<18}{'plain tok/s':>12}{'ragspec tok/s':>15}{'speedup':>9}"
          f"{'mean acc. len':>15}{'prefill share':>15}  outputs")
    for case in cases:
        print(f"{case.name:<18}{case.tokens_per_s(case.plain):>12.1f}{case.tokens_per_s(case.spec):>15.1f}"
              f"{case.speedup:>8.2f}x{case.mean_acceptance_length:>15.2f}{case.prefill_share:>14.0%}  "
              f"{case.identical}/{len(case.plain)} identical")
    everything = UseCase("overall", [r for c in cases for r in c.plain], [r for c in cases for r in c.spec])
    print(f"{'overall':<18}{everything.tokens_per_s(everything.plain):>12.1f}"
          f"{everything.tokens_per_s(everything.spec):>15.1f}{everything.speedup:>8.2f}x"
          f"{everything.mean_acceptance_length:>15.2f}")
    if dtype != "torch.float32" and everything.identical < len(everything.plain):
        print("(bf16: a tree forward and a one-token forward round differently, so a near-tie can flip "
              "a token and the two answers part there; in float32 the outputs are identical)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=Path("../shared/data"))
    parser.add_argument("--home", type=Path, default=Path("indexes"))
    parser.add_argument("--questions", type=int, default=2, help="requests per use case")
    parser.add_argument("--max-new-tokens", type=int, default=192)
    parser.add_argument("--dtype", default=None, help="float32 or bfloat16 (default: the engine's choice)")
    args = parser.parse_args()
    try:
        run(args)
    except RagspecError as exc:
        raise SystemExit(f"Error: {exc}") from None


def run(args: argparse.Namespace) -> None:
    print("loading the embedded model ...", flush=True)
    # Learned drafter state stays in memory: a rerun must not draft these answers from the last run.
    engine = Engine(index_home=args.home, persist_state=False, dtype=args.dtype)
    engine.budget()  # profile the verify-latency curve now, not inside the first timing
    print(f"model {engine.target.name} on {engine.target.device}, {engine.target.dtype}\n")
    index = demo_index(engine, args.data_dir, args.home)
    options = dict(max_new_tokens=args.max_new_tokens)
    cases = [UseCase("RAG answer"), UseCase("summary"), UseCase("multi-turn edit")]

    for request in load_workload("rag:spec_bench", args.data_dir, args.questions).requests:
        question = request.user_turns[0]
        print(f"[RAG answer] {question}")
        run_both(engine, cases[0], question, index=index, k=5, **options)
    for request in load_workload("spec_bench:summarization", args.data_dir, args.questions).requests:
        article = request.user_turns[0]
        print(f"[summary] {textwrap.shorten(article, 90)}")
        run_both(engine, cases[1], [{"role": "user", "content": article}], **options)
    for request in load_workload("mt_redundant", args.data_dir, args.questions).requests:
        messages = prepare_messages(engine, request, args.max_new_tokens)  # turn 1 answered, untimed
        print(f"[multi-turn edit] {textwrap.shorten(request.user_turns[0], 60)} -> {request.user_turns[-1][:60]}")
        run_both(engine, cases[2], messages, history=messages[:-1], **options)
    print_summary(cases, str(engine.target.dtype))


if __name__ == "__main__":
    main()
