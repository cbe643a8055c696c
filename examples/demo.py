"""ragspec demo: answer questions with speculative decoding and compare with plain decoding.

Run with `make demo`. Uses the embedded SmolLM2-135M-Instruct; the first run dequantises it
(~20 s) and profiles the verify-latency curve (~10 s), both cached for later runs.
"""

from __future__ import annotations

import argparse
import json
import textwrap
from pathlib import Path

from ragspec import Engine

FALLBACK_PROMPTS = [
    [{"role": "user", "content": "Summarize: The committee met on Monday. The committee approved the budget "
      "for the new library. The budget for the new library includes money for books, computers and staff. "
      "The new library will open next spring, the committee said."}],
]


def demo_prompts(data_dir: Path) -> list[tuple[str, list[dict]]]:
    path = data_dir / "spec_bench" / "question.jsonl"
    if not path.is_file():
        return [("summary", p) for p in FALLBACK_PROMPTS]
    questions = [json.loads(line) for line in path.read_text().splitlines()]
    picked = []
    for category, count in (("rag", 2), ("summarization", 1)):
        for q in [q for q in questions if q["category"] == category][:count]:
            picked.append((category, [{"role": "user", "content": q["turns"][0]}]))
    return picked


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data-dir", type=Path, default=Path("../shared/data"))
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--model", default=None)
    args = parser.parse_args()

    print("loading the embedded model (first run: ~30 s to dequantise and profile) ...", flush=True)
    engine = Engine(args.model)
    engine.budget()  # profile the verify-latency curve now, not inside the first timing
    print(f"model {engine.target.name} on {engine.target.device}, {engine.target.dtype}\n")
    plain_s = spec_s = 0.0
    tokens = 0
    for category, messages in demo_prompts(args.data_dir):
        plain = engine.generate(messages, max_new_tokens=args.max_new_tokens, speculative=False)
        spec = engine.generate(messages, max_new_tokens=args.max_new_tokens)
        plain_s, spec_s, tokens = plain_s + plain.stats.total_s, spec_s + spec.stats.total_s, tokens + len(spec.token_ids)
        question = messages[-1]["content"].splitlines()[-1][:90]
        print(f"[{category}] {question}")
        print(textwrap.indent(textwrap.fill(spec.text[:300], 96), "  "))
        print(
            f"  plain {plain.stats.tokens_per_s:5.1f} tok/s | ragspec {spec.stats.tokens_per_s:5.1f} tok/s "
            f"| speedup {plain.stats.total_s / spec.stats.total_s:.2f}x "
            f"| mean acceptance length {spec.stats.mean_acceptance_length:.2f} "
            f"| identical to plain: {plain.token_ids == spec.token_ids}\n"
        )
    print(f"overall: plain {tokens / plain_s:.1f} tok/s, ragspec {tokens / spec_s:.1f} tok/s, "
          f"speedup {plain_s / spec_s:.2f}x")


if __name__ == "__main__":
    main()
