"""Context suffix drafter against a brute-force oracle; incremental == fresh; cheap on 30k tokens
(counted in hashing work, not seconds)."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from test_tree import assert_is_trie, assert_monotone, assert_valid_tree, brute_paths
from ragspec.config import SpecConfig
from ragspec.drafting.base import DraftContext, judge_own_tree
from ragspec.drafting.context_suffix import NGRAM_SIZES, ContextSuffixDrafter
from ragspec.types import ROOT, AcceptResult, DraftTree, StepResult


def context(tokens, max_nodes: int = 64) -> DraftContext:
    return DraftContext(tokens=np.asarray(tokens, dtype=np.int64), max_nodes=max_nodes)


def oracle_occurrences(tokens: list[int], config: SpecConfig) -> list[int]:
    """Positions right after earlier occurrences of the current suffix, by brute force.

    An occurrence of the last n tokens (n in NGRAM_SIZES) ends at an earlier position p, with
    1 <= p < len so that its continuation starts inside the known tokens. Longest n
    first, latest first within one n (the latest max_occurrences of each n), each position
    once, at most max_occurrences in all.
    """
    length, limit = len(tokens), config.max_occurrences
    starts: list[int] = []
    for n in sorted(NGRAM_SIZES, reverse=True):
        if length < n or len(starts) >= limit:
            continue
        suffix = tokens[length - n :]
        found = [p for p in range(max(n, 1), length) if tokens[p - n : p] == suffix]
        starts += [p for p in reversed(found[-limit:]) if p not in starts]
    return starts[:limit]


def oracle_paths(tokens: list[int], config: SpecConfig) -> set[tuple[int, ...]]:
    """Every prefix of the continuation after each occurrence; the continuation is
    1 + 2 * (true match length, up to max_match) tokens long, capped at max_depth."""
    paths = set()
    for p in oracle_occurrences(tokens, config):
        match = 0
        while match < config.max_match and p - 1 - match >= 0 and tokens[p - 1 - match] == tokens[-1 - match]:
            match += 1
        continuation = tokens[p : p + min(config.max_depth, 1 + 2 * match)]
        paths |= {tuple(continuation[:k]) for k in range(1, len(continuation) + 1)}
    return paths


configs = st.builds(
    SpecConfig,
    max_match=st.integers(1, 20),
    max_occurrences=st.integers(1, 5),
    max_depth=st.integers(1, 10),
)
token_lists = st.lists(st.integers(0, 2), min_size=1, max_size=70) | st.lists(st.integers(0, 5), min_size=1, max_size=40)


@given(token_lists, configs)
@settings(max_examples=200)
def test_proposal_matches_brute_force_oracle(tokens, config):
    tree = ContextSuffixDrafter(config).propose(context(tokens))
    assert_valid_tree(tree)
    assert_is_trie(tree)
    assert_monotone(tree)
    occurrences = oracle_occurrences(tokens, config)
    first_level = {int(t) for t, parent in zip(tree.token_ids, tree.parents) if parent == ROOT}
    assert first_level == {tokens[p] for p in occurrences}
    assert set(brute_paths(tree)) == oracle_paths(tokens, config)
    assert all(source == "context" for source in tree.sources)
    assert np.all((tree.scores >= 0) & (tree.scores <= 1))


@given(token_lists, configs, st.lists(st.integers(1, 6), min_size=1, max_size=30))
@settings(max_examples=100)
def test_incremental_proposals_equal_fresh_ones(tokens, config, chunks):
    """Tokens arrive a few at a time (accepted drafts + bonus); the index must catch up."""
    incremental = ContextSuffixDrafter(config)
    end = 1
    for chunk in chunks:
        if end > len(tokens):
            break
        grown = incremental.propose(context(tokens[:end]))
        fresh = ContextSuffixDrafter(config).propose(context(tokens[:end]))
        np.testing.assert_array_equal(grown.token_ids, fresh.token_ids)
        np.testing.assert_array_equal(grown.parents, fresh.parents)
        np.testing.assert_allclose(grown.scores, fresh.scores)
        end += chunk


def test_no_match_and_no_budget_give_empty_trees():
    drafter = ContextSuffixDrafter()
    assert drafter.propose(context([1, 2, 3, 4])).num_nodes == 0  # 4 never occurred before
    assert drafter.propose(context([1, 2, 3, 1, 2])).num_nodes > 0
    assert ContextSuffixDrafter().propose(context([1, 2, 3, 1, 2], max_nodes=0)).num_nodes == 0
    assert ContextSuffixDrafter().propose(context([7])).num_nodes == 0


def test_frequent_continuation_scores_higher():
    # after "x" comes "a" three times and "b" once
    tokens = [9, 1, 5, 9, 1, 5, 9, 1, 5, 9, 2, 5, 9]
    tree = ContextSuffixDrafter().propose(context(tokens))
    roots = {int(t): float(s) for t, p, s in zip(tree.token_ids, tree.parents, tree.scores) if p == ROOT}
    assert set(roots) == {1, 2}
    assert roots[1] > roots[2]


class HashCounter:
    """Wraps suffix_index.ngram_hashes: how many vectorised calls, and how many n-grams hashed."""

    def __init__(self, real):
        self.real, self.calls, self.hashed = real, 0, 0

    def __call__(self, tokens, ends, n):
        self.calls += 1
        self.hashed += len(ends)
        return self.real(tokens, ends, n)


def test_long_context_is_cheap_and_finds_the_planted_copy(monkeypatch):
    """Cost in operations, not seconds (a busy machine makes wall-clock asserts flaky): the 30k
    prompt is hashed once per n-gram size in one vectorised call each, and the next step hashes
    only the appended tokens, never the 30k again."""
    from ragspec.drafting import suffix_index

    counter = HashCounter(suffix_index.ngram_hashes)
    monkeypatch.setattr(suffix_index, "ngram_hashes", counter)
    sizes = len(NGRAM_SIZES)
    rng = np.random.default_rng(0)
    document = rng.integers(0, 49152, size=30_000)
    tokens = np.concatenate([document, document[1000:1020]])  # the last 20 tokens quote position 1000
    drafter = ContextSuffixDrafter()
    tree = drafter.propose(context(tokens))
    # indexing: one call per size over every position; lookup: one 1-element call per size
    assert counter.calls <= 2 * sizes
    assert counter.hashed <= sizes * len(tokens) + sizes
    roots = {int(t): float(s) for t, p, s in zip(tree.token_ids, tree.parents, tree.scores) if p == ROOT}
    assert max(roots, key=roots.get) == int(document[1020]), "the 20-token match must lead"
    # a 20-token match earns a deep chain (capped at max_depth = 32)
    expected_chain = tuple(int(t) for t in document[1020 : 1020 + 32])
    assert expected_chain in set(brute_paths(tree))
    # the next step appends 3 tokens: no rescan of the 30k, and the chain moves along
    tokens = np.concatenate([tokens, document[1020:1023]])
    counter.calls = counter.hashed = 0
    tree = drafter.propose(context(tokens))
    assert counter.calls <= 2 * sizes
    assert counter.hashed <= sizes * 3 + sizes, f"{counter.hashed} n-grams hashed for 3 new tokens"
    assert tuple(int(t) for t in document[1023 : 1023 + 32]) in set(brute_paths(tree))


def test_observe_learns_from_the_target():
    tokens = [4, 5, 6, 4, 5, 6, 4, 5]
    drafter = ContextSuffixDrafter()
    tree = drafter.propose(context(tokens))
    before = tree.scores.copy()
    # the target rejects the drafted continuation every time
    for _ in range(5):
        tree = drafter.propose(context(tokens))
        wrong = 100
        accept = AcceptResult(accepted_nodes=[], accepted_tokens=[], bonus_token=wrong)
        drafter.observe(StepResult(tree, accept, logits=None, draft_s=0.0, verify_s=0.0))
    after = drafter.propose(context(tokens)).scores
    assert after[0] < before[0]


def test_judge_own_tree():
    #  n0:1 -> n1:2 -> n2:3 ; n3:9 (root) ; n4:7 under n0
    tree = DraftTree(
        token_ids=np.array([1, 2, 3, 9, 7], dtype=np.int64),
        parents=np.array([ROOT, 0, 1, ROOT, 0], dtype=np.int64),
        scores=np.ones(5),
        sources=("c",) * 5,
    )
    tested, correct = judge_own_tree(tree, [1, 2, 5])
    assert tested.tolist() == [True, True, True, True, True]
    assert correct.tolist() == [True, True, False, False, False]
    tested, correct = judge_own_tree(tree, [1])  # only depth 1 is known
    assert tested.tolist() == [True, False, False, True, False]
    assert correct.tolist() == [True, False, False, False, False]
