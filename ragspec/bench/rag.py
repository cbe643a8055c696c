"""RAG workloads: build the workload's index once, retrieve each prompt, and report the index's costs.

Every method sees the prompt `build_rag_prompt(index, question, k)` makes; `ragspec` on a workload
whose datastore scope is "index" runs in a fresh engine with `SpecConfig(datastore_scope="index")`.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ragspec.bench.peers import (
    SPECULATIVE_METHOD, EngineMethod, Method, MethodOutput, PreparedRequest, RagContext, fresh_engine,
)
from ragspec.bench.workloads import RagSetup, Request, Workload
from ragspec.engine import Engine
from ragspec.engine.rag import build_rag_prompt
from ragspec.index import BuildStats, Index, build_index_from_texts
from ragspec.index.encoders import load_embedder
from ragspec.types import SpecStats

log = logging.getLogger(__name__)


@dataclass
class RagRun:
    """One RAG workload's index, and the retrieval latencies measured while preparing its prompts."""

    workload: Workload
    setup: RagSetup
    engine: Engine
    index: Index
    build: BuildStats
    retrieval_s: list[float] = field(default_factory=list)

    @classmethod
    def build_index(cls, workload: Workload, engine: Engine, home: str | Path) -> "RagRun":
        if workload.rag is None:
            raise ValueError(f"{workload.name} is not a RAG workload")
        name = re.sub(r"[^A-Za-z0-9._-]", "-", workload.name)
        log.info("%s: indexing %d documents", workload.name, len(workload.rag.corpus))
        load_embedder()  # loaded once per process, untimed, so the build throughput is the build's own
        index, stats = build_index_from_texts(
            list(workload.rag.corpus), name, home, tokenizer=engine.tokenizer, model_name=engine.target.name,
        )
        index.search(workload.requests[0].user_turns[-1], k=workload.rag.k)  # untimed: loads the dense index
        return cls(workload, workload.rag, engine, index, stats)

    def prepare(self, request: Request) -> PreparedRequest:
        """The RAG prompt of `request` (its question), with the search timed on its own."""
        question, k = request.user_turns[-1], self.setup.k
        start = time.perf_counter()
        self.index.search(question, k=k)
        self.retrieval_s.append(time.perf_counter() - start)
        rag = build_rag_prompt(self.index, question, k)
        prompt_ids = self.engine.encode(rag.messages)
        again = build_rag_prompt(self.index, question, k)  # what the engine's index= path will build
        if self.engine.encode(again.messages) != prompt_ids:
            raise AssertionError(f"retrieval is not deterministic for {question!r}: the methods' prompts would differ")
        context = RagContext(question, self.index, k, tuple(c.chunk_id for c in rag.chunks))
        return PreparedRequest(request.request_id, rag.messages, prompt_ids, context)

    def methods(self, methods: Sequence[Method]) -> list[Method]:
        """`methods`, with `ragspec` moved to an engine of the workload's datastore scope if it differs."""
        scope = self.setup.datastore_scope
        if self.engine.spec.datastore_scope == scope:
            return list(methods)
        return [EngineMethod(m.name, fresh_engine(m.engine, dataclasses.replace(m.engine.spec, datastore_scope=scope)),
                             True, m.sampling) if m.name in (SPECULATIVE_METHOD, "ragspec-llamacpp") else m
                for m in methods]

    def summary(self, outputs: dict[str, list[MethodOutput]]) -> dict:
        """The workload entry's "index" and "drafting" sections."""
        spec = [out.stats for out in outputs.get(SPECULATIVE_METHOD, []) if out.stats is not None]
        return {"index": self._index_summary(), "drafting": drafting_summary(spec)}

    def _index_summary(self) -> dict:
        build = self.build
        return {
            "num_documents": build.num_documents, "num_chunks": build.num_chunks, "num_tokens": build.num_tokens,
            "build_s": build.seconds, "build_tokens_per_s": build.tokens_per_s,
            "build_chunks_per_s": build.chunks_per_s, "bytes_per_token": build.bytes_per_token,
            "k": self.setup.k, "datastore_scope": self.setup.datastore_scope,
            "retrieval_p50_ms": percentile_ms(self.retrieval_s, 50),
            "retrieval_p99_ms": percentile_ms(self.retrieval_s, 99),
        }

    def close(self) -> None:
        self.index.close()


def drafting_summary(stats: Sequence[SpecStats]) -> dict:
    """Per drafter over all steps of all requests: draft latency p50/p99, tokens drafted and accepted."""
    latencies: dict[str, list[float]] = {}
    accepted: dict[str, int] = {}
    drafted: dict[str, int] = {}
    for s in stats:
        for source, values in s.draft_latencies_s.items():
            latencies.setdefault(source, []).extend(values)
        for source, count in s.accepted_per_source.items():
            accepted[source] = accepted.get(source, 0) + count
        for source, count in s.drafted_per_source.items():
            drafted[source] = drafted.get(source, 0) + count
    return {
        "draft_latency_p50_ms": {k: percentile_ms(v, 50) for k, v in latencies.items()},
        "draft_latency_p99_ms": {k: percentile_ms(v, 99) for k, v in latencies.items()},
        "accepted_per_source": accepted,
        "drafted_per_source": drafted,
        "acceptance_rate_per_source": {k: accepted.get(k, 0) / n for k, n in drafted.items() if n},
    }


def percentile_ms(seconds: Sequence[float], q: float) -> float | None:
    return 1000 * float(np.percentile(seconds, q)) if len(seconds) else None
