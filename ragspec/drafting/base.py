"""The drafter protocol and the bookkeeping every drafter shares.

A drafter never touches the target. Two verbs: `propose(context) -> DraftTree` and
`observe(step)`, called after each verify with what the target accepted.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from ragspec.types import ROOT, DraftTree, StepResult


@dataclass(frozen=True)
class DraftContext:
    tokens: np.ndarray  # [length] int64: committed tokens, then the pending token last
    max_nodes: int  # the most nodes worth proposing this step


class Drafter(Protocol):
    """Optionally also `finish_request(prompt_ids, generated_ids)`: called once a request ends
    (drafters that outlive requests learn from whole answers or save their state there)."""

    name: str

    def propose(self, context: DraftContext) -> DraftTree: ...

    def observe(self, step: StepResult) -> None: ...


def save_state(path: Path, array: np.ndarray) -> None:
    """Save a drafter's learned state as .npy by atomic replace: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npy")
    np.save(tmp, array)
    tmp.replace(path)


def target_continuation(step: StepResult) -> list[int]:
    """What the target produced after the pending token: accepted drafts, then the bonus."""
    return [*step.accept.accepted_tokens, step.accept.bonus_token]


def judge_own_tree(tree: DraftTree, continuation: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Which of a drafter's own nodes were put to the test, and which the target agreed with.

    A node is tested when its parent path matches the target's continuation (so the target's
    token at its depth is known, verified or not); it is correct when its token matches too.
    Returns (tested, correct), each [num_nodes] bool.
    """
    tested = np.zeros(tree.num_nodes, dtype=bool)
    correct = np.zeros(tree.num_nodes, dtype=bool)
    depth = np.zeros(tree.num_nodes, dtype=np.int64)
    for i, (token, parent) in enumerate(zip(tree.token_ids.tolist(), tree.parents.tolist())):
        depth[i] = 1 if parent == ROOT else depth[parent] + 1
        parent_ok = parent == ROOT or correct[parent]
        if parent_ok and depth[i] <= len(continuation):
            tested[i] = True
            correct[i] = continuation[depth[i] - 1] == token
    return tested, correct


class AcceptanceEstimate:
    """P(draft token correct | its parent was), learned online per feature bucket.

    Beta counts per bucket, started at a prior mean with a small pseudo-count so a few steps
    of evidence move it.
    """

    def __init__(self, prior: dict[object, float], default: float = 0.3, strength: float = 4.0):
        self._hits = {k: p * strength for k, p in prior.items()}
        self._trials = {k: strength for k in prior}
        self._default = default
        self._strength = strength

    def rate(self, bucket: object) -> float:
        trials = self._trials.get(bucket)
        return self._default if trials is None else self._hits[bucket] / trials

    def learn(self, tree: DraftTree, buckets: list, step: StepResult) -> None:
        """Update from one verify: buckets[i] is the bucket of the drafter's own node i."""
        tested, correct = judge_own_tree(tree, target_continuation(step))
        for node in np.flatnonzero(tested).tolist():
            self.update(buckets[node], 1, int(correct[node]))

    def update(self, bucket: object, tested: int, correct: int) -> None:
        if bucket not in self._trials:
            self._hits[bucket] = self._default * self._strength
            self._trials[bucket] = self._strength
        self._hits[bucket] += correct
        self._trials[bucket] += tested
