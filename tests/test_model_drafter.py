"""The draft-model drafter: lossless greedy output with good and poor draft models, alone and
fused; its KV cache equals recomputation after partial acceptance; tree rows see exactly their
path; sampled children are draws without replacement recorded for residual rejection; draft
models with another tokenizer are refused; drafting stops when its forwards cost more than the
tokens they are expected to win.

Tiny random models put almost the same probability on every token (max ~4e-5 over 49k tokens):
no draft score would pass the node budget. `sharp_tiny` multiplies the output head of a tiny
model by 50 (top-1 mass ~0.6-0.9); with seed 0 it keeps the argmax of the `tiny_model` fixture
(same weights otherwise), so it drafts what the fixture target decodes.
"""

from __future__ import annotations

import copy
import time

import numpy as np
import pytest
import torch

from conftest import FLAT_CURVE, TINY_ARCHITECTURES, build_tiny_model
from test_lossless import lossless_prompts
from ragspec import Engine, LoadedModel
from ragspec.config import SamplingConfig, SpecConfig
from ragspec.drafting.base import DraftContext
from ragspec.drafting.model import (EXPLORE_EVERY, DraftCosts, DraftLM, ModelDraftConfig, ModelTreeDrafter,
                                   draw_without_replacement)
from ragspec.drafting.registry import default_drafters
from ragspec.engine.budget import LatencyCurve
from ragspec.errors import ConfigError
from ragspec.kernels.select import choose_kernels
from ragspec.kvcache import cache_length
from ragspec.types import ROOT, AcceptResult, DraftTree, StepResult

MAX_NEW = 40
SHARPEN = 50.0
_sharp: dict[tuple[str, int], LoadedModel] = {}


def sharp_tiny(arch: str, tokenizer, seed: int) -> LoadedModel:
    """A tiny random model whose output head is scaled by SHARPEN (built once per session)."""
    if (arch, seed) not in _sharp:
        model = build_tiny_model(arch, len(tokenizer), seed=seed)
        with torch.no_grad():
            model.lm_head.weight.mul_(SHARPEN)
        loaded = LoadedModel(model=model, tokenizer=tokenizer, name=f"sharp-{arch}-{seed}")
        loaded.kernels = choose_kernels(loaded, mode="fast")
        _sharp[arch, seed] = loaded
    return _sharp[arch, seed]


def arch_of(loaded: LoadedModel) -> str:
    return loaded.name.removeprefix("tiny-")


def model_engine(target: LoadedModel, draft, drafters=("model",), **config) -> Engine:
    spec = SpecConfig(drafters=drafters, options=(ModelDraftConfig(model=draft, **config),))
    return Engine(target, latency_curve=FLAT_CURVE, spec=spec, persist_state=False)


def test_greedy_output_equals_plain_with_good_and_poor_draft_models(tiny_model, tokenizer):
    arch = arch_of(tiny_model)
    prompts = lossless_prompts(tokenizer)[::3]  # 7 prompts: repetitive, random strings, chats
    plain_engine = Engine(tiny_model, latency_curve=FLAT_CURVE, prefix_cache=False)
    plain = [plain_engine.generate(p, max_new_tokens=MAX_NEW, speculative=False).token_ids for p in prompts]
    good, poor = sharp_tiny(arch, tokenizer, seed=0), sharp_tiny(arch, tokenizer, seed=1)
    retrieval = default_drafters()
    cases = {
        "good alone": model_engine(tiny_model, good, cost_aware=False),
        "good fused": model_engine(tiny_model, good, (*retrieval, "model"), cost_aware=False),
        "poor alone": model_engine(tiny_model, poor),
        "poor fused": model_engine(tiny_model, poor, (*retrieval, "model")),
    }
    for label, engine in cases.items():
        drafted = accepted = steps = generated = 0
        for prompt, expected in zip(prompts, plain):
            out = engine.generate(prompt, max_new_tokens=MAX_NEW)
            assert out.token_ids == expected, f"{arch} {label}: speculation changed the output for {prompt!r}"
            drafted += out.stats.drafted_per_source.get("model", 0)
            accepted += out.stats.accepted_per_source.get("model", 0)
            steps += out.stats.num_steps
            generated += out.stats.num_generated_tokens
        assert drafted > 0, f"{arch} {label}: no model draft was verified: the case proves nothing"
        if label == "good alone":  # drafts the target's own argmax: long chains accepted
            assert generated / steps >= 3.0, f"{arch}: mean acceptance {generated / steps:.2f} with a perfect draft"


@torch.inference_mode()
def causal_probs(model, ids: list[int]) -> torch.Tensor:
    """softmax of a plain forward over `ids`, no cache: q after the last token. [vocab]"""
    return model(input_ids=torch.tensor([ids])).logits[0, -1].float().softmax(-1)


def path_tokens(tree: DraftTree, node: int) -> list[int]:
    tokens = []
    while node != ROOT:
        tokens.append(int(tree.token_ids[node]))
        node = int(tree.parents[node])
    return tokens[::-1]


def children(tree: DraftTree, parent: int) -> list[int]:
    return [i for i in range(tree.num_nodes) if tree.parents[i] == parent]


def assert_cache_equals_recomputation(lm: DraftLM, module, config) -> None:
    """Every layer's keys and values equal those of a fresh DraftLM fed the same tokens causally."""
    fresh = DraftLM(module, config, device="cpu", dtype=torch.float32)
    fresh.sync([*lm.cached_ids, 0])
    assert cache_length(lm.cache) == cache_length(fresh.cache) == len(lm.cached_ids)
    for ours, theirs in zip(lm.cache.layers, fresh.cache.layers, strict=True):
        torch.testing.assert_close(ours.keys, theirs.keys, atol=1e-5, rtol=0)
        torch.testing.assert_close(ours.values, theirs.values, atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
def test_tree_rows_see_their_path_and_the_cache_equals_recomputation(arch, tokenizer):
    """Every node's q is the draft model's on its path (batched tree forwards see exactly their
    ancestors); after a partial acceptance and after an accepted unfed leaf the cache holds the
    rows a causal forward over the committed tokens gives (sliding windows included: 40 > 16)."""
    draft = sharp_tiny(arch, tokenizer, seed=1)
    model = draft.model
    lm = DraftLM.of(draft)
    drafter = ModelTreeDrafter(lm, "model", ModelDraftConfig(top_k=3, width=4, max_depth=4, cost_aware=False))
    tokens = np.random.default_rng(3).integers(100, len(tokenizer), size=40).tolist()

    # round 1: accept a depth-2 path whose node at depth 3 is rejected
    tree = drafter.propose(DraftContext(np.asarray(tokens), max_nodes=40))
    assert tree.num_nodes == 3 + 9 + 12 + 12 and tree.deterministic is None and set(tree.sources) == {"model"}
    for parent in [ROOT, *range(tree.num_nodes)]:
        kids = children(tree, parent)
        if not kids:
            continue
        q = causal_probs(model, tokens + path_tokens(tree, parent))
        assert [int(tree.token_ids[k]) for k in kids] == q.topk(3).indices.tolist()[: len(kids)]
        (distribution,) = tree.draws[parent]  # q left for RASD pruning; nothing drawn at random
        assert distribution.tokens == ()
        torch.testing.assert_close(distribution.probs, q, atol=1e-5, rtol=1e-3)
        for k in kids:
            assert tree.draft_probs[k] == pytest.approx(float(q[tree.token_ids[k]]), rel=1e-3, abs=1e-6)
            parent_score = 1.0 if parent == ROOT else tree.scores[parent]
            assert tree.scores[k] == pytest.approx(parent_score * tree.draft_probs[k])
    a = next(n for n in children(tree, ROOT) if any(children(tree, b) for b in children(tree, n)))
    b = next(n for n in children(tree, a) if children(tree, n))
    rejected = {int(tree.token_ids[c]) for c in children(tree, b)}
    bonus = next(t for t in range(100, 200) if t not in rejected)
    accept = AcceptResult([a, b], [int(tree.token_ids[a]), int(tree.token_ids[b])], bonus)
    drafter.observe(StepResult(tree, accept, torch.zeros(0), 0.0, 0.01, tokens[-1]))
    tokens = tokens + accept.accepted_tokens + [bonus]
    assert lm.cached_ids == tokens[:-1] and not lm.block_tokens  # the fed rows were kept, nothing else
    assert_cache_equals_recomputation(lm, model, model.config)

    # round 2: accept a leaf that was never fed (max_depth 2: depth-2 nodes are never fed); the
    # next sync feeds it
    shallow = ModelTreeDrafter(lm, "model", ModelDraftConfig(top_k=3, width=4, max_depth=2, cost_aware=False))
    tree = shallow.propose(DraftContext(np.asarray(tokens), max_nodes=6))
    leaf = next(n for n in range(tree.num_nodes) if tree.parents[n] != ROOT)
    path = [int(tree.parents[leaf]), leaf]
    accept = AcceptResult(path, [int(tree.token_ids[n]) for n in path], 7)
    shallow.observe(StepResult(tree, accept, torch.zeros(0), 0.0, 0.01, tokens[-1]))
    tokens = tokens + accept.accepted_tokens + [7]
    assert lm.cached_ids == tokens[:-2]  # the pending token and the fed parent kept
    assert_cache_equals_recomputation(lm, model, model.config)
    assert lm.sync(tokens) == 1  # the leaf
    assert_cache_equals_recomputation(lm, model, model.config)

    # round 3: another request's tokens: the cache is cut back to the common prefix
    tokens = tokens[:20] + [5, 6, 7]
    lm.sync(tokens)
    assert lm.cached_ids == tokens[:-1]
    assert_cache_equals_recomputation(lm, model, model.config)


def test_sampled_children_are_draws_recorded_for_residual_rejection(tokenizer):
    draft = sharp_tiny("llama", tokenizer, seed=1)
    sampling = SamplingConfig(temperature=0.7, top_p=0.95, seed=11)
    config = ModelDraftConfig(top_k=3, width=3, max_depth=3, cost_aware=False)
    tokens = np.asarray(tokenizer("a b c a b c a b").input_ids)

    def propose() -> DraftTree:
        drafter = ModelTreeDrafter(DraftLM.of(draft), "model", config, sampling=sampling)
        return drafter.propose(DraftContext(tokens, max_nodes=12))

    tree = propose()
    assert 3 < tree.num_nodes <= 12 and not tree.is_deterministic().any()
    for parent in [ROOT, *range(tree.num_nodes)]:
        kids = children(tree, parent)
        if not kids:
            continue
        (draws,) = tree.draws[parent]
        assert draws.probs.dtype == torch.float32 and draws.probs.sum().item() == pytest.approx(1.0, abs=1e-5)
        assert len(set(draws.tokens)) == len(draws.tokens) <= 3
        assert {int(tree.token_ids[k]) for k in kids} <= set(draws.tokens)  # pruned draws stay listed
        for k in kids:
            assert tree.draft_probs[k] == pytest.approx(float(draws.probs[tree.token_ids[k]]))
    reference = target_probs_of(draft.model, tokens.tolist(), sampling)
    torch.testing.assert_close(tree.draws[ROOT][0].probs, reference, atol=1e-5, rtol=0)
    again = propose()  # same request seed: same draws
    assert again.token_ids.tolist() == tree.token_ids.tolist()


def target_probs_of(model, ids: list[int], sampling: SamplingConfig) -> torch.Tensor:
    from ragspec.sampling import target_probs

    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([ids])).logits[0, -1:].float()
    return target_probs(logits, sampling)[0]


def test_draws_without_replacement_follow_the_distribution():
    """First draws follow p; second draws follow p with the first removed, renormalised."""
    p = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05, 0.0])
    generator = torch.Generator().manual_seed(0)
    trials = 20000
    pairs: dict[tuple[int, int], int] = {}
    for _ in range(trials):
        tokens, probs = draw_without_replacement(p, 3, generator)
        assert len(set(tokens)) == 3 and 5 not in tokens and probs == [float(p[t]) for t in tokens]
        pairs[tokens[0], tokens[1]] = pairs.get((tokens[0], tokens[1]), 0) + 1
    for a in range(5):
        first = sum(count for (x, _), count in pairs.items() if x == a) / trials
        assert first == pytest.approx(float(p[a]), abs=0.012)
        for b in range(5):
            if b != a:
                expected = float(p[a] * p[b] / (1 - p[a]))
                assert pairs.get((a, b), 0) / trials == pytest.approx(expected, abs=0.012)
    assert draw_without_replacement(torch.tensor([0.0, 1.0, 0.0]), 3, generator)[0] == [1]


def test_sampling_generation_with_a_model_drafter_runs(tiny_llama, tokenizer):
    engine = model_engine(tiny_llama, sharp_tiny("llama", tokenizer, 0), cost_aware=False)
    out = engine.generate("a b c a b c a b", max_new_tokens=16, temperature=0.8, seed=3)
    assert len(out.token_ids) == 16 or out.finish_reason == "eos"
    assert out.stats.drafted_per_source.get("model", 0) > 0


def test_draft_model_with_another_tokenizer_is_refused(tiny_llama, tokenizer):
    other_tokenizer = copy.deepcopy(tokenizer)
    other_tokenizer.add_tokens(["<an-extra-token>"])
    other = LoadedModel(model=build_tiny_model("llama", len(other_tokenizer), seed=2), tokenizer=other_tokenizer,
                        name="tiny-other-vocab")
    engine = model_engine(tiny_llama, other)
    with pytest.raises(ConfigError, match="draft model tiny-other-vocab has another tokenizer than target tiny-llama"):
        engine.generate("Hello", max_new_tokens=4)
    with pytest.raises(ConfigError, match="needs a draft model"):
        model_engine(tiny_llama, None).generate("Hello", max_new_tokens=4)


def test_with_drafter_adds_the_drafter_once_and_replaces_its_option():
    spec = SpecConfig(drafters=("context",)).with_drafter("model", ModelDraftConfig(model="a"))
    again = spec.with_drafter("model", ModelDraftConfig(model="b"))
    assert spec.drafters == again.drafters == ("context", "model")
    assert [option.model for option in again.options] == ["b"]
    assert again.with_drafter("context").options == again.options


def test_draft_model_given_by_path_is_loaded_once_per_engine(tiny_llama, tokenizer, tmp_path, monkeypatch):
    import ragspec.models

    monkeypatch.setenv("RAGSPEC_KERNELS", "plain")
    path = save_model(sharpened(build_tiny_model("llama", len(tokenizer), seed=0)), tokenizer, tmp_path / "draft")
    loads = []
    real_load = ragspec.models.load_model
    monkeypatch.setattr(ragspec.models, "load_model", lambda *a, **k: loads.append(a) or real_load(*a, **k))
    engine = model_engine(tiny_llama, path, cost_aware=False)
    plain = Engine(tiny_llama, latency_curve=FLAT_CURVE, prefix_cache=False)
    for prompt in ("a b c a b c a b", "Hello world! Hello world! Hello"):
        out = engine.generate(prompt, max_new_tokens=24)
        assert out.token_ids == plain.generate(prompt, max_new_tokens=24, speculative=False).token_ids
        assert out.stats.accepted_per_source.get("model", 0) > 0
    assert len(loads) == 1


class SlowModule:
    """A module wrapper whose every forward takes `delay_s` more seconds."""

    def __init__(self, module, delay_s: float):
        self.module, self.delay_s = module, delay_s

    def __call__(self, **arguments):
        time.sleep(self.delay_s)
        return self.module(**arguments)


def test_drafting_stops_when_its_forwards_cost_more_than_they_win(tokenizer):
    """A plain target step is worth 0.2 s here. Draft forwards of a few ms pay on every step; with
    0.4 s forwards the drafter measures them once, then proposes nothing, and a later request
    sharing its measurements skips from its first step; a draft model whose q is flat does not
    pay either."""
    target = sharp_tiny("llama", tokenizer, seed=0)
    worth = LatencyCurve(rows=(1, 64), seconds=(0.2, 0.2), adapt=False)
    prompts = ["a b c a b c a b", "Hello world! Hello world! Hello"]
    plain_engine = Engine(target, latency_curve=FLAT_CURVE, prefix_cache=False)
    plain = [plain_engine.generate(p, max_new_tokens=24, speculative=False).token_ids for p in prompts]

    def run(module) -> list[ModelTreeDrafter]:
        made, costs = [], DraftCosts()

        def factory(engine: Engine) -> list[ModelTreeDrafter]:
            lm = DraftLM(module, target.model.config, device="cpu", dtype=torch.float32)
            made.append(ModelTreeDrafter(lm, "model", ModelDraftConfig(max_depth=3), engine.budget, costs=costs))
            return made[-1:]

        engine = Engine(target, latency_curve=worth, drafter_factories=[factory])
        for prompt, expected in zip(prompts, plain):
            assert engine.generate(prompt, max_new_tokens=24).token_ids == expected
        return made

    cheap = run(target.model)
    assert all(d.drafted_steps >= 3 and d.skipped_steps == 0 for d in cheap)
    slow = run(SlowModule(target.model, 0.4))
    assert slow[0].drafted_steps <= 2 and slow[0].skipped_steps >= 10
    # the skipped steps count on across requests: one re-measuring step at most in the second
    assert slow[1].drafted_steps <= 1 and slow[1].skipped_steps >= 15
    flat = run(build_tiny_model("llama", len(tokenizer), seed=0))
    assert flat[0].drafted_steps <= 2 and flat[0].skipped_steps >= 10
    assert flat[1].drafted_steps <= 1 and flat[1].skipped_steps >= 15


def test_a_drafter_that_does_not_pay_re_measures_ever_less_often(tokenizer):
    """Skipped steps between re-measuring steps: EXPLORE_EVERY, then doubling while drafting
    still does not pay."""
    target = sharp_tiny("llama", tokenizer, seed=0)
    costs = DraftCosts(root_s=10.0, tree_s=10.0, step_s=0.01)  # forwards far dearer than a step
    drafter = ModelTreeDrafter(DraftLM.of(target), "model", ModelDraftConfig(), costs=costs)
    tokens = np.asarray(tokenizer("a b c a b c a b").input_ids)
    drafted_at = []
    for step in range(EXPLORE_EVERY * 7 + 3):
        if drafter.propose(DraftContext(tokens, max_nodes=8)).num_nodes:
            drafted_at.append(step)
            costs.root_s = 10.0  # what it measured (a few ms) would pay: say it did not
    assert drafted_at == [EXPLORE_EVERY, EXPLORE_EVERY * 3 + 1, EXPLORE_EVERY * 7 + 2]


def test_real_model_as_its_own_draft_model_equals_plain(real_model):
    """The embedded model drafting for itself in fp32: identical output, long accepted chains."""
    prompts = [
        [{"role": "user", "content": "What is the capital of France?"}],
        [{"role": "user", "content": "Write a haiku about the sea."}],
    ]
    engine = Engine(real_model, latency_curve=FLAT_CURVE, persist_state=False, prefix_cache=False,
                    spec=SpecConfig(drafters=("model",), options=(ModelDraftConfig(model=real_model, cost_aware=False),)))
    plain = Engine(real_model, latency_curve=FLAT_CURVE, prefix_cache=False)
    for prompt in prompts:
        out = engine.generate(prompt, max_new_tokens=24)
        assert out.token_ids == plain.generate(prompt, max_new_tokens=24, speculative=False).token_ids
        assert out.stats.mean_acceptance_length >= 2.5, out.stats.as_dict()


def deep_twin(model, extra_layers: int):
    """`model` with `extra_layers` more decoder layers whose output projections are zero: each
    adds nothing to the residual stream, so the logits are exactly `model`'s, at several times
    the cost (a target whose draft model is cheap, with the same argmax)."""
    from transformers import AutoModelForCausalLM

    attention = model.config._attn_implementation
    config = type(model.config)(**{**model.config.to_dict(), "num_hidden_layers": model.config.num_hidden_layers + extra_layers})
    deep = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation=attention).eval()
    deep.load_state_dict(model.state_dict(), strict=False)
    with torch.no_grad():
        for layer in deep.model.layers[model.config.num_hidden_layers:]:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
    return deep


def save_model(model, tokenizer, path) -> str:
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def sharpened(model, factor: float = SHARPEN):
    with torch.no_grad():
        model.lm_head.weight.mul_(factor)
    return model


def test_cli_generate_with_a_draft_model(tokenizer, tmp_path, monkeypatch):
    """A target four times the draft model's cost (its deep twin) with the same argmax: the
    drafter pays under the measured latency curve and the reply is the plain one; with an EAGLE
    head added too, the same reply; another target's head is refused before any prompt."""
    from click.testing import CliRunner

    from ragspec.cli import main

    monkeypatch.setenv("RAGSPEC_KERNELS", "plain")
    small = build_tiny_model("llama", len(tokenizer), seed=0)
    target = save_model(deep_twin(small, extra_layers=16), tokenizer, tmp_path / "target")
    draft = save_model(sharpened(small), tokenizer, tmp_path / "draft")
    common = ["--model", target, "--dtype", "float32", "--device", "cpu", "--max-new-tokens", "24"]
    runner = CliRunner()
    spec = runner.invoke(main, ["generate", "a b c a b c a b", "--raw", "--stats", "--draft-model", draft, *common])
    assert spec.exit_code == 0, spec.output
    plain = runner.invoke(main, ["generate", "a b c a b c a b", "--raw", "--no-spec", *common])
    assert plain.exit_code == 0 and plain.stdout == spec.stdout
    assert "source model: accepted" in spec.stderr, spec.stderr

    from ragspec.drafting.eagle import save_head
    from ragspec.models import load_model
    from test_eagle import random_head

    loaded = load_model(target, dtype="float32", device="cpu")
    save_head(random_head(loaded, seed=3), loaded, tmp_path / "head", {"note": "random, for tests"})
    both = runner.invoke(main, ["generate", "a b c a b c a b", "--raw", "--stats", "--draft-model", draft,
                                "--eagle-head", str(tmp_path / "head"), *common])
    assert both.exit_code == 0 and both.stdout == spec.stdout, both.output
    foreign_target = sharp_tiny("llama", tokenizer, seed=0)
    save_head(random_head(foreign_target), foreign_target, tmp_path / "foreign", {"note": "another target's"})
    foreign = runner.invoke(main, ["generate", "hi", "--eagle-head", str(tmp_path / "foreign"), *common])
    assert foreign.exit_code == 1 and foreign.stderr.startswith(f"Error: the EAGLE head in {tmp_path / 'foreign'} "
                                                                 "was trained on "), foreign.stderr

    other_tokenizer = copy.deepcopy(tokenizer)
    other_tokenizer.add_tokens(["<an-extra-token>"])
    other = save_model(build_tiny_model("llama", len(other_tokenizer), seed=1), other_tokenizer, tmp_path / "other")
    refused = runner.invoke(main, ["generate", "hi", "--draft-model", other, *common])
    assert refused.exit_code == 1
    assert refused.stderr.startswith("Error: draft model other has another tokenizer than target target"), refused.stderr
