"""Context suffix drafter (prompt lookup / CopySpec / SuffixDecoding family).

Finds the longest earlier occurrence of the current suffix in the request's own tokens (prompt,
chat history, everything generated so far) and proposes what followed it. Every occurrence of
that longest match becomes a branch, so frequent continuations get high scores; a long match
earns a deep draft, a short one a shallow one.

Index: for each n-gram size in NGRAM_SIZES, a dict from the n-gram's hash to the positions right
after it. It grows incrementally as tokens are committed (O(len(NGRAM_SIZES)) per token), so a
30k-token prompt costs one vectorised pass and each step costs microseconds.
"""

from __future__ import annotations

import numpy as np

from ragspec.config import SpecConfig
from ragspec.drafting.base import AcceptanceEstimate, DraftContext, judge_own_tree, target_continuation
from ragspec.drafting.tree import TrieBuilder
from ragspec.types import DraftTree, StepResult

NGRAM_SIZES = (1, 2, 3, 4, 6, 8, 12, 16)
_HASH_BASE = np.uint64(0x9E3779B97F4A7C15)

# Prior P(draft token correct | parent correct) by match-length bucket, before any evidence.
_PRIOR_BY_MATCH = {0: 0.2, 1: 0.3, 2: 0.4, 3: 0.5, 4: 0.6, 5: 0.7, 6: 0.8}


def match_bucket(match_length: int) -> int:
    """0 for 1 token, 1 for 2, 2 for 3-4, 3 for 5-8, 4 for 9-16, 5 for 17-32, 6 beyond."""
    return min(6, int(np.ceil(np.log2(max(match_length, 1)))))


def depth_bucket(depth: int) -> int:
    return min(3, int(np.ceil(np.log2(max(depth, 1)))))


def ngram_hashes(tokens: np.ndarray, ends: np.ndarray, n: int) -> np.ndarray:
    """Hash of tokens[end - n : end] for each end (all ends must be >= n). [len(ends)] uint64."""
    hashes = np.zeros(len(ends), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for offset in range(n, 0, -1):
            hashes = hashes * _HASH_BASE + tokens[ends - offset].astype(np.uint64)
    return hashes


class ContextSuffixDrafter:
    """Per-request drafter: make a new one for every request."""

    name = "context"

    def __init__(self, config: SpecConfig | None = None, estimate: AcceptanceEstimate | None = None):
        """`estimate` may be shared across requests so what one request learns carries over."""
        self.config = config or SpecConfig()
        self._followers: dict[int, dict[int, list[int]]] = {n: {} for n in NGRAM_SIZES}
        self._indexed_until = 1  # positions p < this have their preceding n-grams indexed
        self._estimate = estimate or self.new_estimate()
        self._last_tree: DraftTree | None = None
        self._last_buckets: list[tuple[int, int]] = []

    @staticmethod
    def new_estimate() -> AcceptanceEstimate:
        """P(correct | parent correct) per (match bucket, depth bucket), from the prior."""
        return AcceptanceEstimate(
            {(m, d): min(0.9, p + 0.1 * (d > 0)) for m, p in _PRIOR_BY_MATCH.items() for d in range(4)}
        )

    # -- index -----------------------------------------------------------------------------
    def _catch_up(self, tokens: np.ndarray) -> None:
        """Index every position p in [indexed_until, len - 1): tokens[p] follows its n-grams.

        The last position is left out on purpose: it is the suffix being looked up.
        """
        stop = len(tokens) - 1
        if stop <= self._indexed_until:
            return
        positions = np.arange(self._indexed_until, stop)
        for n in NGRAM_SIZES:
            valid = positions[positions >= n]
            if not len(valid):
                continue
            table = self._followers[n]
            for key, position in zip(ngram_hashes(tokens, valid, n).tolist(), valid.tolist()):
                followers = table.get(key)
                if followers is None:
                    table[key] = [position]
                else:
                    followers.append(position)
        self._indexed_until = stop

    def _matches(self, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Positions following earlier occurrences of the current suffix, longest matches first
        (latest first within a length), and the true length of each match (checked token by
        token, so hash collisions drop out). At most max_occurrences."""
        length, limit = len(tokens), self.config.max_occurrences
        starts: list[int] = []
        for n in sorted(NGRAM_SIZES, reverse=True):
            if length < n or len(starts) >= limit:
                continue
            key = int(ngram_hashes(tokens, np.array([length]), n)[0])
            followers = self._followers[n].get(key, ())
            seen = set(starts)
            starts.extend(p for p in reversed(followers[-limit:]) if p not in seen)
        found = np.asarray(starts[:limit], dtype=np.int64)
        lengths = self._match_lengths(tokens, found)
        keep = lengths > 0
        return found[keep], lengths[keep]

    def _match_lengths(self, tokens: np.ndarray, starts: np.ndarray) -> np.ndarray:
        """How many tokens before each start equal the tokens before the end. [len(starts)]"""
        back = np.arange(1, self.config.max_match + 1)
        earlier = starts[:, None] - back[None, :]  # [occurrences, max_match]
        current = len(tokens) - back  # [max_match]
        valid = (earlier >= 0) & (current >= 0)[None, :]
        same = (tokens[np.maximum(earlier, 0)] == tokens[np.maximum(current, 0)][None, :]) & valid
        return np.cumprod(same, axis=1).sum(axis=1)

    # -- drafting --------------------------------------------------------------------------
    def propose(self, context: DraftContext) -> DraftTree:
        tokens = context.tokens
        self._catch_up(tokens)
        starts, lengths = self._matches(tokens)
        self._last_tree, self._last_buckets = None, []
        if not len(starts) or context.max_nodes <= 0:
            return DraftTree.empty()
        tree, buckets = self._continuation_tree(tokens, starts, lengths)
        self._last_tree, self._last_buckets = tree, buckets
        return tree

    def _continuation_tree(self, tokens, starts, lengths) -> tuple[DraftTree, list[tuple[int, int]]]:
        """Weigh continuations in a trie (match length squared per occurrence), then score:
        P(node) = P(parent) * share of the parent's weight that goes on to this token
                  * learned P(correct | parent correct) for its match length and depth."""
        counts = TrieBuilder()  # scores hold occurrence counts while counting
        best_match: list[int] = []
        for start, match in zip(starts.tolist(), lengths.tolist()):
            depth = min(self.config.max_depth, 1 + 2 * match)
            node, weight = -1, float(match * match)  # a longer match is stronger evidence
            for token in tokens[start : start + depth].tolist():
                node = counts.add(node, token, 0.0, self.name)
                counts.scores[node] += weight  # add() with score 0 leaves the weight as it was
                if node == len(best_match):
                    best_match.append(match)
                else:
                    best_match[node] = max(best_match[node], match)
        root_weight = float(np.sum(lengths.astype(np.float64) ** 2))
        scores, buckets, depths = [], [], []
        for node, parent in enumerate(counts.parents):
            depth = 1 if parent < 0 else depths[parent] + 1
            parent_count = root_weight if parent < 0 else counts.scores[parent]
            bucket = (match_bucket(best_match[node]), depth_bucket(depth))
            parent_score = 1.0 if parent < 0 else scores[parent]
            scores.append(parent_score * counts.scores[node] / parent_count * self._estimate.rate(bucket))
            buckets.append(bucket)
            depths.append(depth)
        counts.scores = scores
        return counts.build(), buckets

    def observe(self, step: StepResult) -> None:
        if self._last_tree is None:
            return
        tested, correct = judge_own_tree(self._last_tree, target_continuation(step))
        for node in np.flatnonzero(tested).tolist():
            self._estimate.update(self._last_buckets[node], 1, int(correct[node]))
        self._last_tree = None
