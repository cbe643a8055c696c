"""Walk the verified tree and decide which draft tokens the target keeps.

Greedy: follow the child whose token is the target's argmax; stop at the first miss. The result
is bit-identical to plain greedy decoding whenever the tree logits equal token-by-token logits.

Sampling, trees without model draws: at each node draw one token from the processed target
distribution p; if a child carries it, move there and draw again, else emit it and stop. Every
emitted token is then an exact sample of p given its prefix, whatever the tree. (This is
recursive rejection over point masses: a point-mass candidate c is accepted with probability
p(c), and after a rejection the residual is p with c zeroed and renormalised.)

Sampling, nodes with model draws (`DraftTree.draws`: tokens a model drew at random, without
replacement, from its distribution q): SpecInfer / Sequoia recursive rejection. At a node, with
p = the target's distribution there:
  1. each drawn token x_i, in draw order, was drawn from q_i = q without x_0..x_{i-1},
     renormalised: accept it with probability min(1, p(x_i) / q_i(x_i)) (move to its node, or,
     if pruning removed the node, emit it as the step's last token); on rejection
     p <- normalise(max(p - q_i, 0)). Several ModelDraws at one node are taken one after another;
  2. point masses (the node's deterministic children): draw y ~ p (the residual) and move to the
     child carrying y, if any; otherwise emit y as the step's bonus token.
Why the emitted token is distributed as the node's target p: by induction from the last stage.
If whatever follows a rejection at stage i emits a sample of p_{i+1} = normalise(max(p_i - q_i,
0)), stage i emits x with probability q_i(x) min(1, p_i(x)/q_i(x)) = min(q_i, p_i)(x), and after
a rejection (probability 1 - sum min(q_i, p_i) = sum max(p_i - q_i, 0)) a sample of p_{i+1}: in
total min(q_i, p_i) + max(p_i - q_i, 0) = p_i. The final draw y ~ p is exact whichever children
exist. The argument conditions on every earlier draw and coin, so q_i may depend on earlier
candidates, as long as x_i, given all that, really is a sample of q_i (draws without replacement
are), and p after a rejection depends on x_i's distribution, never on x_i itself.

Draws come first because the tree's point masses may depend on the draws: the budget prunes by
scores, and drawn nodes' scores depend on what was drawn, so which retrieval children survive
carries information about the draws. Taking the draws first, while they are still plain samples
of q_i, and the point masses last, as one draw from the residual, is exact whatever pruning did
(a point mass may be any function of the history). It also accepts a little more often than
point masses first (measured: 0.747 vs 0.737 of first tokens on a candidate, 20k steps).
Deeper nodes repeat this with their own rows: the emitted sequence is plain sampling.

The arithmetic of the residuals runs in float64 on the CPU (the target row is moved once).
Trees without draws (or whose ModelDraws drew no tokens: a greedy drafter keeps q for pruning)
take exactly the old code path, so seeded outputs do not change.
"""

from __future__ import annotations

import numpy as np
import torch

from ragspec.config import SamplingConfig
from ragspec.sampling.logits import target_probs
from ragspec.types import ROOT, AcceptResult, DraftTree, ModelDraws


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
    """logits: [1 + num_nodes, vocab], row 0 for the pending token. Lossless: see the module doc."""

    def draw(row: int) -> int:  # row - 1: the node whose children the token may land on (ROOT: -1)
        probs = target_probs(logits[row : row + 1], sampling).cpu()  # the generator lives on the CPU
        return _sample_node(probs, tree.draws.get(row - 1, ()), generator)

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


def _sample_node(probs: torch.Tensor, draws: tuple[ModelDraws, ...], generator: torch.Generator) -> int:
    """One exact sample of `probs` [1, vocab] (float32, CPU) that lands on a candidate whenever
    the rejection scheme allows. The caller moves to the child carrying it, if any."""
    if not any(model_draws.tokens for model_draws in draws):  # point masses only (greedy drafters
        return _draw(probs, generator)  # keep q without drawing): the old draw
    p = probs[0].detach().numpy().astype(np.float64)  # [vocab], a copy
    for model_draws in draws:
        accepted, p = _reject_draws(p, model_draws, generator)
        if accepted is not None:
            return accepted
    return _draw(torch.from_numpy(p), generator)  # a point mass child, if it lands on one


def _draw(probs: torch.Tensor, generator: torch.Generator) -> int:
    return int(torch.multinomial(probs, 1, generator=generator).item())


def _reject_draws(p: np.ndarray, model_draws: ModelDraws, generator: torch.Generator) -> tuple[int | None, np.ndarray]:
    """Recursive rejection of one model's draws against the target residual p [vocab] float64.
    Returns (the accepted token or None, the residual after the rejections)."""
    q = np.maximum(model_draws.probs.detach().to("cpu", torch.float64).numpy(), 0.0)  # [vocab], a copy
    total = float(q.sum())
    for token in model_draws.tokens:
        q_token = float(q[token]) / total if total > 0 else 0.0
        if q_token <= 0.0:  # not a draw q could give (a drafter bug): skipping it keeps p exact
            continue
        coin = float(torch.rand(1, dtype=torch.float64, generator=generator))
        if coin * q_token < p[token]:  # probability min(1, p(x) / q_i(x))
            return token, p
        residual = np.maximum(p - q / total, 0.0)
        mass = float(residual.sum())
        if mass > 0.0:  # 0 only where p == q_i, and then rejection had probability 0
            p = residual / mass
        total -= float(q[token])  # the next draw came from q without this token
        q[token] = 0.0
    return None, p
