"""Benchmark harness: workload parsing, and one end-to-end run on a tiny random-weight Llama."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from ragspec.bench import BenchOptions, load_workload, run_benchmark
from ragspec.bench.peers import MethodOutput, cut_at_eos
from ragspec.bench.report import find_divergences
from ragspec.bench.workloads import (
    DEFAULT_WORKLOADS,
    FULL_WORKLOADS,
    DocumentBudget,
    longdoc_prompt,
)
from ragspec.errors import ConfigError

REAL_DATA = Path(__file__).parents[1] / ".." / "shared" / "data"
DOCUMENT = " ".join(f"The harbour town of Velm{i % 7} keeps {i} boats and a lighthouse." for i in range(200))


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    repeat = "Summarize: the cat sat on the mat. The cat sat on the mat again. The dog sat too."
    _write_jsonl(tmp_path / "spec_bench" / "question.jsonl", [
        {"question_id": 1, "category": "rag", "turns": [repeat, "second turn ignored"]},
        {"question_id": 2, "category": "writing", "turns": ["Write a haiku."]},
        {"question_id": 3, "category": "rag", "turns": ["Where is Paris? Paris is in France."]},
    ])
    _write_jsonl(tmp_path / "mt_redundant" / "question.jsonl", [
        {"question_id": 81, "category": "writing", "turns": ["List three fruits.", "Rewrite it in capitals."]},
    ])
    _write_jsonl(tmp_path / "longdoc" / "quality.jsonl", [
        {"input": DOCUMENT, "instructions": ["How many boats in Velm3?", "unused"], "outputs": ["3"],
         "source": "quality", "evaluation": "exam"},
    ])
    return tmp_path


def test_spec_bench_takes_first_turn_of_the_category(data_dir: Path) -> None:
    workload = load_workload("spec_bench:rag", data_dir)
    assert [r.request_id for r in workload.requests] == ["1", "3"]
    assert all(len(r.user_turns) == 1 for r in workload.requests)
    assert load_workload("spec_bench:rag", data_dir, limit=1).requests[0].user_turns[0].startswith("Summarize")


def test_mt_redundant_keeps_both_turns(data_dir: Path) -> None:
    (request,) = load_workload("mt_redundant", data_dir).requests
    assert request.user_turns == ("List three fruits.", "Rewrite it in capitals.")


def test_longdoc_truncates_the_document_and_asks_the_first_question(data_dir: Path) -> None:
    budget = DocumentBudget(max_document_tokens=50, truncate=lambda text, n: " ".join(text.split()[:n]))
    (request,) = load_workload("longdoc:quality", data_dir, budget=budget).requests
    prompt = request.user_turns[0]
    assert prompt.endswith("Question: How many boats in Velm3?\nAnswer:")
    assert prompt == longdoc_prompt(" ".join(DOCUMENT.split()[:50]), "How many boats in Velm3?")


def test_longdoc_budget_leaves_room_for_new_tokens() -> None:
    budget = DocumentBudget(max_document_tokens=5500, max_prompt_tokens=400, truncate=lambda t, n: t[:n])
    assert len(budget.cut("x" * 10_000, question_tokens=10)) == 400 - 64 - 10


def test_jsonl_accepts_each_schema(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "mixed.jsonl", [
        {"turns": ["first", "second"]},
        {"input": "doc text", "instructions": ["q?"]},
        {"prompt": "plain prompt", "id": "p1"},
    ])
    turns = [r.user_turns for r in load_workload(f"jsonl:{path}", tmp_path).requests]
    assert turns[0] == ("first",)
    assert "doc text" in turns[1][0] and "q?" in turns[1][0]
    assert turns[2] == ("plain prompt",)


@pytest.mark.parametrize("rows, name", [
    ([{"other": 1}], "jsonl"), ([], "jsonl"), (None, "nope:x"), (None, "spec_bench:missing"),
])
def test_bad_workloads_fail_clearly(tmp_path: Path, data_dir: Path, rows, name: str) -> None:
    if rows is not None:
        name = f"jsonl:{_write_jsonl(tmp_path / 'bad.jsonl', rows)}"
    with pytest.raises(ConfigError):
        load_workload(name, data_dir)


def test_missing_file_names_the_data_dir(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--data-dir"):
        load_workload("mt_redundant", tmp_path / "absent")


@pytest.mark.skipif(not (REAL_DATA / "spec_bench").is_dir(), reason="shared data not present")
def test_real_data_parses_for_every_named_workload() -> None:
    for name in dict.fromkeys(FULL_WORKLOADS + DEFAULT_WORKLOADS):
        workload = load_workload(name, REAL_DATA, limit=2, budget=DocumentBudget(max_document_tokens=100))
        assert len(workload.requests) == 2, name
        assert all(turn.strip() for r in workload.requests for turn in r.user_turns)
    assert len(load_workload("spec_bench:summarization", REAL_DATA).requests) == 80
    assert all(len(r.user_turns) == 2 for r in load_workload("mt_redundant", REAL_DATA).requests)


def test_cut_at_eos_and_divergences() -> None:
    assert cut_at_eos([5, 6, 2, 7], {2}) == [5, 6]
    assert cut_at_eos([5, 6], {2}) == [5, 6]
    ref = [MethodOutput([1, 2, 3], 1.0, None), MethodOutput([4, 5], 1.0, None)]
    out = [MethodOutput([1, 2, 3], 1.0, None), MethodOutput([4, 9, 9], 1.0, None)]
    (divergence,) = find_divergences(out, ref, ["a", "b"])
    assert divergence["prompt_index"] == 1 and divergence["request_id"] == "b" and divergence["position"] == 1


@pytest.fixture(scope="module")
def tiny_engine():
    torch = pytest.importorskip("torch")
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from ragspec import Engine, LoadedModel
    from ragspec.engine.budget import LatencyCurve
    from ragspec.errors import RagspecError
    from ragspec.models import _dequantised_dir, embedded_model_path

    try:
        tokenizer = AutoTokenizer.from_pretrained(_dequantised_dir(embedded_model_path()))
    except RagspecError as exc:
        pytest.skip(f"embedded model tokenizer unavailable: {exc}")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
    )
    model = LlamaForCausalLM(config).eval()
    loaded = LoadedModel(model=model, tokenizer=tokenizer, name="tiny")
    return Engine(loaded, latency_curve=LatencyCurve(rows=(1, 64), seconds=(0.01, 0.012)))


def test_end_to_end_report_on_a_tiny_model(tiny_engine, data_dir: Path, tmp_path: Path) -> None:
    prompts = _write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "one two three one two three one two"}])
    options = BenchOptions(
        workloads=("spec_bench:rag", "mt_redundant", "longdoc:quality", f"jsonl:{prompts}"),
        methods=("ragspec", "hf-greedy", "hf-pld"),
        data_dir=str(data_dir), limit=2, max_new_tokens=12, max_context_tokens=300,
        json_path=str(tmp_path / "out" / "report.json"),
    )
    returned = run_benchmark(options, engine=tiny_engine)
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report == json.loads(json.dumps(returned))
    for key in ("model", "device", "dtype", "torch_version", "transformers_version", "cpu", "created"):
        assert report[key], key
    assert report["dtype"] == "float32"
    assert [w["name"] for w in report["workloads"]] == list(options.workloads)
    assert [w["num_prompts"] for w in report["workloads"]] == [2, 1, 1, 1]
    for workload in report["workloads"]:
        methods = workload["methods"]
        assert list(methods) == ["ragspec-ar", "ragspec", "hf-greedy", "hf-pld"]
        reference = methods["ragspec-ar"]
        for name, m in methods.items():
            for key in ("tokens_per_s", "wall_s", "mean_acceptance_length", "identical_outputs",
                        "decode_tokens_per_s", "time_to_first_token_s", "speedup_vs_ragspec_ar",
                        "num_generated_tokens"):
                assert key in m, (name, key)
            assert m["wall_s"] > 0 and m["tokens_per_s"] == pytest.approx(m["num_generated_tokens"] / m["wall_s"])
            assert m["speedup_vs_ragspec_ar"] == pytest.approx(m["tokens_per_s"] / reference["tokens_per_s"])
            assert m["num_generated_tokens"] == reference["num_generated_tokens"], (workload["name"], name)
            if name != "ragspec-ar":  # the reference itself: identical to itself by definition, nothing to check
                # hf-greedy's and hf-pld's True is the independent one: HF's own generate agrees with ragspec-ar
                assert m["identical_outputs"] is True, (workload["name"], name)
        spec = methods["ragspec"]
        accepted = sum(k * steps for k, steps in enumerate(spec["acceptance_histogram"]))
        assert sum(spec["acceptance_histogram"]) == spec["num_steps"] > 0
        assert sum(spec["accepted_per_source"].values()) == accepted
        assert sum(spec["drafted_per_source"].values()) == spec["num_draft_tokens"]
        assert spec["mean_acceptance_length"] == pytest.approx((accepted + spec["num_steps"]) / spec["num_steps"])
        assert methods["hf-pld"]["mean_acceptance_length"] is None
        # prefix cache: only the earlier chat turns, the same for both engine methods, never an
        # earlier method's run of the same prompt
        cached = {name: methods[name]["cached_prompt_tokens"] for name in ("ragspec-ar", "ragspec")}
        if workload["name"] == "mt_redundant":
            assert cached["ragspec-ar"] == cached["ragspec"] > 0
        else:
            assert cached == {"ragspec-ar": 0, "ragspec": 0}, workload["name"]
        assert methods["hf-greedy"]["cached_prompt_tokens"] is None
        bound = workload["copy_bound"]
        assert 1.0 <= bound["suffix_match_mean_acceptance_length"] and 1.0 <= bound["any_copy_mean_acceptance_length"]
    markdown = (tmp_path / "out" / "report.md").read_text()
    assert "## spec_bench:rag" in markdown and "| ragspec |" in markdown and "## Summary" in markdown
    assert "Copy bound (ragspec-ar's outputs replayed with hindsight" in markdown
    for png in ("speedup.png", "acceptance_hist.png"):
        assert (tmp_path / "out" / png).read_bytes()[:4] == b"\x89PNG"


def test_copy_bounds_replay_outputs_step_by_step() -> None:
    from ragspec.bench.copy_bound import copy_bounds

    # suffix match: step 1 finds no earlier "5" and commits the bonus 1; step 2 matches "1" at the
    # start and copies 2 3 4 (5 is the bonus). Any copy: step 1 copies 1 2 3 4 at once, 5 is the bonus.
    bound = copy_bounds([[1, 2, 3, 4, 5]], [[1, 2, 3, 4, 5]])
    assert bound["suffix_match_mean_acceptance_length"] == 5 / 2
    assert bound["any_copy_mean_acceptance_length"] == 5 / 1
    # nothing to copy: every step commits one token
    bound = copy_bounds([[7, 8]], [[1, 2, 3]])
    assert bound["suffix_match_mean_acceptance_length"] == bound["any_copy_mean_acceptance_length"] == 1.0
    # chains are capped at `depth`
    assert copy_bounds([list(range(10))], [list(range(10))], depth=2)["any_copy_mean_acceptance_length"] == 10 / 4


def test_fp32_judge_measures_the_top2_gap_at_the_first_difference(tiny_engine) -> None:
    import torch

    from ragspec.bench.divergence import EOS, NOISE_GAP, Fp32Judge, first_difference

    assert first_difference([1, 2, 3], [1, 2, 3]) is None
    assert first_difference([1, 2, 9], [1, 2, 3]) == 2
    assert first_difference([1, 2], [1, 2, 3]) == 2  # the method stopped (EOS) where the reference went on
    target = tiny_engine.target
    judge = Fp32Judge(lambda: target)
    prompt = [5, 17, 42, 8]
    assert judge.check(prompt, [7, 7, 7], [7, 7, 7]) is None
    check = judge.check(prompt, [7, 9], [7, 11, 12])
    with torch.inference_mode():
        logits = target.model(input_ids=torch.tensor([[*prompt, 7]])).logits[0, -1]
    top = torch.topk(logits, 2)
    assert check.position == 1 and check.reference_token == 11 and check.method_token == 9
    assert check.top2_gap_fp32 == pytest.approx(float(top.values[0] - top.values[1]), abs=1e-5)
    assert check.fp32_token == int(top.indices[0])
    assert check.suspect == (check.top2_gap_fp32 > NOISE_GAP)
    assert judge.check(prompt, [7], [7, 11]).method_token == EOS


def test_bf16_report_carries_the_fp32_judgement(tiny_engine) -> None:
    import torch

    from ragspec.bench.divergence import NOISE_GAP, Fp32Judge
    from ragspec.bench.report import WorkloadRun, render_markdown, summarize_workload
    from ragspec.bench.runner import judge_divergences

    outputs = {"ragspec-ar": [MethodOutput([7, 11, 12], 1.0, None), MethodOutput([3], 1.0, None)],
               "ragspec": [MethodOutput([7, 9], 0.5, None), MethodOutput([3], 0.5, None)]}
    run = WorkloadRun("w", 3, ["a", "b"], outputs, prompt_ids=[[5, 17, 42, 8], [4, 4]])
    judged = judge_divergences(run, Fp32Judge(lambda: tiny_engine.target))
    entry = summarize_workload(judged, "bfloat16")
    (divergence,) = entry["methods"]["ragspec"]["divergences"]
    assert divergence["request_id"] == "a" and divergence["position"] == 1
    # the fp32 gap where "a" diverged (after 5 17 42 8 | 7), from the model's logits directly
    with torch.inference_mode():
        logits = tiny_engine.target.model(input_ids=torch.tensor([[5, 17, 42, 8, 7]])).logits[0, -1]
    top = torch.topk(logits, 2)
    gap = float(top.values[0] - top.values[1])
    assert divergence["top2_gap_fp32"] == pytest.approx(gap, abs=1e-5)
    assert divergence["suspect"] == (gap > NOISE_GAP)
    assert divergence["fp32_token"] == int(top.indices[0])
    assert entry["methods"]["ragspec"]["divergence_rate"] == 0.5
    report = {"model": "tiny", "device": "cpu", "dtype": "bfloat16", "cpu": {"model": "x", "logical_cores": 2},
              "torch_version": "t", "transformers_version": "t", "created": "now", "workloads": [entry],
              "summary": {}}
    assert "ragspec: 1 of 2 outputs diverge from ragspec-ar; fp32 top-2 gaps there: " in render_markdown(report)


def test_model_draft_methods_and_a_sampled_run(tiny_engine, data_dir: Path, tmp_path: Path) -> None:
    """With a draft model (here the target itself, so every draft is right): ragspec fuses it,
    ragspec-model / hf-assisted use it, and all greedy outputs equal ragspec-ar's; a sampled run
    reports acceptance but compares no outputs."""
    import copy

    import torch

    from ragspec.engine import Engine
    from ragspec.engine.budget import LatencyCurve

    FLAT = LatencyCurve(rows=(1, 64), seconds=(0.010, 0.0101), adapt=False)
    prompts = _write_jsonl(tmp_path / "p.jsonl", [{"prompt": "alpha beta gamma delta alpha beta gamma"}])
    # a random model's next-token distribution is nearly flat (q ~ 1/vocab): no budget would verify
    # its drafts; a sharper head makes it confident, as a trained model is
    target = dataclasses.replace(tiny_engine.target, model=copy.deepcopy(tiny_engine.target.model))
    with torch.no_grad():
        target.model.lm_head.weight.mul_(40.0)
    engine = Engine(target, latency_curve=FLAT, persist_state=False)  # timing-independent budget
    methods = ("ragspec", "ragspec-model", "ragspec-retrieval", "ragspec-pruned", "ragspec-self", "hf-greedy",
               "hf-assisted", "hf-early-exit")
    greedy = BenchOptions(workloads=(f"jsonl:{prompts}", "spec_bench:writing"), methods=methods, data_dir=str(data_dir),
                          limit=1, max_new_tokens=10, json_path=str(tmp_path / "g" / "report.json"), plots=False,
                          warmup=False)
    with pytest.raises(ConfigError, match="ragspec-model needs a draft model"):
        run_benchmark(greedy, engine=engine)  # refused before any timing
    report = run_benchmark(greedy, engine=engine, draft=target)
    for workload in report["workloads"]:
        entries = workload["methods"]
        assert list(entries) == ["ragspec-ar", *methods]
        assert all(entries[name]["identical_outputs"] is True for name in methods), {n: e.get("divergences") or e["identical_outputs"] for n, e in entries.items()}
        assert entries["ragspec-model"]["mean_acceptance_length"] > 1.0  # the target drafting for itself
    overall = report["spec_bench_overall"]
    assert overall["categories"] == 1 and overall["methods"]["ragspec-model"]["mean_acceptance_length"] > 1.0

    sampled = dataclasses.replace(greedy, methods=("ragspec", "ragspec-model", "hf-greedy"),
                                  temperature=0.7, seed=3, json_path=str(tmp_path / "s" / "report.json"))
    report = run_benchmark(sampled, engine=engine, draft=target)
    for workload in report["workloads"]:
        assert all(m["identical_outputs"] is None for m in workload["methods"].values())
        # acceptance is reported for the engine methods (the cost rule may skip every draft, so no
        # bound on its value), not for generate()
        assert workload["methods"]["ragspec-model"]["mean_acceptance_length"] is not None
        assert workload["methods"]["hf-greedy"]["mean_acceptance_length"] is None
    assert "samples at temperature 0.7" in (tmp_path / "s" / "report.md").read_text()
