"""Drafting time of one RagspecProposer.propose() call for a batch of requests (target: p50 < ~1 ms
at batch 16), measured through vLLM's array shapes (ragspec.vllm.batch_sim) with no vLLM.

Each request's prompt is a document of `--prompt-tokens` random tokens followed by a question,
and its greedy answer (the oracle the batch verifies against) quotes spans of the document with
fresh tokens between them: the context drafter matches some steps and not others, like a
summary. Steady-state steps only (the prefill step, which indexes the prompts, is reported
apart). Run: .venv/bin/python scripts/vllm_propose_timing.py [--batch 16] [--k 6]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from ragspec.vllm import ProposerSettings, RagspecProposer
from ragspec.vllm.batch_sim import BatchSim, SimRequest


def make_request(rng: np.random.Generator, prompt_tokens: int, answer_tokens: int, vocab: int) -> SimRequest:
    document = rng.integers(0, vocab, prompt_tokens).tolist()
    answer: list[int] = []
    while len(answer) < answer_tokens:
        start = int(rng.integers(0, prompt_tokens - 40))
        answer += document[start : start + int(rng.integers(8, 40))]  # a quoted span
        answer += rng.integers(0, vocab, int(rng.integers(1, 8))).tolist()  # own words
    return SimRequest(prompt=document + rng.integers(0, vocab, 20).tolist(), oracle=answer[:answer_tokens])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--k", type=int, default=6)
    parser.add_argument("--prompt-tokens", type=int, default=2000)
    parser.add_argument("--answer-tokens", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    proposer = RagspecProposer(settings=ProposerSettings(adaptive=False), num_speculative_tokens=args.k)
    sim = BatchSim(proposer, args.k, max_num_reqs=args.batch, max_model_len=args.prompt_tokens + args.answer_tokens + 64)
    requests = [make_request(rng, args.prompt_tokens, args.answer_tokens, args.vocab) for _ in range(args.batch)]
    for request in requests:
        sim.add(request)
    start = time.perf_counter()
    sim.step()  # prefill: every prompt indexed
    prefill_ms = 1000 * (time.perf_counter() - start)
    steps, cpu = [], []
    while len(sim.running) == args.batch:  # full batches only
        sim.step()
        steps.append(proposer.times.seconds[-1])
        cpu.append(proposer.times.cpu_seconds[-1])
    steps_ms, cpu_ms = 1000 * np.asarray(steps), 1000 * np.asarray(cpu)
    print(json.dumps({
        "batch": args.batch, "k": args.k, "prompt_tokens": args.prompt_tokens, "steps": len(steps),
        "propose_p50_ms": round(float(np.median(steps_ms)), 3),
        "propose_p90_ms": round(float(np.percentile(steps_ms, 90)), 3),
        "propose_cpu_p50_ms": round(float(np.median(cpu_ms)), 3),
        "prefill_step_ms": round(prefill_ms, 1),
        "mean_acceptance_length": round(float(np.mean([r.mean_acceptance_length for r in requests])), 3),
    }))


if __name__ == "__main__":
    main()
