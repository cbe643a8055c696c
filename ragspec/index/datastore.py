"""Token datastore: every chunk's target-tokenizer ids, separated, plus their suffix array.

Lookups answer "where in the corpus does the current context's suffix occur, and what follows
it?" (REST). The suffix array is searched with a manual binary search that compares token
sequences as big-endian byte strings, so one comparison is a single `bytes` comparison.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

log = logging.getLogger(__name__)

SEPARATOR = -1  # between chunks in tokens.npy; sorts below every real token, matches none
_SAMPLE_FACTOR = 2  # without a scope, look at this many evenly spaced hits per wanted position


def build_suffix_array(tokens) -> np.ndarray:
    """Suffix array of `tokens` (SEPARATOR = -1 allowed): int32 when it fits, else int64.

    `tokens`: an array, or the path of a tokens.npy file, read a block at a time (file reads, not a
    memory map, so the tokens do not count in the build's resident memory). Memory: the uint32
    symbols (4 bytes/token) plus the suffix array (4 bytes/token; 8 past 2^31 tokens) -- the one
    part of a build that is O(tokens) in RAM.
    """
    from pydivsufsort import divsufsort

    symbols = _symbols(tokens)
    if len(symbols) == 0:
        return np.zeros(0, dtype=np.int32)
    suffix_array = divsufsort(symbols)
    del symbols
    dtype = np.int32 if len(suffix_array) < np.iinfo(np.int32).max else np.int64
    return np.ascontiguousarray(suffix_array, dtype=dtype)


def read_npy_header(handle) -> tuple[tuple[int, ...], np.dtype]:
    """(shape, dtype) of the .npy file open in `handle`, left positioned at its data."""
    version = np.lib.format.read_magic(handle)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, _, dtype = read(handle)
    return shape, dtype


def _symbols(tokens, block: int = 1 << 22) -> np.ndarray:
    """tokens + 1 as uint32 (SEPARATOR -> 0, its own smallest symbol), converted block by block."""
    from pathlib import Path

    if isinstance(tokens, (str, Path)):
        with open(tokens, "rb") as handle:
            shape, dtype = read_npy_header(handle)
            symbols = np.empty(shape[0], dtype=np.uint32)
            for start in range(0, shape[0], block):
                part = np.fromfile(handle, dtype=dtype, count=min(block, shape[0] - start))
                symbols[start:start + len(part)] = part.astype(np.int64) + 1
        return symbols
    tokens = np.asarray(tokens)
    symbols = np.empty(len(tokens), dtype=np.uint32)
    for start in range(0, len(tokens), block):
        symbols[start:start + block] = tokens[start:start + block].astype(np.int64) + 1
    return symbols


def _merge_ranges(ranges: list[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
    """Sorted, disjoint [start, end) ranges as (starts, ends) arrays; empty ranges dropped."""
    merged: list[list[int]] = []
    for start, end in sorted((int(s), int(e)) for s, e in ranges if e > s):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    array = np.array(merged, dtype=np.int64).reshape(-1, 2)
    return array[:, 0], array[:, 1]


def _evenly(values: np.ndarray, limit: int) -> np.ndarray:
    """At most `limit` values spread evenly over `values` (keeps the continuation mix)."""
    if len(values) <= limit:
        return values
    return values[np.linspace(0, len(values) - 1, limit).round().astype(np.int64)]


@dataclass
class TokenDatastore:
    tokens: np.ndarray  # [n] int32 (memmap), SEPARATOR between chunks
    suffix_array: np.ndarray  # [n] int32/int64 (memmap), suffix start positions in sorted order
    _key: bytes | None = field(default=None, repr=False)
    _width: int = field(default=0, repr=False)
    _sa_view: memoryview | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.tokens)

    def prepare(self) -> None:
        """Build the lookup key now (else on the first lookup; ~0.2 s and 2 bytes/token at 10M tokens).

        The key is a big-endian byte copy of tokens + 1, whose byte order is the suffix-array order.
        """
        if self._key is not None:
            return
        top = int(self.tokens.max()) + 1 if len(self.tokens) else 1
        self._width = 2 if top < 1 << 16 else 4
        self._key = (self.tokens.astype(np.int64) + 1).astype(f">u{self._width}").tobytes()
        self._sa_view = memoryview(np.ascontiguousarray(self.suffix_array))

    def _pattern_bytes(self, pattern: np.ndarray) -> bytes:
        return (pattern.astype(np.int64) + 1).astype(f">u{self._width}").tobytes()

    def _sa_range(self, pattern: bytes) -> tuple[int, int]:
        """[lo, hi) of suffix-array rows whose suffix starts with `pattern`."""
        key, sa, width, size = self._key, self._sa_view, self._width, len(pattern)
        lo, hi = 0, len(sa)
        while lo < hi:  # first row whose prefix >= pattern
            mid = (lo + hi) >> 1
            start = sa[mid] * width
            if key[start:start + size] < pattern:
                lo = mid + 1
            else:
                hi = mid
        first, hi = lo, len(sa)
        while lo < hi:  # first row whose prefix > pattern
            mid = (lo + hi) >> 1
            start = sa[mid] * width
            if key[start:start + size] <= pattern:
                lo = mid + 1
            else:
                hi = mid
        return first, lo

    def _valid(self, ends: np.ndarray, scope: tuple[np.ndarray, np.ndarray] | None) -> np.ndarray:
        """Keep end positions with a real continuation token, inside the scope if one is given."""
        ends = ends[ends < len(self.tokens)]
        ends = ends[self.tokens[ends] != SEPARATOR]
        if scope is not None and len(ends):
            starts, stops = scope
            slot = np.searchsorted(starts, ends, side="right") - 1
            ends = ends[(slot >= 0) & (ends < stops[np.maximum(slot, 0)])]
        return ends

    def _scan_scope(self, pattern: np.ndarray, scope: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
        """End positions of `pattern` found by scanning the scope directly (small scopes)."""
        size, found = len(pattern), []
        for start, stop in zip(*scope):
            window = np.asarray(self.tokens[max(int(start) - size, 0):int(stop)])
            if len(window) < size:
                continue
            views = np.lib.stride_tricks.sliding_window_view(window, size)
            hits = np.flatnonzero((views == pattern).all(axis=1))
            found.append(hits + max(int(start) - size, 0) + size)
        ends = np.concatenate(found) if found else np.zeros(0, dtype=np.int64)
        return self._valid(ends.astype(np.int64), scope)

    def _positions(self, context: np.ndarray, length: int, limit: int, scope) -> np.ndarray:
        pattern = context[-length:]
        lo, hi = self._sa_range(self._pattern_bytes(pattern))
        if hi <= lo:
            return np.zeros(0, dtype=np.int64)
        if scope is not None:
            if hi - lo > int((scope[1] - scope[0]).sum()):
                return _evenly(self._scan_scope(pattern, scope), limit)
            ends = np.asarray(self.suffix_array[lo:hi], dtype=np.int64) + length
            return _evenly(np.sort(self._valid(ends, scope)), limit)
        wanted = limit * _SAMPLE_FACTOR
        rows = np.arange(lo, hi) if hi - lo <= wanted else np.linspace(lo, hi - 1, wanted).round().astype(np.int64)
        ends = self._valid(np.asarray(self.suffix_array[rows], dtype=np.int64) + length, None)
        if len(ends) == 0 and hi - lo > len(rows):  # the sample only hit chunk ends: look at all
            ends = self._valid(np.asarray(self.suffix_array[lo:hi], dtype=np.int64) + length, None)
        return np.sort(_evenly(np.sort(ends), limit))

    def longest_match(
        self,
        context: np.ndarray,
        min_len: int = 2,
        max_len: int = 16,
        max_positions: int = 64,
        allowed_ranges: list[tuple[int, int]] | None = None,
    ) -> tuple[int, np.ndarray]:
        """Longest L in [min_len, max_len] with context[-L:] in the datastore, and where it ends.

        Returns (L, positions): positions p (sorted int64, at most max_positions) with
        tokens[p-L:p] == context[-L:] and tokens[p] a real token (the first continuation).
        With allowed_ranges, only p inside one of the [start, end) ranges count. (0, []) if none.
        """
        context = np.asarray(context[-max_len:] if max_len > 0 else [], dtype=np.int64).ravel()
        cut = np.flatnonzero(context < 0)  # a separator in the context ends what can match
        if len(cut):
            context = context[cut[-1] + 1:]
        empty = (0, np.zeros(0, dtype=np.int64))
        top = min(max_len, len(context))
        if len(self.tokens) == 0 or top < max(min_len, 1) or max_positions <= 0:
            return empty
        self.prepare()
        scope = _merge_ranges(allowed_ranges) if allowed_ranges is not None else None
        if scope is not None and len(scope[0]) == 0:
            return empty
        found: dict[int, np.ndarray] = {}

        def hits(length: int) -> np.ndarray:
            if length not in found:
                found[length] = self._positions(context, length, max_positions, scope)
            return found[length]

        # A hit of length L ends where a hit of length L-1 ends, so "has a hit" is monotone in L:
        # try the longest first (copying is the common case), then bisect.
        lo = max(min_len, 1)
        if len(hits(top)):
            return top, hits(top)
        if not len(hits(lo)):
            return empty
        hi = top  # invariant: hits(lo) non-empty, hits(hi) empty
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if len(hits(mid)):
                lo = mid
            else:
                hi = mid
        return lo, hits(lo)

    def following(self, positions: np.ndarray, depth: int) -> list[np.ndarray]:
        """For each position, the up to `depth` tokens from it, cut at the first SEPARATOR."""
        positions = np.asarray(positions, dtype=np.int64).ravel()
        n = len(self.tokens)
        if len(positions) == 0 or depth <= 0 or n == 0:
            return [np.zeros(0, dtype=np.int64) for _ in positions]
        grid = positions[:, None] + np.arange(depth, dtype=np.int64)[None, :]  # [m, depth]
        inside = (grid >= 0) & (grid < n)
        values = np.where(inside, np.asarray(self.tokens)[np.clip(grid, 0, n - 1)], SEPARATOR)
        stop = values == SEPARATOR
        lengths = np.where(stop.any(axis=1), stop.argmax(axis=1), depth)
        return [values[row, :length].astype(np.int64) for row, length in enumerate(lengths)]
