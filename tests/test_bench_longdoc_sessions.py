"""The bench's longdoc-sessions experiment on a tiny model over an L-Eval-schema file written
here: every question of each document in one session per method, the later questions fed from
the document's cached KV, equal answers across methods, and the report section."""

from __future__ import annotations

import json

from conftest import FLAT_CURVE, book_paragraphs, tiny_loaded
from ragspec import Engine
from ragspec.bench.cli import _experiment_summary
from ragspec.bench.experiments import run_experiment
from ragspec.bench.longdoc_sessions import SESSION_METHODS, leval_documents, session_lines
from ragspec.bench.options import BenchOptions
from ragspec.bench.report import experiment_lines


def test_every_question_of_a_document_in_one_session(tokenizer, tmp_path):
    paragraphs = book_paragraphs(12)
    rows = [
        {"input": "\n\n".join(paragraphs[:6]), "instructions": ["Who took Netherfield?", "Who is Mr. Bennet?",
                                                                   "What is the truth acknowledged?"]},
        {"input": "\n\n".join(paragraphs[6:]), "instructions": ["What does Mrs. Bennet say?", "Why?"]},
    ]
    path = tmp_path / "leval.jsonl"
    path.write_text("\n".join(json.dumps(row) for row in rows), encoding="utf-8")
    assert [len(q) for _, q in leval_documents(f"jsonl:{path}", tmp_path, limit=None)] == [3, 2]
    engine = Engine(tiny_loaded("llama", tokenizer), latency_curve=FLAT_CURVE)
    options = BenchOptions(workloads=(f"jsonl:{path}",), experiments=("longdoc-sessions",), experiment_limit=2,
                           max_new_tokens=6, max_context_tokens=300)
    result = run_experiment("longdoc-sessions", options, engine)
    run = result["sets"][f"jsonl:{path}"]
    assert [row["num_questions"] for row in run["documents"]] == [3, 2]
    for row in run["documents"]:
        assert row["document_tokens"] <= 300 + 80  # cut to max_context_tokens, plus the prompt around it
        for method in SESSION_METHODS:
            entry = row["methods"][method]
            questions = entry["questions"]
            assert [q["number"] for q in questions] == list(range(1, row["num_questions"] + 1))
            assert questions[0]["cached_prompt_tokens"] == 0
            assert all(q["cached_prompt_tokens"] >= row["document_tokens"] - 1 for q in questions[1:])
            assert all(q["ttft_s"] >= q["engine_ttft_s"] > 0 for q in questions)
            assert entry["identical_outputs"] is True
            assert entry["ttft_ratio"] == questions[0]["ttft_s"] / entry["later_ttft_s_median"]
    summary = run["summary"]
    assert set(summary) == set(SESSION_METHODS)
    assert summary["ragspec"]["later_cached_share_min"] > 0.8
    lines = "\n".join(experiment_lines({"longdoc_sessions": result}))  # report.md
    assert "long-document sessions" in lines and "| ragspec |" in lines and "| ragspec-ar |" in lines
    summary_lines = _experiment_summary({"longdoc_sessions": result})  # `ragspec bench` output
    assert len(summary_lines) == 2 and all("first-question TTFT" in line for line in summary_lines)


def test_no_long_document_workload_no_sessions(tokenizer):
    engine = Engine(tiny_loaded("llama", tokenizer), latency_curve=FLAT_CURVE)
    options = BenchOptions(workloads=("spec_bench:writing",), experiments=("longdoc-sessions",))
    result = run_experiment("longdoc-sessions", options, engine)
    assert result["sets"] == {}
    assert "No long-document workload" in "\n".join(session_lines(result))
