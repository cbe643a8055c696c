"""Context suffix drafter (prompt lookup / CopySpec / SuffixDecoding family).

Finds the longest earlier occurrences of the current suffix in the request's own tokens (prompt,
chat history, everything generated so far) and proposes what followed them. Every occurrence
becomes a branch, so frequent continuations get high scores; a long match earns a deep draft, a
short one a shallow one. The index grows incrementally as tokens are committed, so a 30k-token
prompt costs one vectorised pass and each step costs microseconds.
"""

from __future__ import annotations

from ragspec.config import SpecConfig
from ragspec.drafting.base import AcceptanceEstimate, DraftContext
from ragspec.drafting.continuations import ContinuationDrafter, draft_depth
from ragspec.drafting.suffix_index import NGRAM_SIZES, NgramIndex
from ragspec.types import DraftTree

__all__ = ["NGRAM_SIZES", "ContextSuffixDrafter"]


class ContextSuffixDrafter(ContinuationDrafter):
    """Per-request drafter: make a new one for every request (the estimate may be shared)."""

    name = "context"

    def __init__(self, config: SpecConfig | None = None, estimate: AcceptanceEstimate | None = None):
        super().__init__(estimate)
        self.config = config or SpecConfig()
        self.index = NgramIndex()

    def propose(self, context: DraftContext) -> DraftTree:
        tokens = context.tokens
        self.index.extend(tokens[len(self.index) :])
        if context.max_nodes <= 0:
            return self.nothing()
        starts, lengths = self.index.matches(tokens, self.config.max_occurrences, self.config.max_match)
        if not len(starts):
            return self.nothing()
        continuations = [
            self.index.following(start, draft_depth(match, self.config.max_depth))
            for start, match in zip(starts.tolist(), lengths.tolist())
        ]
        return self.tree_from(continuations, lengths)
