"""Experiments beside the workload comparison, each a section of the report's "experiments".

  past-twice        the same Spec-Bench questions (mixed categories, first turn) asked twice through
                    one fresh engine: pass 2 can draft from pass 1's answers (the past-responses
                    drafter), so its mean acceptance length should be >= 2x pass 1's
  drafter-ablation  per Spec-Bench category of the selected workloads: each single drafter
                    (context, recycling, past) and the fused default, each in a fresh engine on
                    the same model and latency curve; is fused >= the best single drafter?
  longdoc-sessions  every question of an L-Eval document in one DocumentSession (ragspec with RAPID,
                    ragspec-ar): time to first token of the first question vs the later ones, which
                    reuse the document's KV cache (ragspec.bench.longdoc_sessions)
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import zip_longest
from pathlib import Path

from ragspec.bench.options import EXPERIMENT_NAMES, BenchOptions
from ragspec.bench.peers import fresh_engine
from ragspec.bench.workloads import SPEC_BENCH_CATEGORIES, load_workload, read_jsonl
from ragspec.drafting.registry import default_drafters
from ragspec.engine import Engine
from ragspec.errors import ConfigError

log = logging.getLogger(__name__)

EXPERIMENTS = EXPERIMENT_NAMES
PAST_TWICE_QUESTIONS = 10
PAST_TWICE_TARGET = 2.0  # pass-2 / pass-1 mean acceptance length the past drafter should reach
ABLATION_DRAFTERS = {"context": ("context",), "recycling": ("recycling",), "past": ("past",), "fused": default_drafters()}
FALLBACK_CATEGORIES = ("summarization", "writing", "translation")  # when no spec_bench workload is selected


@dataclass
class Tally:
    """Speculative generations of one configuration, summed."""

    tokens: int = 0
    wall_s: float = 0.0
    steps: int = 0
    accepted: int = 0
    outputs: list[list[int]] = field(default_factory=list)
    accepted_per_source: dict[str, int] = field(default_factory=dict)

    def add(self, engine: Engine, messages: list[dict], max_new_tokens: int) -> None:
        start = time.perf_counter()
        out = engine.generate(messages, max_new_tokens=max_new_tokens, speculative=True)
        self.wall_s += time.perf_counter() - start
        self.tokens += len(out.token_ids)
        self.steps += out.stats.num_steps
        self.accepted += out.stats.num_accepted_tokens
        self.outputs.append(list(out.token_ids))
        for source, count in out.stats.accepted_per_source.items():
            self.accepted_per_source[source] = self.accepted_per_source.get(source, 0) + count

    def as_dict(self) -> dict:
        return {
            "tokens_per_s": self.tokens / self.wall_s if self.wall_s > 0 else 0.0,
            "mean_acceptance_length": (self.accepted + self.steps) / self.steps if self.steps else None,
            "num_generated_tokens": self.tokens,
            "wall_s": self.wall_s,
            "accepted_per_source": dict(self.accepted_per_source),
        }


def run_experiment(name: str, options: BenchOptions, engine: Engine) -> dict:
    if name == "past-twice":
        return past_twice(options, engine, options.experiment_limit or PAST_TWICE_QUESTIONS)
    if name == "drafter-ablation":
        return drafter_ablation(options, engine, options.experiment_limit or options.limit)
    if name == "longdoc-sessions":
        from ragspec.bench.longdoc_sessions import longdoc_sessions

        return longdoc_sessions(options, engine)
    raise ConfigError(f"unknown experiment {name!r}: use {' or '.join(EXPERIMENTS)}")


def mixed_questions(data_dir: str, count: int) -> list[tuple[str, str]]:
    """(category, first turn) of `count` Spec-Bench questions, taken round-robin over the categories."""
    by_category: dict[str, list[str]] = {}
    for row in read_jsonl(Path(data_dir) / "spec_bench" / "question.jsonl"):
        turns = row.get("turns")
        if isinstance(turns, list) and turns and isinstance(turns[0], str) and turns[0].strip():
            by_category.setdefault(str(row.get("category")), []).append(turns[0])
    order = sorted(by_category, key=lambda c: (SPEC_BENCH_CATEGORIES + (c,)).index(c))
    rounds = zip_longest(*(by_category[c] for c in order))
    picked = [(c, q) for row in rounds for c, q in zip(order, row) if q is not None]
    return picked[:count]


def _fits(engine: Engine, messages: list[dict], max_new_tokens: int) -> bool:
    return len(engine.encode(messages)) + max_new_tokens <= engine.target.context_length


def past_twice(options: BenchOptions, engine: Engine, count: int) -> dict:
    """Both passes through one fresh engine (persist_state=False), so only pass 1 can feed pass 2."""
    questions = [(c, [{"role": "user", "content": q}]) for c, q in mixed_questions(options.data_dir, count)]
    questions = [(c, m) for c, m in questions if _fits(engine, m, options.max_new_tokens)]
    if not questions:
        raise ConfigError("past-twice: no question fits the model's context")
    shared = fresh_engine(engine, engine.spec)
    passes = [Tally(), Tally()]
    for number, tally in enumerate(passes, 1):
        for category, messages in questions:
            tally.add(shared, messages, options.max_new_tokens)
            log.info("past-twice pass %d %-14s %d tokens", number, category, len(tally.outputs[-1]))
    first, second = passes[0].as_dict(), passes[1].as_dict()
    ratio = _ratio(second["mean_acceptance_length"], first["mean_acceptance_length"])
    return {
        "num_questions": len(questions),
        "categories": [c for c, _ in questions],
        "pass1": first,
        "pass2": second,
        "acceptance_length_ratio": ratio,
        "tokens_per_s_ratio": _ratio(second["tokens_per_s"], first["tokens_per_s"]),
        "target_ratio": PAST_TWICE_TARGET,
        "meets_target": None if ratio is None else ratio >= PAST_TWICE_TARGET,
        "identical_outputs": passes[0].outputs == passes[1].outputs,
    }


def ablation_categories(workloads: Sequence[str]) -> list[str]:
    found = [name.split(":", 1)[1] for name in workloads if name.startswith("spec_bench:")]
    return list(dict.fromkeys(found)) or list(FALLBACK_CATEGORIES)


def drafter_ablation(options: BenchOptions, engine: Engine, per_category: int | None) -> dict:
    """Per category: each configuration in its own fresh engine, prompts interleaved across them."""
    categories = {}
    for category in ablation_categories(options.workloads):
        categories[category] = _ablate_category(options, engine, category, per_category)
    verdicts = [entry["fused_ge_best_single_tokens_per_s"] for entry in categories.values() if entry["num_prompts"]]
    return {
        "configurations": {label: list(drafters) for label, drafters in ABLATION_DRAFTERS.items()},
        "categories": categories,
        "fused_ge_best_single_everywhere": all(verdicts) if verdicts else None,
    }


def _ablate_category(options: BenchOptions, engine: Engine, category: str, limit: int | None) -> dict:
    requests = load_workload(f"spec_bench:{category}", options.data_dir, limit).requests
    prompts = [[{"role": "user", "content": r.user_turns[0]}] for r in requests]
    prompts = [m for m in prompts if _fits(engine, m, options.max_new_tokens)]
    if not prompts:
        log.warning("drafter-ablation %s: no prompt fits the model's context, skipped", category)
        return {"num_prompts": 0}
    engines = {label: fresh_engine(engine, dataclasses.replace(engine.spec, drafters=drafters))
               for label, drafters in ABLATION_DRAFTERS.items()}
    tallies = {label: Tally() for label in engines}
    for messages in prompts:
        for label, configured in engines.items():
            tallies[label].add(configured, messages, options.max_new_tokens)
        log.info("drafter-ablation %s: prompt %d/%d done", category, len(tallies["fused"].outputs), len(prompts))
    configs = {label: tally.as_dict() for label, tally in tallies.items()}
    singles = {label: m for label, m in configs.items() if label != "fused"}
    best = max(singles, key=lambda label: singles[label]["tokens_per_s"])
    fused = configs["fused"]
    best_length = max((m["mean_acceptance_length"] or 0.0) for m in singles.values())
    return {
        "num_prompts": len(prompts),
        "configs": configs,
        "best_single": best,
        "fused_ge_best_single_tokens_per_s": fused["tokens_per_s"] >= singles[best]["tokens_per_s"],
        "fused_ge_best_single_acceptance": (fused["mean_acceptance_length"] or 0.0) >= best_length,
        "identical_outputs": len({str(t.outputs) for t in tallies.values()}) == 1,
    }


def _ratio(value: float | None, base: float | None) -> float | None:
    return value / base if value is not None and base else None
