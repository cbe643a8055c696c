"""Judging bf16 divergences: where a greedy output first leaves ragspec-ar's, and how sure the
fp32 model is there.

In bf16 a tree verify and a one-token forward round differently (logits differ by up to ~0.7 on
the embedded model), so two correct greedy decoders may pick different tokens where the top two
logits are nearly tied. At each divergence the same model in fp32 re-reads the prompt plus the
agreed tokens: a small fp32 top-2 gap means a near tie that rounding can flip; a gap clearly above
that noise means a real bug.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from ragspec.models import LoadedModel

log = logging.getLogger(__name__)

NOISE_GAP = 1.0  # fp32 top-2 gaps below this are within bf16 rounding noise (measured max 0.72)
EOS = -1  # stands for "the output ended here" at a divergence


@dataclass(frozen=True)
class DivergenceCheck:
    position: int  # first generated token that differs from the reference
    reference_token: int  # EOS where the reference ended there
    method_token: int  # EOS where the method's output ended there
    top2_gap_fp32: float  # fp32 logit of its best token minus its second best, at `position`
    fp32_token: int  # the fp32 model's own greedy token there
    suspect: bool  # gap above NOISE_GAP: rounding can hardly explain a flip there

    def as_dict(self) -> dict:
        return asdict(self)


def first_difference(output: list[int], reference: list[int]) -> int | None:
    """Index of the first differing token (the shorter length if one is a prefix), None if equal."""
    if output == reference:
        return None
    return next((i for i, (a, b) in enumerate(zip(output, reference)) if a != b), min(len(output), len(reference)))


class Fp32Judge:
    """Loads the fp32 model on first use; one forward over prompt + agreed prefix per divergence."""

    def __init__(self, load_fp32: Callable[[], LoadedModel]):
        self._load = load_fp32
        self._target: LoadedModel | None = None

    def check(self, prompt_ids: list[int], output: list[int], reference: list[int]) -> DivergenceCheck | None:
        position = first_difference(output, reference)
        if position is None:
            return None
        gap, fp32_token = self._top2_gap([*prompt_ids, *reference[:position]])
        return DivergenceCheck(
            position=position,
            reference_token=reference[position] if position < len(reference) else EOS,
            method_token=output[position] if position < len(output) else EOS,
            top2_gap_fp32=gap,
            fp32_token=fp32_token,
            suspect=gap > NOISE_GAP,
        )

    @torch.inference_mode()
    def _top2_gap(self, token_ids: list[int]) -> tuple[float, int]:
        if self._target is None:
            log.info("loading the fp32 model to judge bf16 divergences")
            self._target = self._load()
        ids = torch.tensor([token_ids], device=self._target.device)
        logits = self._target.model(input_ids=ids, logits_to_keep=1).logits[0, -1].float()
        top = torch.topk(logits, 2)
        return float(top.values[0] - top.values[1]), int(top.indices[0])
