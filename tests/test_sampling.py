"""Acceptance (greedy and lossless sampling), logits processing, seeded determinism."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from ragspec.config import SamplingConfig
from ragspec.sampling import accept_greedy, accept_sampled, children_by_parent, target_probs
from ragspec.types import ROOT, DraftTree


def tree_of(tokens: list[int], parents: list[int]) -> DraftTree:
    n = len(tokens)
    return DraftTree(
        token_ids=np.asarray(tokens, dtype=np.int64),
        parents=np.asarray(parents, dtype=np.int64),
        scores=np.linspace(1.0, 0.5, n),
        sources=("t",) * n,
    )


def one_hot_rows(argmaxes: list[int], vocab: int = 6) -> torch.Tensor:
    logits = torch.zeros(len(argmaxes), vocab)
    for row, token in enumerate(argmaxes):
        logits[row, token] = 5.0
    return logits


# -- greedy ---------------------------------------------------------------------------------

#        root
#       /    \
#   n0:1      n1:2
#            /    \
#        n2:3      n3:4
#                    \
#                     n4:0
GREEDY_TREE = tree_of([1, 2, 3, 4, 0], [ROOT, ROOT, 1, 1, 3])


def test_accept_greedy_follows_the_argmax_child_to_a_leaf():
    # rows: pending, n0..n4; the walk goes root -> n1 -> n3 -> n4, then n4's argmax is the bonus
    logits = one_hot_rows([2, 5, 4, 5, 0, 3])
    result = accept_greedy(GREEDY_TREE, logits)
    assert result.accepted_nodes == [1, 3, 4]
    assert result.accepted_tokens == [2, 4, 0]
    assert result.bonus_token == 3
    assert result.num_accepted == 3


def test_accept_greedy_stops_at_the_first_miss():
    logits = one_hot_rows([2, 0, 5, 1, 0, 0])  # n1's argmax is 5: no child carries it
    result = accept_greedy(GREEDY_TREE, logits)
    assert result.accepted_nodes == [1]
    assert result.accepted_tokens == [2]
    assert result.bonus_token == 5


def test_accept_greedy_rejects_at_the_root_and_on_an_empty_tree():
    result = accept_greedy(GREEDY_TREE, one_hot_rows([5, 0, 0, 0, 0, 0]))
    assert result.accepted_nodes == [] and result.accepted_tokens == [] and result.bonus_token == 5
    empty = accept_greedy(DraftTree.empty(), one_hot_rows([3]))
    assert empty.num_accepted == 0 and empty.bonus_token == 3


def test_accept_greedy_ignores_rows_off_the_accepted_path():
    # n0 (token 1) is not taken, so its row (argmax 1) must not matter; n2 likewise
    logits = one_hot_rows([2, 1, 4, 1, 5, 2])
    result = accept_greedy(GREEDY_TREE, logits)
    assert result.accepted_nodes == [1, 3]
    assert result.bonus_token == 5


def test_children_by_parent_first_duplicate_wins():
    tree = tree_of([7, 7, 8], [ROOT, ROOT, 1])
    assert children_by_parent(tree) == {ROOT: {7: 0}, 1: {8: 2}}


# -- lossless sampling ----------------------------------------------------------------------

VOCAB = 5


def synthetic_target(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A two-step 'model': logits of x1, and of x2 given x1. ([vocab], [vocab, vocab])"""
    g = torch.Generator().manual_seed(seed)
    first = torch.randn(VOCAB, generator=g) * 1.5
    second = torch.randn(VOCAB, VOCAB, generator=g) * 1.5
    return first, second


def chi_square(counts: np.ndarray, probs: np.ndarray) -> tuple[float, int]:
    """Pearson's statistic over cells with expected count >= 5 (rest pooled), and its dof."""
    expected = probs * counts.sum()
    big = expected >= 5
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    keep = exp > 0
    stat = float(((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum())
    return stat, int(keep.sum()) - 1


@pytest.mark.parametrize(
    "sampling",
    [
        SamplingConfig(temperature=1.0, seed=0),
        SamplingConfig(temperature=0.7, top_k=3, seed=0),
        SamplingConfig(temperature=1.3, top_p=0.8, seed=0),
    ],
    ids=["t1", "t0.7-top3", "t1.3-top0.8"],
)
def test_sampled_acceptance_matches_the_target_distribution(sampling):
    """The first two tokens emitted with a tree (likely, unlikely and duplicate children) have
    the joint distribution of plain sampling: p(x1) p(x2 | x1)."""
    first, second = synthetic_target()
    p1 = target_probs(first[None], sampling)[0]
    p2 = target_probs(second, sampling)  # row x1: p(x2 | x1)
    exact = (p1[:, None] * p2).flatten().numpy().astype(np.float64)
    likely = int(p1.argmax())
    unlikely = int(p1.argmin())
    likely2 = int(p2[likely].argmax())
    # tree: two root children, grandchildren under the likely one (one of them unlikely), a third
    # level whose logits are never needed for the first two tokens, and duplicates: a second root
    # child carrying `likely` (n5) and a second `likely2` under n0 (n6). The duplicates' rows are
    # a wrong distribution (a point mass on the least likely x2): a walk that followed n5 instead
    # of n0 would draw x2 from it, and the chi-square below would see it.
    wrong = torch.full((VOCAB,), -30.0)
    wrong[int(p2[likely].argmin())] = 30.0
    tokens = [likely, unlikely, likely2, (likely2 + 1) % VOCAB, 0, likely, likely2]
    parents = [ROOT, ROOT, 0, 0, 2, ROOT, 0]
    tree = tree_of(tokens, parents)
    assert len(set(zip(tokens, parents))) == len(tokens) - 2, "two duplicate children"
    rows = [first, second[likely], second[unlikely], torch.zeros(VOCAB), torch.zeros(VOCAB), torch.zeros(VOCAB),
            wrong, wrong]
    logits = torch.stack(rows)
    generator = torch.Generator().manual_seed(1234)
    draws = 6000
    counts = np.zeros(VOCAB * VOCAB)
    accepted_any = 0
    for _ in range(draws):
        result = accept_sampled(tree, logits, sampling, generator)
        emitted = [*result.accepted_tokens, result.bonus_token]
        accepted_any += result.num_accepted > 0
        if len(emitted) == 1:  # the next step has no tree: one plain sample given x1
            nxt = accept_sampled(DraftTree.empty(), second[emitted[0]][None], sampling, generator)
            emitted.append(nxt.bonus_token)
        counts[emitted[0] * VOCAB + emitted[1]] += 1
    assert accepted_any > draws // 10, "the tree was hardly used: the test proves nothing"
    stat, dof = chi_square(counts, exact)
    # dof <= 24; P(chi2_24 > 70) ~ 2e-6 (deterministic seed anyway)
    assert stat < max(3.0 * dof, 20.0), f"chi-square {stat:.1f} over {dof} dof"
    # cells the target forbids (top-k / top-p) are never emitted
    assert counts[exact == 0].sum() == 0


def test_sampled_acceptance_uses_the_generator_like_plain_sampling():
    """One draw per emitted token: with the same generator seed, a tree changes nothing."""
    first, second = synthetic_target(3)
    sampling = SamplingConfig(temperature=1.0)
    likely = int(first.argmax())
    tree = tree_of([likely], [ROOT])
    logits = torch.stack([first, second[likely]])
    for seed in range(20):
        with_tree = accept_sampled(tree, logits, sampling, torch.Generator().manual_seed(seed))
        g = torch.Generator().manual_seed(seed)
        x1 = accept_sampled(DraftTree.empty(), first[None], sampling, g).bonus_token
        emitted = [x1]
        if x1 == likely:
            emitted.append(accept_sampled(DraftTree.empty(), second[likely][None], sampling, g).bonus_token)
        assert [*with_tree.accepted_tokens, with_tree.bonus_token] == emitted


# -- target_probs ---------------------------------------------------------------------------


def reference_probs(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Row by row, in plain Python: temperature, keep the k largest, then the smallest set of
    most likely tokens whose mass reaches top_p; renormalise."""
    out = torch.zeros_like(logits, dtype=torch.float64)
    for r, row in enumerate(logits.double() / temperature):
        order = sorted(range(len(row)), key=lambda i: -float(row[i]))
        keep = order[:top_k] if top_k else order
        probs = torch.softmax(row[keep], 0)
        mass, nucleus = 0.0, []
        for i, p in zip(keep, probs.tolist()):
            nucleus.append(i)
            mass += p
            if mass >= top_p - 1e-12:
                break
        final = torch.softmax(row[nucleus], 0)
        out[r, nucleus] = final
    return out


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize(
    "temperature,top_k,top_p",
    [(1.0, 0, 1.0), (0.5, 0, 1.0), (1.0, 5, 1.0), (0.8, 0, 0.9), (1.5, 10, 0.5), (1.0, 1, 1.0), (2.0, 0, 0.05)],
)
def test_target_probs_matches_reference(seed, temperature, top_k, top_p):
    logits = torch.randn(3, 40, generator=torch.Generator().manual_seed(seed)) * 3
    sampling = SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p)
    got = target_probs(logits, sampling)
    assert got.shape == logits.shape
    torch.testing.assert_close(got.double(), reference_probs(logits, temperature, top_k, top_p), atol=1e-6, rtol=0)
    torch.testing.assert_close(got.sum(-1), torch.ones(3), atol=1e-5, rtol=0)


@pytest.mark.parametrize("seed", range(4))
def test_target_probs_matches_hf_warpers(seed):
    from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    logits = torch.randn(2, 50, generator=torch.Generator().manual_seed(seed)) * 2
    for temperature, top_k, top_p in itertools.product((0.7, 1.0), (0, 7), (1.0, 0.85)):
        scores = TemperatureLogitsWarper(temperature)(None, logits.clone())
        if top_k:
            scores = TopKLogitsWarper(top_k)(None, scores)
        if top_p < 1.0:
            scores = TopPLogitsWarper(top_p)(None, scores)
        expected = scores.softmax(-1)
        got = target_probs(logits, SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p))
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


# -- Engine: seeded sampling ----------------------------------------------------------------

SAMPLE_PROMPT = "a b c a b c a b c a b"


def test_seeded_sampling_is_deterministic(tiny_engine):
    outputs = {}
    for seed in (1, 2, 3):
        one = tiny_engine.generate(SAMPLE_PROMPT, max_new_tokens=24, temperature=0.9, seed=seed)
        two = tiny_engine.generate(SAMPLE_PROMPT, max_new_tokens=24, temperature=0.9, seed=seed)
        assert one.token_ids == two.token_ids
        outputs[seed] = tuple(one.token_ids)
    assert len(set(outputs.values())) > 1, "different seeds should give different samples"


def test_seeded_sampling_is_the_same_with_and_without_speculation(tiny_model):
    """Sampled acceptance draws once per emitted token, in order, from the token-by-token
    distribution, exactly as plain sampling does; so a seed fixes the output whatever was
    drafted. An oracle drafter proposes the plain run's own continuation (plus wrong branches),
    so most tokens come through the tree."""
    from ragspec import Engine
    from ragspec.drafting.context_suffix import ContextSuffixDrafter

    from conftest import FLAT_CURVE
    from test_lossless import OracleDrafter

    plain_engine = Engine(tiny_model, latency_curve=FLAT_CURVE, prefix_cache=False)  # each reference cold
    options = dict(max_new_tokens=24, temperature=0.8, top_k=50)
    accepted = 0
    for seed in range(4):
        plain = plain_engine.generate(SAMPLE_PROMPT, seed=seed, speculative=False, **options)
        reference = plain_engine.encode(SAMPLE_PROMPT) + plain.token_ids
        vocab = tiny_model.model.config.vocab_size
        engine = Engine(
            tiny_model,
            latency_curve=FLAT_CURVE,
            drafter_factories=[lambda e: [OracleDrafter(reference, vocab, seed), ContextSuffixDrafter(e.spec)]],
        )
        fast = engine.generate(SAMPLE_PROMPT, seed=seed, speculative=True, **options)
        assert fast.token_ids == plain.token_ids
        accepted += fast.stats.num_accepted_tokens
    assert accepted > 4 * 24 // 4


def test_generate_leaves_the_global_torch_rng_alone(tiny_engine):
    """A library call must not reseed the caller's global RNG (reproducible pipelines rely on
    torch.manual_seed). Unseeded requests should draw their seed without touching it."""
    torch.manual_seed(0)
    expected = torch.rand(4)
    torch.manual_seed(0)
    tiny_engine.generate("hello hello", max_new_tokens=3)
    assert torch.equal(torch.rand(4), expected)
