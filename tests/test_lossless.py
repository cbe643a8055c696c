"""Greedy speculative output is token-for-token identical to plain greedy decoding.

Modelled on HF's `test_prompt_lookup_decoding_matches_greedy_search`: many prompts, two tiny
architectures, the default drafter, a fused pair of drafters (one of them adversarial), HF's own
`generate`, and the real embedded model on spec_bench prompts.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import DATA_DIR, FLAT_CURVE, spec_bench_questions
from ragspec import Engine
from ragspec.bench.peers import stock_kernels
from ragspec.errors import ConfigError
from ragspec.drafting.base import DraftContext
from ragspec.drafting.context_suffix import ContextSuffixDrafter
from ragspec.types import ROOT, DraftTree, StepResult

MAX_NEW = 48


def _random_text(tokenizer, seed: int, length: int, repeat: bool) -> str:
    """A raw string decoded from random token ids (repeated once when `repeat`)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(100, len(tokenizer), size=length).tolist()
    if repeat:
        ids = ids + ids[: length // 2]
    return tokenizer.decode(ids)


def lossless_prompts(tokenizer) -> list:
    repetitive = [
        "a b c a b c a b",
        "1 2 3 4 1 2 3 4 1 2 3",
        "the cat sat on the mat. the cat sat on the mat. the cat sat on the",
        "def f(x):\n    return x\n\ndef g(x):\n    return x\n\ndef",
        "red green blue red green blue red green",
        "Hello world! Hello world! Hello",
        "x" * 40,
    ]
    random_strings = [_random_text(tokenizer, seed, 8 + 5 * seed, repeat=seed % 2 == 0) for seed in range(7)]
    chats = [
        [{"role": "user", "content": "Hi there"}],
        [{"role": "user", "content": "Summarise: the rain in Spain stays mainly in the plain."}],
        [{"role": "system", "content": "You repeat things."}, {"role": "user", "content": "Say abc abc abc"}],
        [
            {"role": "user", "content": "List three colours."},
            {"role": "assistant", "content": "Red, green, blue."},
            {"role": "user", "content": "Again, the same three colours."},
        ],
        [{"role": "user", "content": "one two three one two three one two"}],
        [{"role": "user", "content": "Translate to French: good morning, good night."}],
    ]
    return repetitive + random_strings + chats


def test_greedy_speculative_equals_plain(tiny_engine):
    prompts = lossless_prompts(tiny_engine.tokenizer)
    assert len(prompts) >= 20
    cold = Engine(tiny_engine.target, latency_curve=FLAT_CURVE, prefix_cache=False)  # never reuses fast's KV
    accepted = 0
    for prompt in prompts:
        fast = tiny_engine.generate(prompt, max_new_tokens=MAX_NEW, speculative=True)
        plain = cold.generate(prompt, max_new_tokens=MAX_NEW, speculative=False)
        assert fast.token_ids == plain.token_ids, f"speculation changed the output for {prompt!r}"
        assert fast.text == plain.text
        assert fast.finish_reason == plain.finish_reason
        assert plain.stats.num_accepted_tokens == 0 and plain.stats.num_draft_tokens == 0
        assert plain.stats.cached_prompt_tokens == 0
        assert fast.stats.num_generated_tokens == len(fast.token_ids) == plain.stats.num_generated_tokens
        assert sum(fast.stats.acceptance_histogram) == fast.stats.num_steps
        accepted += fast.stats.num_accepted_tokens
    assert accepted > 0, "no draft token was ever accepted: the test proves nothing"


def test_greedy_matches_hf_generate(tiny_engine):
    model = tiny_engine.target.model
    eos = tiny_engine.target.eos_token_ids
    prompts = lossless_prompts(tiny_engine.tokenizer)[::5]
    for prompt in prompts:
        ids = torch.tensor([tiny_engine.encode(prompt)], device=model.device)
        with torch.inference_mode(), stock_kernels(model):  # SDPA and nn.Linear, as a plain HF setup
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=MAX_NEW,
                do_sample=False,
                pad_token_id=min(eos),
            )
        reference = out[0, ids.shape[1] :].tolist()
        cut = next((i for i, t in enumerate(reference) if t in eos), len(reference))
        fast = tiny_engine.generate(prompt, max_new_tokens=MAX_NEW, speculative=True)
        assert fast.token_ids == reference[:cut], f"differs from HF greedy generate for {prompt!r}"


class OracleDrafter:
    """Adversarial drafter: random wrong branches first, then the true continuation (known from
    a plain greedy run) threaded between wrong siblings, sometimes ending in a wrong token."""

    name = "oracle"

    def __init__(self, reference: list[int], vocab: int, seed: int):
        self.reference = reference  # prompt + plain greedy continuation
        self.vocab = vocab
        self.rng = np.random.default_rng(seed)
        self.observed = 0

    def _wrong(self, avoid: int) -> int:
        token = int(self.rng.integers(0, self.vocab))
        return token if token != avoid else (token + 1) % self.vocab

    def propose(self, context: DraftContext) -> DraftTree:
        assert context.tokens.dtype == np.int64
        tokens = context.tokens.tolist()
        if tokens != self.reference[: len(tokens)]:
            return DraftTree.empty()
        truth = self.reference[len(tokens) : len(tokens) + int(self.rng.integers(0, 12))]
        nodes: list[tuple[int, int, float]] = []  # (token, parent, score)

        def add(token: int, parent: int) -> int:
            parent_score = 1.0 if parent == ROOT else nodes[parent][2]
            nodes.append((token, parent, parent_score * float(self.rng.uniform(0.6, 1.0))))
            return len(nodes) - 1

        first_truth = truth[0] if truth else -1
        for _ in range(int(self.rng.integers(0, 4))):  # a random wrong subtree ahead of the truth
            wrong = add(self._wrong(first_truth), ROOT)
            for _ in range(int(self.rng.integers(0, 3))):
                add(self._wrong(-1), wrong)
        parent = ROOT
        for depth, token in enumerate(truth):
            if self.rng.random() < 0.5:  # a wrong sibling before the true node
                add(self._wrong(token), parent)
            node = add(token, parent)
            if self.rng.random() < 0.3 and depth + 1 < len(truth):  # a wrong child of the true node
                add(self._wrong(truth[depth + 1]), node)
            parent = node
        if truth and self.rng.random() < 0.5:
            add(int(self.rng.integers(0, self.vocab)), parent)  # one more, usually wrong
        if not nodes:
            return DraftTree.empty()
        token_ids, parents, scores = zip(*nodes)
        return DraftTree(
            token_ids=np.asarray(token_ids, dtype=np.int64),
            parents=np.asarray(parents, dtype=np.int64),
            scores=np.asarray(scores, dtype=np.float64),
            sources=(self.name,) * len(nodes),
        )

    def observe(self, step: StepResult) -> None:
        assert isinstance(step, StepResult)
        self.observed += 1


def test_fused_drafters_with_adversarial_tree_stay_lossless(tiny_model):
    plain_engine = Engine(tiny_model, latency_curve=FLAT_CURVE, prefix_cache=False)
    prompts = lossless_prompts(tiny_model.tokenizer)[::2]
    vocab = int(tiny_model.model.config.vocab_size)
    oracle_accepted = 0
    for i, prompt in enumerate(prompts):
        plain = plain_engine.generate(prompt, max_new_tokens=MAX_NEW + 16, speculative=False)
        reference = plain_engine.encode(prompt) + plain.token_ids
        oracles: list[OracleDrafter] = []

        def factory(engine, reference=reference, seed=i):
            oracles.append(OracleDrafter(reference, vocab, seed))
            return [ContextSuffixDrafter(engine.spec), oracles[-1]]

        engine = Engine(tiny_model, latency_curve=FLAT_CURVE, drafter_factories=[factory])
        fast = engine.generate(prompt, max_new_tokens=MAX_NEW, speculative=True)
        assert fast.token_ids == plain.token_ids[:MAX_NEW], f"fused drafts changed the output for {prompt!r}"
        assert len(oracles) == 1 and oracles[0].observed == fast.stats.num_steps
        oracle_accepted += fast.stats.accepted_per_source.get("oracle", 0)
    # the oracle is right by construction: most of the output must come through it
    assert oracle_accepted > len(prompts) * MAX_NEW // 4


REAL_CATEGORIES = {
    "summarization": 3,
    "rag": 3,
    "extraction": 3,
    "translation": 2,
    "qa": 2,
    "math_reasoning": 2,
    "coding": 2,
    "writing": 1,
    "reasoning": 1,
    "roleplay": 1,
}


def real_prompts() -> list[tuple[int, list[dict]]]:
    """The shortest few first-turn questions of each category (keeps prefill cheap)."""
    chosen = []
    questions = spec_bench_questions()
    for category, count in REAL_CATEGORIES.items():
        pool = sorted((q for q in questions if q["category"] == category), key=lambda q: len(q["turns"][0]))
        chosen += [(q["question_id"], [{"role": "user", "content": q["turns"][0]}]) for q in pool[:count]]
    return chosen


@pytest.mark.slow
def test_real_model_greedy_speculative_equals_plain(real_engine):
    prompts = real_prompts()
    if not prompts:
        pytest.skip("spec_bench data not found under ../shared/data")
    assert len(prompts) >= 20
    assert real_engine.target.dtype == torch.float32
    cold = Engine(real_engine.target, latency_curve=FLAT_CURVE, prefix_cache=False)  # never reuses fast's KV
    mismatches, accepted = [], 0
    for question_id, messages in prompts:
        fast = real_engine.generate(messages, max_new_tokens=32, speculative=True)
        plain = cold.generate(messages, max_new_tokens=32, speculative=False)
        seen = (fast.text, fast.token_ids, fast.finish_reason, fast.stats.num_generated_tokens)
        if seen != (plain.text, plain.token_ids, plain.finish_reason, plain.stats.num_generated_tokens):
            mismatches.append(question_id)
        accepted += fast.stats.num_accepted_tokens
    assert not mismatches, f"speculative output differs from plain greedy for questions {mismatches}"
    assert accepted > 0


def _chat_turns(engine: Engine, user_turns: list[str], max_new_tokens: int) -> list[dict]:
    """A conversation whose earlier turns `engine` answered: the messages of its last turn."""
    messages: list[dict] = []
    for turn in user_turns[:-1]:
        messages.append({"role": "user", "content": turn})
        answer = engine.generate(messages, max_new_tokens=max_new_tokens)
        messages.append({"role": "assistant", "content": answer.text})
    return [*messages, {"role": "user", "content": user_turns[-1]}]


def test_prefix_cache_is_lossless_across_chat_turns(tiny_model):
    cached = Engine(tiny_model, latency_curve=FLAT_CURVE)
    cold = Engine(tiny_model, latency_curve=FLAT_CURVE, prefix_cache=False)
    turns = ["List three colours, then repeat them.", "Again, the same three colours.", "Now in reverse."]
    messages = _chat_turns(cached, turns, MAX_NEW)
    fast = cached.generate(messages, max_new_tokens=MAX_NEW)
    reference = cold.generate(messages, max_new_tokens=MAX_NEW, speculative=False)
    assert fast.token_ids == reference.token_ids
    assert fast.stats.cached_prompt_tokens > len(cached.encode(messages[:2]))  # turn 1 and its answer
    assert reference.stats.cached_prompt_tokens == 0
    assert fast.stats.cached_prompt_tokens + 1 < fast.prompt_tokens  # the new turn was prefilled


def test_prefix_cache_serves_interleaved_conversations(tiny_llama):
    """Two chats take turns through one engine: each finds its own earlier turns cached."""
    engine = Engine(tiny_llama, latency_curve=FLAT_CURVE, prefix_cache_entries=2)
    cold = Engine(tiny_llama, latency_curve=FLAT_CURVE, prefix_cache=False)
    chats = {"a": [{"role": "user", "content": "Name two rivers."}],
             "b": [{"role": "user", "content": "Count to five in French."}]}
    for name, messages in chats.items():
        answer = engine.generate(messages, max_new_tokens=MAX_NEW)
        messages.append({"role": "assistant", "content": answer.text})
        messages.append({"role": "user", "content": "And once more."})
    for name, messages in chats.items():
        out = engine.generate(messages, max_new_tokens=MAX_NEW)
        assert out.stats.cached_prompt_tokens > len(engine.encode(messages[:1])), name
        assert out.token_ids == cold.generate(messages, max_new_tokens=MAX_NEW, speculative=False).token_ids, name
    assert len(engine.prefix_pool) == 2


def test_cache_prefix_warms_the_next_request(tiny_llama):
    engine = Engine(tiny_llama, latency_curve=FLAT_CURVE)
    system = [{"role": "system", "content": "You answer in one short sentence about the sea."}]
    cached = engine.cache_prefix(system)
    assert cached > 5
    out = engine.generate([*system, {"role": "user", "content": "Why is it blue?"}], max_new_tokens=8)
    assert out.stats.cached_prompt_tokens == cached
    engine.forget_prefix()
    again = engine.generate([*system, {"role": "user", "content": "Why is it blue?"}], max_new_tokens=8)
    assert again.stats.cached_prompt_tokens == 0 and again.token_ids == out.token_ids
    with pytest.raises(ConfigError, match="prefix_cache=False"):
        Engine(tiny_llama, latency_curve=FLAT_CURVE, prefix_cache=False).cache_prefix(system)


@pytest.mark.slow
def test_real_model_prefix_cache_over_mt_redundant_turns(real_engine):
    """MT-Redundant turn 2 after turn 1 through the same engine equals a cold plain run, in fp32."""
    path = DATA_DIR / "mt_redundant" / "question.jsonl"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    rows = [json.loads(line) for line in path.read_text().splitlines()[:4]]
    cold = Engine(real_engine.target, prefix_cache=False, latency_curve=FLAT_CURVE)
    for row in rows:
        messages = _chat_turns(real_engine, row["turns"][:2], max_new_tokens=48)
        fast = real_engine.generate(messages, max_new_tokens=48)
        plain = cold.generate(messages, max_new_tokens=48, speculative=False)
        assert fast.token_ids == plain.token_ids, f"question {row['question_id']}"
        assert fast.stats.cached_prompt_tokens > 40
