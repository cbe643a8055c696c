"""Tree operations and tree attention against brute-force oracles (hypothesis)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ragspec.drafting.tree import (
    TrieBuilder,
    best_first_order,
    drop_implausible,
    fuse,
    monotone_scores,
    node_paths,
    prune,
)
from ragspec.types import ROOT, DraftTree, ModelDraws
from ragspec.errors import UnsupportedModel
from ragspec.verify.tree_attention import (
    ancestor_matrix,
    layer_windows,
    node_depths,
    tree_attention_mask,
    tree_attention_masks,
    tree_position_ids,
)

SOURCES = ("a", "b", "c")


@st.composite
def draft_trees(draw, max_nodes: int = 24, alphabet: int = 4, distinct_siblings: bool = False) -> DraftTree:
    """Random valid DraftTree: parents before children, scores non-increasing along paths.

    A small alphabet makes shared prefixes (and, unless `distinct_siblings`, duplicate
    siblings) common.
    """
    n = draw(st.integers(0, max_nodes))
    token_ids, parents, scores, sources = [], [], [], []
    seen: set[tuple[int, int]] = set()
    for _ in range(n):
        parent = draw(st.integers(ROOT, len(token_ids) - 1))
        token = draw(st.integers(0, alphabet - 1))
        if distinct_siblings and (parent, token) in seen:
            continue
        seen.add((parent, token))
        cap = 1.0 if parent == ROOT else scores[parent]
        token_ids.append(token)
        parents.append(parent)
        scores.append(cap * draw(st.floats(0.0, 1.0)))
        sources.append(draw(st.sampled_from(SOURCES)))
    return DraftTree(
        token_ids=np.asarray(token_ids, dtype=np.int64),
        parents=np.asarray(parents, dtype=np.int64),
        scores=np.asarray(scores, dtype=np.float64),
        sources=tuple(sources),
    )


def brute_paths(tree: DraftTree) -> list[tuple[int, ...]]:
    """Walk from each node up to the root."""
    paths = []
    for node in range(tree.num_nodes):
        path = []
        while node != ROOT:
            path.append(int(tree.token_ids[node]))
            node = int(tree.parents[node])
        paths.append(tuple(reversed(path)))
    return paths


def brute_ancestors(parents: np.ndarray, node: int) -> set[int]:
    found = set()
    while node != ROOT:
        found.add(node)
        node = int(parents[node])
    return found


def assert_valid_tree(tree: DraftTree) -> None:
    n = tree.num_nodes
    assert tree.token_ids.dtype == np.int64 and tree.parents.dtype == np.int64
    assert len(tree.parents) == len(tree.scores) == len(tree.sources) == n
    for i, parent in enumerate(tree.parents.tolist()):
        assert parent == ROOT or 0 <= parent < i, "parents must come before their children"


def assert_monotone(tree: DraftTree) -> None:
    for i, parent in enumerate(tree.parents.tolist()):
        if parent != ROOT:
            assert tree.scores[i] <= tree.scores[parent] + 1e-12


def assert_is_trie(tree: DraftTree) -> None:
    pairs = list(zip(tree.parents.tolist(), tree.token_ids.tolist()))
    assert len(pairs) == len(set(pairs)), "duplicate (parent, token) pairs"


# -- TrieBuilder ---------------------------------------------------------------------------


@given(st.lists(st.lists(st.integers(0, 3), min_size=1, max_size=6), max_size=10))
def test_trie_builder_holds_exactly_the_prefixes_of_inserted_paths(paths):
    trie = TrieBuilder()
    for path in paths:
        trie.insert(path, [0.5] * len(path), "a")
    tree = trie.build()
    assert_valid_tree(tree)
    assert_is_trie(tree)
    expected = {tuple(p[:k]) for p in paths for k in range(1, len(p) + 1)}
    assert node_paths(tree) == brute_paths(tree)
    assert set(node_paths(tree)) == expected
    assert len(tree.token_ids) == len(expected)


def test_trie_builder_combines_scores_by_noisy_or():
    trie = TrieBuilder()
    trie.insert([7, 8], [0.5, 0.4], "a")
    trie.insert([7, 9], [0.5, 0.2], "b")
    tree = trie.build()
    assert tree.token_ids.tolist() == [7, 8, 9]
    assert tree.parents.tolist() == [ROOT, 0, 0]
    np.testing.assert_allclose(tree.scores, [0.75, 0.4, 0.2])
    assert tree.sources == ("a", "a", "b")  # first proposer wins


# -- fuse ----------------------------------------------------------------------------------


@given(st.lists(draft_trees(), min_size=2, max_size=4))
def test_fuse_is_the_union_trie_of_the_inputs(trees):
    fused = fuse(trees)
    assert_valid_tree(fused)
    assert_is_trie(fused)
    assert_monotone(fused)
    union = {path for tree in trees for path in brute_paths(tree)}
    assert set(brute_paths(fused)) == union
    assert fused.num_nodes == len(union)
    # each fused node's source is one that proposed that path
    proposers: dict[tuple[int, ...], set[str]] = {}
    for tree in trees:
        for path, source in zip(brute_paths(tree), tree.sources):
            proposers.setdefault(path, set()).add(source)
    for path, source in zip(brute_paths(fused), fused.sources):
        assert source in proposers[path]
    # a merged node's score: the noisy-or of every proposal of its path, capped at its parent's
    expected: dict[tuple[int, ...], float] = {}
    for path in sorted(union, key=len):
        proposals = [float(t.scores[i]) for t in trees for i, p in enumerate(brute_paths(t)) if p == path]
        noisy_or = 1.0 - float(np.prod([1.0 - s for s in proposals]))
        expected[path] = min(noisy_or, expected[path[:-1]]) if len(path) > 1 else noisy_or
    for path, score in zip(brute_paths(fused), fused.scores):
        assert score == pytest.approx(expected[path], abs=1e-12)


@given(draft_trees(distinct_siblings=True))
def test_fuse_of_one_trie_keeps_its_paths(tree):
    fused = fuse([tree])
    assert set(brute_paths(fused)) == set(brute_paths(tree))
    assert_is_trie(fused)


def test_fuse_single_tree_with_duplicate_siblings_is_deduplicated():
    """fuse() promises one trie, so a duplicate sibling is verified once. Its single-tree fast
    path returns a drafter's tree unchanged, duplicates included (wasting verify rows)."""
    tree = DraftTree(
        token_ids=np.array([5, 5, 6], dtype=np.int64),
        parents=np.array([ROOT, ROOT, 1], dtype=np.int64),
        scores=np.array([0.5, 0.4, 0.3]),
        sources=("a", "a", "a"),
    )
    fused = fuse([tree])
    assert_is_trie(fused)
    assert set(brute_paths(fused)) == {(5,), (5, 6)}


# -- prune ---------------------------------------------------------------------------------


@given(draft_trees(max_nodes=30), st.integers(0, 35))
def test_prune_keeps_the_n_best_as_a_connected_subtree(tree, budget):
    pruned = prune(tree, budget)
    assert_valid_tree(pruned)
    assert pruned.num_nodes == min(budget, tree.num_nodes)
    # the n best scores survive
    expected_scores = np.sort(tree.scores)[::-1][: pruned.num_nodes]
    np.testing.assert_array_equal(np.sort(pruned.scores)[::-1], expected_scores)
    # re-indexing is right: every pruned node's path (token + scores + source) exists in the original
    original = {}
    for i, path in enumerate(brute_paths(tree)):
        original.setdefault(path, []).append((float(tree.scores[i]), tree.sources[i]))
    for i, path in enumerate(brute_paths(pruned)):
        assert path in original
        assert (float(pruned.scores[i]), pruned.sources[i]) in original[path]
    # kept nodes keep their relative order, so parents still precede children
    assert_monotone(pruned)


@given(draft_trees(max_nodes=30), st.integers(0, 35), st.randoms(use_true_random=False))
def test_prune_by_other_scores_keeps_their_n_best_and_the_raw_scores(tree, budget, rng):
    """The budget ranks nodes by calibrated scores but hands on the drafters' own."""
    other = monotone_scores(np.array([rng.random() for _ in range(tree.num_nodes)]), tree.parents)
    pruned = prune(tree, budget, other)
    assert_valid_tree(pruned)
    assert pruned.num_nodes == min(budget, tree.num_nodes)
    kept = np.sort(best_first_order(tree, other)[: pruned.num_nodes])
    np.testing.assert_array_equal(pruned.token_ids, tree.token_ids[kept])
    np.testing.assert_array_equal(pruned.scores, tree.scores[kept])
    assert np.all(other[kept].min(initial=1.0) >= np.delete(other, kept).max(initial=0.0))


@given(draft_trees(max_nodes=30))
def test_best_first_order_puts_parents_first(tree):
    order = best_first_order(tree).tolist()
    assert sorted(order) == list(range(tree.num_nodes))
    position = {node: k for k, node in enumerate(order)}
    for node, parent in enumerate(tree.parents.tolist()):
        if parent != ROOT:
            assert position[parent] < position[node]
    assert np.all(np.diff(tree.scores[order]) <= 0)


def test_prune_reindexes_parents():
    tree = DraftTree(
        token_ids=np.array([10, 11, 12, 13, 14], dtype=np.int64),
        parents=np.array([ROOT, ROOT, 0, 1, 3], dtype=np.int64),
        scores=np.array([0.2, 0.9, 0.1, 0.8, 0.7]),
        sources=("a",) * 5,
    )
    pruned = prune(tree, 3)
    assert pruned.token_ids.tolist() == [11, 13, 14]
    assert pruned.parents.tolist() == [ROOT, 0, 1]


# -- tree attention ------------------------------------------------------------------------


@given(draft_trees(max_nodes=30))
@settings(max_examples=60)
def test_ancestor_matrix_and_depths_match_brute_force(tree):
    parents = tree.parents
    n = len(parents)
    visible = ancestor_matrix(parents)
    assert visible.shape == (n + 1, n + 1) and visible.dtype == bool
    expected = np.zeros((n + 1, n + 1), dtype=bool)
    expected[:, 0] = True
    for i in range(n):
        for j in brute_ancestors(parents, i):
            expected[i + 1, j + 1] = True
    np.testing.assert_array_equal(visible, expected)
    depths = node_depths(parents)
    np.testing.assert_array_equal(depths, [len(brute_ancestors(parents, i)) for i in range(n)])
    positions = tree_position_ids(parents, 17, torch.device("cpu"))
    assert positions.shape == (1, n + 1) and positions.dtype == torch.int64
    assert positions[0].tolist() == [17] + [17 + int(d) for d in depths]


@given(draft_trees(max_nodes=12), st.integers(0, 9))
@settings(max_examples=40)
def test_tree_attention_mask_layout(tree, past):
    n = tree.num_nodes
    mask = tree_attention_mask(tree.parents, past, torch.float32, torch.device("cpu"))
    assert mask.shape == (1, 1, n + 1, past + n + 1) and mask.dtype == torch.float32
    visible = ancestor_matrix(tree.parents)
    m = mask[0, 0]
    assert torch.all(m[:, :past] == 0), "every row sees the whole committed cache"
    tail = m[:, past:]
    assert torch.all(tail[torch.as_tensor(visible)] == 0)
    assert torch.all(tail[~torch.as_tensor(visible)] == torch.finfo(torch.float32).min)


@given(draft_trees(max_nodes=12), st.integers(0, 9), st.integers(1, 8))
@settings(max_examples=40)
def test_sliding_window_mask_hides_keys_a_window_back(tree, past, window):
    """A row at position p sees key k iff the plain tree mask shows it and k's position > p - window."""
    plain = tree_attention_mask(tree.parents, past, torch.float32, torch.device("cpu"))[0, 0] == 0
    windowed = tree_attention_mask(tree.parents, past, torch.float32, torch.device("cpu"), window)[0, 0] == 0
    depths = [0, *node_depths(tree.parents).tolist()]
    row_positions = [past + d for d in depths]
    key_positions = list(range(past)) + row_positions
    for row, p in enumerate(row_positions):
        for key, k in enumerate(key_positions):
            assert windowed[row, key] == (plain[row, key] and k > p - window)


def test_masks_per_layer_type():
    """A chain of 3 nodes after 5 committed tokens: rows at positions 5-8 over keys 0-8, each row
    seeing the keys up to its own position, and in a window of w only the last w of them."""
    Config = SimpleNamespace  # with the attributes transformers configs use
    parents = np.array([ROOT, 0, 1], dtype=np.int64)
    cpu = torch.device("cpu")
    row, key = np.arange(5, 9)[:, None], np.arange(9)[None, :]

    def expected(window=None):
        return (key <= row) & (row - key < (window or 99))

    def visible(mask):
        assert mask.shape == (1, 1, 4, 9)
        return (mask[0, 0] == 0).numpy()

    np.testing.assert_array_equal(visible(tree_attention_masks(layer_windows(Config()), parents, 5, torch.float32, cpu)),
                                  expected())
    mistral = layer_windows(Config(sliding_window=3))
    np.testing.assert_array_equal(visible(tree_attention_masks(mistral, parents, 5, torch.float32, cpu)), expected(3))
    full_only = layer_windows(Config(sliding_window=3, layer_types=["full_attention"] * 2))
    np.testing.assert_array_equal(visible(tree_attention_masks(full_only, parents, 5, torch.float32, cpu)), expected())
    mixed = tree_attention_masks(layer_windows(Config(sliding_window=3, layer_types=["sliding_attention", "full_attention"])),
                                 parents, 5, torch.float32, cpu)
    assert set(mixed) == {"sliding_attention", "full_attention"}
    np.testing.assert_array_equal(visible(mixed["full_attention"]), expected())
    np.testing.assert_array_equal(visible(mixed["sliding_attention"]), expected(3))
    with pytest.raises(UnsupportedModel, match="linear_attention"):
        tree_attention_masks(layer_windows(Config(layer_types=["linear_attention", "full_attention"])),
                             parents, 5, torch.float32, cpu)


def test_chain_tree_attention_is_causal():
    parents = np.arange(5, dtype=np.int64) - 1
    np.testing.assert_array_equal(ancestor_matrix(parents), np.tril(np.ones((6, 6), dtype=bool)))
    np.testing.assert_array_equal(node_depths(parents), [1, 2, 3, 4, 5])


# -- trees carrying model drafts ---------------------------------------------------------------


def _model_tree() -> DraftTree:
    """A model's root distribution over 6 tokens, its two top children (one fed, with its own
    distribution), fused with a retrieval chain 4 -> 5 and a retrieval child 0 under the fed node."""
    root_q = torch.tensor([0.005, 0.6, 0.3, 0.05, 0.01, 0.035])
    child_q = torch.tensor([0.5, 0.001, 0.2, 0.2, 0.05, 0.049])
    model = DraftTree(
        token_ids=np.array([1, 2, 0]), parents=np.array([ROOT, ROOT, 0]), scores=np.array([0.6, 0.3, 0.3]),
        sources=("model",) * 3, draft_probs=np.array([0.6, 0.3, 0.5]),
        draws={ROOT: (ModelDraws(root_q, ()),), 0: (ModelDraws(child_q, ()),)},
    )
    retrieval = DraftTree(
        token_ids=np.array([4, 5, 1, 1]), parents=np.array([ROOT, 0, ROOT, 2]), scores=np.array([0.9, 0.8, 0.7, 0.6]),
        sources=("context",) * 4,
    )
    return fuse([model, retrieval])


def test_fuse_keeps_model_probabilities_and_distributions_of_merged_nodes():
    tree = _model_tree()
    paths = node_paths(tree)
    assert paths == [(1,), (2,), (1, 0), (4,), (4, 5), (1, 1)]
    assert tree.sources[0] == "model" and tree.scores[0] == pytest.approx(1 - 0.4 * 0.3)  # noisy-or with context
    assert np.allclose(tree.draft_probs[:3], [0.6, 0.3, 0.5]) and np.isnan(tree.draft_probs[3:]).all()
    assert sorted(tree.draws) == [ROOT, 0]


def test_drop_implausible_cuts_what_the_model_finds_unlikely_with_its_subtree():
    tree = _model_tree()
    kept = drop_implausible(tree, min_prob=0.02)
    # (4,) has q 0.01 at the root: gone with (4, 5); (1, 1) has q 0.001 under the fed node: gone
    assert node_paths(kept) == [(1,), (2,), (1, 0)]
    assert sorted(kept.draws) == [ROOT, 0]
    loose = drop_implausible(tree, min_prob=0.0005)
    assert node_paths(loose) == node_paths(tree)
    assert loose.draft_probs[3] == pytest.approx(0.01) and loose.draft_probs[5] == pytest.approx(0.001)
    assert np.isnan(loose.draft_probs[4])  # under (4,), which the model never expanded
    assert drop_implausible(tree, 0.0) is tree


def test_drop_implausible_leaves_trees_without_model_distributions_alone():
    retrieval = DraftTree(np.array([3, 4]), np.array([ROOT, 0]), np.array([0.5, 0.4]), ("context",) * 2)
    assert drop_implausible(retrieval, 0.5) is retrieval


def test_prune_keeps_draws_of_kept_parents_only():
    tree = _model_tree()
    pruned = prune(tree, 2)  # the two best nodes: (1,) and (4,)
    assert node_paths(pruned) == [(1,), (4,)]
    assert sorted(pruned.draws) == [ROOT, 0]  # node 0 is still (1,)
    best = prune(tree, 1)  # (4,) alone: the model's fed node, and its distribution, are gone
    assert node_paths(best) == [(4,)] and best.draws.keys() == {ROOT}
