"""The decoding loop: propose, fuse, verify, accept, commit, observe. One target forward a step."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from ragspec.config import SamplingConfig
from ragspec.drafting.base import DraftContext, Drafter
from ragspec.drafting.budget import NodeBudget
from ragspec.drafting.tree import fuse, prune
from ragspec.models import LoadedModel
from ragspec.sampling import accept_greedy, accept_sampled
from ragspec.types import DraftTree, SpecStats, StepResult
from ragspec.verify import TreeVerifier


class TokenBuffer:
    """Growable int64 array of the request's tokens: committed ones, then the pending one."""

    def __init__(self, tokens: Sequence[int]):
        self._data = np.zeros(max(64, 2 * len(tokens)), dtype=np.int64)
        self._length = 0
        self.extend(tokens)

    def extend(self, tokens: Sequence[int]) -> None:
        end = self._length + len(tokens)
        if end > len(self._data):
            self._data = np.concatenate([self._data, np.zeros(end, dtype=np.int64)])
        self._data[self._length : end] = tokens
        self._length = end

    def view(self) -> np.ndarray:
        return self._data[: self._length]

    def __len__(self) -> int:
        return self._length


def _timed_propose(drafter: Drafter, context: DraftContext, stats: SpecStats) -> DraftTree:
    start = time.perf_counter()
    tree = drafter.propose(context)
    stats.draft_latencies_s.setdefault(drafter.name, []).append(time.perf_counter() - start)
    return tree


def decode_steps(
    target: LoadedModel,
    prompt_ids: Sequence[int],
    *,
    drafters: Sequence[Drafter],
    budget: NodeBudget | None,
    sampling: SamplingConfig,
    stats: SpecStats,
) -> Iterator[list[int]]:
    """Yield the tokens each step commits (accepted drafts, then the bonus token), forever.

    The caller stops iterating at EOS, a stop string, or its token limit; the loop itself ends
    only when the context window is full. With no drafters or no budget it is plain decoding.
    """
    verifier = TreeVerifier(target)
    start = time.perf_counter()
    verifier.prefill(list(prompt_ids))
    stats.prefill_s = time.perf_counter() - start
    tokens = TokenBuffer(prompt_ids)
    generator = torch.Generator()  # sampling draws from its own generator, never the global one
    if sampling.seed is not None:
        generator.manual_seed(sampling.seed)
    else:
        generator.seed()
    while len(tokens) < target.context_length:
        room = target.context_length - len(tokens) - 1  # positions left for drafts, bonus token kept
        # 1-2. propose and fuse, pruned to the budget
        draft_start = time.perf_counter()
        tree = DraftTree.empty()
        if drafters and budget is not None:
            context = DraftContext(tokens=tokens.view(), max_nodes=min(budget.max_nodes, room))
            tree = fuse([_timed_propose(drafter, context, stats) for drafter in drafters])
            tree = prune(tree, budget.choose(tree, limit=room))
        draft_s = time.perf_counter() - draft_start
        # 3. verify the pending token + tree in one forward
        pending_token = int(tokens.view()[-1])
        verified = verifier.verify(pending_token, tree)
        # 4. accept
        if sampling.greedy:
            accept = accept_greedy(tree, verified.logits)
        else:
            accept = accept_sampled(tree, verified.logits, sampling, generator)
        if budget is not None:
            budget.observe(tree, accept.num_accepted, verified.verify_s)
        # 5. commit: keep the accepted path's KV; the bonus token becomes the pending token
        verifier.commit(accept)
        new_tokens = [*accept.accepted_tokens, accept.bonus_token]
        tokens.extend(new_tokens)
        # 6. observe
        step = StepResult(tree, accept, verified.logits, draft_s, verified.verify_s, pending_token)
        for drafter in drafters:
            drafter.observe(step)
        stats.record(step)
        yield new_tokens
