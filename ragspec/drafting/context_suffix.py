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
from ragspec.drafting.continuations import ContinuationDrafter, ScoredTrie, draft_depth
from ragspec.drafting.suffix_index import NGRAM_SIZES, NgramIndex

__all__ = ["NGRAM_SIZES", "ContextSuffixDrafter"]


class ContextSuffixDrafter(ContinuationDrafter):
    """Per-request drafter: make a new one for every request (the estimate may be shared)."""

    name = "context"

    def __init__(self, config: SpecConfig | None = None, estimate: AcceptanceEstimate | None = None):
        super().__init__(estimate)
        self.config = config or SpecConfig()
        self.index = NgramIndex()

    def propose_trie(self, context: DraftContext) -> ScoredTrie | None:
        tokens = context.tokens
        self.index.extend(tokens[len(self.index) :])
        if context.max_nodes <= 0:
            return None
        if len(self.index) == len(tokens):  # always, unless a caller handed a shorter context
            starts, lengths = self.index.own_suffix_matches(self.config.max_occurrences, self.config.max_match)
        else:
            starts, lengths = self.index.match_lists(tokens, self.config.max_occurrences, self.config.max_match)
        if not starts:
            return None
        depths = [draft_depth(match, self.config.max_depth) for match in lengths]
        return self.score_trie(self.index.following_lists(starts, depths), lengths)
