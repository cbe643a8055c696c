"""Tree operations: build a trie from token paths, fuse several trees, prune to a node budget.

All functions keep the DraftTree invariants: parents before children, and a node's score never
above its parent's (so the best n nodes by score always form a connected tree).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace

import numpy as np

from ragspec.types import ROOT, DraftTree, ModelDraws


class TrieBuilder:
    """Insert token paths; shared prefixes merge into one node, scores combine by noisy-or.

    A merged node keeps a model's draft probability where any proposer had one, and is
    deterministic when any proposer proposed it deterministically."""

    def __init__(self) -> None:
        self.token_ids: list[int] = []
        self.parents: list[int] = []
        self.scores: list[float] = []
        self.sources: list[str] = []
        self.draft_probs: list[float] = []
        self.deterministic: list[bool] = []
        self.draws: dict[int, tuple[ModelDraws, ...]] = {}
        self._children: dict[tuple[int, int], int] = {}  # (parent, token) -> node

    def __len__(self) -> int:
        return len(self.token_ids)

    def insert(self, tokens: Sequence[int], scores: Sequence[float], source: str) -> None:
        """scores[d] is the proposer's P(accepted) for the node at depth d + 1 of this path."""
        parent = ROOT
        for token, score in zip(tokens, scores):
            parent = self.add(parent, int(token), float(score), source)

    def add(self, parent: int, token: int, score: float, source: str, draft_prob: float = math.nan,
            deterministic: bool = True) -> int:
        """The node for `token` under `parent`, created if new; returns its index."""
        node = self._children.get((parent, token))
        if node is None:
            node = len(self.token_ids)
            self._children[(parent, token)] = node
            self.token_ids.append(token)
            self.parents.append(parent)
            self.scores.append(score)
            self.sources.append(source)
            self.draft_probs.append(draft_prob)
            self.deterministic.append(deterministic)
        else:
            self.scores[node] = 1.0 - (1.0 - self.scores[node]) * (1.0 - score)
            if math.isnan(self.draft_probs[node]):
                self.draft_probs[node] = draft_prob
            self.deterministic[node] = self.deterministic[node] or deterministic
        return node

    def add_draws(self, parent: int, draws: tuple[ModelDraws, ...]) -> None:
        self.draws[parent] = self.draws.get(parent, ()) + tuple(draws)

    def build(self) -> DraftTree:
        has_model = not all(math.isnan(p) for p in self.draft_probs)
        return DraftTree(
            token_ids=np.asarray(self.token_ids, dtype=np.int64),
            parents=np.asarray(self.parents, dtype=np.int64),
            scores=np.asarray(self.scores, dtype=np.float64),
            sources=tuple(self.sources),
            draft_probs=np.asarray(self.draft_probs, dtype=np.float64) if has_model else None,
            deterministic=None if all(self.deterministic) else np.asarray(self.deterministic, dtype=bool),
            draws=dict(self.draws),
        )


def node_paths(tree: DraftTree) -> list[tuple[int, ...]]:
    """Token path from the root to each node (node's own token last)."""
    paths: list[tuple[int, ...]] = []
    for token, parent in zip(tree.token_ids.tolist(), tree.parents.tolist()):
        paths.append((paths[parent] if parent != ROOT else ()) + (token,))
    return paths


def fuse(trees: Sequence[DraftTree]) -> DraftTree:
    """Merge trees into one trie (how much to trust each source is the budget's calibration)."""
    trie = TrieBuilder()
    for tree in trees:
        node_in_trie: list[int] = []
        columns = zip(tree.token_ids.tolist(), tree.parents.tolist(), tree.scores.tolist(), tree.sources,
                      tree.model_probs().tolist(), tree.is_deterministic().tolist())
        for token, parent, score, source, draft_prob, deterministic in columns:
            trie_parent = ROOT if parent == ROOT else node_in_trie[parent]
            node_in_trie.append(trie.add(trie_parent, token, score, source, draft_prob, deterministic))
        for parent, draws in tree.draws.items():
            trie.add_draws(ROOT if parent == ROOT else node_in_trie[parent], draws)
    tree = trie.build()
    return replace(tree, scores=monotone_scores(tree.scores, tree.parents))


def monotone_scores(scores: np.ndarray, parents: np.ndarray) -> np.ndarray:
    """Each score capped at its parent's (calibration and rounding can break the order). [n]"""
    return np.asarray(monotone_score_list(scores.tolist(), parents.tolist()), dtype=np.float64)


def monotone_score_list(scores: list[float], parents: list[int]) -> list[float]:
    """`monotone_scores` on Python lists (one pass: parents come before their children)."""
    capped: list[float] = []
    for score, parent in zip(scores, parents):
        if parent != ROOT and score > capped[parent]:
            score = capped[parent]
        capped.append(score)
    return capped


def best_first_order(tree: DraftTree, scores: np.ndarray | None = None) -> np.ndarray:
    """Node indices by score (default the tree's), highest first; a parent always precedes its
    children. [num_nodes]"""
    scores = tree.scores if scores is None else scores
    # Ties go to the lower index, and a parent has a lower index and a score >= its child's.
    return np.lexsort((np.arange(tree.num_nodes), -scores))


def prune(tree: DraftTree, num_nodes: int, scores: np.ndarray | None = None) -> DraftTree:
    """Keep the `num_nodes` best nodes by `scores` (default the tree's own; none above its
    parent's); they form a connected tree. Re-indexes parents; the kept nodes keep their own scores."""
    if num_nodes >= tree.num_nodes:
        return tree
    keep = np.zeros(tree.num_nodes, dtype=bool)
    keep[best_first_order(tree, scores)[:num_nodes]] = True
    return subtree(tree, keep)


def subtree(tree: DraftTree, keep: np.ndarray) -> DraftTree:
    """The nodes where `keep` [num_nodes] bool is set (every kept node's parent must be kept),
    re-indexed in their original order; draws stay with their kept parents."""
    kept = np.flatnonzero(keep)
    new_index = np.full(tree.num_nodes, ROOT, dtype=np.int64)
    new_index[kept] = np.arange(len(kept))
    old_parents = tree.parents[kept]
    parents = np.where(old_parents == ROOT, ROOT, new_index[np.maximum(old_parents, 0)])
    return DraftTree(
        token_ids=tree.token_ids[kept],
        parents=parents,
        scores=tree.scores[kept],
        sources=tuple(tree.sources[i] for i in kept),
        draft_probs=None if tree.draft_probs is None else tree.draft_probs[kept],
        deterministic=None if tree.deterministic is None else tree.deterministic[kept],
        draws={ROOT if parent == ROOT else int(new_index[parent]): draws
               for parent, draws in tree.draws.items() if parent == ROOT or keep[parent]},
    )


def drop_implausible(tree: DraftTree, min_prob: float) -> DraftTree:
    """RASD's pruning: wherever a model drafter left its distribution at a node (`draws`), every
    child whose token it gives less than `min_prob` is dropped with its subtree; the other
    children get that probability as `draft_probs` (retrieval nodes had none). Nodes under no
    model distribution are kept as they are. A dropped node that a model drew at random stays
    in `draws`, which lossless sampling allows (a pruned draw)."""
    if not tree.draws or min_prob <= 0:
        return tree
    distributions = {parent: draws[0].probs for parent, draws in tree.draws.items() if draws}
    probs = tree.model_probs().copy()
    keep = np.ones(tree.num_nodes, dtype=bool)
    for node, (token, parent) in enumerate(zip(tree.token_ids.tolist(), tree.parents.tolist())):
        if parent != ROOT and not keep[parent]:
            keep[node] = False
            continue
        if math.isnan(probs[node]) and parent in distributions:
            probs[node] = float(distributions[parent][token])
        keep[node] = not probs[node] < min_prob  # NaN (no distribution) is kept
    return subtree(replace(tree, draft_probs=probs), keep)
