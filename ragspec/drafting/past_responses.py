"""Past-responses drafter (SuffixDecoding's global tree): answers already generated become a
drafting source for later requests, so repeated or similar questions get faster each time.

One instance per scope (the engine, or one per index). Memory is bounded: past `max_tokens`
stored tokens, the older half of the responses is evicted and the index rebuilt.
"""

from __future__ import annotations

from collections import deque

import numpy as np

from ragspec.config import SpecConfig
from ragspec.drafting.base import DraftContext
from ragspec.drafting.continuations import ContinuationDrafter, draft_depth
from ragspec.drafting.suffix_index import SEPARATOR, NgramIndex
from ragspec.types import DraftTree


PROMPT_TAIL = 32  # prompt tokens kept in front of each stored answer


class PastResponsesDrafter(ContinuationDrafter):
    name = "past"

    def __init__(self, config: SpecConfig | None = None, max_tokens: int = 200_000):
        super().__init__()
        self.config = config or SpecConfig()
        self.max_tokens = max_tokens
        self._responses: deque[np.ndarray] = deque()
        self.index = NgramIndex()

    @property
    def num_responses(self) -> int:
        return len(self._responses)

    def remember(self, response: list[int] | np.ndarray) -> None:
        response = np.asarray(response, dtype=np.int64)
        if len(response) < 2:
            return
        self._responses.append(response)
        if len(self.index) + len(response) + 1 > self.max_tokens:
            self._evict()
        else:
            self.index.extend(np.concatenate([[SEPARATOR], response]))

    def _evict(self) -> None:
        while len(self._responses) > 1 and sum(map(len, self._responses)) > self.max_tokens // 2:
            self._responses.popleft()
        self.index = NgramIndex()
        for response in self._responses:
            self.index.extend(np.concatenate([[SEPARATOR], response[-(self.max_tokens // 2) :]]))

    def propose(self, context: DraftContext) -> DraftTree:
        if not len(self.index) or context.max_nodes <= 0:
            return self.nothing()
        starts, lengths = self.index.matches(context.tokens, self.config.max_occurrences, self.config.max_match)
        continuations = [
            self.index.following(start, draft_depth(match, self.config.max_depth))
            for start, match in zip(starts.tolist(), lengths.tolist())
        ]
        keep = [i for i, c in enumerate(continuations) if len(c)]
        if not keep:
            return self.nothing()
        return self.tree_from([continuations[i] for i in keep], lengths[keep])

    def finish_request(self, prompt_ids, generated_ids) -> None:
        """Store the answer behind the end of its prompt, so the same question asked again
        matches on the question itself and drafts the answer from its first token."""
        self.remember([*prompt_ids[-PROMPT_TAIL:], *generated_ids])
