"""The EAGLE head drafter: what it is trained on is what it drafts from (the unrolled training
forward equals drafting step by step), the verifier reports the target's hidden states of every
committed token, greedy output stays identical to plain decoding alone and fused, a head trained
on another target is refused, and a saved head loads back to the same drafts.

Heads here are random (seeded); the target is `sharp_tiny`'s, whose sharpened LM head rows the
EAGLE head projects with, so its drafts pass the node budget.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from conftest import FLAT_CURVE
from test_model_drafter import sharp_tiny
from ragspec import Engine
from ragspec.config import SpecConfig
from ragspec.drafting.base import DraftContext
from ragspec.drafting.eagle import (EagleDraftConfig, EagleDraftLM, EagleTreeDrafter, build_eagle_drafter, load_head,
                                   save_head)
from ragspec.drafting.registry import DraftRequest
from ragspec.drafting.eagle_head import EagleHead, target_rows
from ragspec.engine.loop import decode_steps
from ragspec.errors import ConfigError
from ragspec.models import cache_dir
from ragspec.config import SamplingConfig
from ragspec.types import SpecStats
from ragspec.training.eagle import unrolled_forward

MAX_NEW = 32


def random_head(target, seed: int = 0, vocab: int | None = None) -> EagleHead:
    """A seeded random head drafting the first `vocab` token ids (all by default)."""
    torch.manual_seed(seed)
    count = target.vocab_size if vocab is None else vocab
    vocab_ids = torch.arange(count)
    embedding, lm_rows = target_rows(target.model, vocab_ids)
    return EagleHead(target.model.config, vocab_ids, embedding, lm_rows).eval()


def saved_random_head(target, seed: int = 0) -> str:
    path = cache_dir() / "test-eagle-heads" / f"{target.identity}-{seed}-{os.getpid()}"  # one per xdist worker
    if not (path / "ragspec_eagle.json").is_file():
        save_head(random_head(target, seed), target, path, {"note": "random, for tests"})
    return str(path)


def test_unrolled_training_forward_equals_drafting_step_by_step(tokenizer):
    """Block k of the training forward at row j is the head's output for a depth-(k + 1) draft
    whose chain started at row j - k: the same numbers EagleDraftLM computes while drafting."""
    target = sharp_tiny("llama", tokenizer, seed=0)
    head = random_head(target, seed=1)
    tokens = torch.from_numpy(np.random.default_rng(0).integers(100, len(tokenizer), size=24)).long()[None]
    with torch.no_grad():
        real = target.model.get_decoder()(input_ids=tokens).last_hidden_state
        blocks = unrolled_forward(head, tokens, real, depth=3)
    ids = tokens[0].tolist()
    for n in (5, 14):  # the pending token's position
        lm = EagleDraftLM(head, target)
        lm.add_target_features(0, real[0, :n])
        lm.open_block(ids[: n + 1])
        lm.feed([ids[n + 1]], [0])
        lm.feed([ids[n + 2]], [1])
        for k in range(3):
            torch.testing.assert_close(lm.block_outputs[k], blocks[k][0, n + k], atol=1e-5, rtol=0)


def test_verifier_reports_the_hidden_states_of_every_committed_token(tokenizer):
    """After decoding with trees, the features the drafter collected (prefill rows, then each
    step's pending row and accepted nodes) equal one causal forward over the whole sequence."""
    target = sharp_tiny("llama", tokenizer, seed=0)
    engine = Engine(target, latency_curve=FLAT_CURVE, persist_state=False)
    target.tap_hidden()
    prompt = tokenizer("the cat sat on the mat. the cat sat on the mat. the cat")["input_ids"]
    lm = EagleDraftLM(random_head(target, seed=2), target)
    drafter = EagleTreeDrafter(lm, "eagle", EagleDraftConfig(cost_aware=False, max_depth=3))
    verifier = target.new_verifier()
    steps = decode_steps(verifier, prompt, drafters=[drafter], budget=engine.budget(), sampling=SamplingConfig(),
                         stats=SpecStats())
    committed = list(prompt)
    for _ in range(12):
        new, _sources = next(steps)
        committed += new
    known = len(committed) - 1  # all but the pending token
    with torch.no_grad():
        real = target.model.get_decoder()(input_ids=torch.tensor([committed[:known]])).last_hidden_state[0]
    torch.testing.assert_close(lm.features[:known], real, atol=1e-4, rtol=0)
    assert not lm.features[known:].any()


@pytest.mark.parametrize("drafters", [("eagle",), ("context", "recycling", "eagle")])
def test_greedy_output_equals_plain_alone_and_fused(drafters, tokenizer):
    target = sharp_tiny("llama", tokenizer, seed=0)
    options = (EagleDraftConfig(model=saved_random_head(target), cost_aware=False),)
    engine = Engine(target, latency_curve=FLAT_CURVE, spec=SpecConfig(drafters=drafters, options=options),
                    persist_state=False)
    plain = Engine(target, latency_curve=FLAT_CURVE, prefix_cache=False)
    drafted = 0
    for prompt in ("a b c a b c a b", "the cat sat on the mat. the cat", [{"role": "user", "content": "Hi."}]):
        out = engine.generate(prompt, max_new_tokens=MAX_NEW)
        assert out.token_ids == plain.generate(prompt, max_new_tokens=MAX_NEW, speculative=False).token_ids
        drafted += out.stats.drafted_per_source.get("eagle", 0)
    assert drafted > 0


def test_a_saved_head_loads_back_and_another_targets_head_is_refused(tokenizer, tmp_path):
    target = sharp_tiny("llama", tokenizer, seed=0)
    head = random_head(target, seed=3, vocab=5000)
    save_head(head, target, tmp_path / "head", {})
    loaded = load_head(tmp_path / "head", target)
    ids = np.random.default_rng(1).integers(100, 5000, size=12)
    trees = []
    for h in (head, loaded):
        drafter = EagleTreeDrafter(EagleDraftLM(h, target), "eagle", EagleDraftConfig(cost_aware=False, max_depth=2))
        trees.append(drafter.propose(DraftContext(ids, max_nodes=8)))
    assert trees[0].token_ids.tolist() == trees[1].token_ids.tolist() and trees[0].num_nodes > 0
    assert set(trees[0].token_ids.tolist()) <= set(range(5000))  # drafts only from the head's subset
    # ids are saved most frequent first: a smaller vocab keeps the first ones, rows and all
    small = load_head(tmp_path / "head", target, vocab=100)
    assert small.vocab_ids.tolist() == list(range(100))
    torch.testing.assert_close(small.lm_rows, loaded.lm_rows[:100], atol=0, rtol=0)

    other = sharp_tiny("llama", tokenizer, seed=1)
    with pytest.raises(ConfigError, match="trained on"):
        load_head(tmp_path / "head", other)
    with pytest.raises(ConfigError, match="no finished EAGLE head"):
        load_head(tmp_path / "missing", target)


def test_the_next_turn_recalls_the_features_of_its_cached_prefix(tokenizer):
    """The verifier reuses the first turn's KV without a forward; the drafter of the next turn
    gets that prefix's features from the engine's FeatureMemory instead of zeros."""
    target = sharp_tiny("llama", tokenizer, seed=0)
    config = EagleDraftConfig(model=saved_random_head(target), cost_aware=False)
    engine = Engine(target, latency_curve=FLAT_CURVE, spec=SpecConfig(drafters=("eagle",), options=(config,)),
                    persist_state=False)
    turn = [{"role": "user", "content": "the cat sat on the mat. the cat"}]
    first = engine.generate(turn, max_new_tokens=12)
    follow = [*turn, {"role": "assistant", "content": first.text}, {"role": "user", "content": "and then?"}]
    prompt = engine.encode(follow)
    drafter = build_eagle_drafter(DraftRequest(engine, prompt, SamplingConfig()), config)
    known = drafter.lm.known
    assert known > len(engine.encode(turn))  # the first turn's prompt and part of its answer
    with torch.no_grad():
        real = target.model.get_decoder()(input_ids=torch.tensor([prompt[:known]])).last_hidden_state[0]
    torch.testing.assert_close(drafter.lm.features[:known], real, atol=1e-4, rtol=0)
