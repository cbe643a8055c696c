"""Multi-question mode for long documents: every question of an L-Eval document asked in one
DocumentSession, so the first question pays for the document's prefill and the later ones reuse
its KV cache. The measure is time to first token, first question against the later ones (target:
the later ones at least 5x sooner), for `ragspec` (RAPID drafting over the retrieved chunks) and
`ragspec-ar` (plain decoding, the same session and cache), whose greedy answers must be equal.

Time to first token here is wall time from asking (`DocumentSession.stream`) to the first token:
retrieval of the draft chunks, the document's chunking and embedding (first question only), and
putting the document back into the prefix cache are all inside it. The engine's own figure
(`engine_ttft_s`, from the request's start) is reported beside it.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from ragspec.bench.workloads import DocumentBudget, read_jsonl, tokenizer_truncate
from ragspec.errors import ConfigError

log = logging.getLogger("ragspec.bench")

TTFT_TARGET = 5.0  # first question's TTFT / later questions' TTFT
SESSION_METHODS = ("ragspec-ar", "ragspec")  # plain decoding first: the reference answers


@dataclass
class QuestionRun:
    """One question of a session, as measured."""

    number: int  # 1 = the first question on the document
    ttft_s: float  # wall time from asking to the first token
    engine_ttft_s: float  # the engine's: from the request's start (setup excluded)
    prefill_s: float
    prompt_tokens: int
    cached_prompt_tokens: int
    num_generated_tokens: int
    decode_tokens_per_s: float
    mean_acceptance_length: float
    wall_s: float
    token_ids: list[int]


def ask_all(session, questions: Sequence[str], max_new_tokens: int, speculative: bool) -> list[QuestionRun]:
    """Ask `questions` in order in `session`, timing each."""
    runs = []
    for number, question in enumerate(questions, 1):
        start = time.perf_counter()
        stream = session.stream(question, max_new_tokens=max_new_tokens, speculative=speculative)
        first = None
        for piece in stream.pieces():
            if first is None and piece.token_ids:
                first = time.perf_counter() - start
        wall = time.perf_counter() - start
        out = stream.result
        stats = out.stats
        runs.append(QuestionRun(
            number=number, ttft_s=first if first is not None else wall, engine_ttft_s=stats.time_to_first_token_s,
            prefill_s=stats.prefill_s, prompt_tokens=out.prompt_tokens, cached_prompt_tokens=stats.cached_prompt_tokens,
            num_generated_tokens=len(out.token_ids), decode_tokens_per_s=stats.decode_tokens_per_s,
            mean_acceptance_length=stats.mean_acceptance_length, wall_s=wall, token_ids=list(out.token_ids),
        ))
    return runs


def leval_documents(name: str, data_dir: str | Path, limit: int | None) -> list[tuple[str, list[str]]]:
    """(document, questions) of the first `limit` rows of an L-Eval file: `longdoc:<set>` or
    `jsonl:<path>` (rows with `input` and `instructions`)."""
    kind, _, arg = name.partition(":")
    if kind == "longdoc" and arg:
        path = Path(data_dir) / "longdoc" / f"{arg}.jsonl"
    elif kind == "jsonl" and arg:
        path = Path(arg)
    else:
        raise ConfigError(f"longdoc-sessions reads longdoc:<set> or jsonl:<path> (L-Eval rows), not {name!r}")
    found = []
    for row in read_jsonl(path):
        document, questions = row.get("input"), row.get("instructions")
        if isinstance(document, str) and document.strip() and isinstance(questions, list) and questions:
            found.append((document, [str(q) for q in questions if str(q).strip()]))
        if limit is not None and len(found) >= limit:
            break
    if not found:
        raise ConfigError(f"{path}: no L-Eval rows (`input` and `instructions`)")
    return found


def session_sets(workloads: Sequence[str]) -> list[str]:
    """The L-Eval sets among the selected workloads (longdoc:<set>, jsonl:<path>); none when no
    long-document workload is selected (a run of short prompts does not pay for long documents)."""
    return [w for w in workloads if w.startswith(("longdoc:", "jsonl:"))]


def run_sessions(engine, name: str, documents: Sequence[tuple[str, list[str]]], *, max_new_tokens: int,
                 max_document_tokens: int, max_questions: int | None = None) -> dict:
    """Each document's questions in one session per method (fresh engines on `engine`'s model and
    latency curve, questions interleaved across the methods)."""
    from ragspec.bench.peers import fresh_engine
    from ragspec.longdoc.session import DocumentSession

    budget = DocumentBudget(max_document_tokens, engine.target.context_length - max_new_tokens,
                            tokenizer_truncate(engine.tokenizer))
    rows = []
    for index, (document, questions) in enumerate(documents):
        questions = questions[:max_questions] if max_questions else questions
        longest = max(len(engine.tokenizer(q).input_ids) for q in questions)
        text = budget.cut(document, longest)
        sessions = {method: DocumentSession(fresh_engine(engine, engine.spec), text) for method in SESSION_METHODS}
        runs: dict[str, list[QuestionRun]] = {method: [] for method in SESSION_METHODS}
        for question in questions:  # interleaved: drift hits both methods alike
            for method, session in sessions.items():
                runs[method] += _renumbered(ask_all(session, [question], max_new_tokens, method == "ragspec"),
                                            len(runs[method]))
            log.info("longdoc-sessions %s doc %d: question %d/%d (ttft %s)", name, index, len(runs["ragspec"]),
                     len(questions), ", ".join(f"{m} {r[-1].ttft_s:.2f}s" for m, r in runs.items()))
        rows.append(_document_row(index, sessions["ragspec"].document_tokens, runs))
    return {"workload": name, "documents": rows, "summary": _summary(rows)}


def _renumbered(runs: list[QuestionRun], before: int) -> list[QuestionRun]:
    for offset, run in enumerate(runs, 1):
        run.number = before + offset
    return runs


def _document_row(index: int, document_tokens: int, runs: dict[str, list[QuestionRun]]) -> dict:
    reference = [r.token_ids for r in runs["ragspec-ar"]]
    methods = {}
    for method, questions in runs.items():
        first, later = questions[0], questions[1:]
        later_ttft = statistics.median(r.ttft_s for r in later) if later else None
        methods[method] = {
            "first_ttft_s": first.ttft_s,
            "later_ttft_s_median": later_ttft,
            "ttft_ratio": first.ttft_s / later_ttft if later_ttft else None,
            "identical_outputs": [r.token_ids for r in questions] == reference,
            "questions": [{k: v for k, v in asdict(r).items() if k != "token_ids"} for r in questions],
        }
    return {"document": index, "document_tokens": document_tokens, "num_questions": len(runs["ragspec"]),
            "methods": methods}


def _summary(rows: list[dict]) -> dict:
    summary = {}
    for method in SESSION_METHODS:
        entries = [row["methods"][method] for row in rows]
        ratios = [e["ttft_ratio"] for e in entries if e["ttft_ratio"] is not None]
        questions = [q for e in entries for q in e["questions"]]
        later = [q for q in questions if q["number"] > 1]
        summary[method] = {
            "first_ttft_s_mean": statistics.fmean(e["first_ttft_s"] for e in entries),
            "later_ttft_s_mean": statistics.fmean(q["ttft_s"] for q in later) if later else None,
            "ttft_ratio_min": min(ratios) if ratios else None,
            "ttft_ratio_geomean": statistics.geometric_mean(ratios) if ratios else None,
            "meets_ttft_target": min(ratios) >= TTFT_TARGET if ratios else None,
            "later_cached_share_min": min((q["cached_prompt_tokens"] / q["prompt_tokens"] for q in later), default=None),
            "decode_tokens_per_s_mean": statistics.fmean(q["decode_tokens_per_s"] for q in questions),
            "mean_acceptance_length": statistics.fmean(q["mean_acceptance_length"] for q in questions),
            "identical_outputs": all(e["identical_outputs"] for e in entries),
        }
    return summary


def longdoc_sessions(options, engine) -> dict:
    """The experiment over the selected L-Eval workloads (`options.experiment_limit` documents each,
    or 1; every question of each document)."""
    sets = {}
    for name in session_sets(options.workloads):
        documents = leval_documents(name, options.data_dir, options.experiment_limit or 1)
        sets[name] = run_sessions(engine, name, documents, max_new_tokens=options.max_new_tokens,
                                  max_document_tokens=options.max_context_tokens)
    return {"ttft_target": TTFT_TARGET, "sets": sets}


def session_lines(experiment: dict) -> list[str]:
    """The report.md section."""
    lines = ["", "## Experiment: long-document sessions (every question of a document in one session)", ""]
    if not experiment["sets"]:
        return lines + ["No long-document workload (longdoc:<set>, jsonl:<path>) was selected."]
    lines += ["| set | method | first TTFT s | later TTFT s (mean) | first / median later: worst doc / geomean | decode tok/s | MAL | "
             "later cached share | identical |", "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for name, run in experiment["sets"].items():
        for method, s in run["summary"].items():
            lines.append(
                f"| {name} | {method} | {s['first_ttft_s_mean']:.2f} | {_num(s['later_ttft_s_mean'])} | "
                f"{_num(s['ttft_ratio_min'], 'x')} / {_num(s['ttft_ratio_geomean'], 'x')} | "
                f"{s['decode_tokens_per_s_mean']:.1f} | {s['mean_acceptance_length']:.2f} | "
                f"{_num(s['later_cached_share_min'])} | {'yes' if s['identical_outputs'] else '**no**'} |")
    lines += ["", f"Target: later questions reach their first token {experiment['ttft_target']:.0f}x sooner than "
              "the first (TTFT: wall time from asking, retrieval and the document's indexing included)."]
    return lines


def _num(value: float | None, suffix: str = "") -> str:
    return "—" if value is None else f"{value:.2f}{suffix}"

