"""GPU check (`make gpu-check`): lossless tests on CUDA, the verify-latency curve, and plain vs
speculative tokens/s for a ~1B-parameter random-weight Llama built in-process.

Nothing is downloaded: weights are random, drafts are replayed from an acceptance pattern
(the chance that each next draft token is right), so the timing shows what the verifier and the
loop cost on this GPU for a given acceptance. Runs on CPU too (`--device cpu --small`) to test it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import numpy as np
import torch

from ragspec import Engine, LoadedModel
from ragspec.drafting.base import DraftContext
from ragspec.engine.budget import measure_latency_curve
from ragspec.types import DraftTree, StepResult

ROWS = (1, 2, 4, 8, 16, 32, 48, 64, 96, 128)


def random_llama(device: str, small: bool) -> LoadedModel:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from ragspec.models import _dequantised_dir, embedded_model_path

    tokenizer = AutoTokenizer.from_pretrained(_dequantised_dir(embedded_model_path()))
    size = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=32,
                num_key_value_heads=8) if not small else dict(hidden_size=128, intermediate_size=256,
                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    config = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=4096, **size)
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype).eval()
    params = sum(p.numel() for p in model.parameters()) / 1e9
    print(f"random Llama: {params:.2f}B parameters, {dtype}, {device}")
    return LoadedModel(model=model, tokenizer=tokenizer, name="random-llama")


class ReplayDrafter:
    """Drafts the reference continuation; each token is right with probability `accept_rate`
    given its parent was (a wrong token ends the useful part of the chain)."""

    name = "replay"

    def __init__(self, reference: list[int], prompt_len: int, accept_rate: float, depth: int, seed: int = 0):
        self.reference, self.prompt_len = reference, prompt_len
        self.accept_rate, self.depth = accept_rate, depth
        self.rng = np.random.default_rng(seed)

    def propose(self, context: DraftContext) -> DraftTree:
        done = len(context.tokens) - self.prompt_len  # generated tokens so far (the pending one included)
        truth = self.reference[done : done + self.depth]
        tokens = [t if self.rng.random() < self.accept_rate else (t + 1) for t in truth]
        n = len(tokens)
        return DraftTree(np.asarray(tokens, dtype=np.int64), np.arange(n) - 1,
                         np.full(n, self.accept_rate) ** np.arange(1, n + 1), ("replay",) * n)

    def observe(self, step: StepResult) -> None:
        pass


def speed_check(target: LoadedModel, new_tokens: int, accept_rates: list[float]) -> list[dict]:
    prompt = torch.randint(0, len(target.tokenizer), (256,), generator=torch.Generator().manual_seed(1)).tolist()
    text_prompt = target.tokenizer.decode(prompt)
    plain_engine = Engine(target, latency_curve=measure_latency_curve(target, ROWS[:6]))
    plain = plain_engine.generate(text_prompt, max_new_tokens=new_tokens, speculative=False)
    results = [{"method": "plain", "tokens_per_s": plain.stats.decode_tokens_per_s}]
    prompt_len = len(plain_engine.encode(text_prompt))
    reference = [*plain.token_ids, *[0] * 64]  # padded: drafts may run past the end
    for rate in accept_rates:
        engine = Engine(target, latency_curve=plain_engine.budget().curve,
                        drafter_factories=[lambda e, r=rate: [ReplayDrafter(reference, prompt_len, r, 16)]])
        spec = engine.generate(text_prompt, max_new_tokens=new_tokens)
        results.append({"method": f"replay p={rate}", "tokens_per_s": spec.stats.decode_tokens_per_s,
                        "mean_acceptance_length": spec.stats.mean_acceptance_length,
                        "identical": spec.token_ids == plain.token_ids})
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--small", action="store_true", help="tiny model, for a CPU smoke run")
    parser.add_argument("--skip-tests", action="store_true")
    parser.add_argument("--new-tokens", type=int, default=128)
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("Error: no CUDA device; use --device cpu --small for a smoke run")
    if not args.skip_tests:
        env_cmd = [sys.executable, "-m", "pytest", "-q", "-x", "tests/test_lossless.py", "tests/test_verifier.py", "-m", "not slow"]
        print("lossless tests on", args.device, flush=True)
        subprocess.run(env_cmd, check=False, env={**__import__("os").environ, "RAGSPEC_TEST_DEVICE": args.device})
    target = random_llama(args.device, args.small)
    start = time.perf_counter()
    curve = measure_latency_curve(target, ROWS)
    print("verify latency (rows = pending token + tree nodes):")
    for rows, seconds in zip(curve.rows, curve.seconds):
        print(f"  {rows:4d} rows  {seconds * 1000:8.2f} ms  ({seconds / curve.seconds[0]:.2f}x one token)")
    results = speed_check(target, args.new_tokens, [0.5, 0.7, 0.9])
    for r in results:
        print("  " + json.dumps(r))
    print(f"done in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
