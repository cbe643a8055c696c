"""The node budget sees the cache length: on a long document every verified row attends over the
whole cache, so the budget verifies fewer nodes there than over a short cache; its online
corrections are kept per cache-length bucket; the profile measures long caches without a long
prefill; the cached curve's file is versioned."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ragspec.engine.budget import (
    CURVE_VERSION,
    PROFILE_CONTEXT,
    LatencyCurve,
    NodeBudget,
    _grow_cache,
    cache_bucket,
    load_or_measure_curve,
    long_contexts,
    measure_latency_curve,
    read_curve,
    save_curve,
)
from ragspec.types import DraftTree

# Over a 256-token cache 64 rows cost what 1 costs; over 8192 cached tokens a step costs 3x and
# every extra row 2 ms more (its attention over the long cache).
LONG_ROWS_COST = LatencyCurve(rows=(1, 64), seconds=(0.010, 0.0101), adapt=False, contexts=(8192,),
                              context_rows=(1, 64), context_seconds=((0.030, 0.030 + 63 * 0.002),))


@pytest.fixture
def private_cache(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("RAGSPEC_CACHE_DIR", str(cache))
    return cache


def chain(length: int, p: float) -> DraftTree:
    return DraftTree(token_ids=np.arange(length, dtype=np.int64), parents=np.arange(length, dtype=np.int64) - 1,
                     scores=p ** np.arange(1, length + 1), sources=("context",) * length)


def test_the_budget_verifies_fewer_nodes_over_a_long_cache():
    budget = NodeBudget(LONG_ROWS_COST, max_nodes=64)
    tree = chain(30, 0.8)
    budget.cache_length = PROFILE_CONTEXT
    short = budget.choose(tree)
    budget.cache_length = 6000
    long = budget.choose(tree)
    assert short >= 20 and 0 < long < short // 2, (short, long)
    budget.cache_length = None  # the profile's own cache length: as short
    assert budget.choose(tree) == short


def test_a_curve_without_long_contexts_ignores_the_cache_length():
    flat = LatencyCurve(rows=(1, 64), seconds=(0.010, 0.0101), adapt=False)
    assert np.array_equal(flat(np.arange(1, 9), 6000), flat(np.arange(1, 9)))


def test_the_cost_is_piecewise_linear_in_the_cache_length_and_extrapolated():
    curve = LatencyCurve(rows=(1, 64), seconds=(0.010, 0.020), contexts=(2048, 4096), context_rows=(1, 64),
                         context_seconds=((0.012, 0.030), (0.016, 0.050)))
    assert curve(1, 100) == pytest.approx(0.010)  # below the profile: as profiled
    assert curve(1, (PROFILE_CONTEXT + 2048) // 2) == pytest.approx(0.011)
    assert curve(64, 3072) == pytest.approx(0.040)
    assert curve(64, 6144) == pytest.approx(0.070)  # past the longest: the last slope goes on
    assert curve(np.array([1, 64]), 2048) == pytest.approx([0.012, 0.030])


def test_online_corrections_are_kept_per_cache_length_bucket():
    """Plain steps measured 2x slower than the curve over a long cache do not move the estimate
    over a short one (one correction for all lengths would), and a bucket never measured borrows
    the nearest one's."""
    curve = LatencyCurve(rows=(1, 64), seconds=(0.010, 0.0101), contexts=(8192,), context_rows=(1, 64),
                         context_seconds=((0.030, 0.040),))
    budget = NodeBudget(curve, max_nodes=8)
    budget.cache_length = 300
    budget.observe(DraftTree.empty(), [], 0.010)
    budget.cache_length = 6000
    expected_long = float(curve(1, 6000))
    for _ in range(100):
        budget.observe(DraftTree.empty(), [], 2 * expected_long)
    assert budget.predicted_seconds(0)[0] == pytest.approx(2 * expected_long, rel=0.01)
    assert budget.predicted_seconds(0, cache_length=300)[0] == pytest.approx(0.010)
    assert cache_bucket(300) != cache_bucket(6000) != cache_bucket(1500)
    nearest = 1500 if abs(cache_bucket(1500) - cache_bucket(300)) < abs(cache_bucket(1500) - cache_bucket(6000)) else 3500
    ratio = budget.predicted_seconds(0, cache_length=nearest)[0] / float(curve(1, nearest))
    assert ratio == pytest.approx(1.0 if cache_bucket(nearest) <= 1 else 2.0, rel=0.01)


def test_long_contexts_fit_the_model_and_skip_what_is_not_longer():
    assert long_contexts(8192, 64, (2048, 8192)) == (2048, 8192 - 65)
    assert long_contexts(300, 64, (2048, 8192)) == ()
    assert long_contexts(2048, 16, (2048, 8192)) == (2048 - 17,)


def test_a_grown_cache_verifies_like_a_prefilled_one_of_that_length(tiny_llama):
    """The profile tiles the KV rows instead of prefilling: the verifier then holds `length`
    committed tokens and verifies at positions past them, as after a real prefill."""
    context = list(range(3, 3 + PROFILE_CONTEXT))
    from ragspec.verify import TreeVerifier

    verifier = TreeVerifier(tiny_llama)
    verifier.prefill(context)
    length = min(1000, tiny_llama.context_length - 20)
    _grow_cache(verifier, context, length)
    assert verifier.past_length == length
    out = verifier.verify(context[-1], chain(5, 0.5))
    assert out.logits.shape[0] == 6 and bool(out.logits.isfinite().all())
    verifier.discard()
    assert verifier.past_length == length


def test_the_profile_measures_longer_caches_and_the_cache_file_round_trips(tiny_llama, private_cache):
    curve = measure_latency_curve(tiny_llama, rows=(1, 2, 4), repeats=1, contexts=(1024,))
    wanted = long_contexts(tiny_llama.context_length, 4, (1024,))
    assert curve.contexts == wanted and len(curve.context_seconds) == len(wanted)
    if wanted:
        assert curve.context_rows == (1, 2, 4) and min(min(row) for row in curve.context_seconds) > 0
    path = private_cache / "curve.json"
    assert save_curve(path, curve)
    assert json.loads(path.read_bytes())["version"] == CURVE_VERSION
    assert read_curve(path) == curve


def test_a_curve_cached_by_an_older_version_is_measured_again(tiny_llama, private_cache, caplog):
    path = private_cache / "latency" / f"{tiny_llama.fingerprint}.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"rows": [1, 2], "seconds": [0.01, 0.02], "adapt": True}))  # version 1's format
    curve = load_or_measure_curve(tiny_llama, rows=(1, 2, 4))
    assert curve.rows == (1, 2, 4)
    assert read_curve(path) == curve
