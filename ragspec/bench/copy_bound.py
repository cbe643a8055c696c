"""How far drafting by copying could go on a workload, from the plain run's outputs (no model).

Each reference output is replayed step by step as speculative decoding commits it (accepted
drafts, then one bonus token), and each step drafts one chain of at most `depth` tokens with
hindsight:

- suffix_match: the best continuation among the earlier occurrences of the current suffix that
  the context drafter's index returns (longest match first, as many as it takes). The context
  drafter's tree aims at this without hindsight.
- any_copy: the longest run of upcoming tokens found anywhere earlier in the prompt or output.
  No drafter that only copies from the request can accept more.

Both are mean acceptance lengths, bonus token included, comparable with the engine's. When the
engine's is close to suffix_match, copying has given what it can on that workload.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ragspec.config import SpecConfig
from ragspec.drafting.suffix_index import NgramIndex
from ragspec.kvcache import common_prefix_length

ORACLE_DEPTH = 32  # longest draft chain considered


def copy_bounds(prompts: Sequence[Sequence[int]], outputs: Sequence[Sequence[int]],
                depth: int = ORACLE_DEPTH) -> dict[str, float | None]:
    """Mean acceptance length of the suffix_match and any_copy oracles over all requests."""
    suffix_steps = any_steps = 0
    generated = sum(len(output) for output in outputs)
    for prompt, output in zip(prompts, outputs):
        suffix_steps += _replay(prompt, output, _SuffixMatchOracle(depth))
        any_steps += _replay(prompt, output, lambda tokens, upcoming: _longest_copy(tokens, upcoming, depth))
    return {
        "suffix_match_mean_acceptance_length": generated / suffix_steps if suffix_steps else None,
        "any_copy_mean_acceptance_length": generated / any_steps if any_steps else None,
        "depth": depth,
    }


def _replay(prompt: Sequence[int], output: Sequence[int], oracle) -> int:
    """Steps to commit `output`: each step accepts what `oracle(tokens, upcoming)` gets right, + 1."""
    tokens, steps, done = list(prompt), 0, 0
    while done < len(output):
        upcoming = output[done:]
        accepted = min(oracle(tokens, upcoming), len(upcoming) - 1)  # the last token is a bonus
        tokens += upcoming[: accepted + 1]
        done += accepted + 1
        steps += 1
    return steps


class _SuffixMatchOracle:
    """Best continuation among the occurrences the context drafter's index finds."""

    def __init__(self, depth: int, config: SpecConfig = SpecConfig()):
        self.index = NgramIndex()
        self.depth = depth
        self.config = config  # the context drafter's occurrence and match limits

    def __call__(self, tokens: list[int], upcoming: Sequence[int]) -> int:
        self.index.extend(tokens[len(self.index):])
        query = np.asarray(tokens, dtype=np.int64)
        starts, _ = self.index.matches(query, self.config.max_occurrences, self.config.max_match)
        continuations = (self.index.following(start, self.depth) for start in starts.tolist())
        return max((common_prefix_length(c, upcoming[: self.depth]) for c in continuations), default=0)


def _longest_copy(tokens: list[int], upcoming: Sequence[int], depth: int) -> int:
    """Longest prefix of `upcoming` (at most `depth`) that occurs somewhere in `tokens`."""
    context = np.asarray(tokens, dtype=np.int64)
    want = np.asarray(upcoming[:depth], dtype=np.int64)
    candidates = np.flatnonzero(context == want[0]) if len(want) else np.array([], dtype=np.int64)
    best = 0
    for length in range(1, len(want) + 1):  # keep the starts that still match `length` tokens
        candidates = candidates[candidates + length - 1 < len(context)]
        candidates = candidates[context[candidates + length - 1] == want[length - 1]]
        if not len(candidates):
            break
        best = length
    return best
