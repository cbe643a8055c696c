"""`ragspec bench`: a thin click layer over ragspec.bench.run_benchmark."""

from __future__ import annotations

import logging
import sys

import click

from ragspec.bench.experiments import EXPERIMENTS
from ragspec.bench.options import (
    DEFAULT_DATA_DIR,
    DEFAULT_JSON,
    DEFAULT_LIMIT,
    FULL_LIMIT,
    BenchOptions,
)
from ragspec.bench.peers import ALL_METHODS, DEFAULT_METHODS
from ragspec.bench.workloads import DEFAULT_WORKLOADS, FULL_WORKLOADS, SPEC_BENCH_CATEGORIES
from ragspec.cli_support import library_errors


@click.command("bench")
@click.option("--data-dir", default=DEFAULT_DATA_DIR, show_default=True, help="Shared evaluation data.")
@click.option("--workload", "workloads", multiple=True,
              help="spec_bench:<category>, spec_bench:all (its 13 categories), mt_redundant, longdoc:<set>, "
                   "jsonl:<path>, rag:spec_bench or rag:longdoc:<set> (repeatable).")
@click.option("--methods", default=",".join(DEFAULT_METHODS), show_default=True,
              help=f"Comma-separated: {', '.join(ALL_METHODS)}.")
@click.option("--draft-model", default=None,
              help="Draft model (HF directory, .gguf, or 'auto': the one trained here for the embedded target); "
                   "`ragspec` then fuses it with the retrieval drafters, and ragspec-model / hf-assisted use it.")
@click.option("--eagle-head", default="auto", show_default=True,
              help="EAGLE head folder for ragspec-eagle / ragspec-plus-eagle ('auto': `ragspec draft train-eagle`'s).")
@click.option("--temperature", type=click.FloatRange(min=0.0), default=0.0, show_default=True,
              help="Sample at this temperature (every method); 0 is greedy and compares outputs.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True, help="Sampling seed.")
@click.option("--limit", type=click.IntRange(min=1), default=None,
              help=f"Prompts per workload [default: {DEFAULT_LIMIT}, {FULL_LIMIT} with --full].")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=128, show_default=True)
@click.option("--max-context-tokens", type=click.IntRange(min=1), default=5500, show_default=True,
              help="Long documents are cut to this many tokens.")
@click.option("--min-document-tokens", type=click.IntRange(min=0), default=0, show_default=True,
              help="Leave out long documents shorter than this many tokens (after the cut).")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default=None,
              help="Model dtype [default: the engine's choice].")
@click.option("--model", default=None, help="HF model directory or .gguf file [default: embedded].")
@click.option("--json", "json_path", default=DEFAULT_JSON, show_default=True,
              help="Report path; report.md and PNG plots are written beside it.")
@click.option("--experiment", "experiments", multiple=True, type=click.Choice(EXPERIMENTS),
              help="Also run: past-twice (questions asked twice, one engine), drafter-ablation "
                   "(single drafters vs fused, per Spec-Bench category) or longdoc-sessions (every question of "
                   "--limit documents of each longdoc:/jsonl: workload in one session: TTFT first vs later "
                   "questions). Repeatable.")
@click.option("--full", is_flag=True,
              help="All Spec-Bench categories, mt_redundant, long documents, RAG workloads and both experiments.")
@click.option("--no-plots", is_flag=True, help="Skip the PNG plots.")
@library_errors
def bench_command(data_dir, workloads, methods, draft_model, eagle_head, temperature, seed, limit, max_new_tokens,
                  max_context_tokens, min_document_tokens, dtype, model, json_path, experiments, full, no_plots) -> None:
    """Benchmark ragspec against plain decoding and transformers' generate on real prompts.

    Example: ragspec bench --workload rag:spec_bench --limit 2 --max-new-tokens 64 --experiment past-twice
    """
    from ragspec.bench.runner import run_benchmark

    _log_progress_to_stderr()
    options = BenchOptions(
        workloads=expand_workloads(workloads) or (FULL_WORKLOADS if full else DEFAULT_WORKLOADS),
        methods=tuple(m.strip() for m in methods.split(",") if m.strip()),
        data_dir=data_dir,
        limit=limit or (FULL_LIMIT if full else DEFAULT_LIMIT),
        max_new_tokens=max_new_tokens,
        max_context_tokens=max_context_tokens,
        min_document_tokens=min_document_tokens,
        dtype=dtype,
        model=model,
        json_path=json_path,
        plots=not no_plots,
        experiments=tuple(experiments) or (EXPERIMENTS if full else ()),
        experiment_limit=limit,  # an explicit --limit also sizes the experiments
        draft_model=draft_model,
        eagle_head=eagle_head,
        temperature=temperature,
        seed=seed,
    )
    report = run_benchmark(options)
    for name, entry in report["summary"].items():
        speedup = entry["geomean_speedup_vs_ragspec_ar"]
        click.echo(f"{name:16s} {entry['tokens_per_s']:7.1f} tok/s  "
                   f"{'' if speedup is None else f'{speedup:.2f}x'}  identical={entry['identical_outputs']}")
    for line in _experiment_summary(report.get("experiments") or {}):
        click.echo(line)
    click.echo(f"report: {json_path}")


def expand_workloads(names) -> tuple[str, ...]:
    """`spec_bench:all` stands for every Spec-Bench category."""
    expanded = []
    for name in names:
        expanded += [f"spec_bench:{c}" for c in SPEC_BENCH_CATEGORIES] if name == "spec_bench:all" else [name]
    return tuple(dict.fromkeys(expanded))


def _experiment_summary(experiments: dict) -> list[str]:
    lines = []
    past = experiments.get("past_twice")
    if past:
        ratio = past["acceptance_length_ratio"]
        lines.append(f"past-twice: acceptance length pass 2 / pass 1 = "
                     f"{'—' if ratio is None else f'{ratio:.2f}x'} (target {past['target_ratio']:.1f}x)")
    ablation = experiments.get("drafter_ablation")
    if ablation:
        lines.append(f"drafter-ablation: fused >= best single drafter in every category: "
                     f"{ablation['fused_ge_best_single_everywhere']}")
    sessions = experiments.get("longdoc_sessions") or {}
    for name, run in sessions.get("sets", {}).items():
        for method, entry in run["summary"].items():
            ratio = entry["ttft_ratio_min"]
            lines.append(f"longdoc-sessions {name} {method}: first-question TTFT {entry['first_ttft_s_mean']:.2f} s, "
                         f"later questions (median) {'—' if ratio is None else f'{ratio:.1f}x'} sooner in the worst document "
                         f"(target {sessions['ttft_target']:.0f}x), identical={entry['identical_outputs']}")
    return lines


def _log_progress_to_stderr() -> None:
    logger = logging.getLogger("ragspec.bench")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False  # the root handler of `ragspec -v` would print every line twice
