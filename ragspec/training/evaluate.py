"""How well a draft model predicts the target, per Spec-Bench category, without decoding with it.

The target answers each prompt greedily (plain decoding). The draft model then reads prompt +
answer in one forward (teacher forcing): at each answer position its greedy token either is the
target's next token or not. For greedy speculation that is exact: a chain the draft proposes
after an accepted prefix sees the same context as here, so a chain of depth d starting at
position t is accepted up to the first miss. `chain_steps` replays decoding over those hits.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch

from ragspec.errors import ConfigError
from ragspec.models import LoadedModel, cache_dir
from ragspec.training.teacher import cache_key

CATEGORIES = ("writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities",
              "translation", "summarization", "qa", "math_reasoning", "rag")
SPEC_BENCH_FILE = Path("spec_bench") / "question.jsonl"


@dataclass(frozen=True)
class EvalItem:
    category: str
    question_id: int
    prompt_ids: list[int]  # [prompt tokens], chat template applied
    answer_ids: list[int]  # [answer tokens] the target's greedy answer (EOS excluded)


@dataclass(frozen=True)
class CategoryAcceptance:
    category: str
    num_prompts: int
    num_tokens: int  # answer positions scored
    top1_agreement: float  # share of positions where the draft's greedy token is the target's
    tokens_per_step: float  # greedy chain of depth `depth` replayed: tokens per target forward (bonus included)
    depth: int

    @property
    def mean_accepted(self) -> float:
        """Draft tokens accepted per step (the bonus token not counted)."""
        return self.tokens_per_step - 1.0


def chain_steps(hits: np.ndarray, depth: int) -> int:
    """Target forwards greedy speculation with a draft chain of `depth` needs for an answer. `hits`:
    [answer tokens] bool, whether the draft's token at each position is the target's (a draft
    model: the same at any depth), or [depth, answer tokens] (an EAGLE head, whose depth-(k + 1)
    drafts read its own predicted features: hits[k, i] for a chain started k positions before i).
    Each step accepts the chain up to its first miss and adds the target's own (bonus) token."""
    n = hits.shape[-1]
    hits = np.broadcast_to(hits, (depth, n)) if hits.ndim == 1 else hits
    position, steps = 0, 0
    while position < n:
        run = 0
        while run < depth and position + run < n and hits[run, position + run]:
            run += 1
        steps += 1
        position += run + 1
    return steps


def eval_questions(data_dir: Path, per_category: int) -> list[dict]:
    """The first `per_category` Spec-Bench questions of each category (file order)."""
    path = Path(data_dir) / SPEC_BENCH_FILE
    if not path.is_file():
        raise ConfigError(f"Spec-Bench questions not found at {path}: pass --data-dir")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    picked = []
    for category in CATEGORIES:
        picked += [row for row in rows if row["category"] == category][:per_category]
    return picked


def target_answers(target: LoadedModel, data_dir: Path, per_category: int = 3, max_new_tokens: int = 64,
                   progress: bool = True) -> list[EvalItem]:
    """The target's greedy answers to the eval questions' first turns (cached per target)."""
    from tqdm.auto import tqdm

    from ragspec import Engine

    questions = eval_questions(data_dir, per_category)
    key = cache_key(target=f"{target.name}-{target.identity}", dtype=str(target.dtype), max_new=max_new_tokens,
                    questions=[q["question_id"] for q in questions])
    path = cache_dir() / "draft-eval" / f"{key}.json"
    if path.is_file():
        return [EvalItem(**item) for item in json.loads(path.read_text())]
    engine = Engine(target, persist_state=False, prefix_cache=False)
    items = []
    for question in tqdm(questions, desc="target answers", unit="prompt", disable=not progress):
        messages = [{"role": "user", "content": question["turns"][0]}]
        answer = engine.generate(messages, speculative=False, max_new_tokens=max_new_tokens)
        items.append(EvalItem(question["category"], int(question["question_id"]), engine.encode(messages),
                              list(answer.token_ids)))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps([item.__dict__ for item in items]))
    return items


@torch.inference_mode()
def draft_hits(draft: torch.nn.Module, item: EvalItem) -> np.ndarray:
    """[answer tokens] bool: the draft's greedy token after prompt + answer[:i] is answer[i]."""
    if not item.answer_ids:
        return np.zeros(0, dtype=bool)
    ids = torch.tensor([item.prompt_ids + item.answer_ids[:-1]])
    logits = draft(input_ids=ids).logits[0, len(item.prompt_ids) - 1:]  # [answer tokens, vocab]
    return (logits.argmax(-1) == torch.tensor(item.answer_ids)).numpy()


def evaluate_draft(draft: torch.nn.Module | None, items: list[EvalItem], depth: int = 5,
                   hits_of: Callable[[EvalItem], np.ndarray] | None = None) -> list[CategoryAcceptance]:
    """Per category (in CATEGORIES order, then "all"): agreement (of depth-1 drafts) and replayed
    chain speculation. `hits_of(item)`: the hits (see chain_steps); default: `draft_hits(draft, .)`."""
    hits_of = hits_of or partial(draft_hits, draft)
    by_category: dict[str, list[np.ndarray]] = {}
    for item in items:
        by_category.setdefault(item.category, []).append(hits_of(item))
    by_category["all"] = [hits for group in list(by_category.values()) for hits in group]
    results = []
    for category, groups in by_category.items():
        tokens = sum(h.shape[-1] for h in groups)
        steps = sum(chain_steps(h, depth) for h in groups)
        agreement = float(np.concatenate([h if h.ndim == 1 else h[0] for h in groups]).mean()) if tokens else 0.0
        results.append(CategoryAcceptance(category, len(groups), tokens, agreement,
                                          tokens / steps if steps else 0.0, depth))
    return results


def format_table(results: list[CategoryAcceptance]) -> str:
    lines = [f"{'category':<15} {'prompts':>7} {'tokens':>6} {'top-1 agree':>11} {'tok/step d=' + str(results[0].depth if results else 5):>13}"]
    lines += [f"{r.category:<15} {r.num_prompts:>7} {r.num_tokens:>6} {r.top1_agreement:>11.3f} {r.tokens_per_step:>13.2f}"
              for r in results]
    return "\n".join(lines)
