"""Turn per-prompt method outputs into the report: JSON, a Markdown summary and PNG plots."""

from __future__ import annotations

import json
import logging
import math
import os
import platform
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ragspec.bench.divergence import NOISE_GAP, first_difference
from ragspec.bench.options import BenchOptions
from ragspec.bench.peers import REFERENCE_METHOD, SPECULATIVE_METHOD, MethodOutput
from ragspec.types import SpecStats

if TYPE_CHECKING:
    from ragspec.engine import Engine

log = logging.getLogger(__name__)

PLD_METHOD = "hf-pld"
DIVERGENCE_NOTE = (
    "position = index of the first generated token that differs from ragspec-ar; top2_gap_fp32 = the "
    "fp32 model's top-1 minus top-2 logit there, recomputed over the prompt and the agreed tokens "
    f"(null in fp32 runs, where any divergence is a bug); suspect = gap above {NOISE_GAP}, more than "
    "bf16 rounding explains"
)


@dataclass(frozen=True)
class WorkloadRun:
    name: str
    max_new_tokens: int
    request_ids: list[str]
    outputs: dict[str, list[MethodOutput]]  # method -> one output per request, same order
    extra: dict = field(default_factory=dict)  # more entry keys: "copy_bound"; RAG workloads' "index", "drafting"
    prompt_ids: list[list[int]] = field(default_factory=list)  # [requests] the measured prompts
    checks: dict[str, dict[int, dict]] = field(default_factory=dict)  # method -> prompt index -> DivergenceCheck dict


@dataclass(frozen=True)
class RunMetadata:
    model: str
    device: str
    dtype: str
    torch_version: str
    transformers_version: str
    cpu: dict
    created: str
    options: dict

    @classmethod
    def collect(cls, engine: "Engine", options: BenchOptions) -> "RunMetadata":
        import transformers

        return cls(
            model=engine.target.name,
            device=str(engine.target.device),
            dtype=str(engine.target.dtype).removeprefix("torch."),
            torch_version=torch.__version__,
            transformers_version=transformers.__version__,
            cpu=cpu_info(engine.target),
            created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            options=asdict(options),
        )


def cpu_info(target=None) -> dict:
    """The CPU, the flags its kernels depend on, any ISA limit set by environment, and (given the
    loaded model) the kernels chosen for it: what decides a CPU run's speed."""
    from ragspec.kernels import probe

    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"model": model, "machine": platform.machine(), "logical_cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "flags": list(probe.cpu_flags()),
            "aten_capability": torch.backends.cpu.get_cpu_capability(),
            "onednn_isa_limit": os.environ.get("ONEDNN_MAX_CPU_ISA", "")}
    kernels = getattr(target, "kernels", None)
    if kernels is not None:
        info["kernels"] = {"linear": kernels.linear.chosen, "attention": kernels.attention.chosen}
    return info


def _cpu_line(cpu: dict) -> str:
    """The header's CPU line: flags, ISA limits and kernels where the report has them."""
    parts = [f"CPU flags: {' '.join(cpu.get('flags', [])) or 'none of the kernel flags'}",
             f"ATen capability {cpu.get('aten_capability', '?')}"]
    if cpu.get("onednn_isa_limit"):
        parts.append(f"ONEDNN_MAX_CPU_ISA={cpu['onednn_isa_limit']} (an ISA limit: emulates a CPU without the rest)")
    if cpu.get("kernels"):
        parts.append(f"kernels: linear {cpu['kernels']['linear']}, attention {cpu['kernels']['attention']}")
    return "; ".join(parts)


def build_report(meta: RunMetadata, runs: list[WorkloadRun], experiments: dict | None = None) -> dict:
    sampled = meta.options.get("temperature", 0.0) > 0
    workloads = [summarize_workload(run, meta.dtype, sampled) for run in runs]
    spec_bench = [w for w in workloads if w["name"].startswith("spec_bench:")]
    return {**asdict(meta), "divergence_note": DIVERGENCE_NOTE, "workloads": workloads,
            "summary": summarize_methods(workloads),
            # Spec-Bench's leaderboard row: every category's prompts together
            "spec_bench_overall": {"categories": len(spec_bench), "methods": summarize_methods(spec_bench)}
            if spec_bench else None,
            "experiments": experiments or {}}


def summarize_workload(run: WorkloadRun, dtype: str, sampled: bool = False) -> dict:
    """`sampled`: the run sampled, so outputs are not compared with ragspec-ar's."""
    methods = {name: _method_metrics(outs) for name, outs in run.outputs.items()}
    reference = run.outputs.get(REFERENCE_METHOD)
    for name, metrics in methods.items():
        metrics["speedup_vs_ragspec_ar"] = _ratio(metrics, methods.get(REFERENCE_METHOD))
        metrics["speedup_vs_hf_pld"] = _ratio(metrics, methods.get(PLD_METHOD))
        metrics["decode_speedup_vs_ragspec_ar"] = _ratio(metrics, methods.get(REFERENCE_METHOD), "decode_tokens_per_s")
        if reference is None or sampled:
            metrics["identical_outputs"] = None
            continue
        divergences = find_divergences(run.outputs[name], reference, run.request_ids, run.checks.get(name))
        metrics["identical_outputs"] = not divergences
        if name != REFERENCE_METHOD and dtype != "float32":  # fp32 must match exactly; others report
            metrics["divergences"] = divergences
            metrics["divergence_rate"] = len(divergences) / len(reference)
    spec = run.outputs.get(SPECULATIVE_METHOD)
    if spec is not None:
        methods[SPECULATIVE_METHOD].update(_speculation_details(spec))
    return {"name": run.name, "num_prompts": len(run.request_ids), "max_new_tokens": run.max_new_tokens,
            "methods": methods, **run.extra}


def _method_metrics(outputs: list[MethodOutput]) -> dict:
    tokens = sum(len(out.token_ids) for out in outputs)
    wall_s = sum(out.wall_s for out in outputs)
    stats = [out.stats for out in outputs if out.stats is not None]
    engine_stats = len(stats) == len(outputs)
    steps = sum(s.num_steps for s in stats)
    decode_s = sum(s.total_s - s.prefill_s for s in stats)
    return {
        "tokens_per_s": tokens / wall_s if wall_s > 0 else 0.0,
        "wall_s": wall_s,
        "num_generated_tokens": tokens,
        "num_steps": steps if engine_stats else None,
        "num_accepted_tokens": sum(s.num_accepted_tokens for s in stats) if engine_stats else None,
        "mean_acceptance_length": (
            (sum(s.num_accepted_tokens for s in stats) + steps) / steps if engine_stats and steps else None
        ),
        "decode_tokens_per_s": (
            sum(s.num_generated_tokens for s in stats) / decode_s if engine_stats and decode_s > 0 else None
        ),
        "time_to_first_token_s": _mean_per_prompt(stats, "time_to_first_token_s") if engine_stats else None,
        # prompt tokens found in the prefix cache
        "cached_prompt_tokens": _mean_per_prompt(stats, "cached_prompt_tokens") if engine_stats else None,
        "wall_s_per_prompt": [out.wall_s for out in outputs],
    }


def _mean_per_prompt(stats: list[SpecStats], field: str) -> float | None:
    return sum(getattr(s, field) for s in stats) / len(stats) if stats else None


def _ratio(metrics: dict, base: dict | None, key: str = "tokens_per_s") -> float | None:
    if base is None or not base[key] or metrics[key] is None:
        return None
    return metrics[key] / base[key]


def find_divergences(outputs: list[MethodOutput], reference: list[MethodOutput], request_ids: list[str],
                     checks: dict[int, dict] | None = None) -> list[dict]:
    """Prompts whose greedy output differs from the reference: the first differing position, and
    the fp32 judgement of it where `checks` (prompt index -> DivergenceCheck dict) has one."""
    found = []
    for index, (out, ref) in enumerate(zip(outputs, reference)):
        position = first_difference(out.token_ids, ref.token_ids)
        if position is None:
            continue
        entry = {"prompt_index": index, "request_id": request_ids[index], "position": position,
                 "top2_gap_fp32": None, "suspect": None}
        found.append({**entry, **(checks or {}).get(index, {})})
    return found


def _speculation_details(outputs: list[MethodOutput]) -> dict:
    total = SpecStats()
    for out in outputs:
        if out.stats is None:
            continue
        for key in ("num_steps", "num_draft_tokens", "num_accepted_tokens"):
            setattr(total, key, getattr(total, key) + getattr(out.stats, key))
        _add_counts(total.acceptance_histogram, out.stats.acceptance_histogram)
        _add_counts(total.accepted_per_depth, out.stats.accepted_per_depth)
        for source, count in out.stats.accepted_per_source.items():
            total.accepted_per_source[source] = total.accepted_per_source.get(source, 0) + count
        for source, count in out.stats.drafted_per_source.items():
            total.drafted_per_source[source] = total.drafted_per_source.get(source, 0) + count
    return {
        "accepted_per_source": total.accepted_per_source,
        "drafted_per_source": total.drafted_per_source,
        "acceptance_histogram": total.acceptance_histogram,  # [k] steps that accepted k drafts
        "accepted_per_depth": total.accepted_per_depth,
        "num_steps": total.num_steps,
        "num_draft_tokens": total.num_draft_tokens,
        "draft_acceptance_rate": total.draft_acceptance_rate,
    }


def _add_counts(total: list[int], counts: list[int]) -> None:
    total.extend([0] * (len(counts) - len(total)))
    for index, count in enumerate(counts):
        total[index] += count


def summarize_methods(workloads: list[dict]) -> dict:
    """Per method over `workloads`: geometric-mean speedup, overall tok/s and mean acceptance
    length (all prompts together), all identical."""
    summary: dict[str, dict] = {}
    names = dict.fromkeys(name for w in workloads for name in w["methods"])
    for name in names:
        entries = [w["methods"][name] for w in workloads if name in w["methods"]]
        speedups = [e["speedup_vs_ragspec_ar"] for e in entries if e["speedup_vs_ragspec_ar"]]
        tokens = sum(e["num_generated_tokens"] for e in entries)
        wall_s = sum(e["wall_s"] for e in entries)
        identical = [e["identical_outputs"] for e in entries]
        steps = [e.get("num_steps") for e in entries]
        accepted = sum(e.get("num_accepted_tokens") or 0 for e in entries)
        summary[name] = {
            "geomean_speedup_vs_ragspec_ar": _geomean(speedups),
            "min_speedup_vs_ragspec_ar": min(speedups) if speedups else None,
            "mean_acceptance_length": (accepted + sum(steps)) / sum(steps) if None not in steps and sum(steps) else None,
            "tokens_per_s": tokens / wall_s if wall_s > 0 else 0.0,
            "wall_s": wall_s,
            "identical_outputs": None if None in identical else all(identical),
        }
    return summary


def _geomean(values: list[float]) -> float | None:
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else None


def write_report(report: dict, json_path: Path, plots: bool = True) -> list[Path]:
    """Write report.json, report.md and (with matplotlib) the PNG plots; return the paths."""
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    markdown_path = json_path.with_name("report.md")
    markdown_path.write_text(render_markdown(report))
    written = [json_path, markdown_path]
    if plots:
        written += write_plots(report, json_path.parent)
    log.info("wrote %s", ", ".join(str(p) for p in written))
    return written


def render_markdown(report: dict) -> str:
    lines = [
        f"# ragspec benchmark — {report['model']}",
        "",
        f"{report['device']}, {report['dtype']}, CPU {report['cpu']['model']} "
        f"({report['cpu']['logical_cores']} cores), torch {report['torch_version']}, "
        f"transformers {report['transformers_version']}, {report['created']}",
        "",
        _cpu_line(report["cpu"]),
        "",
        "tok/s: generated tokens over the whole request (prefill included); decode tok/s leaves the "
        "prefill out, TTFT is the time to the first token, cached prompt tokens the mean prompt tokens "
        "found in the prefix cache (earlier chat turns; engine methods only).",
        "",
    ]
    options = report.get("options") or {}
    if options.get("draft_model"):
        lines += [f"Draft model: `{options['draft_model']}` (`ragspec` fuses it with the retrieval drafters).", ""]
    if options.get("temperature", 0.0) > 0:
        lines += [f"Every method samples at temperature {options['temperature']} (seed {options.get('seed', 0)}): "
                  "outputs differ by design and are not compared.", ""]
    elif report["dtype"] != "float32":
        lines += [f"In {report['dtype']} a method's output can leave ragspec-ar's at a near-tie (listed under "
                  "each table), so methods may compare different texts of different lengths: read tok/s with "
                  "the tokens column, and the fp32 report for exact comparisons.", ""]
    for workload in report["workloads"]:
        lines += [f"## {workload['name']} ({workload['num_prompts']} prompts, "
                  f"max_new_tokens {workload['max_new_tokens']})", "", *_method_table(workload["methods"]), ""]
        if "index" in workload:
            lines += [rag_line(workload), ""]
        if "copy_bound" in workload:
            lines += [copy_bound_line(workload), ""]
        lines += divergence_lines(workload)
    lines += ["## Summary", "", *_summary_table(report["summary"])]
    overall = report.get("spec_bench_overall")
    if overall:
        lines += ["", f"## Spec-Bench overall ({overall['categories']} categories, every prompt together)", "",
                  *_summary_table(overall["methods"])]
    lines += experiment_lines(report.get("experiments") or {})
    return "\n".join(lines) + "\n"


def _summary_table(methods: dict) -> list[str]:
    rows = ["| method | geomean speedup vs ragspec-ar | lowest speedup | mean acceptance length | tok/s overall "
            "| identical |", "|---|---:|---:|---:|---:|---|"]
    for name, entry in methods.items():
        rows.append(f"| {name} | {_fmt(entry['geomean_speedup_vs_ragspec_ar'], 'x')} | "
                    f"{_fmt(entry.get('min_speedup_vs_ragspec_ar'), 'x')} | {_fmt(entry.get('mean_acceptance_length'))} | "
                    f"{_fmt(entry['tokens_per_s'])} | {_fmt_bool(entry['identical_outputs'])} |")
    return rows


def rag_line(workload: dict) -> str:
    """One Markdown line: the index's build cost and size, retrieval and per-drafter latency, accepted tokens."""
    index, drafting = workload["index"], workload["drafting"]
    latency = ", ".join(f"{source} {_fmt(p50)}/{_fmt(drafting['draft_latency_p99_ms'].get(source))}"
                        for source, p50 in drafting["draft_latency_p50_ms"].items())
    accepted = ", ".join(f"{source} {count}" for source, count in drafting["accepted_per_source"].items())
    return (f"Index: {index['num_documents']} documents, {index['num_chunks']} chunks, {index['num_tokens']} tokens, "
            f"built at {_fmt(index['build_tokens_per_s'])} tok/s ({_fmt(index['build_chunks_per_s'])} chunks/s), "
            f"{_fmt(index['bytes_per_token'])} bytes/token; retrieval (k={index['k']}) p50 "
            f"{_fmt(index['retrieval_p50_ms'])} ms, p99 {_fmt(index['retrieval_p99_ms'])} ms; datastore scope "
            f"{index['datastore_scope']}; draft ms p50/p99: {latency or '—'}; accepted tokens: {accepted or '—'}.")


def copy_bound_line(workload: dict) -> str:
    """One Markdown line: what copying could accept with hindsight, beside what ragspec accepted."""
    bound = workload["copy_bound"]
    spec = workload["methods"].get(SPECULATIVE_METHOD, {}).get("mean_acceptance_length")
    return (f"Copy bound (ragspec-ar's outputs replayed with hindsight, one chain of <= {bound['depth']} tokens "
            f"a step): best occurrence of the current suffix {_fmt(bound['suffix_match_mean_acceptance_length'])}, "
            f"longest copy from anywhere earlier {_fmt(bound['any_copy_mean_acceptance_length'])}; "
            f"ragspec's mean acceptance length {_fmt(spec)}.")


def divergence_lines(workload: dict) -> list[str]:
    """One line per method whose outputs left ragspec-ar's (bf16 runs), with the fp32 gaps there."""
    lines = []
    for name, metrics in workload["methods"].items():
        divergences = metrics.get("divergences")
        if not divergences:
            continue
        gaps = [d["top2_gap_fp32"] for d in divergences if d["top2_gap_fp32"] is not None]
        suspects = sum(bool(d["suspect"]) for d in divergences)
        lines += [f"{name}: {len(divergences)} of {workload['num_prompts']} outputs "
                  f"diverge from ragspec-ar; fp32 top-2 gaps there: "
                  f"{', '.join(f'{g:.2f}' for g in gaps) or '—'}; {suspects} above the {NOISE_GAP} noise bound.", ""]
    return lines


def experiment_lines(experiments: dict) -> list[str]:
    lines: list[str] = []
    past = experiments.get("past_twice")
    if past:
        lines += ["", f"## Experiment: past-twice ({past['num_questions']} questions asked twice)", "",
                  "| pass | mean acceptance length | tok/s |", "|---|---:|---:|"]
        lines += [f"| {n} | {_fmt(past[f'pass{n}']['mean_acceptance_length'])} | "
                  f"{_fmt(past[f'pass{n}']['tokens_per_s'])} |" for n in (1, 2)]
        lines += ["", f"Acceptance length ratio {_fmt(past['acceptance_length_ratio'], 'x')} (target "
                  f"{_fmt(past['target_ratio'], 'x')}), tok/s ratio {_fmt(past['tokens_per_s_ratio'], 'x')}, "
                  f"identical outputs {_fmt_bool(past['identical_outputs'])}."]
    if experiments.get("longdoc_sessions"):
        from ragspec.bench.longdoc_sessions import session_lines

        lines += session_lines(experiments["longdoc_sessions"])
    ablation = experiments.get("drafter_ablation")
    if ablation:
        labels = list(ablation["configurations"])
        lines += ["", "## Experiment: drafter ablation (tok/s, mean acceptance length)", "",
                  "| category | " + " | ".join(labels) + " | fused >= best single |",
                  "|---|" + "---:|" * len(labels) + "---|"]
        for category, entry in ablation["categories"].items():
            if not entry["num_prompts"]:
                continue
            cells = [f"{_fmt(entry['configs'][label]['tokens_per_s'])}, "
                     f"{_fmt(entry['configs'][label]['mean_acceptance_length'])}" for label in labels]
            lines.append(f"| {category} | " + " | ".join(cells) +
                         f" | {_fmt_bool(entry['fused_ge_best_single_tokens_per_s'])} |")
    return lines


def _method_table(methods: dict) -> list[str]:
    rows = ["| method | tok/s | speedup vs ragspec-ar | speedup vs hf-pld | mean acceptance length | "
            "decode tok/s | decode speedup vs ragspec-ar | TTFT s | cached prompt tokens | tokens | identical |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for name, m in methods.items():
        rows.append(f"| {name} | {_fmt(m['tokens_per_s'])} | {_fmt(m['speedup_vs_ragspec_ar'], 'x')} | "
                    f"{_fmt(m['speedup_vs_hf_pld'], 'x')} | {_fmt(m['mean_acceptance_length'])} | "
                    f"{_fmt(m['decode_tokens_per_s'])} | {_fmt(m.get('decode_speedup_vs_ragspec_ar'), 'x')} | "
                    f"{_fmt(m['time_to_first_token_s'])} | "
                    f"{_fmt(m.get('cached_prompt_tokens'), digits=0)} | {m['num_generated_tokens']} | "
                    f"{_fmt_bool(m['identical_outputs'])} |")
    return rows


def _fmt(value: float | None, suffix: str = "", digits: int = 2) -> str:
    return "—" if value is None else f"{value:.{digits}f}{suffix}"


def _fmt_bool(value: bool | None) -> str:
    return "—" if value is None else ("yes" if value else "**no**")


def write_plots(report: dict, out_dir: Path) -> list[Path]:
    """speedup.png and acceptance_hist.png; skipped with a hint when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed, no plots written: pip install 'ragspec[bench]'")
        return []
    paths = [_plot_speedup(plt, report, out_dir / "speedup.png")]
    paths.append(_plot_acceptance(plt, report, out_dir / "acceptance_hist.png"))
    return paths


def _plot_speedup(plt, report: dict, path: Path) -> Path:
    workloads = report["workloads"]
    methods = list(report["summary"])
    width = 0.8 / max(1, len(methods))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.4 * len(workloads)), 4.0))
    for offset, name in enumerate(methods):
        values = [w["methods"].get(name, {}).get("speedup_vs_ragspec_ar") or 0.0 for w in workloads]
        xs = [i + (offset - (len(methods) - 1) / 2) * width for i in range(len(workloads))]
        ax.bar(xs, values, width=width, label=name)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(workloads)), [w["name"] for w in workloads], rotation=30, ha="right")
    ax.set_ylabel("speedup vs ragspec-ar (tok/s)")
    ax.set_title(f"{report['model']} — {report['device']} {report['dtype']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _plot_acceptance(plt, report: dict, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7.0, 4.0))
    for workload in report["workloads"]:
        histogram = workload["methods"].get(SPECULATIVE_METHOD, {}).get("acceptance_histogram") or []
        steps = sum(histogram)
        if steps:
            lengths = range(1, len(histogram) + 1)  # k accepted drafts + the bonus token
            ax.plot(lengths, [count / steps for count in histogram], marker="o", label=workload["name"])
    ax.set_xlabel("tokens committed per step (accepted drafts + bonus)")
    ax.set_ylabel("fraction of steps")
    ax.set_title("ragspec acceptance length per workload")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
