"""Corpus datastore drafter (REST): what followed the current suffix in the indexed documents.

Binary search of the longest suffix (16 tokens down to 2) in the index's suffix array, up to
`max_occurrences` continuations, merged into a trie where frequent prefixes score high. Scope:
the chunks retrieved for this request, or the whole index.
"""

from __future__ import annotations

import numpy as np

from ragspec.config import SpecConfig
from ragspec.drafting.base import AcceptanceEstimate, DraftContext
from ragspec.drafting.continuations import ContinuationDrafter, ScoredTrie, draft_depth

MIN_MATCH, MAX_MATCH = 2, 16


class DatastoreDrafter(ContinuationDrafter):
    name = "datastore"

    def __init__(
        self,
        datastore,
        allowed_ranges: list[tuple[int, int]] | None = None,
        config: SpecConfig | None = None,
        estimate: AcceptanceEstimate | None = None,
    ):
        """`datastore`: an index's TokenDatastore; `allowed_ranges`: token ranges [start, end)
        of the retrieved chunks, or None for the whole index."""
        super().__init__(estimate)
        self.datastore = datastore
        self.allowed_ranges = allowed_ranges
        self.config = config or SpecConfig()

    def propose_trie(self, context: DraftContext) -> ScoredTrie | None:
        if context.max_nodes <= 0:
            return None
        match, positions = self.datastore.longest_match(
            context.tokens, MIN_MATCH, MAX_MATCH, self.config.max_occurrences, self.allowed_ranges
        )
        if match == 0:
            return None
        continuations = [c for c in self.datastore.following(positions, draft_depth(match, self.config.max_depth)) if len(c)]
        if not continuations:
            return None
        return self.score_trie([np.asarray(c, dtype=np.int64) for c in continuations], np.full(len(continuations), match))
