"""Long-document benchmark rows: the workload keeps each document and question (and can keep only
long documents), `ragspec-plus-rapid` and `ragspec-rapid` give the RAPID drafter the chunks
retrieved for the question, `ragspec` (RAPID is not a default drafter) runs without it, every output equals `ragspec-ar`'s, and the report
carries decode tokens/s, TTFT and the decode speedup beside end-to-end tokens/s."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import FLAT_CURVE
from test_model_drafter import sharp_tiny
from ragspec.bench import BenchOptions, run_benchmark
from ragspec.bench.workloads import DocumentBudget, load_workload

SHORT = "The harbour of Velm had three boats. " * 10
LONG = " ".join(f"In year {y} the harbour of Velm had {y % 7 + 1} boats and {y % 5} ships." for y in range(60))


def write_longdoc(data_dir: Path) -> None:
    rows = [{"input": text, "instructions": [question], "outputs": ["x"], "source": "quality", "evaluation": "exam"}
            for text, question in ((SHORT, "How many boats?"), (LONG, "How many ships in year 12?"))]
    (data_dir / "longdoc").mkdir(parents=True)
    (data_dir / "longdoc" / "quality.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))


def test_the_workload_keeps_document_and_question_and_selects_long_documents(tmp_path):
    write_longdoc(tmp_path)
    words = lambda text: len(text.split())  # noqa: E731 - a token count for the test
    every = load_workload("longdoc:quality", tmp_path, budget=DocumentBudget(count_tokens=words)).requests
    assert [r.question for r in every] == ["How many boats?", "How many ships in year 12?"]
    assert every[0].document == SHORT and every[0].document in every[0].user_turns[0]
    long_only = load_workload("longdoc:quality", tmp_path, limit=1,
                              budget=DocumentBudget(min_document_tokens=200, count_tokens=words)).requests
    assert [r.question for r in long_only] == ["How many ships in year 12?"]  # the limit counts long ones only


def test_longdoc_bench_rows_with_and_without_rapid(tokenizer, tmp_path):
    from ragspec import Engine
    from ragspec.config import SpecConfig
    from ragspec.drafting.rapid import RapidConfig

    write_longdoc(tmp_path)
    spec = SpecConfig(options=(RapidConfig(cost_aware=False),))  # a tiny model's drafts need not pay
    engine = Engine(sharp_tiny("llama", tokenizer, seed=0), spec=spec, latency_curve=FLAT_CURVE, persist_state=False)
    options = BenchOptions(
        workloads=("longdoc:quality",), methods=("ragspec", "ragspec-plus-rapid", "ragspec-rapid", "hf-greedy"),
        data_dir=str(tmp_path), limit=1, max_new_tokens=16, min_document_tokens=300, plots=False, warmup=False,
        json_path=str(tmp_path / "out" / "report.json"),
    )
    report = run_benchmark(options, engine=engine)
    (workload,) = report["workloads"]
    assert workload["num_prompts"] == 1
    methods = workload["methods"]
    assert list(methods) == ["ragspec-ar", "ragspec", "ragspec-plus-rapid", "ragspec-rapid", "hf-greedy"]
    for name, m in methods.items():
        if name != "ragspec-ar":
            assert m["identical_outputs"] is True, name
        if name != "hf-greedy":
            assert m["decode_tokens_per_s"] > 0 and m["time_to_first_token_s"] > 0, name
            assert m["decode_speedup_vs_ragspec_ar"] == pytest.approx(
                m["decode_tokens_per_s"] / methods["ragspec-ar"]["decode_tokens_per_s"])
    assert methods["ragspec-rapid"]["num_accepted_tokens"] > 0  # RAPID alone, on the retrieved chunks
    assert "rapid" not in methods["ragspec"]["drafted_per_source"]  # not a default drafter
    markdown = (tmp_path / "out" / "report.md").read_text()
    assert "decode speedup vs ragspec-ar" in markdown and "| ragspec-plus-rapid |" in markdown
