"""Walk the verified tree and decide which draft tokens the target keeps.

Greedy: follow the child whose token is the target's argmax; stop at the first miss. The result
is bit-identical to plain greedy decoding whenever the tree logits equal token-by-token logits.

Sampling: at each node draw one token from the processed target distribution; if a child carries
it, move there and draw again, else emit it and stop. Every emitted token is then an exact sample
of the target given its prefix, whatever the tree: lossless for drafts without draft probabilities.
"""

from __future__ import annotations

import torch

from ragspec.config import SamplingConfig
from ragspec.sampling.logits import target_probs
from ragspec.types import ROOT, AcceptResult, DraftTree


def children_by_parent(tree: DraftTree) -> dict[int, dict[int, int]]:
    """{parent node (ROOT for the pending token): {token id: child node}}."""
    children: dict[int, dict[int, int]] = {}
    for node, (token, parent) in enumerate(zip(tree.token_ids.tolist(), tree.parents.tolist())):
        children.setdefault(parent, {}).setdefault(token, node)
    return children


def accept_greedy(tree: DraftTree, logits: torch.Tensor) -> AcceptResult:
    """logits: [1 + num_nodes, vocab], row 0 for the pending token."""
    choices = logits.argmax(-1).tolist()  # [1 + num_nodes]
    return _walk(tree, lambda row: choices[row])


def accept_sampled(
    tree: DraftTree, logits: torch.Tensor, sampling: SamplingConfig, generator: torch.Generator
) -> AcceptResult:
    def draw(row: int) -> int:
        probs = target_probs(logits[row : row + 1], sampling).cpu()  # the generator lives on the CPU
        return int(torch.multinomial(probs, 1, generator=generator).item())

    return _walk(tree, draw)


def _walk(tree: DraftTree, next_token) -> AcceptResult:
    """next_token(row) gives the target's token after verify row `row` (0 = pending token)."""
    children = children_by_parent(tree)
    node, nodes, tokens = ROOT, [], []
    while True:
        token = next_token(node + 1)
        child = children.get(node, {}).get(token)
        if child is None:
            return AcceptResult(accepted_nodes=nodes, accepted_tokens=tokens, bonus_token=token)
        nodes.append(child)
        tokens.append(token)
        node = child
