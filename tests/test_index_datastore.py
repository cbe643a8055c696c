"""Token datastore lookups against brute-force oracles (hypothesis)."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from ragspec.index.datastore import SEPARATOR, TokenDatastore, build_suffix_array

SMALL_VOCAB = 4  # few symbols: many repeats, long matches, ties


def make_datastore(tokens) -> TokenDatastore:
    tokens = np.asarray(tokens, dtype=np.int32)
    return TokenDatastore(tokens=tokens, suffix_array=build_suffix_array(tokens))


def oracle_longest(tokens, context, min_len, max_len, ranges):
    """Longest L and every valid end position, by scanning."""
    tokens, context = list(tokens), list(context)
    if any(t < 0 for t in context):
        context = context[max(i for i, t in enumerate(context) if t < 0) + 1:]
    for length in range(min(max_len, len(context)), max(min_len, 1) - 1, -1):
        pattern = context[-length:]
        ends = [
            p for p in range(length, len(tokens))
            if tokens[p - length:p] == pattern and tokens[p] != SEPARATOR
            and (ranges is None or any(s <= p < e for s, e in ranges))
        ]
        if ends:
            return length, ends
    return 0, []


token_lists = st.lists(st.sampled_from([SEPARATOR] + list(range(SMALL_VOCAB))), min_size=0, max_size=120)
contexts = st.lists(st.integers(0, SMALL_VOCAB - 1), min_size=0, max_size=20)
range_lists = st.one_of(
    st.none(), st.lists(st.tuples(st.integers(0, 130), st.integers(0, 40)).map(lambda r: (r[0], r[0] + r[1])), max_size=4)
)


@settings(max_examples=300)
@given(token_lists)
def test_suffix_array_sorts_suffixes(tokens):
    expected = sorted(range(len(tokens)), key=lambda i: tokens[i:])
    assert build_suffix_array(np.asarray(tokens, dtype=np.int32)).tolist() == expected


def test_suffix_array_handles_a_large_vocabulary():
    tokens = np.array([262_000, 5, 7, SEPARATOR, 70_000, 5, 262_000, 5, 9], dtype=np.int32)
    expected = sorted(range(len(tokens)), key=lambda i: tokens[i:].tolist())
    assert build_suffix_array(tokens).tolist() == expected
    length, ends = make_datastore(tokens).longest_match(np.array([3, 262_000, 5]))
    assert length == 2 and ends.tolist() == [2, 8]


@settings(max_examples=400)
@given(token_lists, contexts, st.integers(1, 4), st.integers(1, 10), range_lists)
def test_longest_match_equals_oracle(tokens, context, min_len, max_len, ranges):
    datastore = make_datastore(tokens)
    length, ends = datastore.longest_match(np.array(context), min_len, max_len, 1000, ranges)
    expected_length, expected_ends = oracle_longest(tokens, context, min_len, max_len, ranges)
    assert length == expected_length
    assert ends.dtype == np.int64 and ends.tolist() == expected_ends


@settings(max_examples=200)
@given(token_lists, contexts, st.integers(1, 5), range_lists)
def test_longest_match_caps_positions_to_a_subset(tokens, context, max_positions, ranges):
    datastore = make_datastore(tokens)
    length, ends = datastore.longest_match(np.array(context), 1, 8, max_positions, ranges)
    expected_length, expected_ends = oracle_longest(tokens, context, 1, 8, ranges)
    assert length == expected_length
    assert len(ends) == min(max_positions, len(expected_ends))
    assert set(ends.tolist()) <= set(expected_ends) and ends.tolist() == sorted(ends.tolist())


def test_longest_match_never_crosses_a_separator():
    datastore = make_datastore([1, 2, SEPARATOR, 3, 4, 5])
    assert datastore.longest_match(np.array([2, 3, 4]), 2)[0] == 2  # [3, 4] matches, [2, 3, 4] does not
    assert datastore.longest_match(np.array([9, SEPARATOR, 3, 4]), 2)[1].tolist() == [5]
    assert datastore.longest_match(np.array([1, 2]), 2)[0] == 0  # followed by the separator only


@settings(max_examples=300)
@given(token_lists, st.lists(st.integers(-2, 125), max_size=8), st.integers(0, 6))
def test_following_equals_oracle(tokens, positions, depth):
    datastore = make_datastore(tokens)
    result = datastore.following(np.array(positions, dtype=np.int64), depth)
    assert len(result) == len(positions)
    for position, continuation in zip(positions, result):
        expected = []
        for p in range(position, position + depth):
            if p < 0 or p >= len(tokens) or tokens[p] == SEPARATOR:
                break
            expected.append(tokens[p])
        assert continuation.tolist() == expected


def test_empty_datastore_matches_nothing():
    datastore = make_datastore([])
    length, ends = datastore.longest_match(np.array([1, 2, 3]))
    assert length == 0 and len(ends) == 0
    assert datastore.following(np.array([0]), 3)[0].tolist() == []
