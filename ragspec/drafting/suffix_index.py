"""An incremental n-gram index over a growing token sequence: where did this suffix occur?

For each n in NGRAM_SIZES, a dict from the hash of an n-gram to the positions right after its
occurrences. Appending a token costs O(len(NGRAM_SIZES)); appending a 30k-token prompt is one
vectorised hashing pass. Hash collisions are harmless: every match is re-checked token by token
(one that makes a long n-gram look present where a shorter one is not is ignored).
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from ragspec.types import TokenBuffer

NGRAM_SIZES = (1, 2, 3, 4, 6, 8, 12, 16)
SEPARATOR = -1  # between unrelated sequences (e.g. stored responses); matches no real token
_HASH_BASE = np.uint64(0x9E3779B97F4A7C15)
_MASK = (1 << 64) - 1
_POWERS = [pow(int(_HASH_BASE), i, 1 << 64) for i in range(max(NGRAM_SIZES) + 1)]
SMALL_EXTEND = 16  # appending at most this many tokens (a decode step) hashes in plain Python


def ngram_hashes(tokens: np.ndarray, ends: np.ndarray, n: int) -> np.ndarray:
    """Hash of tokens[end - n : end] for each end (all ends must be >= n). [len(ends)] uint64."""
    hashes = np.zeros(len(ends), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for offset in range(n, 0, -1):
            hashes = hashes * _HASH_BASE + tokens[ends - offset].astype(np.uint64)
    return hashes


def suffix_hashes(tokens: list[int], sizes: tuple[int, ...]) -> dict[int, int]:
    """ngram_hashes of the last n tokens of `tokens`, for every n in sizes (ascending) that fits, in
    one pass of Python ints: a step appends a few tokens, where numpy's per-call overhead is ~10x
    the work. Same values: the hash of the last n tokens is sum(token[-i] * BASE**(i - 1))."""
    hashes, value, n = {}, 0, 0
    for size in sizes:
        if size > len(tokens):
            break
        while n < size:
            n += 1
            value = (value + (tokens[-n] & _MASK) * _POWERS[n - 1]) & _MASK
        hashes[size] = value
    return hashes


class NgramIndex:
    def __init__(self, sizes: tuple[int, ...] = NGRAM_SIZES):
        self.sizes = tuple(sorted(sizes))
        # defaultdicts: filing a position is one `table[key].append(position)`; lookups use .get()
        self._followers: dict[int, defaultdict[int, list[int]]] = {n: defaultdict(list) for n in self.sizes}
        self._buffer = TokenBuffer([])
        # _prefix[i]: the hash of tokens[:i] (sum of token[j] * BASE**(i - 1 - j)), so the hash of
        # tokens[p - n : p] is _prefix[p] - _prefix[p - n] * BASE**n: a step's new positions cost
        # one multiply per n-gram size
        self._prefix: list[int] = [0]
        # (n, BASE**n, its table) ascending: what a decode step's few new positions are filed under
        self._tables = [(n, _POWERS[n], self._followers[n]) for n in self.sizes]
        self._last_keys: tuple[int, list[int]] = (-1, [])  # (position, _keys_at(position))

    def __len__(self) -> int:
        return len(self._buffer)

    @property
    def tokens(self) -> np.ndarray:
        return self._buffer.view()

    def extend(self, tokens: np.ndarray | list[int]) -> None:
        """Append tokens; each new position p is indexed under the n-grams that end right before it."""
        start = len(self._buffer)
        self._buffer.extend(tokens)
        self._extend_prefix(start)
        if len(self._buffer) - start <= SMALL_EXTEND:
            self._extend_small(start)
            return
        positions = np.arange(max(start, 1), len(self._buffer))
        data = self._buffer.view()
        for n in self.sizes:
            valid = positions[positions >= n]
            table = self._followers[n]
            for key, position in zip(ngram_hashes(data, valid, n).tolist(), valid.tolist()):
                table[key].append(position)

    def _extend_prefix(self, start: int) -> None:
        prefix, base = self._prefix, int(_HASH_BASE)
        value = prefix[-1]
        for token in self._buffer.view()[start:].tolist():
            value = (value * base + (token & _MASK)) & _MASK
            prefix.append(value)

    def _extend_small(self, start: int) -> None:
        """extend() for a few new positions, in plain Python (numpy's per-call overhead would
        cost more than the work)."""
        prefix, longest = self._prefix, self.sizes[-1]
        for position in range(max(start, 1), len(self._buffer)):
            if position < longest or position == self._last_keys[0]:  # a short prefix, or keys known
                for (_, _, table), key in zip(self._tables, self._keys_at(position)):
                    table[key].append(position)
            else:  # the common case: each key computed where it is filed, no list of keys
                head = prefix[position]
                for n, power, table in self._tables:
                    table[(head - prefix[position - n] * power) & _MASK].append(position)

    def _keys_at(self, position: int) -> list[int]:
        """The keys of the n-grams ending right before `position`, for each size that fits
        (ascending), from the prefix hashes (same values as ngram_hashes). The last position
        asked for is remembered: the context drafter looks up its suffix at the end, and the
        next extend files that very position."""
        if self._last_keys[0] == position:
            return self._last_keys[1]
        prefix = self._prefix
        head = prefix[position]
        if position >= self.sizes[-1]:  # every size fits (always, after the first tokens)
            keys = [(head - prefix[position - n] * power) & _MASK for n, power, _ in self._tables]
        else:
            keys = [(head - prefix[position - n] * power) & _MASK for n, power, _ in self._tables if n <= position]
        self._last_keys = (position, keys)
        return keys

    def matches(self, query: np.ndarray, max_results: int, max_match: int) -> tuple[np.ndarray, np.ndarray]:
        """Positions following earlier occurrences of query's suffix, longest match first (latest
        first among equals), with each match's true length (up to max_match). Both [<= max_results]."""
        starts, lengths = self.match_lists(query, max_results, max_match)
        return np.asarray(starts, dtype=np.int64), np.asarray(lengths, dtype=np.int64)

    def match_lists(self, query: np.ndarray, max_results: int, max_match: int,
                    keys: list[int] | None = None) -> tuple[list[int], list[int]]:
        """`matches` as Python lists: a decode step looks up a handful of positions, where numpy's
        per-call overhead would cost more than the work (the vLLM proposer does this per row).
        `keys`: the query's suffix keys when already known (`own_suffix_keys()` of an index with
        the same sizes whose tokens are the query): not hashed again."""
        if keys is None:
            keys = list(suffix_hashes(query[-self.sizes[-1]:].tolist(), self.sizes).values())
        return self._lookup(query, keys, max_results, max_match)

    def own_suffix_keys(self) -> list[int]:
        """The keys of the n-grams that end the index's tokens, one per size that fits (ascending):
        `match_lists`' keys for those tokens as the query, in another index with the same sizes."""
        return self._keys_at(len(self._buffer))

    def own_suffix_matches(self, max_results: int, max_match: int) -> tuple[list[int], list[int]]:
        """`match_lists` of the index's own tokens (the context drafter's query), keyed from the
        prefix hashes."""
        return self._lookup(self._buffer.view(), self._keys_at(len(self._buffer)), max_results, max_match)

    def _lookup(self, query: np.ndarray, keys: list[int], max_results: int,
                max_match: int) -> tuple[list[int], list[int]]:
        """Starts and true match lengths of the query whose suffix n-grams hash to `keys` (one
        per size that fits, ascending). An n-gram occurs only where its shorter suffixes do, so
        the sizes are probed upwards until one misses or holds a single position, then collected
        longest first."""
        occurrences: list[list[int]] = []
        for (_, _, table), key in zip(self._tables, keys):
            followers = table.get(key)
            if not followers:
                break
            occurrences.append(followers)
            if len(followers) == 1:  # a longer n-gram can only occur there too: it comes first either way
                break
        starts: list[int] = []
        for followers in reversed(occurrences):
            latest_first = followers[: -max_results - 1 : -1]
            if starts:
                seen = set(starts)
                starts.extend(p for p in latest_first if p not in seen)
            else:
                starts = latest_first
            if len(starts) >= max_results:
                break
        del starts[max_results:]
        lengths = self._match_lengths(query, starts, max_match)
        if 0 in lengths:  # a hash collision: no match at all
            kept = [i for i, length in enumerate(lengths) if length]
            return [starts[i] for i in kept], [lengths[i] for i in kept]
        return starts, lengths

    def _match_lengths(self, query: np.ndarray, starts: list[int], max_match: int) -> list[int]:
        """How many tokens before each start equal the last tokens of query (up to max_match)."""
        if not starts:
            return []
        recent = query[-max_match:].tolist()[::-1]  # recent[j]: query's token j + 1 back from its end
        data = self._buffer.view()
        lengths = []
        for start in starts:
            earlier = data[max(0, start - max_match) : start].tolist()[::-1]  # same order, before start
            length = 0
            for mine, theirs in zip(earlier, recent):
                if mine != theirs:
                    break
                length += 1
            lengths.append(length)
        return lengths

    def following(self, start: int, depth: int) -> np.ndarray:
        """Up to `depth` tokens from `start`, cut at the first SEPARATOR."""
        window = self.tokens[start : start + depth]
        cut = np.flatnonzero(window == SEPARATOR)
        return window[: cut[0]] if len(cut) else window

    def following_lists(self, starts: list[int], depths: list[int]) -> list[list[int]]:
        """`following` for each (start, depth), as Python lists (what a trie is built from)."""
        data = self._buffer.view()
        continuations = []
        for start, depth in zip(starts, depths):
            window = data[start : start + depth].tolist()
            if SEPARATOR in window:
                window = window[: window.index(SEPARATOR)]
            continuations.append(window)
        return continuations
