"""Bad input gets a clear RagspecError; the node budget turns speculation off when it does not pay."""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import FLAT_CURVE, tiny_loaded
from hypothesis import given, settings
from hypothesis import strategies as st
from test_tree import draft_trees

from ragspec import Engine, RagspecError, SamplingConfig, SpecConfig, load_model
from ragspec.engine.budget import LatencyCurve, NodeBudget
from ragspec.errors import ConfigError, ModelNotFound, PromptTooLong
from ragspec.types import ROOT, DraftTree


@pytest.fixture(scope="module")
def short_context_engine(tokenizer) -> Engine:
    return Engine(tiny_loaded("llama", tokenizer, max_positions=64), latency_curve=FLAT_CURVE)


def test_prompt_longer_than_the_context(short_context_engine):
    prompt = " ".join(["word"] * 100)
    with pytest.raises(PromptTooLong, match="64") as info:
        short_context_engine.generate(prompt, max_new_tokens=4)
    assert isinstance(info.value, RagspecError)
    with pytest.raises(PromptTooLong):
        short_context_engine.stream(prompt)  # raised when the request is made, not mid-stream


@pytest.mark.parametrize("speculative", [False, True])
def test_generation_stops_at_the_context_window(short_context_engine, speculative):
    prompt = " ".join(["a", "b"] * 28)
    length = len(short_context_engine.encode(prompt))
    assert 50 < length < 64
    out = short_context_engine.generate(prompt, max_new_tokens=48, speculative=speculative)
    assert out.finish_reason == "length"
    # the window (not max_new_tokens, 48 > 64 - length) ended it: prompt + output fill it exactly
    assert length + len(out.token_ids) == 64
    plain = short_context_engine.generate(prompt, max_new_tokens=48, speculative=False)
    assert out.token_ids == plain.token_ids


def test_unknown_model_path():
    with pytest.raises(ModelNotFound, match="nonexistent"):
        load_model("/nonexistent")
    with pytest.raises(ModelNotFound):
        Engine("/nonexistent/model")


def test_directory_without_config_json(tmp_path):
    (tmp_path / "weights.safetensors").write_bytes(b"")
    with pytest.raises(ModelNotFound, match="config.json"):
        load_model(tmp_path)
    not_gguf = tmp_path / "model.bin"
    not_gguf.write_bytes(b"\0" * 16)
    with pytest.raises(ModelNotFound):
        load_model(not_gguf)


def test_request_options_are_checked(tiny_llama):
    engine = Engine(tiny_llama, latency_curve=FLAT_CURVE)
    with pytest.raises(ConfigError, match="max_new_tokens"):
        engine.stream("hello", max_new_tokens=0)
    with pytest.raises(ConfigError):
        engine.generate("hello", max_new_tokens=-3)
    with pytest.raises(ConfigError):
        engine.generate("hello", temperature=-1.0)
    with pytest.raises(ConfigError):
        engine.generate("hello", top_p=0.0)
    with pytest.raises(ConfigError, match="empty"):
        engine.generate("", max_new_tokens=2)
    with pytest.raises(ConfigError, match="too close to 0"):
        engine.generate("hello", temperature=1e-45, max_new_tokens=2)
    with pytest.raises(ConfigError, match="seed"):
        engine.generate("hello", temperature=0.7, seed=10**30, max_new_tokens=2)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(temperature=-0.1),
        dict(top_k=-1),
        dict(top_p=0.0),
        dict(top_p=1.5),
        dict(top_p=-0.5),
        dict(temperature=math.nan),
        dict(top_p=math.nan),
        dict(temperature=1e-45),  # logits / 1e-45 overflow to inf: greedy is temperature 0
        dict(seed=2**64),
        dict(seed=-1),
    ],
)
def test_invalid_sampling_config(kwargs):
    with pytest.raises(ConfigError):
        SamplingConfig(**kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(max_nodes=-1),
        dict(min_nodes=-1),
        dict(min_nodes=5, max_nodes=4),
        dict(max_depth=0),
        dict(max_occurrences=0),
        dict(max_match=0),
    ],
)
def test_invalid_spec_config(kwargs):
    with pytest.raises(ConfigError):
        SpecConfig(**kwargs)


def test_valid_configs_build():
    assert SamplingConfig().greedy
    assert not SamplingConfig(temperature=0.5, top_k=10, top_p=0.9, seed=3).greedy
    SpecConfig(max_nodes=0, min_nodes=0)
    SpecConfig(max_nodes=8, min_nodes=8, max_depth=1, max_occurrences=1, max_match=1)


# -- node budget ----------------------------------------------------------------------------

STEEP = LatencyCurve(rows=(1, 2, 64), seconds=(0.010, 0.025, 0.700))


def chain(scores: list[float]) -> DraftTree:
    n = len(scores)
    return DraftTree(
        token_ids=np.arange(n, dtype=np.int64),
        parents=np.arange(n, dtype=np.int64) - 1,
        scores=np.asarray(scores, dtype=np.float64),
        sources=("t",) * n,
    )


def test_budget_turns_speculation_off_when_it_does_not_pay():
    low = chain([0.3 * 0.8**d for d in range(20)])
    assert NodeBudget(STEEP, max_nodes=64).choose(low) == 0
    high = chain([0.99**d for d in range(20)])
    assert NodeBudget(STEEP, max_nodes=64).choose(high) == 0  # one node costs 2.5x a plain step
    assert NodeBudget(FLAT_CURVE, max_nodes=64).choose(high) == 20
    assert NodeBudget(FLAT_CURVE, max_nodes=8).choose(high) == 8
    assert NodeBudget(FLAT_CURVE, max_nodes=64).choose(high, limit=3) == 3
    assert NodeBudget(FLAT_CURVE, max_nodes=64).choose(DraftTree.empty()) == 0
    assert NodeBudget(STEEP, max_nodes=64, min_nodes=4).choose(low) == 4


def test_budget_takes_a_bigger_tree_where_the_curve_dips():
    # fp32 on a 2-core CPU: 2-3 verify rows cost more than 4 (matmul kernels block rows by 4)
    dip = LatencyCurve(rows=(1, 2, 3, 4, 8), seconds=(0.065, 0.104, 0.125, 0.090, 0.094))
    tree = chain([0.5, 0.3, 0.1, 0.02, 0.01])
    assert NodeBudget(dip, max_nodes=64).choose(tree) == 3  # 4 rows: cheaper than 2 or 3 rows
    assert NodeBudget(dip, max_nodes=64).choose(tree, limit=2) == 0  # 2 or 3 rows do not pay


def test_budget_calibrates_each_source_from_its_own_verdicts():
    """Two sources claim the same odds; only one is ever right. After some steps the budget
    trusts that one, drops the other's nodes, and the pruned tree keeps the raw scores."""
    two_branches = DraftTree(
        token_ids=np.array([1, 2, 3, 4]), parents=np.array([ROOT, 0, ROOT, 2]),
        scores=np.array([0.5, 0.4, 0.5, 0.4]), sources=("good", "good", "bad", "bad"),
    )
    budget = NodeBudget(FLAT_CURVE, max_nodes=64)
    assert budget.calibration("good") == budget.calibration("bad") == 1.0
    for _ in range(60):
        budget.observe(two_branches, accepted_nodes=[0, 1], seconds=float(FLAT_CURVE(5)))
    assert budget.calibration("good") > 1.5 and budget.calibration("bad") == 0.25
    calibrated = budget.calibrated_scores(two_branches)
    assert calibrated[0] == 1.0 and calibrated[1] <= calibrated[0] and calibrated[2] < 0.15
    kept = budget.select(two_branches, limit=2)
    assert kept.sources == ("good", "good")
    assert np.all(np.isin(kept.scores, two_branches.scores))  # raw, not calibrated


@given(
    draft_trees(max_nodes=40),
    st.lists(st.floats(0.001, 0.1), min_size=2, max_size=6),
    st.integers(0, 64),
    st.integers(1, 64),
)
@settings(max_examples=100)
def test_budget_maximises_expected_tokens_per_second(tree, increments, max_nodes, limit):
    """Brute force over n: (1 + sum of the n best scores) / latency(1 + n)."""
    rows = tuple(int(r) for r in np.cumsum([1] + [7] * (len(increments) - 1)))
    curve = LatencyCurve(rows=rows, seconds=tuple(np.cumsum(increments).tolist()))
    budget = NodeBudget(curve, max_nodes=max_nodes)
    chosen = budget.choose(tree, limit=limit)
    cap = min(tree.num_nodes, max_nodes, limit)
    assert 0 <= chosen <= cap
    best = sorted(tree.scores.tolist(), reverse=True)

    def throughput(n: int) -> float:
        return (1.0 + sum(best[:n])) / float(np.interp(1 + n, rows, curve.seconds))

    assert throughput(chosen) >= max(throughput(n) for n in range(cap + 1)) * (1 - 1e-9)


def test_engine_with_a_steep_curve_verifies_no_drafts(tiny_llama):
    engine = Engine(tiny_llama, latency_curve=STEEP)
    out = engine.generate("a b c a b c a b c a b c", max_new_tokens=16, speculative=True)
    assert out.stats.num_draft_tokens == 0
    assert out.stats.num_steps == len(out.token_ids)
    assert out.stats.mean_acceptance_length == 1.0


def test_errors_are_ragspec_errors():
    from ragspec import errors

    for name in ("ModelNotFound", "UnsupportedModel", "PromptTooLong", "ConfigError"):
        assert issubclass(getattr(errors, name), RagspecError)


def test_tree_contract_is_enforced():
    with pytest.raises(ValueError):
        DraftTree(np.array([1, 2]), np.array([1, ROOT]), np.ones(2), ("a", "a"))  # child before parent
    with pytest.raises(ValueError):
        DraftTree(np.array([1, 2]), np.array([ROOT]), np.ones(2), ("a", "a"))


@pytest.mark.parametrize("device, message", [("foo", "unknown device"), ("cuda:-1", "unknown device"),
                                             ("meta", "not supported"), ("xla", "not supported")])
def test_bad_device_strings_are_config_errors(device, message):
    from ragspec.models import pick_device

    with pytest.raises(ConfigError, match=message):
        pick_device(device)
    assert pick_device("cpu").type == "cpu"


def test_cuda_without_cuda_is_a_config_error():
    import torch

    from ragspec.models import pick_device

    if torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA device"):
            pick_device(f"cuda:{torch.cuda.device_count()}")
    else:
        with pytest.raises(ConfigError, match="CUDA is not available"):
            pick_device("cuda")


@pytest.mark.parametrize("keep", [0, 10, 1000, 100_000, 5_000_000])
def test_truncated_gguf_is_a_clear_error(tmp_path, monkeypatch, keep):
    from ragspec.errors import UnsupportedModel
    from ragspec.models import embedded_model_path

    monkeypatch.setenv("RAGSPEC_CACHE_DIR", str(tmp_path / "cache"))
    with open(embedded_model_path(), "rb") as whole:
        (tmp_path / "cut.gguf").write_bytes(whole.read(keep))
    with pytest.raises(UnsupportedModel, match="cut.gguf .truncated, damaged or unsupported"):
        load_model(tmp_path / "cut.gguf", device="cpu")


def _model_dir(path, marker: str):
    path.mkdir()
    for name in ("config.json", "model.safetensors"):
        (path / name).write_text(marker)
    return path


def test_dequantised_model_published_once_when_two_processes_race(tmp_path):
    """A second dequantisation of the same file keeps the copy published first (a reader may
    already be loading it); the old code deleted it before renaming its own."""
    from ragspec.models import _publish

    target = _model_dir(tmp_path / "model", "first")
    _publish(_model_dir(tmp_path / ".tmp-second", "second"), target)
    assert (target / "model.safetensors").read_text() == "first"


def test_damaged_dequantised_dir_is_replaced(tmp_path):
    from ragspec.models import _publish

    target = tmp_path / "model"
    target.mkdir()
    (target / "config.json").write_text("left by an old version, no weights")
    _publish(_model_dir(tmp_path / ".tmp-new", "new"), target)
    assert (target / "model.safetensors").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
