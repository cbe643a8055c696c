"""How ragspec on the llama.cpp backend compares with llama.cpp's own greedy loop in one run.

The ragspec-llamacpp methods and `llamacpp-greedy` run the same GGUF weights through the same
library, so their greedy outputs should agree token for token. They may not where llama.cpp's
batched path (a tree verify, many rows in one llama_decode) and its one-token path round
differently and the top two logits are nearly tied. At each divergence the llama.cpp target
re-reads the prompt and the agreed tokens by one-token decoding, as llamacpp-greedy does, and
reports the top-2 gap there: a gap within the measured batched-vs-sequential noise explains the
flip; a larger one is a bug (`suspect`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ragspec.bench.divergence import EOS, first_difference
from ragspec.types import AcceptResult, DraftTree

GREEDY_METHOD = "llamacpp-greedy"
ENGINE_METHODS = ("ragspec-llamacpp-ar", "ragspec-llamacpp")
# Largest |tree-verify - one-token-decode| logit difference measured on the embedded Q4_1 GGUF
# (tests/test_llamacpp_backend.py); a top-2 gap below it can be flipped by the batched path.
NOISE_GAP = 1e-3


@dataclass(frozen=True)
class LlamaDivergence:
    prompt_index: int
    position: int  # first generated token that differs from llamacpp-greedy's
    greedy_token: int  # llamacpp-greedy's token there (EOS: its output ended)
    method_token: int
    top2_gap: float  # llama.cpp's best logit minus its second best there, one-token decoding
    sequential_token: int  # llama.cpp's own one-token-decoding greedy token there
    suspect: bool  # gap above NOISE_GAP: the batched path's rounding can hardly explain it


def top2_gap(target, prompt_ids: list[int], agreed: list[int]) -> tuple[float, int]:
    """llama.cpp's top-2 logit gap and argmax after `prompt_ids + agreed`, computed as
    llamacpp-greedy computes them: the whole prompt in n_batch chunks (its last token inside the
    last chunk: a chunk of 64 rows or more takes llama.cpp's other matmul path, whose logits and
    KV differ from one-token decoding's), then one token at a time."""
    verifier = target.new_verifier()
    logits = verifier.prefill_and_verify(list(prompt_ids))[0].logits[0]
    for token in agreed:
        verifier.commit(AcceptResult([], [], token))
        logits = verifier.verify(token, DraftTree.empty()).logits[0]
    top = logits.topk(2)
    return float(top.values[0] - top.values[1]), int(top.indices[0])


def compare_with_llamacpp(run, target) -> dict | None:
    """The "llamacpp" entry of a workload: each ragspec-llamacpp method's speed over
    llamacpp-greedy's and its divergences from it (None when the run lacks either side)."""
    greedy = run.outputs.get(GREEDY_METHOD)
    present = [name for name in ENGINE_METHODS if name in run.outputs]
    if greedy is None or not present:
        return None
    greedy_speed = _tokens_per_s(greedy)
    entry = {}
    for name in present:
        divergences = []
        for index, (out, ref) in enumerate(zip(run.outputs[name], greedy)):
            position = first_difference(out.token_ids, ref.token_ids)
            if position is None:
                continue
            gap, token = top2_gap(target, run.prompt_ids[index], ref.token_ids[:position])
            divergences.append(asdict(LlamaDivergence(
                prompt_index=index, position=position,
                greedy_token=ref.token_ids[position] if position < len(ref.token_ids) else EOS,
                method_token=out.token_ids[position] if position < len(out.token_ids) else EOS,
                top2_gap=gap, sequential_token=token, suspect=gap > NOISE_GAP)))
        speed = _tokens_per_s(run.outputs[name])
        entry[name] = {"speedup_vs_llamacpp_greedy": speed / greedy_speed if greedy_speed else None,
                       "identical_to_llamacpp_greedy": not divergences, "divergences": divergences}
    return entry


def _tokens_per_s(outputs) -> float:
    wall = sum(out.wall_s for out in outputs)
    return sum(len(out.token_ids) for out in outputs) / wall if wall > 0 else 0.0
