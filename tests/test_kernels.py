"""CPU kernel choice: the probes agree with what runs on this machine, the plain fallbacks give the
fast paths' greedy outputs, bf16 loads where oneDNN cannot prepack bf16 (also for real, under
ONEDNN_MAX_CPU_ISA=AVX2 in a subprocess), and timings are measured once and cached."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest
import torch
from conftest import FLAT_CURVE, TEST_DEVICE, build_tiny_model

from ragspec import Engine, LoadedModel, load_model
from ragspec.engine.budget import LatencyCurve
from ragspec.kernels import probe, select
from ragspec.kernels.attention import small_query_attention
from ragspec.kernels.linear import PackedLinear
from ragspec.models import pick_dtype

pytestmark = pytest.mark.skipif(TEST_DEVICE != "cpu", reason="ragspec's kernels are CPU kernels")
PROMPTS = ["Name three colours, then repeat them.", "Count from one to ten in words."]
# Used as given: trees of up to ~16 nodes (FLAT_CURVE's 64-node trees make the real model's
# fallback forwards slow, and these tests are about the kernels, not the budget).
TREES_TO_16 = LatencyCurve(rows=(1, 17, 65), seconds=(0.010, 0.0101, 0.040), adapt=False)
X86 = platform.machine().lower() in ("x86_64", "amd64")


def runs_packed_linear(dtype: torch.dtype) -> bool:
    """Independently of the probe: oneDNN's packing ops called directly, on another shape."""
    weight, x = torch.randn(40, 72).to(dtype), torch.randn(5, 72).to(dtype)
    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, 1)
        torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
    except RuntimeError:
        return False
    return True


def force_unsupported(monkeypatch, linear: bool = True, attention: bool = True) -> None:
    if linear:
        monkeypatch.setattr(probe, "probe_packed_linear", lambda dtype: "forced: unsupported")
    if attention:
        monkeypatch.setattr(probe, "probe_small_query_attention", lambda dtype: "forced: unsupported")


def tiny(tokenizer, mode: str = "auto", cache_path=None) -> LoadedModel:
    loaded = LoadedModel(model=build_tiny_model("llama", len(tokenizer)), tokenizer=tokenizer, name="tiny-llama")
    loaded.kernels = select.choose_kernels(loaded, cache_path, mode=mode)
    return loaded


def greedy_outputs(loaded: LoadedModel, max_new_tokens: int = 24, curve=FLAT_CURVE) -> list[list[int]]:
    engine = Engine(loaded, latency_curve=curve, persist_state=False, prefix_cache=False)
    return [engine.generate([{"role": "user", "content": prompt}], max_new_tokens=max_new_tokens,
                            speculative=speculative).token_ids
            for prompt in PROMPTS for speculative in (True, False)]


def has_packed(model: torch.nn.Module) -> bool:
    return any(isinstance(module, PackedLinear) for module in model.modules())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_packed_linear_probe_agrees_with_what_runs_here(dtype):
    problem = probe.probe_packed_linear(dtype)
    assert (problem is None) == runs_packed_linear(dtype), problem
    assert problem is None or problem.strip()


def test_fast_bf16_means_the_bf16_prepack_runs_and_is_the_auto_dtype():
    fast = probe.cpu_has_fast_bf16()
    assert not fast or runs_packed_linear(torch.bfloat16)
    assert not fast or probe.onednn_bf16_supported()
    assert pick_dtype(torch.device("cpu")) == (torch.bfloat16 if fast else torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_attention_probe_agrees_with_what_runs_here(dtype):
    problem = probe.probe_small_query_attention(dtype)
    query = torch.randn(1, 6, 5, 16).to(dtype)
    key, value = torch.randn(1, 2, 40, 16).to(dtype), torch.randn(1, 2, 40, 16).to(dtype)
    try:
        small_query_attention(torch.nn.Module().eval(), query, key, value, torch.ones(1, 1, 5, 40, dtype=torch.bool))
        runs = True
    except RuntimeError:
        runs = False
    assert (problem is None) == runs, problem


def test_unsupported_probes_give_the_plain_ops_with_the_reason(tokenizer, monkeypatch):
    force_unsupported(monkeypatch)
    loaded = tiny(tokenizer)
    assert not has_packed(loaded.model) and not loaded.packed_linears
    assert loaded.model.config._attn_implementation == select.SDPA
    assert (loaded.kernels.linear.chosen, loaded.kernels.attention.chosen) == (select.PLAIN_LINEAR, select.SDPA)
    assert "forced: unsupported" in loaded.kernels.linear.reason
    assert "forced: unsupported" in loaded.kernels.attention.reason


def test_forced_fallback_equals_the_fast_path_tiny(tokenizer, monkeypatch):
    fast = tiny(tokenizer, mode="fast")
    if fast.kernels.linear.chosen != select.PACKED:
        pytest.skip(f"no packed fp32 linear on this CPU: {fast.kernels.linear.reason}")
    assert has_packed(fast.model) and fast.kernels.attention.chosen == select.MATMUL
    expected = greedy_outputs(fast)
    force_unsupported(monkeypatch)
    plain = tiny(tokenizer)
    assert not has_packed(plain.model) and plain.model.config._attn_implementation == select.SDPA
    assert greedy_outputs(plain) == expected
    assert plain.fingerprint != fast.fingerprint and plain.model_fingerprint == fast.model_fingerprint


@pytest.mark.slow
def test_real_model_forced_fallback_equals_the_fast_path(monkeypatch):
    with monkeypatch.context() as patch:
        force_unsupported(patch)
        loaded = load_model(None, device="cpu", dtype="float32")
    assert not has_packed(loaded.model) and loaded.model.config._attn_implementation == select.SDPA
    plain = greedy_outputs(loaded, curve=TREES_TO_16)
    loaded.kernels = select.choose_kernels(loaded, None, mode="fast")  # the same weights, fast kernels
    if loaded.kernels.linear.chosen != select.PACKED:
        pytest.skip(f"no packed fp32 linear on this CPU: {loaded.kernels.linear.reason}")
    assert has_packed(loaded.model) and loaded.kernels.attention.chosen == select.MATMUL
    assert greedy_outputs(loaded, curve=TREES_TO_16) == plain


def test_plain_mode_uses_the_fallbacks_even_where_the_fast_paths_run(tokenizer):
    loaded = tiny(tokenizer, mode="plain")
    assert not has_packed(loaded.model) and loaded.model.config._attn_implementation == select.SDPA


def test_bf16_without_the_bf16_prepack_keeps_nn_linear(tokenizer, monkeypatch):
    real_probe = probe.probe_packed_linear
    monkeypatch.setattr(probe, "probe_packed_linear",
                        lambda dtype: "forced: no bf16 prepack" if dtype == torch.bfloat16 else real_probe(dtype))
    model = build_tiny_model("llama", len(tokenizer)).to(torch.bfloat16)
    loaded = LoadedModel(model=model, tokenizer=tokenizer, name="tiny-llama-bf16")
    loaded.kernels = select.choose_kernels(loaded, None)
    assert loaded.kernels.linear.chosen == select.PLAIN_LINEAR and not has_packed(model)
    assert "forced: no bf16 prepack" in loaded.kernels.linear.reason
    assert all(len(ids) == 24 for ids in greedy_outputs(loaded))


@pytest.mark.slow
def test_real_model_loads_in_bf16_without_the_bf16_prepack(monkeypatch):
    real_probe = probe.probe_packed_linear
    monkeypatch.setattr(probe, "probe_packed_linear",
                        lambda dtype: "forced: no bf16 prepack" if dtype == torch.bfloat16 else real_probe(dtype))
    loaded = load_model(None, device="cpu", dtype="bfloat16", kernels="fast")  # the probes, not the timing
    assert loaded.dtype == torch.bfloat16 and not has_packed(loaded.model)
    assert "forced: no bf16 prepack" in loaded.kernels.linear.reason
    out = Engine(loaded, latency_curve=FLAT_CURVE, persist_state=False).generate("Name three colours.", max_new_tokens=12)
    assert len(out.token_ids) > 0 and out.text.strip()


AVX2_SCRIPT = """
import json, torch
from ragspec import Engine, load_model
from ragspec.engine.budget import LatencyCurve
from ragspec.kernels import probe
from ragspec.models import pick_dtype
loaded = load_model(None, device="cpu", dtype="bfloat16")
flat = LatencyCurve(rows=(1, 64), seconds=(0.010, 0.0101))
out = Engine(loaded, latency_curve=flat, persist_state=False).generate("Name three colours.", max_new_tokens=8)
print(json.dumps({"auto_dtype": str(pick_dtype(torch.device("cpu"))), "dtype": str(loaded.dtype),
                  "linear": loaded.kernels.linear.chosen, "reason": loaded.kernels.linear.reason,
                  "bf16_probe": probe.probe_packed_linear(torch.bfloat16), "tokens": len(out.token_ids)}))
"""


@pytest.mark.slow
@pytest.mark.skipif(not X86, reason="ONEDNN_MAX_CPU_ISA=AVX2 emulates an x86 CPU without AVX-512")
def test_bf16_loads_and_generates_with_onednn_limited_to_avx2():
    """For real: oneDNN limited to AVX2 refuses the bf16 prepack (the RuntimeError this machine
    class raised at load); the model loads with nn.Linear, generates, and auto stays float32."""
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", AVX2_SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["bf16_probe"] and "bf16" in result["bf16_probe"]
    assert result["dtype"] == "torch.bfloat16" and result["linear"] == select.PLAIN_LINEAR
    assert result["bf16_probe"] in result["reason"]
    assert result["auto_dtype"] == "torch.float32" and result["tokens"] > 0


def test_timings_are_measured_once_and_cached(tokenizer, tmp_path, monkeypatch):
    path = tmp_path / "kernels" / "tiny.json"
    first = tiny(tokenizer, cache_path=path)
    data = json.loads(path.read_text())
    assert data["machine"] == select.machine_key()
    assert set(data["timings_ms"]["linear"]) == {select.PACKED, select.PLAIN_LINEAR}
    assert set(data["timings_ms"]["attention"]) == {select.MATMUL, select.SDPA}
    assert all(len(ms) == len(select.TIMING_ROWS) and min(ms) > 0 for kind in data["timings_ms"].values() for ms in kind.values())
    assert first.kernels.linear.timings_ms == data["timings_ms"]["linear"]
    assert not [p for p in path.parent.iterdir() if p != path]  # no temporary file left behind

    def no_timing(*args):
        raise AssertionError("timed again although cached")

    monkeypatch.setattr(select, "measure_kernel_timings", no_timing)
    assert tiny(tokenizer, cache_path=path).kernels == first.kernels
    data["machine"]["threads"] += 1  # taken on another machine setup: timed again
    path.write_text(json.dumps(data))
    with pytest.raises(AssertionError, match="timed again"):
        tiny(tokenizer, cache_path=path)


def test_the_faster_variant_is_kept(tokenizer, tmp_path):
    """Timings where the plain ops win (as on AVX2-only CPUs) give the plain ops."""
    path = tmp_path / "kernels.json"
    timings = {"linear": {select.PACKED: [2.0, 3.0, 4.5], select.PLAIN_LINEAR: [2.5, 2.0, 4.0]},
               "attention": {select.MATMUL: [1.0, 2.0, 2.0], select.SDPA: [1.0, 2.0, 1.5]}}
    path.write_text(json.dumps({"version": select.CACHE_VERSION, "machine": select.machine_key(), "timings_ms": timings}))
    loaded = tiny(tokenizer, cache_path=path)
    if loaded.kernels.linear.reason.startswith(select.PACKED + " not used"):
        pytest.skip(loaded.kernels.linear.reason)
    assert (loaded.kernels.linear.chosen, loaded.kernels.attention.chosen) == (select.PLAIN_LINEAR, select.SDPA)
    assert not has_packed(loaded.model) and loaded.model.config._attn_implementation == select.SDPA
    assert "2.0/3.0/4.5 ms" in loaded.kernels.linear.reason and "2.5/2.0/4.0 ms" in loaded.kernels.linear.reason


def test_unreadable_timings_are_measured_again(tokenizer, tmp_path, caplog):
    path = tmp_path / "kernels.json"
    path.write_text("{")
    loaded = tiny(tokenizer, cache_path=path)
    assert "unreadable kernel timings" in caplog.text
    assert json.loads(path.read_text())["timings_ms"]["linear"] == loaded.kernels.linear.timings_ms


@pytest.mark.slow
def test_info_shows_the_kernels_and_the_cached_curve(real_engine):
    from click.testing import CliRunner

    from ragspec.cli import main
    from ragspec.kernels.info import format_info, runtime_info

    curve = real_engine.budget().curve  # measured now or earlier in the session, and cached
    info = runtime_info(real_engine.target)
    assert info.kernels is real_engine.target.kernels and info.latency_curve == curve
    assert info.cpu_flags == probe.cpu_flags() and info.dtype == "float32"
    shown = CliRunner().invoke(main, ["info", "--dtype", "float32", "--device", "cpu"], catch_exceptions=False)
    assert shown.exit_code == 0, shown.output
    plan = real_engine.target.kernels
    assert f"kernel linear: {plan.linear.chosen} (" in shown.stdout
    assert f"kernel attention: {plan.attention.chosen} (" in shown.stdout
    assert f"1: {curve.seconds[0] * 1000:.1f}" in shown.stdout  # the same cached curve, read back
    assert shown.stdout.splitlines()[1:5] == format_info(info)[1:5]  # device, torch, flags, capability


def test_an_unknown_kernel_mode_is_a_config_error_before_loading(monkeypatch):
    from ragspec.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown kernel mode 'fastest'"):
        load_model("/nonexistent", kernels="fastest")  # the mode is refused before the path
    monkeypatch.setenv("RAGSPEC_KERNELS", "quick")
    with pytest.raises(ConfigError, match="RAGSPEC_KERNELS"):
        load_model("/nonexistent")


def test_kernels_env_var_sets_the_default_mode(tokenizer, tmp_path, monkeypatch):
    """RAGSPEC_KERNELS=plain loads with nn.Linear and SDPA (a saved tiny model, loaded for real)."""
    model = build_tiny_model("llama", len(tokenizer))
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    monkeypatch.setenv("RAGSPEC_KERNELS", "plain")
    loaded = load_model(tmp_path, device="cpu", dtype="float32")
    assert not has_packed(loaded.model) and loaded.model.config._attn_implementation == select.SDPA
    assert "kernel mode plain" in loaded.kernels.linear.reason


def test_other_devices_keep_their_model_as_loaded(tokenizer):
    """ragspec's kernels are CPU kernels: on another device (meta here, standing in for CUDA,
    which this machine may not have) nothing is probed, timed or swapped."""
    model = build_tiny_model("llama", len(tokenizer)).to("meta")
    model.set_attn_implementation("sdpa")
    loaded = LoadedModel(model=model, tokenizer=tokenizer, name="tiny-meta")
    plan = select.choose_kernels(loaded, None)
    assert (plan.linear.chosen, plan.attention.chosen) == (select.PLAIN_LINEAR, "sdpa")
    assert "meta device" in plan.linear.reason and not has_packed(model)
