"""Token recycling drafter: reuse the target's own top-k guesses from earlier steps.

A [vocab, k] matrix holds, for each token, the top-k tokens the target ranked after it the last
time that token was verified. Every verify overwrites the rows of all its tokens (the pending
token and every tree node) with their fresh top-k. A static tree template (rank paths such as
(0,), (1,), (0, 0), ...) is filled level by level from the matrix. The matrix is saved per model
after each request, so a new process starts warm. An unreadable or invalid saved matrix is ignored
with a warning; processes sharing one file each save their whole matrix, the last save wins
(`base.write_atomically`), and a failed save is only a warning.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from ragspec.drafting.base import AcceptanceEstimate, DraftContext, load_state, save_state
from ragspec.drafting.tree import TrieBuilder
from ragspec.types import ROOT, DraftTree, StepResult

log = logging.getLogger(__name__)

UNKNOWN = -1
TOP_K = 8
# Prior P(rank-r successor is the target's next token), before any evidence.
_RANK_PRIOR = (0.45, 0.15, 0.08, 0.05, 0.04, 0.03, 0.02, 0.02)


def rank_template(num_nodes: int = 80, max_depth: int = 6, k: int = TOP_K) -> list[tuple[int, ...]]:
    """The num_nodes rank paths with the highest prior product, parents before children."""
    paths: list[tuple[float, tuple[int, ...]]] = []
    frontier = [(1.0, ())]
    while frontier and len(paths) < num_nodes:
        frontier.sort(reverse=True)
        prior, path = frontier.pop(0)
        if path:
            paths.append((prior, path))
        if len(path) < max_depth:
            frontier.extend((prior * _RANK_PRIOR[r], path + (r,)) for r in range(k))
    return [path for _, path in paths]


class TokenRecyclingDrafter:
    """Lives as long as the engine (one matrix for all requests)."""

    name = "recycling"

    def __init__(self, vocab_size: int, state_path: Path | None = None, template_nodes: int = 80):
        self.state_path = state_path
        self.successors = self._load(vocab_size)  # [vocab, TOP_K] int32, UNKNOWN where never seen
        self.template = rank_template(template_nodes)
        self.estimate = AcceptanceEstimate({(r, d): _RANK_PRIOR[r] for r in range(TOP_K) for d in range(4)})
        self._last_tree: DraftTree | None = None
        self._last_buckets: list[tuple[int, int]] = []

    def propose(self, context: DraftContext) -> DraftTree:
        trie, node_of_path, buckets = TrieBuilder(), {(): ROOT}, []
        token_of_path = {(): int(context.tokens[-1])}
        for path in self.template:
            parent = node_of_path.get(path[:-1])
            if parent is None:
                continue
            token = int(self.successors[token_of_path[path[:-1]], path[-1]])
            if token == UNKNOWN:
                continue
            bucket = (path[-1], min(3, len(path) - 1))
            parent_score = 1.0 if parent == ROOT else trie.scores[parent]
            node = trie.add(parent, token, parent_score * self.estimate.rate(bucket), self.name)
            if node == len(buckets):
                buckets.append(bucket)
            node_of_path[path], token_of_path[path] = node, token
        self._last_tree, self._last_buckets = trie.build(), buckets
        return self._last_tree

    def observe(self, step: StepResult) -> None:
        rows = [step.pending_token, *step.tree.token_ids.tolist()]
        top = torch.topk(step.logits, TOP_K, dim=-1).indices.to("cpu", torch.int32).numpy()  # [rows, k]
        self.successors[rows] = top
        if self._last_tree is not None:
            self.estimate.learn(self._last_tree, self._last_buckets, step)
            self._last_tree = None

    def finish_request(self, prompt_ids, generated_ids) -> None:
        if self.state_path is not None:
            save_state(self.state_path, self.successors)  # warns, never raises

    def _load(self, vocab_size: int) -> np.ndarray:
        """The saved matrix, or a fresh one (with a warning) when it is missing or not a
        [vocab, TOP_K] integer matrix of UNKNOWN or token ids below vocab_size."""
        fresh = np.full((vocab_size, TOP_K), UNKNOWN, dtype=np.int32)
        saved = load_state(self.state_path, "recycling state")
        if saved is None:
            return fresh
        expected = (vocab_size, TOP_K)
        if saved.shape != expected or saved.dtype.kind not in "iu":
            log.warning("ignoring %s: %s %s, expected int %s; starting fresh",
                        self.state_path, saved.dtype, saved.shape, expected)
            return fresh
        if saved.size and (saved.min() < UNKNOWN or saved.max() >= vocab_size):
            log.warning("ignoring %s: token ids outside [%d, %d); starting fresh", self.state_path, UNKNOWN, vocab_size)
            return fresh
        return saved.astype(np.int32)
