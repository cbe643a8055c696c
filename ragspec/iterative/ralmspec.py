"""RaLMSpec: iterative RAG whose retrievals are speculated, verified in batches, rolled back on a miss.

Each stride's passage is guessed from a per-request cache (the chunks this request has fetched,
seeded with the first query's top-`prefetch`): the cached chunk whose stored vector is closest to
the query's. Generation goes on with the guess; after `s` strides (fixed, or OS3's choice) the
queries of those strides go to FAISS in ONE batched call (top-1 each, as naive retrieval asks). A
stride whose real top-1 differs from its guess is the rollback point: the answer is cut back to
where that stride began, generation resumes there on the real passage (from the segment that was
decoding just before it when the passage is the previous stride's one, else a re-prefill), and
every later speculation is dropped. The output is token for token naive iterative RAG's: every
stride of it is generated on the passage naive retrieval returns for the same query.

With `asynchronous`, a batch's FAISS call runs on a verifier thread while the next batch is
speculated (FAISS and torch release the GIL); its result is taken when that next batch is full
or the answer ends.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from ragspec.errors import ConfigError
from ragspec.iterative.generate import (
    IterativeResult,
    Segment,
    StrideRunner,
    finish,
    prompt_layout,
)
from ragspec.iterative.retriever import MAX_BATCH, Retriever
from ragspec.iterative.scheduler import StrideBounds, StrideScheduler


@dataclass(frozen=True)
class RalmSpecConfig:
    prefetch: int = 20  # top chunks of the first query put in the speculation cache
    bounds: StrideBounds = field(default_factory=StrideBounds)
    adaptive: bool = True  # OS3; False: always bounds.initial strides per verification
    # verify on a background thread while speculating on? None: only when the model runs on an
    # accelerator. On a CPU the background search and the decoding fight for the same cores
    # (measured over 973k chunks, 8 NQ questions, stride 1: 21.2 s asynchronous, 19.9 s not)
    asynchronous: bool | None = None
    # OS3's cost model: may a background verification count as free while its guesses hold (the
    # paper's asynchronous formula)? None: only when the model runs on an accelerator. On a CPU the
    # retrieval and the model share the cores and the memory bus (both stream hundreds of MB per
    # call), so the verification costs what it costs and OS3 uses the synchronous formula
    verification_hidden: bool | None = None

    def __post_init__(self) -> None:
        if self.prefetch < 1:
            raise ConfigError(f"prefetch must be >= 1, got {self.prefetch}")
        if self.bounds.high > MAX_BATCH:
            raise ConfigError(f"at most {MAX_BATCH} strides per verification, got {self.bounds.high}")


class SpeculationCache:
    """Chunks fetched by this request and their stored vectors; a query's guess is the closest one."""

    def __init__(self, retriever: Retriever):
        self.retriever = retriever
        self.ids: list[int] = []
        self._matrix = np.zeros((0, 0), dtype=np.float32)  # [cached, dim]

    def add(self, ids) -> None:
        new = [int(i) for i in dict.fromkeys(int(i) for i in np.ravel(ids)) if i >= 0 and int(i) not in self.ids]
        if new:
            vectors = self.retriever.vectors(new)
            self._matrix = vectors if not self.ids else np.concatenate([self._matrix, vectors])
            self.ids.extend(new)

    def guess(self, query_vector: np.ndarray) -> int:
        return self.ids[int(np.argmax(self._matrix @ query_vector))]


@dataclass
class Speculated:
    """One stride generated on a guessed passage, waiting for its verification."""

    start: int  # generated tokens before the stride
    query_vector: np.ndarray  # [dim]
    passage: int  # the guess
    before: Segment | None  # the segment decoding up to this stride (resumed if the guess was wrong
    #                         and the real passage is that segment's)


@dataclass
class _Batch:
    strides: list[Speculated]
    future: Future  # -> (scores [n, 1], ids [n, 1], seconds)


class _Speculation:
    """One question's RaLMSpec state: the answer so far, the current segment, unverified strides."""

    def __init__(self, runner: StrideRunner, question: str, config: RalmSpecConfig, cache: SpeculationCache,
                 pool: ThreadPoolExecutor | None):
        self.runner, self.question, self.config, self.cache, self.pool = runner, question, config, cache, pool
        self.layout = prompt_layout(runner.tokenizer, question, runner.config.template)
        self.result = IterativeResult([], "", [])
        hidden = config.verification_hidden
        if hidden is None:
            hidden = on_accelerator(runner)
        self.scheduler = StrideScheduler(config.bounds, config.adaptive, pool is not None and hidden)
        self.generated: list[int] = []
        self.done = False
        self.segment: Segment | None = None
        self.pending: list[Speculated] = []  # speculated, not yet sent to verification
        self.in_flight: _Batch | None = None
        self.batch_size = self.scheduler.strides()

    def run(self) -> IterativeResult:
        start = time.perf_counter()
        self.runner.start_request()
        first = self.runner.retriever.embed(self.runner.query(self.question, []), self.result.clock)
        self._prefetch(first)
        vector = first
        while True:
            if not self.done and len(self.pending) < self.batch_size:
                self._speculate(vector)
                vector = None
                continue
            if self._settle():  # verified up to the end of the answer
                break
        return finish(self.runner, self.result, self.generated, start)

    def _prefetch(self, vector: np.ndarray) -> None:
        _, ids, seconds = self.runner.retriever.search(vector[None], self.config.prefetch)
        self.result.clock.search_s += seconds
        self._count_call(seconds, 1)
        self.cache.add(ids)

    def _speculate(self, vector: np.ndarray | None) -> None:
        """Generate one stride on the cache's guess."""
        began = time.perf_counter()
        if vector is None:
            vector = self.runner.retriever.embed(self.runner.query(self.question, self.generated), self.result.clock)
        guess = self.cache.guess(vector)
        self.pending.append(Speculated(len(self.generated), vector, guess, self.segment))
        self.result.speculated += 1
        self._advance(guess)
        self.scheduler.observe_stride(time.perf_counter() - began)

    def _advance(self, passage: int, resume: Segment | None = None) -> None:
        """Decode one stride on `passage`: continue the current segment when it reads that passage,
        else `resume` (a parked segment at this very position) or a new segment (re-prefill)."""
        if self.segment is None or self.segment.passage != passage or self.segment.position != len(self.generated):
            if resume is not None and resume.passage == passage and resume.position == len(self.generated):
                self.segment = resume
                self.result.resumes += 1
            else:
                self.segment = self.runner.segment(self.layout, passage, self.generated, self.result)
        self.result.passages.append(passage)
        new = self.segment.take(self.runner.stride_tokens(self.generated))
        self.generated, self.done = self.runner.append(self.generated, new)
        self.done = self.done or self.segment.exhausted

    def _settle(self) -> bool:
        """Send the pending batch for verification, taking the one in flight first. True when the
        answer is complete and every stride of it verified."""
        if self.in_flight is not None:
            batch, self.in_flight = self.in_flight, None
            waited = time.perf_counter()
            scores_ids_seconds = batch.future.result()
            self.result.wait_s += time.perf_counter() - waited
            self.result.background_search_s += scores_ids_seconds[2]
            if not self._check(batch.strides, scores_ids_seconds[1], scores_ids_seconds[2]):
                return False  # rolled back: the pending strides were dropped
        if not self.pending:
            return self.done
        batch, self.pending = self.pending, []
        self.batch_size = self.scheduler.strides()
        self.result.stride_plan.append(len(batch))
        vectors = np.stack([s.query_vector for s in batch])
        if self.pool is not None and not self.done:
            self.in_flight = _Batch(batch, self.pool.submit(self.runner.retriever.search, vectors, 1))
            return False
        _, ids, seconds = self.runner.retriever.search(vectors, 1)
        self.result.clock.search_s += seconds
        return self._check(batch, ids, seconds) and self.done

    def _check(self, batch: list[Speculated], ids: np.ndarray, seconds: float) -> bool:
        """Compare guesses with the real top-1s; on a miss roll back. True when all were right."""
        self._count_call(seconds, len(batch))
        real = [int(i) for i in ids[:, 0]]
        self.cache.add(real)
        miss = next((n for n, (s, r) in enumerate(zip(batch, real)) if s.passage != r), None)
        hits = [True] * len(batch) if miss is None else [True] * miss + [False]
        self.scheduler.observe_verification(seconds, hits)
        self.result.speculation_hits += sum(hits)
        if miss is None:
            return True
        self._roll_back(batch[miss], real[miss])
        return False

    def _roll_back(self, stride: Speculated, passage: int) -> None:
        """Cut the answer back to where `stride` began, drop every later speculation, and generate
        that stride again on the real passage (verified, so not pending)."""
        self.result.rollbacks += 1
        del self.result.passages[stride.start // self.runner.config.stride:]  # strides start on boundaries
        self.generated, self.done = self.generated[: stride.start], False
        self.pending, self.in_flight = [], None
        if self.segment is not stride.before:
            self.segment = None
        self._advance(passage, resume=stride.before)

    def _count_call(self, seconds: float, queries: int) -> None:
        clock = self.result.clock
        clock.calls += 1
        clock.queries += queries
        clock.per_call_s.append(seconds)


def on_accelerator(runner: StrideRunner) -> bool:
    return str(getattr(runner.engine.target, "device", "cpu")).split(":")[0] != "cpu"


def generate_ralmspec(runner: StrideRunner, question: str, config: RalmSpecConfig = RalmSpecConfig(),
                      cache: SpeculationCache | None = None) -> IterativeResult:
    """RaLMSpec generation of one answer; `cache` replaces the per-request speculation cache (a
    fresh SpeculationCache over the runner's retriever)."""
    cache = cache if cache is not None else SpeculationCache(runner.retriever)
    asynchronous = config.asynchronous if config.asynchronous is not None else on_accelerator(runner)
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ralmspec-verify") if asynchronous else None
    try:
        return _Speculation(runner, question, config, cache, pool).run()
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
