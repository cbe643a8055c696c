"""`iterative_rag` workload: naive iterative RAG (`ralm-naive`) vs RaLMSpec (`ralmspec`).

Questions: the NQ-open dev questions that Spec-Bench's rag category asks (their Wikipedia
passages are in the corpus), in Spec-Bench order. Corpus: the cached index of
ragspec.iterative.corpus (>= 200k chunks of real text), searched whole or by its first N chunks
(`--sizes`, the crossover sweep), with the exact (`flat`) or the HNSW retriever.

    python -m ragspec.bench.iterative --limit 6 --max-new-tokens 48 --sizes 20000,60000,120000,all

The JSON report holds one row per (corpus size, method); `identical_outputs` compares every
ralmspec answer with ralm-naive's token for token.
"""

from __future__ import annotations

import json
import logging
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import click

from ragspec.iterative.generate import (
    IterativeConfig,
    IterativeResult,
    StrideRunner,
    generate_naive,
)
from ragspec.iterative.ralmspec import RalmSpecConfig, generate_ralmspec
from ragspec.iterative.retriever import RETRIEVERS
from ragspec.iterative.scheduler import StrideBounds

log = logging.getLogger("ragspec.bench")

WORKLOAD = "iterative_rag"
METHODS = ("ralm-naive", "ralmspec")


def nq_questions(data_dir: Path, limit: int | None) -> list[str]:
    """NQ-open dev questions that Spec-Bench rag asks (passages in the corpus), Spec-Bench order."""
    nq = {}
    for line in (data_dir / "nq_open" / "NQ-open.dev.jsonl").read_text(encoding="utf-8").splitlines():
        question = json.loads(line)["question"]
        nq[question.strip().lower().rstrip("?")] = question
    asked = []
    for line in (data_dir / "spec_bench" / "question.jsonl").read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        if row.get("category") == "rag":
            key = row["turns"][0].split("\n")[-1].strip().lower().rstrip("?")
            if key in nq:
                asked.append(nq[key])
    return asked[:limit] if limit else asked


@dataclass
class MethodRow:
    """One method over every question at one corpus size."""

    method: str
    corpus_chunks: int
    results: list[IterativeResult]
    identical: bool | None = None  # against ralm-naive; None for ralm-naive itself

    def summary(self, naive: MethodRow | None) -> dict:
        wall = sum(r.wall_s for r in self.results)
        tokens = sum(len(r.token_ids) for r in self.results)
        retrieval = sum(r.retrieval_s for r in self.results)
        row = {
            "method": self.method, "corpus_chunks": self.corpus_chunks, "questions": len(self.results),
            "tokens": tokens, "wall_s": round(wall, 3), "tokens_per_s": round(tokens / wall, 2) if wall else 0.0,
            "identical_outputs": self.identical, "retrieval_calls": sum(r.clock.calls for r in self.results),
            "retrieval_queries": sum(r.clock.queries for r in self.results),
            "rollbacks": sum(r.rollbacks for r in self.results),
            "retrieval_share": round(retrieval / wall, 3) if wall else 0.0,
            "retrieval_s": round(retrieval, 3), "embed_s": round(sum(r.clock.embed_s for r in self.results), 3),
            "search_s_per_call": round(statistics.mean(s for r in self.results for s in r.clock.per_call_s), 5),
            "background_search_s": round(sum(r.background_search_s for r in self.results), 3),
            "overlap_s": round(sum(r.overlap_s for r in self.results), 3),
            "prefills": sum(r.prefills for r in self.results),
            "mean_acceptance_length": round(statistics.mean(r.spec.mean_acceptance_length for r in self.results), 3),
        }
        if self.method == "ralmspec":
            speculated = sum(r.speculated for r in self.results)
            row["speculation_accuracy"] = round(sum(r.speculation_hits for r in self.results) / speculated, 3) \
                if speculated else None
            row["strides_per_verification"] = round(statistics.mean(
                s for r in self.results for s in r.stride_plan), 2) if any(r.stride_plan for r in self.results) else None
        if naive is not None and naive is not self:
            base = sum(r.wall_s for r in naive.results)
            row["speedup_vs_naive"] = round(base / wall, 3) if wall else None
            row["per_question_speedups"] = [round(n.wall_s / r.wall_s, 3) for n, r in zip(naive.results, self.results)]
        return row


def run_size(engine, index, kind: str, size: int | None, questions: list[str], config: IterativeConfig,
             spec: RalmSpecConfig, methods: tuple[str, ...]) -> list[dict]:
    """Every method over every question at one corpus size (one untimed warm-up question each)."""
    from ragspec.iterative.retriever import retriever_for_index

    retriever = retriever_for_index(index, kind, size)
    runner = StrideRunner(engine, retriever, config)
    run = {"ralm-naive": lambda q: generate_naive(runner, q), "ralmspec": lambda q: generate_ralmspec(runner, q, spec)}
    for method in methods:
        run[method](questions[0])  # warm-up: pages the vectors in, loads the encoder, profiles the budget
    rows = {}
    for method in methods:
        rows[method] = MethodRow(method, retriever.num_chunks, [run[method](q) for q in questions])
        log.info("%s %d chunks: %.1f s", method, retriever.num_chunks, sum(r.wall_s for r in rows[method].results))
    naive = rows.get("ralm-naive")
    for row in rows.values():
        if naive is not None and row is not naive:
            row.identical = all(a.token_ids == b.token_ids for a, b in zip(row.results, naive.results))
    return [row.summary(naive) for row in rows.values()]


def crossover(rows: list[dict]) -> dict:
    """Per corpus size: naive's retrieval share and ralmspec's speedup; the smallest size where
    ralmspec is faster than naive (speedup > 1)."""
    points = {}
    for row in rows:
        point = points.setdefault(row["corpus_chunks"], {})
        if row["method"] == "ralm-naive":
            point["naive_retrieval_share"] = row["retrieval_share"]
        else:
            point["ralmspec_speedup"] = row.get("speedup_vs_naive")
    faster = [size for size, p in sorted(points.items()) if (p.get("ralmspec_speedup") or 0) > 1.0]
    return {"points": points, "first_size_faster": faster[0] if faster else None}


def markdown(report: dict) -> str:
    header = ("| chunks | method | tok/s | wall s | speedup | identical | calls | rollbacks | retrieval share | "
              "search ms/call | spec. accuracy | strides/verify | overlap s |")
    lines = [header, "|" + "---|" * 13]
    for row in report["rows"]:
        lines.append(
            f"| {row['corpus_chunks']} | {row['method']} | {row['tokens_per_s']} | {row['wall_s']} | "
            f"{row.get('speedup_vs_naive', '—')} | {row['identical_outputs'] if row['identical_outputs'] is not None else '—'} | "
            f"{row['retrieval_calls']} | {row['rollbacks']} | {row['retrieval_share']} | "
            f"{row['search_s_per_call'] * 1000:.1f} | {row.get('speculation_accuracy', '—')} | "
            f"{row.get('strides_per_verification', '—')} | {row['overlap_s']} |")
    return "\n".join(lines) + "\n"


@click.command("iterative")
@click.option("--data-dir", default="../shared/data", show_default=True, type=click.Path(path_type=Path))
@click.option("--workload", default=WORKLOAD, type=click.Choice([WORKLOAD]), show_default=True)
@click.option("--methods", default=",".join(METHODS), show_default=True)
@click.option("--limit", type=click.IntRange(min=1), default=6, show_default=True, help="Questions.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=48, show_default=True)
@click.option("--stride", type=click.IntRange(min=1), default=4, show_default=True, help="Tokens per retrieval.")
@click.option("--retriever", "kind", type=click.Choice(RETRIEVERS), default="flat", show_default=True)
@click.option("--encoder", default="minilm-static", show_default=True, help="Corpus encoder (see ragspec.iterative.corpus).")
@click.option("--overlap", type=click.IntRange(min=0), default=0, show_default=True,
              help="The corpus of sliding-window passages built with this overlap (ragspec.iterative.corpus --overlap).")
@click.option("--sizes", default="all", show_default=True, help="Corpus sizes in chunks, comma-separated ('all': whole).")
@click.option("--strides", type=click.IntRange(min=1, max=16), default=3, show_default=True,
              help="Strides speculated per verification (the start, when OS3 is on).")
@click.option("--max-strides", type=click.IntRange(min=1, max=16), default=8, show_default=True)
@click.option("--no-adaptive", is_flag=True, help="Fixed --strides (no OS3).")
@click.option("--async/--no-async", "asynchronous", default=None,
              help="Verify on a background thread [default: only when the model runs on an accelerator].")
@click.option("--no-token-speculation", is_flag=True, help="Plain decoding within each stride.")
@click.option("--dtype", default="float32", show_default=True)
@click.option("--json", "json_path", default="bench-results/iterative_rag.json", show_default=True)
def iterative_command(data_dir, workload, methods, limit, max_new_tokens, stride, kind, encoder, overlap, sizes, strides,
                      max_strides, no_adaptive, asynchronous, no_token_speculation, dtype, json_path) -> None:
    """Benchmark RaLMSpec against naive iterative RAG on NQ-open questions over the cached corpus.

    Example: python -m ragspec.bench.iterative --limit 4 --sizes 20000,all --retriever flat
    """
    from ragspec.engine import Engine
    from ragspec.iterative.corpus import open_corpus

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    chosen = tuple(m.strip() for m in methods.split(",") if m.strip())
    if not chosen or any(m not in METHODS for m in chosen):
        raise click.BadParameter(f"methods are {', '.join(METHODS)}")
    index = open_corpus(encoder, overlap)
    questions = nq_questions(data_dir, limit)
    config = IterativeConfig(stride=stride, max_new_tokens=max_new_tokens, token_speculation=not no_token_speculation)
    spec = RalmSpecConfig(bounds=StrideBounds(initial=min(strides, max_strides), high=max_strides),
                          adaptive=not no_adaptive, asynchronous=asynchronous)
    engine = Engine(None, dtype=dtype, persist_state=False)
    rows = []
    for size in [None if s.strip() == "all" else int(s) for s in sizes.split(",")]:
        rows += run_size(engine, index, kind, size, questions, config, spec, chosen)
    report = {"workload": workload, "retriever": kind, "encoder": encoder, "passage_overlap": overlap,
              "questions": questions,
              "config": {"stride": stride, "max_new_tokens": max_new_tokens, "token_speculation": not no_token_speculation,
                         "strides": strides, "max_strides": max_strides, "adaptive": not no_adaptive,
                         "asynchronous": asynchronous, "dtype": dtype},
              "rows": rows, "crossover": crossover(rows), "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    path = Path(json_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2))
    path.with_suffix(".md").write_text(markdown(report))
    click.echo(markdown(report))
    click.echo(f"report: {path}")


if __name__ == "__main__":
    iterative_command()
