"""End to end: sampling through `Engine.generate` with the real "model" drafter (ModelTreeDrafter
over a second tiny LM, fused with the context drafter, RASD-pruned, cut to the NodeBudget) gives
the target's plain-sampling distribution.

The target is a tiny random llama with its output head scaled (a random tiny model is nearly flat;
scaled, plain sampling has a few likely tokens, so drafts get verified and accepted); the draft
model is a noisy copy of it, so its q differs from the target's p (it even ranks another token
first at the prompt). Each case generates 3 tokens from one prompt, RUNS times with seeds
0..RUNS-1, and compares the outcomes with plain sampling's exact distribution, computed from the
target's logits by enumerating every path of mass >= MIN_MASS (the rest is one cell): a
chi-square test of the triple (x1, x2, x3) and of the pair (x2, x3) with x1 summed out. x1 comes
from the prefill step, which never has a tree; x2 and x3 are what the draft trees decide.

A spy around the loop's `accept_sampled` (the real function runs) counts what the trees did,
and each case asserts that it exercised the scheme: model draws accepted, first draws rejected
(residual rejection), pruned draws (in `draws`, not in the tree) accepted, and, where
min_draft_prob is high, draws RASD pruning removed from the tree. Everything is seeded and runs
on one thread: the test is deterministic. The right scheme must keep p > PASS_P_VALUE (measured:
every p >= 0.066). Measured with acceptance.py broken on purpose, the triple test of every case
fails: a draw accepted with probability p(x) instead of min(1, p(x) / q_i(x)) gave p <= 2e-23;
q_i not renormalised after each draw (the subtler bug) gave p <= 4e-7.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch
from conftest import FLAT_CURVE, build_tiny_model
from test_sampling_model_drafts import PASS_P_VALUE, chi_square_p_value

from ragspec.config import SamplingConfig
from ragspec.types import ROOT, AcceptResult, DraftTree

PROMPT = "a b c a b c a b c a b"
NEW_TOKENS = 3
RUNS = 300
SHARPEN = 60.0  # output head scale: the target's top token after the prompt gets p = 0.89
DRAFT_NOISE = 0.1  # the draft model: every weight matrix + 0.1 of its std of noise (seed 1)
MIN_MASS = 2e-3  # paths of plain sampling enumerated down to this probability (rarer ones are pooled anyway)
# a top-k / top-p cut this close to flipping (logit gap, or mass before a token minus top_p) would
# make the reference fragile: a tree forward's float32 logits may differ from a plain one's by rounding
FILTER_MARGIN = 1e-5


@dataclass(frozen=True)
class Case:
    sampling: dict  # generate() options
    min_draft_prob: float  # SpecConfig.min_draft_prob (RASD)


CASES = {
    "temperature 1, no RASD": Case({"temperature": 1.0}, 0.0),
    "temperature 1, RASD 0.15": Case({"temperature": 1.0}, 0.15),
    "top-k 12, top-p 0.9, RASD 0.02": Case({"temperature": 1.0, "top_k": 12, "top_p": 0.9}, 0.02),
}


# -- the models ---------------------------------------------------------------------------


def sharpened_tiny_llama(tokenizer, *, noise: float = 0.0, noise_seed: int = 1):
    """The tiny llama (seed 0) with its output weights scaled by SHARPEN; with `noise`, every
    weight matrix perturbed by that fraction of its std, drawn from `noise_seed`."""
    from ragspec import LoadedModel
    from ragspec.kernels.select import choose_kernels

    model = build_tiny_model("llama", len(tokenizer), seed=0)
    generator = torch.Generator().manual_seed(noise_seed)
    with torch.no_grad():
        model.lm_head.weight.mul_(SHARPEN)
        for weight in (w for w in model.parameters() if w.dim() > 1 and noise):
            weight.add_(torch.randn(weight.shape, generator=generator) * weight.std() * noise)
    loaded = LoadedModel(model=model, tokenizer=tokenizer, name="tiny-llama-sharp-draft" if noise else "tiny-llama-sharp")
    loaded.kernels = choose_kernels(loaded, mode="fast")
    return loaded


@pytest.fixture(scope="module")
def models(tokenizer):
    return sharpened_tiny_llama(tokenizer), sharpened_tiny_llama(tokenizer, noise=DRAFT_NOISE)


# -- plain sampling's exact distribution --------------------------------------------------


@dataclass
class PlainReference:
    """Plain sampling's distribution of the first generated tokens: every path of mass >=
    MIN_MASS with its probability; the other paths form one cell (`rest`)."""

    paths: dict[tuple[int, ...], float]  # full-length paths -> probability
    supports: dict[tuple[int, ...], set[int] | None]  # expanded prefix -> tokens it can be followed by (None: all)

    @property
    def rest(self) -> float:
        return max(0.0, 1.0 - sum(self.paths.values()))

    def cell(self, path: tuple[int, ...]) -> tuple[int, ...] | str:
        """The path's cell; "impossible" if plain sampling can never produce it."""
        if path in self.paths:
            return path
        for length in range(len(path)):
            support = self.supports.get(path[:length])
            if support is not None and path[length] not in support:
                return "impossible"
        return "rest"


def filter_margin(logits: torch.Tensor, sampling: SamplingConfig) -> float:
    """How far the row's top-k / top-p cut is from flipping (inf without filters). [vocab]"""
    scaled = logits.double() / sampling.temperature
    margin = np.inf
    if sampling.top_k:
        top = torch.topk(scaled, sampling.top_k + 1).values
        margin = min(margin, float(top[-2] - top[-1]))
    if sampling.top_p < 1.0:
        kept = torch.topk(scaled, sampling.top_k).values if sampling.top_k else scaled.sort(descending=True).values
        probs = kept.softmax(-1)
        before = probs.cumsum(-1) - probs  # the mass before each token, compared with top_p
        margin = min(margin, float((before - sampling.top_p).abs().min()))
    return margin


def plain_reference(target, prompt_ids: list[int], sampling: SamplingConfig, depth: int) -> PlainReference:
    from ragspec.sampling import target_probs

    reference = PlainReference(paths={(): 1.0}, supports={})
    for _ in range(depth):
        grown: dict[tuple[int, ...], float] = {}
        for prefix, mass in reference.paths.items():
            with torch.no_grad():
                logits = target.model(input_ids=torch.tensor([prompt_ids + list(prefix)])).logits[0, -1]
            assert filter_margin(logits, sampling) > FILTER_MARGIN, f"a near tie at the filter's edge after {prefix}"
            probs = target_probs(logits[None], sampling)[0].double().numpy()
            support = np.flatnonzero(probs > 0)
            reference.supports[prefix] = set(support.tolist()) if len(support) < len(probs) else None
            for token in support[probs[support] * mass >= MIN_MASS].tolist():
                grown[prefix + (token,)] = mass * float(probs[token])
        reference.paths = grown
    return reference


# -- what the trees did -------------------------------------------------------------------


@dataclass
class TreeEvents:
    """Counts over the visited nodes of every step's tree that carried model draws."""

    min_draft_prob: float
    steps_with_draws: int = 0
    draw_accepted: int = 0  # the token a visited node emitted was one of the model's draws
    first_draw_rejected: int = 0  # ... was not its first draw (residual rejection happened)
    pruned_draw_accepted: int = 0  # ... was a draw whose node was not in the verified tree
    implausible_draws: int = 0  # draws with q < min_draft_prob (RASD must have dropped their nodes)
    implausible_kept: int = 0  # ... whose node is in the verified tree anyway (a bug)

    def record(self, tree: DraftTree, result: AcceptResult) -> None:
        if not any(draws.tokens for group in tree.draws.values() for draws in group):
            return
        self.steps_with_draws += 1
        for parent, group in tree.draws.items():
            children = set(tree.token_ids[tree.parents == parent].tolist())
            for draws in group:
                implausible = [t for t in draws.tokens if float(draws.probs[t]) < self.min_draft_prob]
                self.implausible_draws += len(implausible)
                self.implausible_kept += len(children.intersection(implausible))
        path = [ROOT, *result.accepted_nodes]
        emitted = [*result.accepted_tokens, result.bonus_token]
        for node, token in zip(path, emitted):
            drawn = [t for draws in tree.draws.get(node, ()) for t in draws.tokens]
            if not drawn:
                continue
            children = set(tree.token_ids[tree.parents == node].tolist())
            # a rejected draw x has p(x) < q_i(x), so the residual gives it no mass: the node
            # emits a drawn token exactly when a draw was accepted
            self.draw_accepted += token in drawn
            self.first_draw_rejected += token != drawn[0]
            self.pruned_draw_accepted += token in drawn and token not in children


def run_engine(models, case: Case, monkeypatch) -> tuple[PlainReference, dict, TreeEvents, dict[str, int]]:
    """RUNS generations; returns the reference, the outcome counts by cell, the tree events and
    the accepted draft tokens by source (SpecStats)."""
    from ragspec import Engine
    from ragspec.config import SpecConfig
    from ragspec.drafting.model import ModelDraftConfig
    from ragspec.engine import loop

    target, draft = models
    events = TreeEvents(case.min_draft_prob)
    real_accept = loop.accept_sampled

    def accept_and_count(tree, logits, sampling, generator):
        result = real_accept(tree, logits, sampling, generator)
        events.record(tree, result)
        return result

    monkeypatch.setattr(loop, "accept_sampled", accept_and_count)
    spec = SpecConfig(
        drafters=("context", "model"), max_nodes=16, min_draft_prob=case.min_draft_prob,
        options=(ModelDraftConfig(model=draft, cost_aware=False, max_depth=2, width=4, top_k=4),),
    )
    engine = Engine(target, spec=spec, latency_curve=FLAT_CURVE, prefix_cache=False, persist_state=False)
    reference = plain_reference(target, engine.encode(PROMPT), SamplingConfig(**case.sampling), NEW_TOKENS)
    counts: dict = {}
    accepted: dict[str, int] = {}
    for seed in range(RUNS):
        out = engine.generate(PROMPT, max_new_tokens=NEW_TOKENS, seed=seed, **case.sampling)
        assert len(out.token_ids) == NEW_TOKENS
        cell = reference.cell(tuple(out.token_ids))
        counts[cell] = counts.get(cell, 0) + 1
        for source, n in out.stats.accepted_per_source.items():
            accepted[source] = accepted.get(source, 0) + n
    return reference, counts, events, accepted


def p_values(reference: PlainReference, counts: dict) -> dict[str, tuple[float, int, float]]:
    """Chi-square (statistic, dof, p-value) of the triple and of the pair (x2, x3); the pair's
    cells are the enumerated paths grouped by their last two tokens, plus the rest."""
    impossible = counts.get("impossible", 0)
    triple_cells = [*reference.paths, "rest"]
    triple_probs = [*reference.paths.values(), reference.rest]
    pairs = sorted({path[1:] for path in reference.paths})
    pair_index = {pair: i for i, pair in enumerate(pairs)}
    pair_counts, pair_probs = np.zeros(len(pairs) + 1), np.zeros(len(pairs) + 1)
    for path, probability in reference.paths.items():
        pair_counts[pair_index[path[1:]]] += counts.get(path, 0)
        pair_probs[pair_index[path[1:]]] += probability
    pair_counts[-1], pair_probs[-1] = counts.get("rest", 0), reference.rest
    tests = {
        "(x1, x2, x3)": ([counts.get(cell, 0) for cell in triple_cells], triple_probs),
        "(x2, x3)": (list(pair_counts), list(pair_probs)),
    }
    # outcomes plain sampling cannot produce: a cell of probability 0 (p-value 0 if any)
    return {name: chi_square_p_value(np.asarray([*c, impossible]), np.asarray([*p, 0.0])) for name, (c, p) in tests.items()}


@pytest.mark.parametrize("name", CASES)
def test_engine_sampling_with_the_model_drafter_matches_plain_sampling(models, name, monkeypatch):
    case = CASES[name]
    reference, counts, events, accepted = run_engine(models, case, monkeypatch)
    results = p_values(reference, counts)
    print(f"\n{name}: {RUNS} runs, {len(reference.paths)} paths enumerated (rest {reference.rest:.4f}), "
          f"accepted per source {accepted}, {events}")
    for test_name, (stat, dof, p_value) in results.items():
        print(f"  {test_name}: chi-square {stat:.1f} over {dof} dof, p = {p_value:.3g}")
    assert counts.get("impossible", 0) == 0, "an outcome plain sampling cannot produce"
    for test_name, (stat, dof, p_value) in results.items():
        assert p_value > PASS_P_VALUE, f"{test_name}: chi-square {stat:.1f} over {dof} dof, p = {p_value:.2e}"
    # the trees exercised the scheme, not only trivial accepts
    assert accepted.get("model", 0) > RUNS // 2, "the target hardly accepted model nodes"
    assert events.draw_accepted > RUNS // 2 and events.first_draw_rejected > RUNS // 2
    assert events.pruned_draw_accepted > 0, "no draw outside the verified tree was accepted"
    assert events.implausible_kept == 0, "RASD kept a node the model gives less than min_draft_prob"
    if case.min_draft_prob >= 0.1:
        assert events.implausible_draws > RUNS, "RASD pruning removed hardly any draws"
