"""RAPID: a model drafter reading a short draft prompt (retrieved chunks + question) while the
target reads the whole document. Greedy output stays identical to plain decoding (tiny model and
the real one on an L-Eval document), sampled output keeps plain sampling's distribution, and the
drafter's KV cache holds the short context, not the document."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import FLAT_CURVE
from test_model_drafter import sharp_tiny
from ragspec import Engine
from ragspec.config import SamplingConfig, SpecConfig
from ragspec.drafting.rapid import RapidConfig, RapidDrafter, build_rapid_drafter
from ragspec.drafting.registry import DraftRequest, build_drafters
from ragspec.engine.budget import NodeBudget
from ragspec.engine.loop import decode_steps
from ragspec.types import SpecStats

LONGDOC = Path(__file__).resolve().parents[2] / "shared" / "data" / "longdoc"
DOCUMENT = " ".join(f"the {w} sat on the mat near the {v}." for w, v in
                    [("cat", "door"), ("dog", "window"), ("bird", "tree"), ("fox", "river")] * 12)
QUESTION = "Where did the dog sit?"
SAMPLED_RUNS = 100  # enough for the chi-square test to pass a right scheme; the model drafter's own
# sampling tests (test_sampling_model_drafts) have the power to reject wrong ones


def long_prompt(document: str, question: str) -> list[dict]:
    from ragspec.bench.workloads import longdoc_prompt

    return [{"role": "user", "content": longdoc_prompt(document, question)}]


def rapid_engine(target, **knobs) -> Engine:
    spec = SpecConfig(drafters=("rapid",), options=(RapidConfig(**knobs),))
    return Engine(target, latency_curve=FLAT_CURVE, spec=spec, persist_state=False, prefix_cache=False)


def test_the_drafter_reads_the_draft_prompt_and_the_generated_tokens():
    inner = object.__new__(RapidDrafter)  # only the context mapping is exercised here
    RapidDrafter.__init__(inner, type("Inner", (), {"name": "rapid"})(), prompt_length=5, draft_prompt_ids=[7, 8])
    tokens = np.array([1, 2, 3, 4, 5, 40, 41, 42])
    assert inner.draft_tokens(tokens).tolist() == [7, 8, 40, 41, 42]
    assert inner.draft_tokens(tokens[:6]).tolist() == [7, 8, 40]  # just the pending token


def test_no_draft_prompt_no_rapid_drafter(tokenizer):
    engine = rapid_engine(sharp_tiny("llama", tokenizer, seed=0))
    request = DraftRequest(engine, [1, 2, 3], SamplingConfig())
    assert build_rapid_drafter(request, RapidConfig()) is None
    assert build_drafters(("rapid",), request) == []


def test_greedy_rapid_equals_plain_decoding_and_drafts_over_the_short_context(tokenizer):
    """decode_steps with the RAPID drafter alone (the target itself reading the question only):
    the tokens are plain greedy's, drafts were accepted, and the drafter's cache holds the draft
    prompt and the generated tokens, never the document."""
    from ragspec.verify import TreeVerifier

    target = sharp_tiny("llama", tokenizer, seed=0)
    engine = rapid_engine(target, cost_aware=False)
    prompt_ids = engine.encode(long_prompt(DOCUMENT, QUESTION))
    draft_ids = engine.encode([{"role": "user", "content": QUESTION}])
    drafter = build_rapid_drafter(DraftRequest(engine, prompt_ids, SamplingConfig(), draft_prompt_ids=draft_ids),
                                  RapidConfig(cost_aware=False))
    steps = decode_steps(TreeVerifier(target), prompt_ids, drafters=[drafter], budget=NodeBudget(FLAT_CURVE, 16),
                         sampling=SamplingConfig(), stats=(stats := SpecStats()))
    generated: list[int] = []
    longest_draft_cache = 0
    while len(generated) < 40:
        generated += next(steps)[0]
        longest_draft_cache = max(longest_draft_cache, drafter.inner.lm.past_length)
    steps.close()
    plain = engine.generate(long_prompt(DOCUMENT, QUESTION), max_new_tokens=len(generated), speculative=False)
    eos = next((i for i, t in enumerate(generated) if t in target.eos_token_ids), len(generated))
    assert generated[:eos][: len(plain.token_ids)] == plain.token_ids
    assert stats.drafted_per_source.get("rapid", 0) > 0, "no RAPID draft was accepted: the test proves nothing"
    assert 0 < longest_draft_cache <= len(draft_ids) + len(generated) < len(prompt_ids)


def test_engine_requests_with_a_draft_prompt_equal_plain_greedy(tokenizer):
    target = sharp_tiny("llama", tokenizer, seed=1)
    engine = rapid_engine(target, cost_aware=False)
    drafted = 0
    for question in (QUESTION, "Which animal sat near the river?"):
        prompt = long_prompt(DOCUMENT, question)
        out = engine.generate(prompt, max_new_tokens=24, draft_prompt=[{"role": "user", "content": question}])
        plain = engine.generate(prompt, max_new_tokens=24, speculative=False)
        assert out.token_ids == plain.token_ids
        drafted += out.stats.drafted_per_source.get("rapid", 0)
    assert drafted > 0


def test_sampled_rapid_keeps_plain_sampling_distribution(tokenizer):
    """The first three sampled tokens (the second and third through RAPID's tree) follow plain
    sampling's joint distribution, computed exactly from the target's logits."""
    from test_sampling_model_drafts import (
        E2E_PROMPT, E2E_SAMPLING, PASS_P_VALUE, chi_square_p_value, plain_distribution, sharpened_tiny_llama,
    )

    target = sharpened_tiny_llama(tokenizer)
    engine = rapid_engine(target, cost_aware=False, max_depth=2)  # the tree decides tokens 2 and 3
    prompt_ids = engine.encode(E2E_PROMPT)
    exact = plain_distribution(target, prompt_ids, SamplingConfig(**E2E_SAMPLING), depth=3)
    cells = {path: i for i, path in enumerate(exact)}
    observed = np.zeros(len(cells))
    drafted = 0
    for seed in range(SAMPLED_RUNS):
        out = engine.generate(E2E_PROMPT, max_new_tokens=3, seed=seed, draft_prompt="c a b", **E2E_SAMPLING)
        observed[cells[tuple(out.token_ids)]] += 1  # KeyError: a path plain sampling cannot produce
        drafted += out.stats.drafted_per_source.get("rapid", 0)
    assert drafted > SAMPLED_RUNS // 10
    _, _, p_value = chi_square_p_value(observed, np.asarray(list(exact.values())))
    assert p_value > PASS_P_VALUE, p_value


@pytest.mark.slow
def test_real_model_rapid_on_an_leval_document_equals_plain_greedy(real_model):
    """The embedded model reading an earnings call (cut to ~1.5k tokens) while RAPID, the target
    itself, reads the top chunks: answers identical to plain greedy, some drafts accepted."""
    from ragspec.bench.workloads import tokenizer_truncate
    from ragspec.longdoc import DocumentChunks, rapid_prompt

    row = json.loads((LONGDOC / "financial_qa.jsonl").read_text(encoding="utf-8").splitlines()[0])
    document = tokenizer_truncate(real_model.tokenizer)(row["input"], 1500)
    chunks = DocumentChunks.of(document, real_model.tokenizer)
    # the prefix cache hands plain decoding's prefill to the RAPID run (one 1.5k-token prefill a question)
    engine = Engine(real_model, latency_curve=FLAT_CURVE, persist_state=False,
                    spec=SpecConfig(drafters=("rapid",), options=(RapidConfig(cost_aware=False),)))
    drafted = 0
    for question in row["instructions"][:2]:
        prompt = long_prompt(document, question)
        draft_prompt = rapid_prompt(chunks.top_chunks(question, 2), question)
        plain = engine.generate(prompt, max_new_tokens=24, speculative=False)
        out = engine.generate(prompt, max_new_tokens=24, draft_prompt=draft_prompt)
        assert out.token_ids == plain.token_ids, question
        assert out.stats.cached_prompt_tokens > 1000
        drafted += out.stats.drafted_per_source.get("rapid", 0)
    assert drafted > 0
