"""The decoding loop: propose, fuse, verify, accept, commit, observe. One target forward a step."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import replace

import numpy as np
import torch

from ragspec.config import SamplingConfig
from ragspec.drafting.base import DraftContext, Drafter
from ragspec.drafting.tree import drop_implausible, fuse, subtree
from ragspec.engine.budget import NodeBudget
from ragspec.engine.request import TARGET_SOURCE
from ragspec.sampling import accept_greedy, accept_sampled
from ragspec.types import DraftTree, SpecStats, StepResult, TokenBuffer
from ragspec.backends.base import TargetVerifier


def _timed_propose(drafter: Drafter, context: DraftContext, stats: SpecStats) -> DraftTree:
    start = time.perf_counter()
    tree = drafter.propose(context)
    stats.draft_latencies_s.setdefault(drafter.name, []).append(time.perf_counter() - start)
    return tree


def _draft(drafters, budget: NodeBudget | None, tokens: TokenBuffer, context_length: int, stats: SpecStats,
           min_draft_prob: float, max_tree_nodes: int | None = None):
    """The fused draft tree for this step, pruned to the budget, and the seconds it took."""
    start = time.perf_counter()
    room = context_length - len(tokens) - 1  # positions left for drafts, bonus token kept
    if max_tree_nodes is not None:  # the backend verifies exactly only up to this many nodes
        room = min(room, max_tree_nodes)
    if budget is not None:  # the step's verify cost (and a model drafter's token value) depend on it
        budget.cache_length = len(tokens)
    if not drafters or budget is None or room <= 0:
        return DraftTree.empty(), time.perf_counter() - start
    context = DraftContext(tokens=tokens.view(), max_nodes=min(budget.max_nodes, room))
    tree = fuse([_timed_propose(drafter, context, stats) for drafter in drafters])
    tree = drop_implausible(tree, min_draft_prob)  # RASD: nodes a model drafter finds implausible
    tree = budget.select(tree, limit=room, explore=True)
    return tree, time.perf_counter() - start


def decode_steps(
    verifier: TargetVerifier,
    prompt_ids: Sequence[int],
    *,
    drafters: Sequence[Drafter],
    budget: NodeBudget | None,
    sampling: SamplingConfig,
    stats: SpecStats,
    min_draft_prob: float = 0.0,
) -> Iterator[tuple[list[int], list[str]]]:
    """Yield the tokens each step commits (accepted drafts, then the bonus token), forever, with
    the source of each: the drafter that proposed it, or "target" for the bonus token.

    The caller stops iterating at EOS, a stop string, or its token limit; the loop itself ends
    only when the context window is full. With no drafters or no budget it is plain decoding.
    `verifier` may already hold a cached prefix of the prompt (see KVPrefix). `min_draft_prob`:
    SpecConfig.min_draft_prob (RASD pruning of the fused tree).

    A drafter may carry a `lossy_target` (opt-in, LOSSY: RAPID's knowledge transfer): a callable
    (tree, verify logits, sampling) -> (logits, sampling) that acceptance then uses instead of the
    target's own. None (every built-in drafter's default) leaves the lossless path untouched.
    """
    target = verifier.target
    shifts = [shift for drafter in drafters if (shift := getattr(drafter, "lossy_target", None)) is not None]
    prefilled, stats.cached_prompt_tokens = verifier.prefill_and_verify(list(prompt_ids))  # step 1, empty tree
    stats.prefill_s = prefilled.verify_s
    tokens = TokenBuffer(prompt_ids)
    generator = torch.Generator()  # sampling draws from its own generator, never the global one
    if sampling.seed is not None:
        generator.manual_seed(sampling.seed)
    else:
        generator.seed()
    while len(tokens) < target.context_length:
        pending_token = int(tokens.view()[-1])
        if prefilled is not None:  # its time is in stats.prefill_s, not in any step's
            tree, draft_s, verified, prefilled = DraftTree.empty(), 0.0, replace(prefilled, verify_s=0.0), None
            if shifts:  # the first token is shifted too: the drafters' distributions at the root, no nodes
                tree, draft_s = _draft(drafters, budget, tokens, target.context_length, stats, min_draft_prob)
                tree = subtree(tree, np.zeros(tree.num_nodes, dtype=bool))
        else:
            # 1-2. propose and fuse, pruned to the budget
            tree, draft_s = _draft(drafters, budget, tokens, target.context_length, stats, min_draft_prob,
                                   target.max_tree_nodes)
            # 3. verify the pending token + tree in one forward
            verified = verifier.verify(pending_token, tree)
        # 4. accept
        accept_logits, accept_sampling = verified.logits, sampling
        for shift in shifts:  # lossy, opt-in only
            accept_logits, accept_sampling = shift(tree, accept_logits, accept_sampling)
        if accept_sampling.greedy:
            accept = accept_greedy(tree, accept_logits)
        else:
            accept = accept_sampled(tree, accept_logits, accept_sampling, generator)
        if budget is not None and verified.verify_s > 0:
            budget.observe(tree, accept.accepted_nodes, verified.verify_s)
        # 5. commit: keep the accepted path's KV; the bonus token becomes the pending token
        verifier.commit(accept)
        new_tokens = [*accept.accepted_tokens, accept.bonus_token]
        tokens.extend(new_tokens)
        # 6. observe
        step = StepResult(tree, accept, verified.logits, draft_s, verified.verify_s, pending_token, verified.hidden)
        for drafter in drafters:
            drafter.observe(step)
        stats.record(step)
        yield new_tokens, [*(tree.sources[node] for node in accept.accepted_nodes), TARGET_SOURCE]
