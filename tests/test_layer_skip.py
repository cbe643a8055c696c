"""The "self" drafter: the target with layers skipped drafts for itself.

The view computes what the target computes with those layers taken out (checked against the
target with pass-through modules in their place, and with every layer kept against the target
itself); it shares the target's tensors and leaves the target, its weights and its verify results
as they were; the calibration skips a layer that contributes little and keeps one that matters,
caches its choice per model and recalibrates over a corrupt cache file or when a request's
measured agreement falls far below the prediction; greedy output with "self", alone and fused
with the retrieval drafters, equals plain decoding on every tiny architecture and on the real
embedded model.

Tiny targets here have 4 layers (the suite's 2-layer ones leave nothing to skip between the first
and last layer), an output head scaled like test_model_drafter's `sharp_tiny` (so draft scores
pass the node budget), and layer 2 made weak (its residual contributions scaled by 0.05), so that
a view skipping it agrees with the target and its drafts get accepted.
"""

from __future__ import annotations

import copy
import json
import logging

import numpy as np
import pytest
import torch
from conftest import (
    FLAT_CURVE,
    TEST_DEVICE,
    TINY_ARCHITECTURES,
    build_tiny_model,
    spec_bench_questions,
)
from test_lossless import lossless_prompts

from ragspec import Engine, LoadedModel
from ragspec.config import SamplingConfig, SpecConfig
from ragspec.drafting.layer_skip import (
    SelfDraftConfig,
    build_self_drafter,
    calibrate,
    calibration_ids,
    choice_path,
    layer_skip_view,
    new_view_cache,
    predicted_speedup,
    protected_layers,
    read_choice,
    view_cost,
)
from ragspec.drafting.model import ModelDraftConfig
from ragspec.drafting.registry import DraftRequest
from ragspec.errors import ConfigError
from ragspec.kernels.select import choose_kernels
from ragspec.kvcache import cache_length
from ragspec.types import DraftTree
from ragspec.verify import TreeVerifier
from ragspec.verify.tree_attention import (
    layer_windows,
    tree_attention_masks,
    tree_position_ids,
)

MAX_NEW = 32
SHARPEN = 50.0
WEAK_LAYER = 2
WEAK_SCALE = 0.05
_models: dict[tuple[str, int], LoadedModel] = {}


def weaken(layer: torch.nn.Module, arch: str) -> None:
    """Scale what the layer adds to the residual stream by WEAK_SCALE."""
    with torch.no_grad():
        if arch == "gemma3":  # its outputs pass a norm computing x * (1 + weight) (weights start at 0)
            layer.post_attention_layernorm.weight.fill_(WEAK_SCALE - 1.0)
            layer.post_feedforward_layernorm.weight.fill_(WEAK_SCALE - 1.0)
        else:
            layer.self_attn.o_proj.weight.mul_(WEAK_SCALE)
            layer.mlp.down_proj.weight.mul_(WEAK_SCALE)


def build_four_layer(arch: str, vocab_size: int, seed: int = 0) -> torch.nn.Module:
    """The suite's tiny model of `arch` with 4 layers, a sharpened head and layer 2 weak."""
    from transformers import AutoModelForCausalLM

    two = build_tiny_model(arch, vocab_size, seed=seed)
    config = copy.deepcopy(two.config)
    config.num_hidden_layers = 4
    if getattr(config, "layer_types", None):
        config.layer_types = config.layer_types * 2
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation=two.config._attn_implementation)
    model = model.to(TEST_DEVICE).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(SHARPEN)
    weaken(model.model.layers[WEAK_LAYER], arch)
    return model


def four_layer_tiny(arch: str, tokenizer, seed: int = 0) -> LoadedModel:
    """`build_four_layer` with ragspec's CPU kernels, built once per session (never changed by a test)."""
    if (arch, seed) not in _models:
        model = build_four_layer(arch, len(tokenizer), seed)
        loaded = LoadedModel(model=model, tokenizer=tokenizer, name=f"tiny4-{arch}-{seed}")
        loaded.kernels = choose_kernels(loaded, mode="fast")
        _models[arch, seed] = loaded
    return _models[arch, seed]


@pytest.fixture(scope="module", params=TINY_ARCHITECTURES)
def tiny4(request, tokenizer) -> LoadedModel:
    return four_layer_tiny(request.param, tokenizer)


class PassThrough(torch.nn.Module):
    """A decoder layer that changes nothing (and writes no KV)."""

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


def random_ids(length: int, vocab: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(100, vocab, (1, length), generator=generator).to(TEST_DEVICE)


def self_engine(target: LoadedModel, drafters=("self",), draft: ModelDraftConfig | None = None, **config) -> Engine:
    draft = draft or ModelDraftConfig(cost_aware=False)  # always draft: the tests need drafts to check
    config = {"min_predicted_speedup": 0.0, **config}  # tiny models' heavy output head: no set predicts a gain
    spec = SpecConfig(drafters=drafters, options=(SelfDraftConfig(calibration_tokens=64, draft=draft, **config),))
    return Engine(target, latency_curve=FLAT_CURVE, spec=spec, persist_state=False)


# ---- the view --------------------------------------------------------------------------------


@torch.inference_mode()
def test_view_with_every_layer_kept_is_the_target(tiny4):
    ids = random_ids(40, tiny4.model.config.vocab_size)
    expected = tiny4.model(input_ids=ids).logits
    assert torch.allclose(layer_skip_view(tiny4.model, [])(input_ids=ids).logits, expected, atol=1e-5, rtol=0)


@torch.inference_mode()
@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
def test_view_equals_the_target_with_those_layers_passed_through(arch, tokenizer):
    """A reference built another way: the same model built again, its skipped layers replaced by
    modules that return their input (plain nn.Linear here: the packed copies cannot be deep-copied)."""
    target = build_four_layer(arch, len(tokenizer))
    ids = random_ids(40, len(tokenizer), seed=1)
    full = target(input_ids=ids).logits
    for skipped in [(1,), (2,), (1, 2), (3,)]:
        reference = build_four_layer(arch, len(tokenizer))
        for layer in skipped:
            reference.model.layers[layer] = PassThrough()
        expected = reference(input_ids=ids).logits
        assert torch.equal(layer_skip_view(target, skipped)(input_ids=ids).logits, expected)
        assert not torch.allclose(full, expected, atol=1e-3), "skipping changed nothing: the test proves nothing"


@torch.inference_mode()
def test_view_over_its_own_cache_with_tree_masks_equals_one_causal_forward(tiny4):
    """Prefill into a lazy cache, then a chain fed with the verifier's tree masks and positions:
    the logits of one causal forward over the whole sequence; skipped layers' cache stays empty."""
    skipped = (1, 2)
    view = layer_skip_view(tiny4.model, skipped)
    ids = random_ids(36, tiny4.model.config.vocab_size, seed=2)
    expected = view(input_ids=ids).logits[0]
    cache, past = new_view_cache(), 30
    prefill = view(input_ids=ids[:, :past], cache=cache, use_cache=True).logits[0]
    parents = np.arange(ids.shape[1] - past - 1) - 1  # rows: pending token, then a chain
    positions = tree_position_ids(parents, past, ids.device)
    mask = tree_attention_masks(layer_windows(view.config), parents, past, torch.float32, ids.device, positions)
    step = view(input_ids=ids[:, past:], attention_mask=mask, position_ids=positions, cache=cache, use_cache=True)
    assert torch.allclose(torch.cat([prefill, step.logits[0]]), expected, atol=1e-4, rtol=0)
    assert [layer.get_seq_length() for layer in cache.layers] == [36, 0, 0, 36]
    assert cache_length(cache) == 36


def target_snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def test_view_shares_the_targets_tensors_and_leaves_the_target_as_it_was(tiny4):
    """Same tensors (no copies), same values, same module tree, same verify results after the
    view ran, calibrated and drafted."""
    target = tiny4
    before = target_snapshot(target.model)
    modules_before = [id(m) for m in target.model.modules()]
    text = "the cat sat on the mat. the cat sat on the"
    prompt = target.tokenizer(text).input_ids

    def verify_logits() -> torch.Tensor:
        verifier = TreeVerifier(target)
        verifier.prefill(prompt)
        chain = DraftTree(np.asarray(prompt[1:5]), np.arange(4) - 1, np.ones(4), ("test",) * 4)
        return verifier.verify(prompt[-1], chain).logits

    verified = verify_logits()
    view = layer_skip_view(target.model, (1, 2))
    owned = {t.data_ptr() for t in target.model.parameters()}
    assert {p.data_ptr() for p in view.parameters()} <= owned
    assert view.lm_head is target.model.lm_head and view.model.embed_tokens is target.model.model.embed_tokens
    assert [layer is target.model.model.layers[i] for i, layer in zip((0, 3), view.model.layers)] == [True, True]
    assert target.model.config.num_hidden_layers == 4 and len(target.model.model.layers) == 4
    calibrate(target.model, random_ids(32, target.model.config.vocab_size), SelfDraftConfig(calibration_tokens=32))
    out = self_engine(target).generate(text, max_new_tokens=8)
    assert out.stats.drafted_per_source.get("self", 0) > 0
    after = target_snapshot(target.model)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert [id(m) for m in target.model.modules()] == modules_before
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in target.model.modules())
    assert torch.equal(verify_logits(), verified)


def test_bad_skip_sets_are_refused(tiny4):
    with pytest.raises(ValueError):
        layer_skip_view(tiny4.model, [4])
    with pytest.raises(ValueError):
        layer_skip_view(tiny4.model, [0, 1, 2, 3])
    engine = self_engine(tiny4, skipped=(0, 2))  # the first layer is never skipped
    with pytest.raises(ConfigError):
        engine.generate("hello", max_new_tokens=2)
    with pytest.raises(ConfigError):
        SelfDraftConfig(min_skip_ratio=0.6, max_skip_ratio=0.5)


# ---- costs and calibration -------------------------------------------------------------------


def test_cost_and_speed_estimates(tiny4):
    model = tiny4.model
    assert view_cost(model, []) == pytest.approx(1.0)
    one, two = view_cost(model, [1]), view_cost(model, [1, 2])
    head = model.lm_head.weight.numel()
    assert 0 < head / sum(p.numel() for p in [*model.model.layers.parameters(), model.lm_head.weight]) < two < one < 1
    assert predicted_speedup(1.0, 0.0) == pytest.approx(9.0)  # 8 drafts and the bonus, drafting free
    assert predicted_speedup(0.0, 0.5) < 1.0  # never right: each draft forward is lost
    assert predicted_speedup(0.8, 0.3) > predicted_speedup(0.6, 0.3) > predicted_speedup(0.6, 0.6)
    assert protected_layers(30) == {0, 29} and protected_layers(2) == {0}


def test_calibration_skips_the_weak_layer_and_keeps_the_strong_one(tiny4):
    ids = tiny4.tokenizer(" ".join(["the rain in spain stays mainly in the plain"] * 6)).input_ids[:48]
    choice = calibrate(tiny4.model, torch.tensor([ids], device=tiny4.device), SelfDraftConfig(calibration_tokens=48))
    assert choice.skipped == (WEAK_LAYER,)
    assert choice.agreement > 0.8
    assert choice.forwards >= 2 and choice.calibration_tokens == 48
    assert choice.speedup == pytest.approx(predicted_speedup(choice.agreement, choice.cost))
    strong = calibrate(tiny4.model, torch.tensor([ids], device=tiny4.device),
                       SelfDraftConfig(calibration_tokens=48, min_skip_ratio=0.5))  # must skip 2 of 4
    assert strong.skipped == (1, 2) and strong.agreement < choice.agreement


def test_calibration_tokens_come_from_the_prompt_or_a_text(tokenizer, tmp_path, caplog):
    config = SelfDraftConfig(calibration_tokens=16)
    prompt = list(range(1000, 1040))
    assert calibration_ids(tokenizer, prompt, config) == (prompt[-16:], "prompt")
    builtin, source = calibration_ids(tokenizer, prompt[:10], config)
    assert source == "text" and len(builtin) == 16
    text = tmp_path / "book.txt"
    text.write_text("It is a truth universally acknowledged, that a single man in possession of a good fortune, "
                    "must be in want of a wife.")
    from_file, _ = calibration_ids(tokenizer, [], SelfDraftConfig(calibration_tokens=16, calibration_text_path=str(text)))
    assert tokenizer.decode(from_file).startswith("It is a truth")
    missing = SelfDraftConfig(calibration_tokens=16, calibration_text_path=str(tmp_path / "absent.txt"))
    with caplog.at_level(logging.WARNING):
        assert calibration_ids(tokenizer, [], missing) == (builtin, "text")
    assert "absent.txt" in caplog.text


def test_choice_is_cached_per_model_and_a_corrupt_file_recalibrates(tokenizer, caplog):
    target = four_layer_tiny("llama", tokenizer, seed=3)  # its own cache file: no other test uses seed 3
    path = choice_path(target)
    assert not path.exists()
    self_engine(target).generate("hello there", max_new_tokens=4)
    cached = read_choice(path, 4)
    assert cached is not None and cached.skipped == (WEAK_LAYER,) and cached.source == "text"
    other = four_layer_tiny("llama", tokenizer, seed=4)
    assert choice_path(other) != path  # same name pattern and shape, other weights: another file

    # a new engine reads the file instead of calibrating: a skip set only the file could give
    path.write_text(json.dumps({**json.loads(path.read_text()), "skipped": [1]}))
    engine = self_engine(target)
    engine.generate("hello there", max_new_tokens=4)
    assert [s.choice.skipped for s in engine._shared.values() if hasattr(s, "choice")] == [(1,)]

    path.write_bytes(b'{"skipped": [1, ')
    with caplog.at_level(logging.WARNING):
        engine = self_engine(target)
        engine.generate("hello there", max_new_tokens=4)
    assert "unreadable self-draft skip set" in caplog.text
    assert read_choice(path, 4).skipped == (WEAK_LAYER,)  # recalibrated and written back whole


def test_low_measured_agreement_recalibrates_on_the_request(tokenizer, caplog):
    """A cached choice that promises agreement 1.0 (and a 5x speedup) for skipping the strong
    layer: the drafts disagree, and after `monitor_steps` drafted steps the request recalibrates on
    its own tokens; the new choice predicts a loss (tiny models), so the request drafts no more."""
    target = four_layer_tiny("llama", tokenizer, seed=5)
    path = choice_path(target)
    path.parent.mkdir(parents=True, exist_ok=True)
    promise = {"skipped": [1], "num_layers": 4, "agreement": 1.0, "cost": 0.9, "speedup": 5.0,
               "calibration_tokens": 64, "source": "text", "forwards": 0, "version": 1}
    path.write_text(json.dumps(promise))
    config = SelfDraftConfig(calibration_tokens=64, monitor_steps=4, draft=ModelDraftConfig(cost_aware=False))
    made = []

    def factory(engine: Engine) -> list:
        made.append(build_self_drafter(DraftRequest(engine, [], SamplingConfig()), config))
        return made[-1:]

    engine = Engine(target, latency_curve=FLAT_CURVE, drafter_factories=[factory])  # persists recalibrations
    prompt = " ".join(["one two three four five six seven eight nine ten"] * 8)
    with caplog.at_level(logging.INFO, logger="ragspec.drafting.layer_skip"):
        fast = engine.generate(prompt, max_new_tokens=24)
    plain = engine.generate(prompt, max_new_tokens=24, speculative=False)
    assert fast.token_ids == plain.token_ids
    assert "recalibrated on the request's" in caplog.text and "drafting stops" in caplog.text
    assert made[0].recalibrated and made[0].inner is None and made[0].monitor.samples == 4
    saved = read_choice(path, 4)
    assert saved.source == "request" and saved.skipped == (WEAK_LAYER,)


def test_drafter_stays_off_while_the_calibration_predicts_a_loss(tokenizer, caplog):
    """The tiny models' output head is most of a forward: no skip set can pay, the drafter is not
    built; with min_predicted_speedup=0 the same engine drafts."""
    target = four_layer_tiny("llama", tokenizer, seed=6)
    with caplog.at_level(logging.WARNING):
        off = self_engine(target, min_predicted_speedup=1.0).generate("the cat sat on the", max_new_tokens=8)
    choice = read_choice(choice_path(target), 4)
    assert choice.speedup < 1.0 and "the self drafter stays off" in caplog.text
    assert "self" not in off.stats.draft_latencies_s
    on = self_engine(target, min_predicted_speedup=0.0).generate("the cat sat on the", max_new_tokens=8)
    assert on.token_ids == off.token_ids and on.stats.draft_latencies_s.get("self")


# ---- lossless --------------------------------------------------------------------------------


def test_greedy_with_self_alone_and_fused_equals_plain(tiny4):
    prompts = lossless_prompts(tiny4.tokenizer)[::2]
    plain_engine = Engine(tiny4, latency_curve=FLAT_CURVE, prefix_cache=False)
    accepted = 0
    for drafters in (("self",), ("context", "recycling", "self")):
        engine = self_engine(tiny4, drafters=drafters)
        for prompt in prompts:
            fast = engine.generate(prompt, max_new_tokens=MAX_NEW)
            plain = plain_engine.generate(prompt, max_new_tokens=MAX_NEW, speculative=False)
            assert fast.token_ids == plain.token_ids, f"{drafters} changed the output for {prompt!r}"
            assert fast.finish_reason == plain.finish_reason
            accepted += fast.stats.accepted_per_source.get("self", 0)
    assert accepted > 0, "no self draft was ever accepted: the test proves nothing"


def test_sampling_with_self_is_seeded_and_runs(tiny4):
    engine = self_engine(tiny4)
    runs = [engine.generate("the cat sat on the", max_new_tokens=16, temperature=0.8, seed=7) for _ in range(2)]
    assert runs[0].token_ids == runs[1].token_ids
    assert runs[0].stats.drafted_per_source.get("self", 0) > 0


def test_real_model_greedy_with_self_equals_plain(real_model):
    """A fixed skip set (calibrating over 30 layers takes a minute on this CPU), drafting forced
    to depth 3, a writing and a coding prompt of Spec-Bench."""
    questions = spec_bench_questions()
    questions = [next((q for q in questions if q["category"] == c), None) for c in ("writing", "coding")]
    if None in questions:
        pytest.skip("spec_bench data not present")
    draft, skipped = ModelDraftConfig(cost_aware=False, max_depth=3), tuple(range(12, 19))
    engine = self_engine(real_model, drafters=("self",), draft=draft, skipped=skipped)
    fused = self_engine(real_model, drafters=("context", "self"), draft=draft, skipped=skipped)
    plain_engine = Engine(real_model, prefix_cache=False)
    accepted = 0
    for question in questions:
        messages = [{"role": "user", "content": question["turns"][0]}]
        plain = plain_engine.generate(messages, max_new_tokens=24, speculative=False)
        for spec_engine in (engine, fused):
            fast = spec_engine.generate(messages, max_new_tokens=24)
            assert fast.token_ids == plain.token_ids, f"question {question['question_id']}"
            accepted += fast.stats.accepted_per_source.get("self", 0)
    assert accepted > 0
