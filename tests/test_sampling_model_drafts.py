"""Lossless sampling with model drafts: residual rejection of a model's random draws, mixed with
point-mass (retrieval, top-k) candidates.

The statistical tests draw the model's tokens inside the loop, without replacement, from the
model's q with a torch.Generator (what a model drafter does), build the tree through the real
`fuse`, and compare what `accept_sampled` emits with the target's own distribution by a
chi-square test. Seeds are fixed, so each test is deterministic; the thresholds would hold for
other seeds too with overwhelming probability: the right scheme must keep p > 1e-4, a wrong one
must fall under 1e-8, and each of the three wrong rules in BUGS gave p < 1e-18 here.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from ragspec.config import SamplingConfig
from ragspec.drafting.tree import fuse
from ragspec.sampling import accept_greedy, accept_sampled, target_probs
from ragspec.types import ROOT, DraftTree, ModelDraws

VOCAB = 8
SAMPLES = 10_000
PASS_P_VALUE = 1e-4  # the right scheme must not be rejected at this level
FAIL_P_VALUE = 1e-8  # a wrong scheme must be rejected at this level

# A target that is far from the drafters: its mass sits on tokens 0, 6, 1; the drafters like 3, 5, 4.
ROOT_LOGITS = torch.tensor([2.0, 1.2, 0.8, 0.3, 0.0, -0.5, 1.5, -1.0])
CHILD_LOGITS = torch.randn(VOCAB, VOCAB, generator=torch.Generator().manual_seed(7)) * 1.5  # row x: logits after x
Q_A = torch.tensor([0.02, 0.30, 0.05, 0.35, 0.03, 0.20, 0.02, 0.03])  # covers retrieval token 1
Q_B = torch.tensor([0.10, 0.05, 0.05, 0.10, 0.40, 0.10, 0.10, 0.10])
RETRIEVED = (1, 2)  # the root's deterministic children


# -- building trees the way drafters and fuse do --------------------------------------------


def draw_without_replacement(q: torch.Tensor, count: int, generator: torch.Generator) -> tuple[int, ...]:
    """A model drafter's draws: torch.multinomial without replacement gives them in draw order."""
    return tuple(torch.multinomial(q, count, replacement=False, generator=generator).tolist())


@dataclass
class TreeSpec:
    """Nodes of one drafter's tree, for DraftTree: (token, parent, deterministic), parents first."""

    nodes: list[tuple[int, int, bool]]
    draws: dict[int, tuple[ModelDraws, ...]]

    def add(self, token: int, parent: int, deterministic: bool) -> int:
        self.nodes.append((token, parent, deterministic))
        return len(self.nodes) - 1

    def tree(self, source: str) -> DraftTree:
        n = len(self.nodes)
        return DraftTree(
            token_ids=np.asarray([t for t, _, _ in self.nodes], dtype=np.int64).reshape(n),
            parents=np.asarray([p for _, p, _ in self.nodes], dtype=np.int64).reshape(n),
            scores=np.full(n, 0.5),
            sources=(source,) * n,
            draft_probs=np.full(n, 0.5),
            deterministic=np.asarray([d for _, _, d in self.nodes], dtype=bool).reshape(n),
            draws=dict(self.draws),
        )


def new_spec() -> TreeSpec:
    return TreeSpec(nodes=[], draws={})


def retrieval_tree(paths: list[tuple[int, ...]]) -> DraftTree:
    spec = new_spec()
    for path in paths:
        parent = ROOT
        for token in path:
            existing = [i for i, (t, p, _) in enumerate(spec.nodes) if (t, p) == (token, parent)]
            parent = existing[0] if existing else spec.add(token, parent, True)
    return spec.tree("retrieval")


def model_draw_tree(draws_by_parent: dict[int, list[tuple[torch.Tensor, tuple[int, ...], int]]]) -> TreeSpec:
    """Only for the root: {ROOT: [(q, draws, how many of them get a node), ...]}."""
    spec = new_spec()
    for q, tokens, kept in draws_by_parent[ROOT]:
        spec.draws[ROOT] = spec.draws.get(ROOT, ()) + (ModelDraws(q, tokens),)
        for token in tokens[:kept]:
            spec.add(token, ROOT, False)
    return spec


def logits_for(tree: DraftTree, root: torch.Tensor = ROOT_LOGITS, children: torch.Tensor = CHILD_LOGITS) -> torch.Tensor:
    """Verify rows: the root's, then each node's (depth-1 nodes: the child row of their token;
    deeper nodes never matter for the first two tokens: zeros). [1 + n, vocab]"""
    rows = [root]
    for token, parent in zip(tree.token_ids.tolist(), tree.parents.tolist()):
        rows.append(children[token] if parent == ROOT else torch.zeros(VOCAB))
    return torch.stack(rows)


# -- the chi-square check -------------------------------------------------------------------


def chi_square_p_value(counts: np.ndarray, probs: np.ndarray) -> tuple[float, int, float]:
    """Pearson's test of counts against probs: (statistic, dof, p-value). Cells expected under 5
    are pooled; an observed count where probs is 0 gives p-value 0."""
    counts, probs = np.asarray(counts, dtype=np.float64).ravel(), np.asarray(probs, dtype=np.float64).ravel()
    if counts[probs == 0].sum() > 0:
        return math.inf, 0, 0.0
    expected = probs / probs.sum() * counts.sum()
    big = expected >= 5
    observed = np.append(counts[big], counts[~big].sum())
    expected = np.append(expected[big], expected[~big].sum())
    keep = expected > 0
    stat = float(((observed[keep] - expected[keep]) ** 2 / expected[keep]).sum())
    dof = int(keep.sum()) - 1
    return stat, dof, chi2_survival(stat, dof)


def chi2_survival(stat: float, dof: int) -> float:
    try:
        from scipy.stats import chi2
    except ImportError:  # Wilson-Hilferty: accurate to a few percent in the tails used here
        z = ((stat / dof) ** (1 / 3) - (1 - 2 / (9 * dof))) / math.sqrt(2 / (9 * dof))
        return 0.5 * math.erfc(z / math.sqrt(2))
    return float(chi2.sf(stat, dof))


@dataclass
class Tally:
    first: np.ndarray  # [vocab] counts of the first emitted token
    pair: np.ndarray  # [vocab * vocab] counts of (first, second)
    on_candidate: int = 0  # steps whose first token was a tree node or an accepted draw
    by_draw: int = 0  # ... a model draw's (a non-deterministic node or a pruned draw)


Acceptor = Callable[[DraftTree, torch.Tensor, SamplingConfig, torch.Generator], object]


def run_steps(make_tree: Callable[[torch.Generator], DraftTree], sampling: SamplingConfig, *,
              accept: Acceptor = accept_sampled, samples: int = SAMPLES, seed: int = 0,
              root: torch.Tensor = ROOT_LOGITS, children: torch.Tensor = CHILD_LOGITS) -> Tally:
    """Steps with fresh draws each; a step that emits one token is followed by a plain one."""
    draft_generator = torch.Generator().manual_seed(seed)
    accept_generator = torch.Generator().manual_seed(seed + 1)
    tally = Tally(first=np.zeros(VOCAB), pair=np.zeros(VOCAB * VOCAB))
    for _ in range(samples):
        tree = make_tree(draft_generator)
        result = accept(tree, logits_for(tree, root, children), sampling, accept_generator)
        emitted = [*result.accepted_tokens, result.bonus_token]
        if len(emitted) == 1:  # the next step: no tree, a plain sample after x1
            emitted.append(accept_sampled(DraftTree.empty(), children[emitted[0]][None], sampling, accept_generator).bonus_token)
        tally.first[emitted[0]] += 1
        tally.pair[emitted[0] * VOCAB + emitted[1]] += 1
        drawn = {t for draws in tree.draws.get(ROOT, ()) for t in draws.tokens}
        first_node = result.accepted_nodes[0] if result.accepted_nodes else None
        tally.on_candidate += first_node is not None or emitted[0] in drawn
        tally.by_draw += (first_node is not None and not tree.is_deterministic()[first_node]) or (
            first_node is None and emitted[0] in drawn)
    return tally


def exact(sampling: SamplingConfig, root: torch.Tensor = ROOT_LOGITS,
          children: torch.Tensor = CHILD_LOGITS) -> tuple[np.ndarray, np.ndarray]:
    """Plain sampling's distribution of the first token [vocab] and of the pair [vocab * vocab]."""
    first = target_probs(root[None], sampling)[0].double()
    pair = first[:, None] * target_probs(children, sampling).double()
    return first.numpy(), pair.flatten().numpy()


def assert_matches_target(tally: Tally, sampling: SamplingConfig, **rows) -> None:
    first, pair = exact(sampling, **rows)
    for name, counts, probs in (("first token", tally.first, first), ("pair", tally.pair, pair)):
        stat, dof, p_value = chi_square_p_value(counts, probs)
        assert p_value > PASS_P_VALUE, f"{name}: chi-square {stat:.1f} over {dof} dof, p = {p_value:.2e}"


# -- (a) retrieval point masses and two models' draws at the root ---------------------------


def mixed_root_tree(generator: torch.Generator, q_a: torch.Tensor = Q_A, q_b: torch.Tensor = Q_B) -> DraftTree:
    """Retrieval children 1 and 2 (point masses); model A draws 3 tokens, the third pruned from
    the tree (it stays in `draws`); model B draws 2. A draw of 1 or 2 merges with the retrieval
    node, which stays deterministic."""
    a = draw_without_replacement(q_a, 3, generator)
    b = draw_without_replacement(q_b, 2, generator)
    model_a = model_draw_tree({ROOT: [(q_a, a, 2)]}).tree("model-a")
    model_b = model_draw_tree({ROOT: [(q_b, b, 2)]}).tree("model-b")
    return fuse([retrieval_tree([(t,) for t in RETRIEVED]), model_a, model_b])


def test_mixed_root_tree_is_what_the_test_means():
    tree = mixed_root_tree(torch.Generator().manual_seed(3))
    deterministic = dict(zip(tree.token_ids.tolist(), tree.is_deterministic().tolist()))
    assert all(deterministic[t] for t in RETRIEVED)
    assert len(tree.draws[ROOT]) == 2, "two models' draws at one node"
    assert [len(draws.tokens) for draws in tree.draws[ROOT]] == [3, 2]
    assert all(t in deterministic for draws in tree.draws[ROOT] for t in draws.tokens[:2])


def test_mixed_point_masses_and_model_draws_keep_the_target_distribution():
    sampling = SamplingConfig(temperature=1.0)
    tally = run_steps(mixed_root_tree, sampling)
    assert tally.by_draw > SAMPLES // 20, "model draws were hardly accepted: the test proves little"
    assert_matches_target(tally, sampling)


def test_a_draw_of_a_retrieved_token_and_a_pruned_draw_are_both_exercised():
    """The cases of (a) that need checking separately happen often enough in the loop above."""
    generator = torch.Generator().manual_seed(0)
    duplicate = pruned_alone = 0
    for _ in range(2000):
        tree = mixed_root_tree(generator)
        a_tokens = tree.draws[ROOT][0].tokens
        duplicate += any(t in RETRIEVED for draws in tree.draws[ROOT] for t in draws.tokens)
        pruned_alone += a_tokens[2] not in tree.token_ids.tolist()
    assert duplicate > 200 and pruned_alone > 200


def test_residual_rejection_beats_point_masses_on_the_same_candidates():
    """The same trees, every node taken as a point mass and the draws dropped (the old scheme):
    residual rejection lands the first token on a candidate more often."""
    sampling = SamplingConfig(temperature=1.0)

    def as_point_masses(generator: torch.Generator) -> DraftTree:
        tree = mixed_root_tree(generator)
        return DraftTree(tree.token_ids, tree.parents, tree.scores, tree.sources)

    mixed = run_steps(mixed_root_tree, sampling, samples=5000)
    point_masses = run_steps(as_point_masses, sampling, samples=5000)
    print(f"first token on a candidate: mixed {mixed.on_candidate / 5000:.3f} (by a model draw "
          f"{mixed.by_draw / 5000:.3f}), point masses only {point_masses.on_candidate / 5000:.3f}")
    assert mixed.on_candidate > point_masses.on_candidate + 5000 // 20


# -- the check can fail ---------------------------------------------------------------------

BUGS = {
    "accept with p(x)": "a draw accepted with probability p(x), not min(1, p(x) / q_i(x))",
    "q not renormalised": "every draw judged against q itself, not q without the earlier draws",
    "final draw from p": "the last draw (point masses, bonus) from the target p, not from the residual",
}


def root_acceptor(bug: str | None) -> Acceptor:
    """A second, root-only implementation of the scheme (a depth-1 tree), with one bug or none."""
    from ragspec.types import AcceptResult

    def accept(tree: DraftTree, logits: torch.Tensor, sampling: SamplingConfig, generator: torch.Generator):
        children = {t: i for i, t in reversed(list(enumerate(tree.token_ids.tolist())))}

        def emit(token: int) -> AcceptResult:
            node = children.get(token)
            if node is None:
                return AcceptResult([], [], token)
            row = target_probs(logits[node + 1 : node + 2], sampling)[0]
            return AcceptResult([node], [token], int(torch.multinomial(row, 1, generator=generator)))

        target = p = target_probs(logits[:1], sampling)[0].double()
        for draws in tree.draws[ROOT]:
            q = draws.probs.double().clone()
            for token in draws.tokens:
                q_i = draws.probs.double() if bug == "q not renormalised" else q / q.sum()
                ratio = p[token] if bug == "accept with p(x)" else p[token] / q_i[token]
                if float(torch.rand(1, dtype=torch.float64, generator=generator)) < float(ratio):
                    return emit(token)
                residual = (p - q_i).clamp_min(0.0)
                p = residual / residual.sum() if residual.sum() > 0 else p
                q[token] = 0.0
        final = target if bug == "final draw from p" else p
        return emit(int(torch.multinomial(final, 1, generator=generator)))  # a point mass, or the bonus

    return accept


@pytest.mark.parametrize("bug", [None, *BUGS])
def test_the_chi_square_check_rejects_wrong_acceptance_rules(bug):
    """The same check on a second implementation: passes without a bug, fails with each bug."""
    sampling = SamplingConfig(temperature=1.0)
    tally = run_steps(mixed_root_tree, sampling, accept=root_acceptor(bug), samples=SAMPLES, seed=9)
    if bug is None:
        assert_matches_target(tally, sampling)
        return
    first, pair = exact(sampling)
    p_values = [chi_square_p_value(tally.first, first)[2], chi_square_p_value(tally.pair, pair)[2]]
    assert min(p_values) < FAIL_P_VALUE, f"{BUGS[bug]}: passed, p-values {p_values}"


# -- (b) depth 2: an accepted drawn node with its own draws and deterministic children ------

Q_ROOT_B = torch.tensor([0.05, 0.05, 0.05, 0.40, 0.05, 0.25, 0.10, 0.05])
Q_CHILD_B = torch.softmax(torch.randn(VOCAB, VOCAB, generator=torch.Generator().manual_seed(11)) * 1.5, -1)


def depth_two_tree(generator: torch.Generator) -> DraftTree:
    """Retrieval path (3, 5), point masses. Model: 2 draws at the root, both nodes; under the
    first, its top-1 token (deterministic, as a model's top-k child is) and 2 draws, the second
    pruned; under retrieval node 3, 1 draw."""
    model = new_spec()
    roots = draw_without_replacement(Q_ROOT_B, 2, generator)
    model.draws[ROOT] = (ModelDraws(Q_ROOT_B, roots),)
    first = model.add(roots[0], ROOT, False)
    model.add(roots[1], ROOT, False)
    q_first = Q_CHILD_B[roots[0]]
    model.add(int(q_first.argmax()), first, True)
    below = draw_without_replacement(q_first, 2, generator)
    model.draws[first] = (ModelDraws(q_first, below),)
    model.add(below[0], first, False)
    model_tree = model.tree("model")
    under_three = new_spec()
    three = under_three.add(3, ROOT, True)  # the model reads the retrieval node too
    drawn = draw_without_replacement(Q_CHILD_B[3], 1, generator)
    under_three.draws[three] = (ModelDraws(Q_CHILD_B[3], drawn),)
    under_three.add(drawn[0], three, False)
    return fuse([retrieval_tree([(3, 5)]), model_tree, under_three.tree("model-on-retrieval")])


def test_depth_two_model_draws_keep_the_target_distribution():
    sampling = SamplingConfig(temperature=0.8, top_p=0.9)
    tally = run_steps(depth_two_tree, sampling)
    assert tally.by_draw > SAMPLES // 20
    assert_matches_target(tally, sampling)


def test_depth_two_reaches_the_second_level_through_a_draw():
    """How often a drawn root node was accepted and then one of its own children: the pair test
    above checks that level only if this happens."""
    sampling = SamplingConfig(temperature=1.0)
    draft_generator, accept_generator = torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)
    through_draw = 0
    for _ in range(2000):
        tree = depth_two_tree(draft_generator)
        result = accept_sampled(tree, logits_for(tree), sampling, accept_generator)
        nodes = result.accepted_nodes
        through_draw += len(nodes) == 2 and not tree.is_deterministic()[nodes[0]]
    assert through_draw > 100


# -- (c) q without mass where p has some, p without mass where q has some -------------------

Q_SPARSE = torch.tensor([0.0, 0.0, 0.10, 0.30, 0.0, 0.30, 0.25, 0.05])  # nothing on the target's 0 and 1


@pytest.mark.parametrize("sampling", [SamplingConfig(temperature=1.0, top_k=4), SamplingConfig(temperature=1.0, top_p=0.7)],
                         ids=["top4", "top0.7"])
def test_draws_where_supports_differ_keep_the_target_distribution(sampling):
    """The target's top-k / top-p zeroes tokens the drafters like (3, 5, 4); Q_SPARSE has no
    mass on the target's likeliest tokens."""
    p_root = target_probs(ROOT_LOGITS[None], sampling)[0]
    assert bool(((p_root == 0) & (Q_SPARSE > 0)).any()) and bool(((p_root > 0) & (Q_SPARSE == 0)).any())
    tally = run_steps(lambda g: mixed_root_tree(g, q_a=Q_SPARSE), sampling)
    assert tally.by_draw > SAMPLES // 50
    assert_matches_target(tally, sampling)


# -- exact properties -----------------------------------------------------------------------


def test_a_draft_that_is_the_target_is_always_accepted():
    """q == p: min(1, p/q) = 1 for the first draw; a pruned draw ends the step as the bonus."""
    sampling = SamplingConfig(temperature=1.0)
    p = target_probs(ROOT_LOGITS[None], sampling)[0]
    generator = torch.Generator().manual_seed(0)
    for kept in (1, 0):
        for _ in range(200):
            tokens = draw_without_replacement(p, 2, generator)
            tree = model_draw_tree({ROOT: [(p, tokens, kept)]}).tree("model")
            result = accept_sampled(tree, logits_for(tree), sampling, generator)
            if kept:
                assert result.accepted_nodes == [0] and result.accepted_tokens == [tokens[0]]
            else:
                assert result.accepted_nodes == [] and result.bonus_token == tokens[0]


def test_greedy_ignores_draws():
    tree = mixed_root_tree(torch.Generator().manual_seed(1))
    logits = logits_for(tree)
    plain = DraftTree(tree.token_ids, tree.parents, tree.scores, tree.sources)
    assert accept_greedy(tree, logits) == accept_greedy(plain, logits)


def test_logits_on_another_dtype_and_no_draws_at_a_reached_node():
    """float16 rows and a drawn node without its own draws: its row is sampled plainly."""
    sampling = SamplingConfig(temperature=1.0)
    tree = mixed_root_tree(torch.Generator().manual_seed(2))
    result = accept_sampled(tree, logits_for(tree).half(), sampling, torch.Generator().manual_seed(0))
    assert 0 <= result.bonus_token < VOCAB and len(result.accepted_nodes) <= 1


# -- end to end: a model drafter fused with the context drafter, through Engine.generate -----

E2E_PROMPT = "a b c a b c a b c a b"
E2E_SAMPLING = {"temperature": 1.0, "top_k": 5}
E2E_RUNS = 500
SHARPEN = 20.0  # the tiny model's logits are nearly flat (std 0.16): scaled, plain sampling has a shape


def sharpened_tiny_llama(tokenizer, noise: float = 0.0):
    """The tiny llama with its output weights scaled; with `noise`, every weight matrix perturbed
    by that fraction of its std (another seed): a draft model that agrees with it in part."""
    from conftest import build_tiny_model

    from ragspec import LoadedModel
    from ragspec.kernels.select import choose_kernels

    model = build_tiny_model("llama", len(tokenizer), seed=0)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        model.lm_head.weight.mul_(SHARPEN)
        for weight in (w for w in model.parameters() if w.dim() > 1 and noise):
            weight.add_(torch.randn(weight.shape, generator=generator) * weight.std() * noise)
    loaded = LoadedModel(model=model, tokenizer=tokenizer, name="tiny-llama-sharp")
    if not noise:
        loaded.kernels = choose_kernels(loaded, mode="fast")
    return loaded


class NoisyCopyDrafter:
    """A model drafter over a noisy copy of the target: at the pending token its top-1 token
    (deterministic) and 2 draws without replacement from its q; under the first draw the same
    again, the second draw there pruned (in `draws` only). Counts what the target accepted."""

    name = "model"

    def __init__(self, model: torch.nn.Module, sampling: SamplingConfig, seed: int, counts: dict[str, int]):
        self.model, self.sampling, self.counts = model, sampling, counts
        self.generator = torch.Generator().manual_seed(seed)

    def _q(self, tokens: list[int]) -> torch.Tensor:
        with torch.no_grad():
            logits = self.model(input_ids=torch.tensor([tokens])).logits[0, -1]
        return target_probs(logits[None], self.sampling)[0]  # [vocab]

    def propose(self, context) -> DraftTree:
        from ragspec.drafting.tree import TrieBuilder

        if context.max_nodes < 6:
            return DraftTree.empty()
        tokens, trie = context.tokens.tolist(), TrieBuilder()
        q_root = self._q(tokens)
        roots = draw_without_replacement(q_root, 2, self.generator)
        trie.add(ROOT, int(q_root.argmax()), 0.6, self.name, float(q_root.max()), deterministic=True)
        first = trie.add(ROOT, roots[0], 0.4, self.name, float(q_root[roots[0]]), deterministic=False)
        trie.add(ROOT, roots[1], 0.2, self.name, float(q_root[roots[1]]), deterministic=False)
        trie.add_draws(ROOT, (ModelDraws(q_root, roots),))
        q_child = self._q(tokens + [roots[0]])
        below = draw_without_replacement(q_child, 2, self.generator)
        trie.add(first, int(q_child.argmax()), 0.3, self.name, float(q_child.max()), deterministic=True)
        trie.add(first, below[0], 0.2, self.name, float(q_child[below[0]]), deterministic=False)
        trie.add_draws(first, (ModelDraws(q_child, below),))
        return trie.build()

    def observe(self, step) -> None:
        tree, nodes = step.tree, step.accept.accepted_nodes
        deterministic = tree.is_deterministic()
        self.counts["point mass"] += sum(bool(deterministic[n]) for n in nodes)
        self.counts["draw"] += sum(not deterministic[n] for n in nodes)
        last = nodes[-1] if nodes else ROOT
        pruned = {t for draws in tree.draws.get(last, ()) for t in draws.tokens} - set(
            tree.token_ids[tree.parents == last].tolist())
        self.counts["pruned draw"] += step.accept.bonus_token in pruned


def plain_distribution(target, prompt_ids: list[int], sampling: SamplingConfig, depth: int) -> dict[tuple, float]:
    """P(first `depth` generated tokens) under plain sampling, from the model's logits."""
    paths = {(): 1.0}
    for _ in range(depth):
        grown = {}
        for path, mass in paths.items():
            with torch.no_grad():
                logits = target.model(input_ids=torch.tensor([prompt_ids + list(path)])).logits[0, -1]
            top = torch.topk(logits.float(), sampling.top_k + 1).values
            assert float(top[-2] - top[-1]) > 1e-3, "a near tie at the top-k edge: the reference is fragile"
            probs = target_probs(logits[None], sampling)[0].double()
            for token in torch.nonzero(probs).flatten().tolist():
                grown[path + (token,)] = mass * float(probs[token])
        paths = grown
    return paths


def test_engine_sampling_with_model_drafts_matches_plain_sampling(tokenizer):
    """Engine.generate with the model drafter fused with the context drafter: the first three
    tokens (the first from the prefill, the next two through the first tree) have plain
    sampling's joint distribution, computed exactly from the model's logits."""
    from conftest import FLAT_CURVE

    from ragspec import Engine
    from ragspec.drafting.context_suffix import ContextSuffixDrafter

    target = sharpened_tiny_llama(tokenizer)
    draft_model = sharpened_tiny_llama(tokenizer, noise=0.1).model
    sampling = SamplingConfig(**E2E_SAMPLING)
    counts = {"point mass": 0, "draw": 0, "pruned draw": 0}
    seeds = iter(range(10**6, 10**7))

    def drafters(engine):
        return [NoisyCopyDrafter(draft_model, sampling, next(seeds), counts), ContextSuffixDrafter(engine.spec)]

    engine = Engine(target, latency_curve=FLAT_CURVE, prefix_cache=False, drafter_factories=[drafters])
    prompt_ids = engine.encode(E2E_PROMPT)
    exact_paths = plain_distribution(target, prompt_ids, sampling, depth=3)
    cells = {path: i for i, path in enumerate(exact_paths)}
    observed = np.zeros(len(cells))
    for seed in range(E2E_RUNS):
        out = engine.generate(E2E_PROMPT, max_new_tokens=3, seed=seed, **E2E_SAMPLING)
        observed[cells[tuple(out.token_ids)]] += 1  # KeyError: a path plain sampling cannot produce
    print(f"{E2E_RUNS} runs, accepted: {counts}")
    assert counts["draw"] > E2E_RUNS // 5 and counts["point mass"] > E2E_RUNS // 10
    triple = np.asarray(list(exact_paths.values()))
    stat, dof, p_value = chi_square_p_value(observed, triple)
    assert p_value > PASS_P_VALUE, f"(x1, x2, x3): chi-square {stat:.1f} over {dof} dof, p = {p_value:.2e}"
    # the last two tokens, x1 summed out: what the tree decided
    pairs = sorted({path[1:] for path in exact_paths})
    marginal = np.zeros((2, len(pairs)))
    for path, i in cells.items():
        marginal[0, pairs.index(path[1:])] += observed[i]
        marginal[1, pairs.index(path[1:])] += exact_paths[path]
    stat, dof, p_value = chi_square_p_value(marginal[0], marginal[1])
    assert p_value > PASS_P_VALUE, f"(x2, x3): chi-square {stat:.1f} over {dof} dof, p = {p_value:.2e}"


def test_draws_without_tokens_take_the_old_path():
    """A greedy model drafter leaves q in `draws` with no tokens drawn: the same random draws as
    a tree without draws, so seeded outputs do not change."""
    sampling = SamplingConfig(temperature=1.0)
    q_only = model_draw_tree({ROOT: [(Q_A, (), 0)]})
    q_only.add(3, ROOT, True)
    q_only.add(0, ROOT, True)
    tree = q_only.tree("model")
    plain = DraftTree(tree.token_ids, tree.parents, tree.scores, tree.sources)
    logits = logits_for(tree)
    for seed in range(50):
        with_q = accept_sampled(tree, logits, sampling, torch.Generator().manual_seed(seed))
        assert with_q == accept_sampled(plain, logits, sampling, torch.Generator().manual_seed(seed))
