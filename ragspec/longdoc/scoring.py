"""L-Eval's automatic scores, as L-Eval computes them (OpenLMLab/LEval, Evaluation/auto_eval.py
and em.py; its F1 and ROUGE follow SCROLLS, whose code L-Eval's metric wraps):

- "exam" (multiple choice: QuALITY, ...): exact match of the answer letter. The reference's
  letter is its first word's A-D characters ("(B) Their ..." -> "B"); the prediction's is the
  first capital A, B, C or D anywhere in it (L-Eval's rule: "Because ..." reads as "B"), "A" when
  there is none (L-Eval's random guess). Score 100 * mean.
- "f1" (open QA: financial_qa, scientific_qa, ...): SQuAD token F1 after normalisation (lower
  case, punctuation and articles removed, whitespace collapsed), best over the references,
  100 * mean.
- "rouge" (summaries): ROUGE-1/2/L F-measure (Google's `rouge-score`, no stemming, as L-Eval),
  best over the references, 100 * mean; L-Eval's score is their geometric mean.

`score(evaluation, predictions, references)` picks by a row's `evaluation` field. `rouge-score`
is the [eval] extra and imported on first use.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

CHOICES = "ABCD"
EVALUATIONS = ("exam", "f1", "rouge")  # the automatic ones (L-Eval's SUPPORT_METRICS)


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def reference_choice(reference: str) -> str:
    """The letter(s) of a multiple-choice reference: its first word's A-D characters ("A" if none)."""
    words = reference.split()
    letters = re.sub(r"[^A-D]", "", words[0]) if words else ""
    return letters or "A"


def predicted_choice(prediction: str) -> str:
    """The letter a prediction chose: the first capital A-D in it, "A" when none (L-Eval's rule
    for single-answer sets; see the module doc). A prediction that is a substring of "ABCD" is
    taken as it is, as L-Eval does (so an empty answer scores 0.25 there, by the subset rule)."""
    if prediction in CHOICES:
        return prediction
    return next((ch for ch in prediction if ch in CHOICES), "A")


def exact_match(prediction: str, reference: str) -> float:
    """L-Eval's exam score of one answer: 1 for the reference's letter, 0.25 for a strict subset
    of several correct letters (multi-answer sets), else 0."""
    chosen, correct = predicted_choice(prediction), reference_choice(reference)
    if chosen == correct:
        return 1.0
    return 0.25 if set(chosen) < set(correct) else 0.0


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD token-overlap F1 of normalised texts, in [0, 1]."""
    predicted, expected = normalize_answer(prediction).split(), normalize_answer(reference).split()
    common = sum((Counter(predicted) & Counter(expected)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(expected)
    return 2 * precision * recall / (precision + recall)


def rouge(prediction: str, reference: str) -> dict[str, float]:
    """ROUGE-1, -2 and -L F-measures in [0, 1] (rouge-score's tokenizer, no stemming)."""
    return {name: value.fmeasure for name, value in _rouge_scorer().score(reference, prediction).items()}


_SCORER = None


def _rouge_scorer():
    global _SCORER
    if _SCORER is None:
        try:
            from rouge_score import rouge_scorer
        except ImportError as exc:  # an optional dependency
            raise ImportError("ROUGE needs rouge-score: pip install 'ragspec[eval]' (or rouge-score)") from exc
        _SCORER = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=False)
    return _SCORER


@dataclass(frozen=True)
class Scores:
    """One set's scores, 0-100 like L-Eval's. `score`: L-Eval's headline (exact_match, f1, or the
    ROUGE geometric mean); `metrics`: every figure computed; `per_answer`: each answer's own."""

    evaluation: str
    score: float
    metrics: dict[str, float] = field(default_factory=dict)
    per_answer: list[float] = field(default_factory=list)  # [answers] the headline metric of each, 0-100


def score(evaluation: str, predictions: Sequence[str], references: Sequence[str | Sequence[str]]) -> Scores:
    """L-Eval's score of `predictions` against `references` (one reference text, or several, per
    prediction) for a set whose rows say `evaluation` ("exam", "f1" or "rouge")."""
    if evaluation not in EVALUATIONS:
        raise ValueError(f"L-Eval scores {', '.join(EVALUATIONS)} automatically, not {evaluation!r}")
    if len(predictions) != len(references) or not predictions:
        raise ValueError("score needs one reference (or list of them) per prediction, and some predictions")
    refs = [[r] if isinstance(r, str) else list(r) for r in references]
    if evaluation == "exam":
        each = [100 * max(exact_match(p, r) for r in rs) for p, rs in zip(predictions, refs)]
        return Scores(evaluation, _mean(each), {"exact_match": _mean(each)}, each)
    if evaluation == "f1":
        each = [100 * max(token_f1(p, r) for r in rs) for p, rs in zip(predictions, refs)]
        return Scores(evaluation, _mean(each), {"f1": _mean(each)}, each)
    per_metric: dict[str, list[float]] = {"rouge1": [], "rouge2": [], "rougeL": []}
    for p, rs in zip(predictions, refs):
        all_refs = [rouge(p, r) for r in rs]
        for name in per_metric:
            per_metric[name].append(100 * max(s[name] for s in all_refs))
    metrics = {name: _mean(values) for name, values in per_metric.items()}
    metrics["geometric_mean"] = (metrics["rouge1"] * metrics["rouge2"] * metrics["rougeL"]) ** (1 / 3)
    return Scores(evaluation, metrics["geometric_mean"], metrics, per_metric["rougeL"])


def _mean(values: Sequence[float]) -> float:
    return math.fsum(values) / len(values)
