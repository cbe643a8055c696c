"""Every drafter in the registry, alone, keeps greedy output identical to plain decoding.

Parametrised over `REGISTRY`, so a drafter is tested the day it is registered. Entries with a
config type run with the config from TEST_CONFIGS, else with their default config; a default that
cannot run (a ConfigError) fails the test with a message saying to add one here. Each entry must
also get drafts verified on these requests, or the test would prove nothing for it.

The target is a tiny llama whose output head is scaled up (`sharp_tiny`): random tiny models put
~1/vocab on every token, and no model drafter's scores would pass the node budget.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from conftest import FLAT_CURVE
from test_eagle import saved_random_head
from test_model_drafter import sharp_tiny
from ragspec import Engine
from ragspec.config import SpecConfig
from ragspec.drafting.eagle import EagleDraftConfig
from ragspec.drafting.layer_skip import SelfDraftConfig
from ragspec.drafting.model import ModelDraftConfig
from ragspec.drafting.rapid import RapidConfig
from ragspec.drafting.registry import REGISTRY
from ragspec.errors import ConfigError

# name -> (tokenizer -> config instance) for entries whose default config cannot run here
TEST_CONFIGS: dict[str, Callable[[object], object]] = {
    "model": lambda tokenizer: ModelDraftConfig(model=sharp_tiny("llama", tokenizer, seed=0), cost_aware=False),
    # by default it stays off where its skip set predicts a loss, as on a 2-layer model
    "self": lambda tokenizer: SelfDraftConfig(calibration_tokens=64, min_predicted_speedup=0.0,
                                              draft=ModelDraftConfig(cost_aware=False)),
    "rapid": lambda tokenizer: RapidConfig(cost_aware=False),
    # a random head (none is trained for a tiny model) projecting with the sharp target's LM head
    "eagle": lambda tokenizer: EagleDraftConfig(model=saved_random_head(sharp_tiny("llama", tokenizer, seed=0)),
                                                cost_aware=False),
}

PROMPTS = [
    "a b c a b c a b",
    "the cat sat on the mat. the cat sat on the mat. the cat sat on the",
    [{"role": "user", "content": "List three colours."}],
]
DOCUMENTS = ("the cat sat on the mat. red green blue red green blue.", "a b c d e f g h a b c d e f g h")
MAX_NEW = 32


def documents(plain: Engine) -> tuple[str, ...]:
    """DOCUMENTS and the plain answer to a request with them: a random model copies nothing from
    its documents, but its answers with similar prompts start alike, so the datastore drafts."""
    answer = plain.generate(PROMPTS[-1], documents=DOCUMENTS, max_new_tokens=MAX_NEW, speculative=False)
    return (*DOCUMENTS, answer.text)


@pytest.mark.parametrize("name", list(REGISTRY))
def test_every_registered_drafter_alone_equals_plain_greedy(name, tokenizer):
    entry = REGISTRY[name]
    options = (TEST_CONFIGS[name](tokenizer),) if name in TEST_CONFIGS else ()
    target = sharp_tiny("llama", tokenizer, seed=0)
    engine = Engine(target, latency_curve=FLAT_CURVE, spec=SpecConfig(drafters=(name,), options=options),
                    persist_state=False)
    plain = Engine(target, latency_curve=FLAT_CURVE, prefix_cache=False)
    # the documents requests also carry a draft prompt (the bare question: RAPID's short context)
    requests = [(p, {}) for p in PROMPTS] + [(p, {"documents": documents(plain), "draft_prompt": p}) for p in PROMPTS]
    drafted = 0
    for prompt, extra in requests * 2:  # the second round lets drafters that learn from answers draft
        try:
            out = engine.generate(prompt, max_new_tokens=MAX_NEW, **extra)
        except ConfigError as exc:
            if entry.config_type is not None and name not in TEST_CONFIGS:
                pytest.fail(f"drafter {name!r} cannot run with a default {entry.config_type.__name__} ({exc}): "
                            f"add a test config for it to TEST_CONFIGS in {__file__}")
            raise
        expected = plain.generate(prompt, max_new_tokens=MAX_NEW, speculative=False, **extra)
        assert out.token_ids == expected.token_ids, f"drafter {name!r} changed the output for {prompt!r} {extra}"
        drafted += out.stats.drafted_per_source.get(name, 0)
    assert drafted > 0, (f"drafter {name!r} had no draft verified on any request, so this test proves nothing "
                         f"for it: give it a config in TEST_CONFIGS (or requests here) under which it drafts")
