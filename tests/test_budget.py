"""The node budget notices a latency curve that no longer describes the machine (profiled while
it was busy, or elsewhere): it measures plain and tree steps as they run and stops speculating
when tree steps cost more than the tokens they bring, and keeps speculating where they pay."""

from __future__ import annotations

import time

import numpy as np

from ragspec import Engine
from ragspec.engine.budget import EXPLORE_EVERY, LatencyCurve, NodeBudget
from ragspec.types import DraftTree

# As conftest's FLAT_CURVE (64 rows cost what 1 costs), but corrected online like a measured curve.
FLAT = LatencyCurve(rows=(1, 64), seconds=(0.010, 0.0101))


def chain(length: int, p: float) -> DraftTree:
    """A chain whose node d is accepted with probability p**(d + 1) (p per level)."""
    return DraftTree(token_ids=np.arange(length, dtype=np.int64), parents=np.arange(length, dtype=np.int64) - 1,
                     scores=p ** np.arange(1, length + 1), sources=("context",) * length)


def simulate(budget: NodeBudget, tree: DraftTree, p: float, step_seconds, steps: int) -> tuple[list[int], float]:
    """Run `steps` decoding steps against a simulated machine: each level of the chosen chain is
    accepted with probability p, a step verifying n nodes takes step_seconds(n). Returns the
    nodes verified per step and the tokens per second achieved."""
    rng = np.random.default_rng(0)
    verified, tokens, seconds = [], 0, 0.0
    for _ in range(steps):
        chosen = budget.select(tree, explore=True)
        accepted = 0
        while accepted < chosen.num_nodes and rng.random() < p:
            accepted += 1
        budget.observe(chosen, list(range(accepted)), step_seconds(chosen.num_nodes))
        verified.append(chosen.num_nodes)
        tokens += accepted + 1
        seconds += step_seconds(chosen.num_nodes)
    return verified, tokens / seconds


def test_speculation_stops_when_tree_steps_cost_more_than_the_curve_says():
    """The issue's case: a curve saying 64 rows cost what 1 costs, on a machine where a tree
    step costs 1.5x-3x a plain one, with drafts accepted about as often as scored (mean acceptance
    length ~1.4). A single additive offset learned from tree steps raised the plain estimate just
    as much and kept speculating, at 0.62x plain decoding's rate here."""

    def machine(nodes: int) -> float:
        return 0.010 if nodes == 0 else 0.015 + 0.001 * nodes

    verified, tokens_per_s = simulate(NodeBudget(FLAT, max_nodes=64), chain(20, 0.3), 0.3, machine, 400)
    later = verified[50:]
    assert sum(n > 0 for n in later) <= len(later) // EXPLORE_EVERY + 2  # only the re-measuring tree steps
    assert tokens_per_s >= 0.97 * (1 / machine(0))  # plain decoding's rate, less the exploration


def test_speculation_continues_where_it_pays_even_if_the_curve_was_taken_on_a_busy_machine():
    """Profiled while busy: every row count twice as slow as now and noisy. Trees that pay now are
    still verified on nearly every step, and the rate is far above plain decoding's."""
    rows = (1, 2, 4, 8, 16, 32, 64)
    busy = LatencyCurve(rows=rows, seconds=tuple(2 * (0.010 + 0.0004 * r) * (1.3 if r in (2, 8) else 1) for r in rows))

    def machine(nodes: int) -> float:
        return 0.010 + 0.0004 * (1 + nodes)

    verified, tokens_per_s = simulate(NodeBudget(busy, max_nodes=64), chain(30, 0.9), 0.9, machine, 300)
    assert sum(n > 0 for n in verified) >= 0.9 * len(verified)
    assert tokens_per_s > 3 * (1 / machine(0))


def test_a_curve_given_as_fixed_is_used_as_given():
    """adapt=False (the tests' curves): no latency correction and no re-measuring steps."""
    def machine(nodes: int) -> float:
        return 0.01 + 0.01 * nodes

    fixed = LatencyCurve(rows=FLAT.rows, seconds=FLAT.seconds, adapt=False)
    budget = NodeBudget(fixed, max_nodes=64)
    verified, _ = simulate(budget, chain(20, 0.3), 0.3, machine, 100)
    assert all(n > 0 for n in verified)
    assert np.array_equal(budget.predicted_seconds(8), fixed(np.arange(1, 10)))
    adaptive, _ = simulate(NodeBudget(FLAT, max_nodes=64), chain(20, 0.3), 0.3, machine, 100)
    assert sum(n > 0 for n in adaptive) < 10  # the same machine with the correction on


def test_without_exploring_the_budget_choice_is_the_plain_argmax():
    """Tests and tools asking for the best count (explore=False) never get a re-measuring step."""
    budget = NodeBudget(FLAT, max_nodes=64)
    tree = chain(10, 0.9)
    for _ in range(2 * EXPLORE_EVERY):
        budget.observe(tree, list(range(9)), 0.0101)
    assert budget.choose(tree) == 10
    assert budget.choose(tree, explore=True) == 0  # a plain step was never measured


def test_engine_turns_speculation_off_on_a_machine_slower_for_trees(tiny_llama):
    """End to end: each multi-row forward is made 100 ms slower than the flat curve the engine
    was given says. After its first tree step the engine measures a plain one and decodes plainly,
    apart from the re-measuring tree steps (the additive offset of before kept verifying trees
    whenever there were drafts: 10 tree steps in 99 here, against 2 in 115 now)."""
    rows_per_forward: list[int] = []

    def slow_trees(module, args, kwargs):
        rows = kwargs["input_ids"].shape[1]
        rows_per_forward.append(rows)
        if len(rows_per_forward) > 1 and rows > 1:  # not the prefill
            time.sleep(0.100)

    engine = Engine(tiny_llama, latency_curve=FLAT, persist_state=False, prefix_cache=False)
    prompt = "a b c d a b c d a b c d a b c d a b c d"
    handle = tiny_llama.model.register_forward_pre_hook(slow_trees, with_kwargs=True)
    try:
        out = engine.generate(prompt, max_new_tokens=128)
    finally:
        handle.remove()
    plain = Engine(tiny_llama, latency_curve=FLAT, persist_state=False, prefix_cache=False)
    assert out.token_ids == plain.generate(prompt, max_new_tokens=128, speculative=False).token_ids
    steps = rows_per_forward[1:]
    assert sum(rows > 1 for rows in steps) <= 2 + len(steps) // EXPLORE_EVERY
