"""RAG workloads and experiments of the benchmark, end to end on a tiny random-weight Llama.

The index is real (the embedded all-MiniLM embedder, FAISS, the token datastore), built from two
real Spec-Bench rag questions' passages and a short synthetic long document.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import FLAT_CURVE, spec_bench_questions

from ragspec import Engine
from ragspec.bench import BenchOptions, load_workload, run_benchmark
from ragspec.bench.experiments import EXPERIMENTS, mixed_questions
from ragspec.bench.workloads import DEFAULT_WORKLOADS, FULL_WORKLOADS, split_spec_bench_rag
from ragspec.errors import ConfigError

RAG_ROWS = [row for row in spec_bench_questions() if row["category"] == "rag"][:2]
WRITING = {"question_id": 900, "category": "writing", "turns": ["Write a haiku about the sea. Then the sea."]}
DOCUMENT = " ".join(f"The harbour town of Velm{i % 7} keeps {i} boats and a lighthouse." for i in range(60))

needs_data = pytest.mark.skipif(len(RAG_ROWS) < 2, reason="shared Spec-Bench data not present")


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    _write_jsonl(tmp_path / "spec_bench" / "question.jsonl", [*RAG_ROWS, WRITING])
    _write_jsonl(tmp_path / "longdoc" / "quality.jsonl", [
        {"input": DOCUMENT, "instructions": ["How many boats does Velm3 keep?"], "outputs": ["3"]},
    ])
    return tmp_path


@pytest.fixture(scope="module")
def engine(tiny_llama) -> Engine:
    return Engine(tiny_llama, latency_curve=FLAT_CURVE, persist_state=False)


def test_split_spec_bench_rag_prompt() -> None:
    passages, question = split_spec_bench_rag("first passage\nsecond passage\n\nWho?")
    assert passages == ["first passage", "second passage"] and question == "Who?"
    with pytest.raises(ConfigError):
        split_spec_bench_rag("only a question?")


@needs_data
def test_rag_workloads_index_the_passages_and_ask_only_the_question(data_dir: Path) -> None:
    workload = load_workload("rag:spec_bench", data_dir)
    assert workload.rag is not None and workload.rag.datastore_scope == "retrieved"
    assert len(workload.requests) == 2 and len(workload.rag.corpus) == 10
    for row, request in zip(RAG_ROWS, workload.requests):
        assert request.user_turns == (row["turns"][0].split("\n")[-1].strip(),)
        assert len(request.user_turns[0]) < 200
    longdoc = load_workload("rag:longdoc:quality", data_dir)
    assert longdoc.rag is not None and longdoc.rag.datastore_scope == "index"
    assert longdoc.rag.corpus == (("quality-0", DOCUMENT),)
    assert longdoc.requests[0].user_turns == ("How many boats does Velm3 keep?",)
    with pytest.raises(ConfigError):
        load_workload("rag:nope", data_dir)


def test_default_and_full_sets() -> None:
    assert "rag:spec_bench" in DEFAULT_WORKLOADS and "spec_bench:rag" not in DEFAULT_WORKLOADS
    assert {"rag:spec_bench", "rag:longdoc:quality", "rag:longdoc:financial_qa"} <= set(FULL_WORKLOADS)


def expected_layout(workload, tokenizer, chunk_tokens: int = 256, overlap: int = 32) -> tuple[int, int]:
    """(chunks, datastore tokens) of the workload's index, from the chunking rule written out: per
    document of n tokens, windows of `chunk_tokens` every `chunk_tokens - overlap` tokens until the
    rest is covered, each window's tokens stored followed by one separator."""
    chunks = tokens = 0
    for _, text in workload.rag.corpus:
        n = len(tokenizer(text, add_special_tokens=False).input_ids)
        windows = max(1, math.ceil((n - overlap) / (chunk_tokens - overlap)))
        chunks += windows
        tokens += n + overlap * (windows - 1) + windows
    return chunks, tokens


@needs_data
def test_rag_workloads_end_to_end(engine: Engine, data_dir: Path, tmp_path: Path) -> None:
    options = BenchOptions(
        workloads=("rag:spec_bench", "rag:longdoc:quality"), methods=("ragspec", "hf-greedy", "hf-pld"),
        data_dir=str(data_dir), limit=2, max_new_tokens=12, json_path=str(tmp_path / "out" / "report.json"),
        plots=False, warmup=False,
    )
    run_benchmark(options, engine=engine)
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert [w["num_prompts"] for w in report["workloads"]] == [2, 1]
    for workload in report["workloads"]:
        for name, method in workload["methods"].items():
            if name != "ragspec-ar":  # the reference, identical to itself by definition
                assert method["identical_outputs"] is True, (workload["name"], name)
        index, drafting = workload["index"], workload["drafting"]
        assert (index["num_chunks"], index["num_tokens"]) == expected_layout(load_workload(workload["name"], data_dir),
                                                                              engine.tokenizer)
        assert index["build_tokens_per_s"] == pytest.approx(index["num_tokens"] / index["build_s"])
        assert index["build_chunks_per_s"] == pytest.approx(index["num_chunks"] / index["build_s"])
        for key in ("bytes_per_token", "retrieval_p50_ms", "retrieval_p99_ms"):
            assert index[key] > 0, (workload["name"], key)
        assert index["retrieval_p99_ms"] >= index["retrieval_p50_ms"]
        assert "datastore" in drafting["draft_latency_p50_ms"], workload["name"]
        assert set(drafting["draft_latency_p99_ms"]) == set(drafting["draft_latency_p50_ms"])
        assert drafting["accepted_per_source"] == workload["methods"]["ragspec"]["accepted_per_source"]
        assert workload["copy_bound"]["any_copy_mean_acceptance_length"] >= 1.0  # kept beside the RAG keys
    assert [w["index"]["datastore_scope"] for w in report["workloads"]] == ["retrieved", "index"]
    assert report["workloads"][0]["index"]["num_documents"] == 10
    assert report["experiments"] == {}
    markdown = (tmp_path / "out" / "report.md").read_text()
    assert "## rag:spec_bench" in markdown and "Index: 10 documents" in markdown and "retrieval (k=5)" in markdown


@needs_data
def test_experiments_produce_their_sections(engine: Engine, data_dir: Path, tmp_path: Path) -> None:
    options = BenchOptions(
        workloads=("spec_bench:writing",), methods=("ragspec",), data_dir=str(data_dir), limit=1,
        max_new_tokens=12, json_path=str(tmp_path / "report.json"), plots=False, warmup=False,
        experiments=EXPERIMENTS, experiment_limit=1,
    )
    report = run_benchmark(options, engine=engine)
    past = report["experiments"]["past_twice"]
    assert past["num_questions"] == 1 and past["categories"] == ["writing"]
    assert past["identical_outputs"] is True
    for key in ("pass1", "pass2"):
        assert past[key]["mean_acceptance_length"] >= 1.0 and past[key]["tokens_per_s"] > 0
    ratio = past["pass2"]["mean_acceptance_length"] / past["pass1"]["mean_acceptance_length"]
    assert past["acceptance_length_ratio"] == pytest.approx(ratio)
    assert ratio > 1.0  # pass 2 drafts pass 1's answer
    assert past["meets_target"] is (ratio >= past["target_ratio"])
    ablation = report["experiments"]["drafter_ablation"]
    assert list(ablation["categories"]) == ["writing"]
    writing = ablation["categories"]["writing"]
    assert set(writing["configs"]) == {"context", "recycling", "past", "fused"}
    assert writing["identical_outputs"] is True
    speeds = {label: config["tokens_per_s"] for label, config in writing["configs"].items()}
    best = max(("context", "recycling", "past"), key=speeds.get)
    assert writing["best_single"] == best
    assert writing["fused_ge_best_single_tokens_per_s"] is (speeds["fused"] >= speeds[best])
    markdown = (tmp_path / "report.md").read_text()
    assert "## Experiment: past-twice" in markdown and "## Experiment: drafter ablation" in markdown


@needs_data
def test_mixed_questions_round_robin(data_dir: Path) -> None:
    assert [c for c, _ in mixed_questions(str(data_dir), 3)] == ["writing", "rag", "rag"]


def test_cli_flags_reach_the_options(monkeypatch) -> None:
    from ragspec.bench import cli, runner

    seen = []
    report = {"summary": {}, "experiments": {}}
    monkeypatch.setattr(runner, "run_benchmark", lambda options: seen.append(options) or report)
    result = CliRunner().invoke(cli.bench_command, ["--experiment", "past-twice", "--limit", "1", "--no-plots"])
    assert result.exit_code == 0, result.output
    assert seen[-1].experiments == ("past-twice",) and seen[-1].experiment_limit == 1
    result = CliRunner().invoke(cli.bench_command, ["--full"])
    assert result.exit_code == 0, result.output
    assert seen[-1].experiments == EXPERIMENTS and seen[-1].experiment_limit is None
    assert "rag:longdoc:quality" in seen[-1].workloads
    result = CliRunner().invoke(cli.bench_command, ["--experiment", "nope"])
    assert result.exit_code != 0
