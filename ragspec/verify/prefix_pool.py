"""A small LRU pool of finished requests' KV caches, so that several conversations served in turn
each find their earlier turns cached (not only the last request's)."""

from __future__ import annotations

from collections.abc import Sequence

from ragspec.kvcache import common_prefix_length
from ragspec.verify.verifier import KVPrefix

DEFAULT_ENTRIES = 4
DEFAULT_TOKENS = 16_384  # cached tokens in all entries together; the embedded model in bf16 holds
# 30 layers x (K, V) x 3 heads x 64 dims x 2 bytes = 23 KB of KV per token, ~370 MB at this limit


class PrefixPool:
    def __init__(self, max_entries: int = DEFAULT_ENTRIES, max_tokens: int = DEFAULT_TOKENS):
        if max_entries < 1 or max_tokens < 1:
            raise ValueError(f"need max_entries >= 1 and max_tokens >= 1, got {max_entries} and {max_tokens}")
        self.max_entries = max_entries
        self.max_tokens = max_tokens
        self._entries: list[KVPrefix] = []  # least recently used first

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def num_tokens(self) -> int:
        return sum(len(entry.token_ids) for entry in self._entries)

    def take(self, token_ids: Sequence[int]) -> KVPrefix | None:
        """A prefix for a request of `token_ids`, from the entry sharing the longest leading run
        with it (the most recent among equals). A request sharing more than half of the entry is
        its conversation's next turn: it gets the entry itself, to crop and extend in place (the
        entry's tail rarely matches: the answer's text re-encodes to other tokens, measured 63 of
        119 tokens shared). One sharing less (a system prompt) gets a copy of the shared rows, and
        the entry stays for its own conversation. None when no entry shares the first token."""
        best, best_shared = None, 0
        for entry in self._entries:
            shared = common_prefix_length(entry.token_ids, token_ids)
            if shared and shared >= best_shared:
                best, best_shared = entry, shared
        if best is None:
            return None
        if 2 * best_shared <= len(best.token_ids):
            return best.head(best_shared)
        self._entries.remove(best)
        return best

    def put(self, prefix: KVPrefix) -> None:
        """Keep `prefix` as the most recent entry; drop the least recent beyond the limits."""
        self._entries.append(prefix)
        while len(self._entries) > self.max_entries or (len(self._entries) > 1 and self.num_tokens > self.max_tokens):
            self._entries.pop(0)

    def clear(self) -> None:
        self._entries.clear()
