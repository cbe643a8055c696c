"""Past-responses drafter (SuffixDecoding's global tree): answers already generated become a
drafting source for later requests, so repeated or similar questions get faster each time.

One instance per scope (SpecConfig.past_scope: one per index, or one for the whole engine).
Memory is bounded: past `max_tokens` stored tokens, the older half of the responses is evicted
and the index rebuilt. With a `state_path` (the index's `past_responses.npy`, see
indexes/README.md) the stored responses are loaded at start and saved after every request, so
a new process drafts from what earlier ones answered. An unreadable or invalid file is ignored
with a warning; processes sharing an index each save all the responses they hold, the last save
wins (`base.write_atomically`), and a failed save is only a warning.
"""

from __future__ import annotations

import logging
from collections import deque
from pathlib import Path

import numpy as np

from ragspec.config import SpecConfig
from ragspec.drafting.base import DraftContext, load_state, save_state
from ragspec.drafting.continuations import ContinuationDrafter, ScoredTrie, draft_depth
from ragspec.drafting.suffix_index import SEPARATOR, NgramIndex


log = logging.getLogger(__name__)

PROMPT_TAIL = 32  # prompt tokens kept in front of each stored answer


class PastResponsesDrafter(ContinuationDrafter):
    name = "past"

    def __init__(self, config: SpecConfig | None = None, max_tokens: int = 200_000,
                 state_path: Path | None = None, vocab_size: int | None = None):
        super().__init__()
        self.config = config or SpecConfig()
        self.max_tokens = max_tokens
        self.state_path = state_path
        self._responses: deque[np.ndarray] = deque()
        self.index = NgramIndex()
        for response in self._load(vocab_size):
            self.remember(response)

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

    def propose_trie(self, context: DraftContext, suffix_keys: list[int] | None = None) -> ScoredTrie | None:
        """`suffix_keys`: the context's suffix n-gram keys when a request's own NgramIndex has
        them (`NgramIndex.own_suffix_keys`): the vLLM proposer saves hashing them again per row."""
        if not len(self.index) or context.max_nodes <= 0:
            return None
        starts, lengths = self.index.match_lists(context.tokens, self.config.max_occurrences, self.config.max_match,
                                                 suffix_keys)
        depths = [draft_depth(match, self.config.max_depth) for match in lengths]
        continuations = self.index.following_lists(starts, depths)
        keep = [i for i, c in enumerate(continuations) if c]
        if not keep:
            return None
        return self.score_trie([continuations[i] for i in keep], [lengths[i] for i in keep])

    def finish_request(self, prompt_ids, generated_ids) -> None:
        """Store the answer behind the end of its prompt, so the same question asked again
        matches on the question itself and drafts the answer from its first token."""
        self.remember([*prompt_ids[-PROMPT_TAIL:], *generated_ids])
        if self.state_path is not None:
            self._save()

    def _save(self) -> None:
        """All stored responses, each behind a SEPARATOR, as one int32 array (atomic replace;
        a read-only index still serves, it just does not learn across processes)."""
        parts = [np.concatenate([[SEPARATOR], r]) for r in self._responses]
        tokens = np.concatenate(parts).astype(np.int32) if parts else np.zeros(0, dtype=np.int32)
        save_state(self.state_path, tokens)  # warns, never raises

    def _load(self, vocab_size: int | None) -> list[np.ndarray]:
        """The saved responses, or none (with a warning) when the file is unreadable or not a
        1-D integer array of separators and token ids below vocab_size."""
        tokens = load_state(self.state_path, "past responses")
        if tokens is None:
            return []
        high = vocab_size if vocab_size is not None else np.iinfo(np.int32).max
        valid = tokens.ndim == 1 and tokens.dtype.kind in "iu"
        if valid and len(tokens):
            valid = tokens.min() >= SEPARATOR and tokens.max() < high
        if not valid:
            log.warning("ignoring %s: not a 1-D array of token ids below %d and separators", self.state_path, high)
            return []
        pieces = np.split(tokens.astype(np.int64), np.flatnonzero(tokens == SEPARATOR))
        return [piece[piece != SEPARATOR] for piece in pieces if len(piece) > 1]
