"""An independent oracle: the real embedded model's greedy output through transformers' own
`generate` (stock SDPA attention, plain nn.Linear: none of ragspec's kernels, verifier, loop or
text assembly) equals ragspec's, plain and speculative, on cold engines (no prefix cache), in
fp32, on real prompts of each workload kind:

  chat        20 Spec-Bench first turns, two of each of ten categories
  rag         12 Spec-Bench rag questions asked through an index built from their own passages
  multi_turn  12 MT-Redundant turn 2, with the oracle's own turn-1 answer in the history

(rag and multi_turn at 12, not 20, keep the suite inside CI's ~15 min: ~7 s a prompt.)

Text, token ids, finish reason and token counts must all agree. HF runs once per prompt.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import torch

from conftest import DATA_DIR, spec_bench_questions
from ragspec import Engine
from ragspec.bench.peers import stock_kernels
from ragspec.bench.workloads import split_spec_bench_rag
from ragspec.engine.rag import build_rag_prompt

pytestmark = pytest.mark.slow

MAX_NEW = 16
CHAT_PER_CATEGORY = 2
PER_KIND = 12  # rag and multi_turn prompts
RAG_K = 2
CHAT_CATEGORIES = ("translation", "summarization", "qa", "math_reasoning", "extraction",
                   "coding", "writing", "roleplay", "reasoning", "stem")


@dataclass(frozen=True)
class Case:
    case_id: str
    prompt: object  # what ragspec's generate is given: messages, or the question of a RAG request
    prompt_ids: list[int]  # what HF generate is given
    chunk_ids: tuple[int, ...] = ()  # a RAG case: the chunks its prompt holds


@dataclass(frozen=True)
class Expected:
    token_ids: list[int]
    text: str
    finish_reason: str


def hf_greedy(engine: Engine, prompt_ids: list[int]) -> Expected:
    """transformers' greedy `generate`, everything set explicitly, then cut at the first EOS."""
    target = engine.target
    eos = sorted(target.eos_token_ids)
    input_ids = torch.tensor([prompt_ids], dtype=torch.long, device=target.device)
    with torch.inference_mode(), stock_kernels(target.model):
        output = target.model.generate(
            input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=MAX_NEW, do_sample=False,
            num_beams=1, repetition_penalty=1.0, eos_token_id=eos, pad_token_id=eos[0],
        )
    generated = output[0, len(prompt_ids):].tolist()
    ends = [i for i, token in enumerate(generated) if token in eos]
    token_ids = generated[: ends[0]] if ends else generated
    return Expected(token_ids, engine.tokenizer.decode(token_ids), "eos" if ends else "length")


def shortest_first(rows: list[dict]) -> list[dict]:
    return sorted(rows, key=lambda row: (len(row["turns"][0]), row["question_id"]))


def chat_cases(engine: Engine) -> list[Case]:
    questions = spec_bench_questions()
    cases = []
    for category in CHAT_CATEGORIES:
        rows = shortest_first([q for q in questions if q["category"] == category])[:CHAT_PER_CATEGORY]
        for row in rows:
            messages = [{"role": "user", "content": row["turns"][0]}]
            cases.append(Case(f"spec_bench-{row['question_id']}", messages, engine.encode(messages)))
    return cases


def rag_rows() -> list[dict]:
    return shortest_first([q for q in spec_bench_questions() if q["category"] == "rag"])[:PER_KIND]


def rag_cases(engine: Engine, index) -> list[Case]:
    cases = []
    for row in rag_rows():
        _, question = split_spec_bench_rag(row["turns"][0])
        rag = build_rag_prompt(index, question, RAG_K)
        chunk_ids = tuple(chunk.chunk_id for chunk in rag.chunks)
        cases.append(Case(f"rag-{row['question_id']}", question, engine.encode(rag.messages), chunk_ids))
    return cases


def multi_turn_cases(engine: Engine) -> list[Case]:
    """MT-Redundant rows round robin over the categories, shortest first (none whose first turn is
    a chat case's), turn 2 after the oracle's own turn-1 answer."""
    path = DATA_DIR / "mt_redundant" / "question.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    taken = {case.prompt[0]["content"] for case in chat_cases(engine)}
    by_category: dict[str, list[dict]] = {}
    for row in shortest_first([r for r in rows if r["turns"][0] not in taken]):
        by_category.setdefault(row["category"], []).append(row)
    chosen = [row for group in zip(*by_category.values()) for row in group][:PER_KIND]
    cases = []
    for row in chosen:
        first = [{"role": "user", "content": row["turns"][0]}]
        answer = hf_greedy(engine, engine.encode(first)).text
        messages = [*first, {"role": "assistant", "content": answer}, {"role": "user", "content": row["turns"][1]}]
        cases.append(Case(f"mt_redundant-{row['question_id']}", messages, engine.encode(messages)))
    return cases


@pytest.fixture(scope="module")
def rag_index(real_engine, tmp_path_factory):
    """An index over the passages of the rag questions the test asks, built once."""
    from ragspec.index import build_index_from_texts

    passages = [p for row in rag_rows() for p in split_spec_bench_rag(row["turns"][0])[0]]
    texts = [(f"passage-{i}", text) for i, text in enumerate(dict.fromkeys(passages))]
    home = tmp_path_factory.mktemp("oracle-index")
    index, _ = build_index_from_texts(texts, "oracle", home, tokenizer=real_engine.tokenizer,
                                      model_name=real_engine.target.name, chunk_tokens=128, overlap_tokens=16)
    yield index
    index.close()


def cold_engines(real_engine: Engine) -> Iterator[tuple[str, Engine, bool]]:
    """(label, engine, speculative): each on the real model, no prefix cache, state kept in memory."""
    curve = real_engine.budget().curve
    for label, speculative in (("plain", False), ("speculative", True)):
        engine = Engine(real_engine.target, latency_curve=curve, prefix_cache=False, persist_state=False)
        yield label, engine, speculative


@pytest.mark.parametrize("kind", ["chat", "rag", "multi_turn"])
def test_real_model_equals_hf_generate(real_engine, request, kind):
    if not spec_bench_questions() or not (DATA_DIR / "mt_redundant" / "question.jsonl").is_file():
        pytest.skip(f"shared data not found under {DATA_DIR}")
    assert real_engine.target.dtype == torch.float32
    index = request.getfixturevalue("rag_index") if kind == "rag" else None
    if kind == "rag":
        cases = rag_cases(real_engine, index)
    else:
        cases = chat_cases(real_engine) if kind == "chat" else multi_turn_cases(real_engine)
    wanted = CHAT_PER_CATEGORY * len(CHAT_CATEGORIES) if kind == "chat" else PER_KIND
    assert len(cases) == wanted and len({c.case_id for c in cases}) == wanted
    expected = {case.case_id: hf_greedy(real_engine, case.prompt_ids) for case in cases}
    mismatches, accepted = [], 0
    for label, engine, speculative in cold_engines(real_engine):
        for case in cases:
            options = dict(max_new_tokens=MAX_NEW, speculative=speculative)
            out = engine.generate(case.prompt, index=index, k=RAG_K, **options) if index is not None \
                else engine.generate(case.prompt, **options)
            want = expected[case.case_id]
            seen = Expected(out.token_ids, out.text, out.finish_reason)
            if seen != want or out.stats.num_generated_tokens != len(want.token_ids):
                mismatches.append(f"{label} {case.case_id}: {seen} != HF {want}")
            assert out.prompt_tokens == len(case.prompt_ids), case.case_id
            assert tuple(c.chunk_id for c in out.sources) == case.chunk_ids, case.case_id
            assert out.stats.cached_prompt_tokens == 0
            accepted += out.stats.num_accepted_tokens
    assert not mismatches, "\n".join(mismatches)
    assert accepted > 0, "no draft accepted: the speculative runs proved nothing beyond plain decoding"
