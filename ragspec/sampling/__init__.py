"""Logits processing and lossless acceptance of draft trees."""

from ragspec.sampling.acceptance import accept_greedy, accept_sampled, children_by_parent
from ragspec.sampling.logits import target_probs

__all__ = ["accept_greedy", "accept_sampled", "children_by_parent", "target_probs"]
