"""Drafters that propose what followed earlier occurrences of the current suffix.

The context, past-responses and corpus-datastore drafters differ only in where they look up the
suffix; turning the continuations into a scored tree, and learning from the target's verdicts,
is shared here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ragspec.drafting.base import AcceptanceEstimate, DraftContext
from ragspec.types import ROOT, DraftTree, StepResult

# Prior P(draft token correct | parent correct) by match-length bucket, for a node every
# occurrence agrees on, and the middle of each share bucket; their product is the prior.
_PRIOR_BY_MATCH = {0: 0.2, 1: 0.3, 2: 0.4, 3: 0.5, 4: 0.6, 5: 0.7, 6: 0.8, 7: 0.85}
_SHARE_EDGES = (0.95, 0.6, 0.3, 0.1)  # share bucket 0 is >= 0.95, 1 is >= 0.6, ... 4 below 0.1
_SHARE_MIDDLES = (1.0, 0.75, 0.45, 0.2, 0.05)


_NO_DRAFT = DraftTree.empty()  # shared: most rows match nothing most steps, and an empty tree has nothing to change


def match_bucket(match_length: int) -> int:
    """0 for 1 token, 1 for 2, 2 for 3-4, 3 for 5-8, 4 for 9-16, 5 for 17-32, 6 for 33-64, 7 beyond."""
    return min(7, (max(match_length, 1) - 1).bit_length())  # ceil(log2(m)), in integers (called per node)


def share_bucket(share: float) -> int:
    """Bucket of the share of the parent's occurrences that go on to a node."""
    for bucket, edge in enumerate(_SHARE_EDGES):  # a loop, not next(genexpr): called per node
        if share >= edge:
            return bucket
    return len(_SHARE_EDGES)


def draft_depth(match_length: int, max_depth: int) -> int:
    """Deep drafts where the match is long, shallow where it is short."""
    return min(max_depth, 1 + 2 * match_length)


def new_match_estimate() -> AcceptanceEstimate:
    """P(correct | parent correct) per (match bucket, share bucket), from the prior."""
    return AcceptanceEstimate(
        {(m, s): p * middle for m, p in _PRIOR_BY_MATCH.items() for s, middle in enumerate(_SHARE_MIDDLES)}
    )


@dataclass
class ScoredTrie:
    """A drafter's continuations merged into a trie and scored, as plain lists (parents before
    children): what the vLLM proposer chooses its chain from, for every row every step, where
    building numpy arrays would cost more than the work. `tree()` is its DraftTree."""

    source: str  # the drafter's name
    tokens: list[int]  # [nodes]
    parents: list[int]  # [nodes] ROOT or an earlier node
    scores: list[float]  # [nodes] P(accepted), never above the parent's
    buckets: list[tuple[int, int]]  # [nodes] (match bucket, share bucket): what learning updates

    def tree(self) -> DraftTree:
        return DraftTree(
            token_ids=np.asarray(self.tokens, dtype=np.int64), parents=np.asarray(self.parents, dtype=np.int64),
            scores=np.asarray(self.scores, dtype=np.float64), sources=(self.source,) * len(self.tokens),
        )


class ContinuationDrafter:
    """Base for suffix-match drafters: subclasses find continuations (`propose_trie`), this
    scores them and learns."""

    name = "continuation"

    def __init__(self, estimate: AcceptanceEstimate | None = None):
        self.estimate = estimate or new_match_estimate()
        self._last_tree: DraftTree | None = None
        self._last_buckets: list[tuple[int, int]] = []

    def propose(self, context: DraftContext) -> DraftTree:
        trie = self.propose_trie(context)
        if trie is None:
            return self.nothing()
        self._last_tree, self._last_buckets = trie.tree(), trie.buckets
        return self._last_tree

    def propose_trie(self, context: DraftContext) -> ScoredTrie | None:
        """The scored trie (`score_trie`) of what followed the context's suffix; None when
        nothing matched. Learning from it is the caller's (`estimate.learn_nodes`)."""
        raise NotImplementedError

    def score_trie(self, continuations: Sequence[Sequence[int] | np.ndarray],
                   match_lengths: Sequence[int] | np.ndarray) -> ScoredTrie:
        """Weigh continuations in a trie (match length squared per occurrence), then score:
        P(node) = P(parent) * learned P(correct | parent correct) for its bucket: the match
        length it continues and the share of the parent's weight that goes on to its token.

        A node at depth d under an occurrence that matched m tokens continues a match of
        m + d - 1 tokens once its ancestors are accepted: the longer the match, the likelier the
        next token, so a long copy streak earns a deep draft. The rate is learned per share
        bucket rather than multiplied by the share, since the learned rate already averages
        over siblings: a majority continuation is right far more often than its share says."""
        matches = match_lengths.tolist() if isinstance(match_lengths, np.ndarray) else list(match_lengths)
        tokens, parents, weights, best_match = self._weigh_trie(continuations, matches)
        root_weight = float(sum(m * m for m, c in zip(matches, continuations) if len(c)))
        rate = self.estimate.rate
        scores: list[float] = []
        buckets: list[tuple[int, int]] = []
        depths: list[int] = []
        for node, parent in enumerate(parents):
            if parent == ROOT:
                depth, parent_weight, parent_score = 1, root_weight, 1.0
            else:
                depth, parent_weight, parent_score = depths[parent] + 1, weights[parent], scores[parent]
            bucket = (match_bucket(best_match[node] + depth - 1), share_bucket(weights[node] / parent_weight))
            scores.append(parent_score * rate(bucket))
            buckets.append(bucket)
            depths.append(depth)
        return ScoredTrie(self.name, tokens, parents, scores, buckets)

    @staticmethod
    def _weigh_trie(continuations: Sequence[Sequence[int] | np.ndarray], match_lengths: list[int]
                    ) -> tuple[list[int], list[int], list[float], list[int]]:
        """The continuations merged into a trie (parents before children, in insertion order):
        each node's token, parent, summed weight (match length squared per occurrence through
        it) and longest match among those occurrences. Plain lists: this runs per request per
        step, on a few dozen nodes."""
        tokens: list[int] = []
        parents: list[int] = []
        weights: list[float] = []
        best_match: list[int] = []
        children: dict[tuple[int, int], int] = {}
        for continuation, match in zip(continuations, match_lengths):
            node, weight = ROOT, float(match * match)
            for token in continuation.tolist() if isinstance(continuation, np.ndarray) else continuation:
                child = children.get((node, token))
                if child is None:
                    child = children[(node, token)] = len(tokens)
                    tokens.append(token)
                    parents.append(node)
                    weights.append(0.0)
                    best_match.append(match)
                elif match > best_match[child]:
                    best_match[child] = match
                weights[child] += weight
                node = child
        return tokens, parents, weights, best_match

    def nothing(self) -> DraftTree:
        self._last_tree, self._last_buckets = None, []
        return _NO_DRAFT

    def observe(self, step: StepResult) -> None:
        if self._last_tree is None:
            return
        self.estimate.learn(self._last_tree, self._last_buckets, step)
        self._last_tree = None
