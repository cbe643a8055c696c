"""RAPID's lossy knowledge transfer against L-Eval's reference answers: score, mean acceptance
length and decode tokens/s per eta (0 = lossless: the model's own greedy answers).

Each document is asked its first questions in one DocumentSession per eta (the model reads the
whole document, RAPID the chunks closest to the question; the default drafters draft too, as
`ragspec ask --doc --rapid` does). Every question is answered once per eta, one after another
(interleaved, so drift hits all etas alike). Each eta has its own engine (its drafters learn only
from its own answers: the past-responses drafter would otherwise draft eta 0's answer for eta 10),
all on one model, one latency curve and one prefix cache, so each document is prefilled once.
Greedy decoding, fp32. Scores are L-Eval's (ragspec.longdoc.scoring): exact match of the answer letter for QuALITY,
token F1 for financial_qa / scientific_qa, ROUGE for summaries.

    python scripts/rapid_transfer_eval.py                      # quality 2 docs x 4 q, financial_qa 1 x 3, eta 0 3 10
    python scripts/rapid_transfer_eval.py --etas 0 10 --sets quality:3:4 --max-document-tokens 3000

Writes OUT.json (every answer with its scores and stats) and OUT.md (a table per set).
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import time
from dataclasses import dataclass, replace
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data"
DEFAULT_SETS = ("quality:2:4", "financial_qa:1:3")  # set:documents:questions
MAX_NEW_TOKENS = {"quality": 24, "financial_qa": 64, "scientific_qa": 48, "gov_report_summ": 160}

log = logging.getLogger("rapid_transfer_eval")


@dataclass(frozen=True)
class SetChoice:
    name: str  # an L-Eval file under DATA_DIR/longdoc
    documents: int
    questions: int

    @classmethod
    def parse(cls, text: str) -> "SetChoice":
        name, documents, questions = (text.split(":") + ["1", "3"])[:3]
        return cls(name, int(documents), int(questions))


def leval_rows(data_dir: Path, choice: SetChoice) -> list[dict]:
    """The first `documents` rows whose evaluation L-Eval scores automatically."""
    from ragspec.longdoc.scoring import EVALUATIONS

    rows = []
    for line in (data_dir / "longdoc" / f"{choice.name}.jsonl").read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        if row.get("evaluation") in EVALUATIONS and row.get("instructions"):
            rows.append(row)
        if len(rows) == choice.documents:
            break
    return rows


def spec_with_eta(engine_spec, eta: float):
    from ragspec.drafting.rapid import RapidConfig

    options = tuple(o for o in engine_spec.options if not isinstance(o, RapidConfig))
    return replace(engine_spec, options=(*options, RapidConfig(lossy_transfer_eta=eta)))


def run(args) -> dict:
    from ragspec import Engine, load_model
    from ragspec.bench.workloads import DocumentBudget, tokenizer_truncate
    from ragspec.config import SpecConfig
    from ragspec.drafting.registry import default_drafters
    from ragspec.longdoc import DocumentSession

    model = load_model(None, dtype=args.dtype)
    spec = SpecConfig(drafters=(*default_drafters(), "rapid"))
    first = Engine(model, spec=spec_with_eta(spec, args.etas[0]), persist_state=False)
    engines = {args.etas[0]: first}
    for eta in args.etas[1:]:
        engines[eta] = Engine(model, spec=spec_with_eta(spec, eta), persist_state=False,
                              latency_curve=first.budget().curve,
                              prefix_pool=first.prefix_pool)  # the document's KV is prefilled once
    answers = []
    for choice in map(SetChoice.parse, args.sets):
        max_new = args.max_new_tokens or MAX_NEW_TOKENS.get(choice.name, 64)
        budget = DocumentBudget(args.max_document_tokens, model.context_length - max_new,
                                tokenizer_truncate(model.tokenizer))
        for doc_index, row in enumerate(leval_rows(Path(args.data_dir), choice)):
            questions = row["instructions"][: choice.questions]
            references = row["outputs"][: choice.questions]
            longest = max(len(model.tokenizer(q).input_ids) for q in questions)
            text = budget.cut(row["input"], longest)
            sessions = {eta: DocumentSession(engine, text) for eta, engine in engines.items()}
            for q_index, (question, reference) in enumerate(zip(questions, references)):
                for eta, session in sessions.items():
                    start = time.perf_counter()
                    out = session.ask(question, max_new_tokens=max_new)
                    stats = out.stats
                    answers.append({
                        "set": choice.name, "evaluation": row["evaluation"], "document": doc_index,
                        "document_tokens": session.document_tokens, "question": q_index, "eta": eta,
                        "cached_prompt_tokens": stats.cached_prompt_tokens,
                        "answer": out.text, "reference": reference, "token_ids": out.token_ids,
                        "generated_tokens": len(out.token_ids), "steps": stats.num_steps,
                        "accepted_tokens": stats.num_accepted_tokens,
                        "decode_s": max(0.0, stats.total_s - stats.prefill_s), "prefill_s": stats.prefill_s,
                        "mean_acceptance_length": stats.mean_acceptance_length,
                        "accepted_per_source": dict(stats.accepted_per_source), "wall_s": time.perf_counter() - start,
                    })
                    log.info("%s doc %d q %d eta %g: %d tokens, MAL %.2f, %r", choice.name, doc_index, q_index, eta,
                             len(out.token_ids), stats.mean_acceptance_length, out.text[:60])
    return {"model": model.name, "dtype": args.dtype, "etas": list(args.etas), "sets": list(args.sets),
            "max_document_tokens": args.max_document_tokens, "machine": platform.processor() or platform.machine(),
            "answers": answers, "summary": summarise(answers, args.etas)}


def summarise(answers: list[dict], etas) -> list[dict]:
    """Per set and eta: L-Eval's score, mean acceptance length (tokens per target forward),
    decode tokens/s, and how many answers differ from eta 0's."""
    from ragspec.longdoc.scoring import score

    rows = []
    for name in dict.fromkeys(a["set"] for a in answers):
        lossless = {(a["document"], a["question"]): a["token_ids"] for a in answers if a["set"] == name and a["eta"] == 0}
        for eta in etas:
            mine = [a for a in answers if a["set"] == name and a["eta"] == eta]
            result = score(mine[0]["evaluation"], [a["answer"] for a in mine], [a["reference"] for a in mine])
            for a, value in zip(mine, result.per_answer):
                a["score"] = value
            tokens, steps = sum(a["generated_tokens"] for a in mine), sum(a["steps"] for a in mine)
            committed = sum(a["accepted_tokens"] for a in mine) + steps  # the engine's definition, bonus tokens in
            decode_s = sum(a["decode_s"] for a in mine)
            changed = sum(a["token_ids"] != lossless.get((a["document"], a["question"]), a["token_ids"]) for a in mine)
            rows.append({
                "set": name, "eta": eta, "evaluation": mine[0]["evaluation"], "answers": len(mine),
                "score": result.score, "metrics": result.metrics,
                "mean_acceptance_length": committed / steps if steps else 0.0,
                "decode_tokens_per_s": tokens / decode_s if decode_s > 0 else 0.0,
                "answers_changed_vs_eta0": changed if 0 in etas else None,
                "mean_answer_tokens": tokens / len(mine),
            })
    return rows


def markdown(report: dict) -> str:
    lines = [f"# RAPID lossy knowledge transfer vs L-Eval references ({report['model']}, {report['dtype']})", "",
             f"Sets {', '.join(report['sets'])}; documents cut to {report['max_document_tokens']} tokens; greedy; "
             "eta 0 is lossless (the model's own answers). Score: L-Eval's (exam: exact match of the letter, "
             "f1: token F1, rouge: geometric mean of ROUGE-1/2/L), 0-100. MAL: tokens per target forward "
             "(bonus included), all answers of the set; decode tok/s: generated tokens / decode seconds.",
             *([f"\n{report['note']}"] if report.get("note") else []), "",
             "| set | eta | answers | score | MAL | decode tok/s | changed vs eta 0 | mean answer tokens |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in report["summary"]:
        changed = "-" if row["answers_changed_vs_eta0"] is None else str(row["answers_changed_vs_eta0"])
        lines.append(f"| {row['set']} ({row['evaluation']}) | {row['eta']:g} | {row['answers']} | {row['score']:.1f} | "
                     f"{row['mean_acceptance_length']:.2f} | {row['decode_tokens_per_s']:.1f} | {changed} | "
                     f"{row['mean_answer_tokens']:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--etas", type=float, nargs="+", default=[0.0, 3.0, 10.0])
    parser.add_argument("--sets", nargs="+", default=list(DEFAULT_SETS), help="SET:DOCUMENTS:QUESTIONS (L-Eval files)")
    parser.add_argument("--max-document-tokens", type=int, default=4000)
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default: per set (quality 24, financial_qa 64)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--data-dir", default=str(DATA_DIR))
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--note", default="", help="a line for the Markdown report (e.g. the machine's state)")
    parser.add_argument("--out", default="bench-results/rapid-transfer/rapid_transfer_eval",
                        help="writes OUT.json and OUT.md")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    report = run(args)
    report["note"] = args.note
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=1), encoding="utf-8")
    out.with_suffix(".md").write_text(markdown(report), encoding="utf-8")
    print(markdown(report))


if __name__ == "__main__":
    main()
