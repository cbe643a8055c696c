"""Iterative RAG: RaLMSpec (speculated, batch-verified retrievals) equals naive iterative RAG token
for token, through rollbacks, asynchronous verification and token-level speculation."""

from __future__ import annotations

import time

import numpy as np
import pytest
from conftest import FLAT_CURVE, book_paragraphs, spec_bench_questions

from ragspec import Engine
from ragspec.errors import ConfigError
from ragspec.index import build_index_from_texts
from ragspec.iterative.generate import IterativeConfig, StrideRunner, generate_naive
from ragspec.iterative.ralmspec import (
    RalmSpecConfig,
    SpeculationCache,
    generate_ralmspec,
)
from ragspec.iterative.retriever import ExactFlat, Retriever, retriever_for_index
from ragspec.iterative.scheduler import StrideBounds, StrideScheduler, optimal_strides

QUESTIONS = ("who does elizabeth marry", "what did mrs bennet want for her daughters")


@pytest.fixture(scope="module")
def book_retriever(tmp_path_factory) -> Retriever:
    texts = [(f"p{i}", text) for i, text in enumerate(book_paragraphs(60))]
    index, _ = build_index_from_texts(texts, "book", tmp_path_factory.mktemp("indexes"), chunk_tokens=32,
                                      overlap_tokens=0)
    return retriever_for_index(index, "flat")


@pytest.fixture(scope="module")
def tiny_iterative_engine(tiny_llama) -> Engine:
    return Engine(tiny_llama, latency_curve=FLAT_CURVE, persist_state=False)


class FarthestCache(SpeculationCache):
    """Speculates wrong on purpose: the cached chunk least like the query."""

    def guess(self, query_vector: np.ndarray) -> int:
        return self.ids[int(np.argmin(self._matrix @ query_vector))]


class SlowRetriever(Retriever):
    """The real search, then a pause (a far-away or much larger index)."""

    delay_s = 0.04

    def search(self, vectors, k=1):
        scores, ids, seconds = super().search(vectors, k)
        time.sleep(self.delay_s)
        return scores, ids, seconds + self.delay_s


def test_exact_flat_top1_is_batch_invariant_and_exact():
    rng = np.random.default_rng(0)
    matrix = rng.standard_normal((3000, 64)).astype(np.float32)
    matrix[1500:1510] = matrix[7]  # duplicates: exact ties go to the lowest id
    matrix /= np.linalg.norm(matrix, axis=1, keepdims=True)
    flat = ExactFlat(matrix)
    queries = np.concatenate([matrix[[7, 42, 2999]], rng.standard_normal((13, 64)).astype(np.float32)])
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    _, batched = flat.search(queries, 1)
    exact = matrix.astype(np.float64) @ queries.astype(np.float64).T  # [chunks, queries]
    for row, query in enumerate(queries):
        assert flat.search(query[None], 1)[1][0, 0] == batched[row, 0]
        assert batched[row, 0] == np.flatnonzero(np.isclose(exact[:, row], exact[:, row].max(), rtol=0, atol=1e-12))[0]
    assert batched[0, 0] == 7 and batched[1, 0] == 42
    _, top = flat.search(queries[:2], 5)
    assert list(top[1][:1]) == [42] and len(set(top[0])) == 5


@pytest.mark.parametrize("token_speculation,asynchronous,adaptive", [
    (False, False, False), (False, True, True), (True, False, True), (True, True, False),
])
def test_ralmspec_equals_naive_tiny(tiny_iterative_engine, book_retriever, token_speculation, asynchronous, adaptive):
    config = IterativeConfig(stride=3, query_tokens=16, max_new_tokens=36, token_speculation=token_speculation)
    runner = StrideRunner(tiny_iterative_engine, book_retriever, config)
    spec = RalmSpecConfig(asynchronous=asynchronous, adaptive=adaptive)
    changed = 0
    for question in QUESTIONS:
        naive = generate_naive(runner, question)
        fast = generate_ralmspec(runner, question, spec)
        assert fast.token_ids == naive.token_ids
        assert fast.passages == naive.passages  # every stride on the passage naive retrieval gives
        assert naive.clock.calls == len(naive.passages)  # one FAISS call per stride
        assert fast.clock.calls < naive.clock.calls  # prefetch + one call per batch
        changed += len(set(naive.passages)) > 1
    assert changed  # a passage changed mid-answer somewhere: re-prefill is exercised


def test_rollback_on_wrong_speculation(tiny_iterative_engine, book_retriever):
    runner = StrideRunner(tiny_iterative_engine, book_retriever,
                          IterativeConfig(stride=3, query_tokens=16, max_new_tokens=30, token_speculation=True))
    resumed = 0
    for asynchronous in (False, True):
        for question in QUESTIONS:
            naive = generate_naive(runner, question)
            fast = generate_ralmspec(runner, question, RalmSpecConfig(asynchronous=asynchronous),
                                     cache=FarthestCache(book_retriever))
            resumed += fast.resumes
            assert fast.rollbacks > 0
            assert fast.speculation_hits < fast.speculated
            assert fast.token_ids == naive.token_ids
            assert fast.passages == naive.passages
    assert resumed  # a rollback went on decoding the segment it had left (no re-prefill)


def test_async_verifier_overlaps_slow_retriever(tiny_iterative_engine, book_retriever):
    slow = SlowRetriever(book_retriever.embedder, book_retriever.dense, book_retriever._texts)
    runner = StrideRunner(tiny_iterative_engine, slow,
                          IterativeConfig(stride=2, query_tokens=16, max_new_tokens=24, token_speculation=False))
    question = QUESTIONS[0]
    naive = generate_naive(runner, question)
    fixed = RalmSpecConfig(bounds=StrideBounds(initial=2, low=1, high=4), adaptive=False, asynchronous=True)
    fast = generate_ralmspec(runner, question, fixed)
    assert fast.token_ids == naive.token_ids
    assert fast.background_search_s >= SlowRetriever.delay_s * (len(fast.stride_plan) - 1)
    assert fast.overlap_s > 0  # verifier-thread time the main thread did not wait for
    assert fast.wait_s < fast.background_search_s


def test_os3_stride_within_bounds():
    for asynchronous in (False, True):
        for gamma in (0.0, 0.3, 0.9, 0.999):
            for a, b in ((0.01, 0.0), (0.01, 0.05), (0.1, 1.0), (1.0, 0.001)):
                assert 2 <= optimal_strides(gamma, a, b, 2, 6, asynchronous) <= 6
    # an always-right guess with costly verification batches to the top; a never-right one verifies each
    assert optimal_strides(0.999, 0.01, 1.0, 1, 8, False) == 8
    assert optimal_strides(0.0, 0.01, 1.0, 1, 8, False) == 1
    scheduler = StrideScheduler(StrideBounds(initial=3, low=2, high=5), adaptive=True)
    assert scheduler.strides() == 3  # nothing measured yet
    for hits in ([True] * 4, [False], [True, True, False], [True] * 5):
        scheduler.observe_stride(0.02)
        scheduler.observe_verification(0.2, hits)
        assert 2 <= scheduler.strides() <= 5
    fixed = StrideScheduler(StrideBounds(initial=4), adaptive=False)
    fixed.observe_stride(0.02)
    fixed.observe_verification(0.5, [False])
    assert fixed.strides() == 4
    with pytest.raises(ConfigError):
        StrideBounds(initial=9, low=1, high=8)
    with pytest.raises(ConfigError):
        RalmSpecConfig(bounds=StrideBounds(initial=3, high=17))


@pytest.mark.slow
def test_ralmspec_equals_naive_real_model(real_model, tmp_path):
    rows = [row for row in spec_bench_questions() if row["category"] == "rag"][:3]
    if not rows:
        pytest.skip("Spec-Bench data not present")
    passages = [(f"{row['question_id']}/{n}", text) for row in rows for n, text in enumerate(row["turns"][0].split("\n")[:-1])]
    index, _ = build_index_from_texts(passages, "rag", tmp_path, chunk_tokens=48, overlap_tokens=0)
    retriever = retriever_for_index(index, "flat")
    engine = Engine(real_model, persist_state=False, latency_curve=FLAT_CURVE)
    runner = StrideRunner(engine, retriever, IterativeConfig(stride=3, query_tokens=16, max_new_tokens=20))
    for number, row in enumerate(rows[:2]):
        question = row["turns"][0].split("\n")[-1]
        naive = generate_naive(runner, question)
        assert generate_ralmspec(runner, question).token_ids == naive.token_ids
        if number == 0:
            wrong = generate_ralmspec(runner, question, cache=FarthestCache(retriever))
            assert wrong.rollbacks > 0 and wrong.token_ids == naive.token_ids


def test_sliding_window_corpus_is_a_separate_index_and_checks_its_overlap(tmp_path):
    from ragspec.iterative.corpus import CHUNK_TOKENS, build_corpus, corpus_name

    assert corpus_name("minilm-static") != corpus_name("minilm-static", 48)
    with pytest.raises(ValueError, match="overlap"):
        build_corpus(tmp_path, 1000, overlap=CHUNK_TOKENS)
