"""RAPID's inference-time knowledge transfer (LOSSY, opt-in): the target's distribution shifted
toward the RAPID drafter's where the drafter is confident.

RAPID (Chen et al., "Long-Context Inference with Retrieval-Augmented Speculative Decoding", ICML
2025, Eq. 6; the official code's `_speculative_sampling`, github.com/John-AI-Lab/RAPID) treats
the drafter reading the retrieved chunks as a teacher and the long-context target as a student,
and takes one gradient step of the distillation loss KL(q || p) on the target's logits z (its
gradient is p - q), only over the tokens the drafter finds plausible:

    M(x)  = [ q(x) >= alpha * max_y q(y) ]                      (the drafter's confident tokens)
    z'(x) = z(x) + eta * M(x) * (q(x) - p(x))
    p^    = softmax(z')                                         (the retrieval-augmented target)

p is the target's distribution (greedy: softmax of the raw logits; sampling: after temperature,
top-k, top-p, as plain sampling draws), q the drafter's at the same position (greedy: its plain
softmax; sampling: processed alike), both from the same parent path. The official code calls
eta `speculative_margin` (its README example: 10) and alpha `spec_alpha` (default 0.1).

Acceptance then treats p^ as the target wherever the drafter left q (`DraftTree.draws` tagged
with its source), at the pending row and at every tree node it expanded:
- greedy: the target's token at such a row is argmax p^ (the temperature -> 0 limit); a draft
  token is accepted iff it is that token, the bonus token is it too;
- sampling: a drawn token x is accepted with probability min(1, p^(x)/q(x)), on rejection the
  residual is normalise(max(p^ - q, 0)), i.e. standard speculative sampling with target p^, so
  every emitted token is an exact sample of p^. (The official code resamples from
  max(p - q, p - p^) instead, which does not sample p^ nor p; we keep the stated target.)
Rows without the drafter's q keep the target's own p. At eta = 0 nothing is installed at all
(the decoding loop runs its lossless path unchanged).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ragspec.config import SamplingConfig
from ragspec.errors import ConfigError
from ragspec.types import DraftTree

DEFAULT_CONFIDENCE = 0.1  # alpha: the official code's spec_alpha


@dataclass(frozen=True)
class LossyTransfer:
    """p -> p^ on the verify rows where the drafter `source` left its distribution (see module doc).

    Called by the decoding loop before acceptance (a drafter's `lossy_target`): returns the logits
    and the sampling config that acceptance should use instead of the target's own."""

    eta: float  # strength of the shift; > 0
    confidence: float = DEFAULT_CONFIDENCE  # alpha: q(x) >= alpha * max q marks a confident token
    source: str = "rapid"  # ModelDraws.source whose q is the teacher

    def __post_init__(self) -> None:
        if not self.eta > 0:
            raise ConfigError(f"LossyTransfer.eta must be > 0 (0 is the lossless path), got {self.eta}")
        if not 0.0 <= self.confidence <= 1.0:
            raise ConfigError(f"LossyTransfer.confidence must be in [0, 1], got {self.confidence}")

    def teacher_rows(self, tree: DraftTree) -> dict[int, torch.Tensor]:
        """{verify row: the drafter's q [vocab]}: row 0 is the pending token (draws at ROOT = -1),
        row i + 1 is tree node i."""
        return {parent + 1: draws.probs for parent, all_draws in tree.draws.items()
                for draws in all_draws if draws.source == self.source}

    def __call__(self, tree: DraftTree, logits: torch.Tensor,
                 sampling: SamplingConfig) -> tuple[torch.Tensor, SamplingConfig]:
        """logits: [1 + num_nodes, vocab] the verify logits. Returns (scores, sampling) for
        acceptance: greedy keeps raw-logit scores and `sampling`; sampling gets log p (processed)
        with the shifted rows and a plain temperature-1 config, so acceptance draws from p^."""
        rows = self.teacher_rows(tree)
        if not rows:
            return logits, sampling
        if sampling.greedy:
            scores = logits.float().clone()
            accept_sampling = sampling
        else:
            from ragspec.sampling.logits import target_probs

            scores = torch.log(target_probs(logits, sampling))  # -inf where plain sampling never draws
            accept_sampling = SamplingConfig(temperature=1.0, seed=sampling.seed)
        for row, q in rows.items():
            scores[row] = shifted_scores(scores[row], q, self.eta, self.confidence)
        return scores, accept_sampling


def shifted_scores(scores: torch.Tensor, q: torch.Tensor, eta: float, confidence: float) -> torch.Tensor:
    """z + eta * M * (q - softmax(z)), M = [q >= confidence * max q]. scores, q: [vocab] -> [vocab].
    q is cut or zero-padded to the scores' width (a drafter's q covers the target's vocabulary)."""
    q = _aligned(q.to(device=scores.device, dtype=torch.float32), scores.shape[-1])
    p = scores.float().softmax(-1)
    confident = q >= confidence * q.max()
    return scores + eta * torch.where(confident, q - p, torch.zeros_like(p))


def _aligned(q: torch.Tensor, width: int) -> torch.Tensor:
    if q.shape[-1] == width:
        return q
    if q.shape[-1] > width:
        return q[:width]
    return torch.cat([q, q.new_zeros(width - q.shape[-1])])
