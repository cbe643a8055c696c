"""The CPU linear with a prepacked weight computes what nn.Linear computes. The packed path runs
where oneDNN runs it (the probe says so; bf16 needs avx512bw/vl/dq or avx_ne_convert): tests of
it skip elsewhere with the probe's reason, and the fallback's tests run everywhere."""

from __future__ import annotations

import pytest
import torch

from ragspec.kernels.linear import PackedLinear, pack_linears, packing_problem, unpack_linears, unpacked
from ragspec.kernels.probe import probe_packed_linear


def needs_packed(dtype: torch.dtype):
    problem = probe_packed_linear(dtype)
    return pytest.mark.skipif(problem is not None, reason=f"no packed {dtype} linear on this CPU: {problem}")


@needs_packed(torch.float32)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(1, 1), (1, 3), (1, 17), (2, 40), (5,)])
def test_packed_linear_equals_linear(bias, shape):
    torch.manual_seed(0)
    linear = torch.nn.Linear(48, 80, bias=bias)
    packed = PackedLinear(linear)
    x = torch.randn(*shape, 48)
    with torch.inference_mode():
        out = packed(x)
        expected = linear(x)
    assert out.shape == (*shape, 80)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert packed.weight is linear.weight
    torch.testing.assert_close(packed(x), expected, atol=1e-5, rtol=1e-5)  # grad mode: the dense weight
    with torch.no_grad():
        linear.weight.zero_()  # the packed copy, not the dense weight, serves inference
    with torch.inference_mode():
        torch.testing.assert_close(packed(x), expected, atol=1e-5, rtol=1e-5)


@needs_packed(torch.bfloat16)
def test_bf16_packed_linear_equals_linear():
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 96).to(torch.bfloat16)
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    with torch.inference_mode():
        torch.testing.assert_close(PackedLinear(linear)(x), linear(x), atol=0.05, rtol=0.02)


@needs_packed(torch.float32)
def test_pack_linears_swaps_cpu_layers_of_fp32():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    assert pack_linears(model)
    assert [type(m).__name__ for m in model] == ["PackedLinear", "ReLU", "PackedLinear"]


@needs_packed(torch.bfloat16)
def test_pack_linears_swaps_cpu_layers_of_bf16():
    assert pack_linears(torch.nn.Sequential(torch.nn.Linear(8, 8).to(torch.bfloat16)))


def test_pack_linears_leaves_other_dtypes_alone():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8).to(torch.float16))
    assert packing_problem(model) == "packing is for fp32/bf16 weights on a CPU"
    assert not pack_linears(model) and type(model[0]) is torch.nn.Linear


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_the_plain_linear_fallback_runs_everywhere(dtype):
    """What a model keeps where packing is unusable or slower: its own nn.Linear, back after
    unpack_linears, computing what it computed before packing (where packing ran at all)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.ReLU(), torch.nn.Linear(96, 32)).to(dtype)
    x = torch.randn(3, 64, dtype=dtype)
    with torch.inference_mode():
        expected = model(x)
    plain = list(model)
    if probe_packed_linear(dtype) is None:
        pack_linears(model)
    unpack_linears(model)
    assert list(model) == plain
    with torch.inference_mode():
        assert torch.equal(model(x), expected)


def test_pack_linears_respects_the_memory_cap(monkeypatch):
    monkeypatch.setattr("ragspec.kernels.linear.MAX_PACKED_BYTES", 100)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8))
    assert not pack_linears(model)
    assert type(model[0]) is torch.nn.Linear


@needs_packed(torch.float32)
def test_unpacked_restores_the_plain_layers_for_a_block():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU())
    plain = model[0]
    pack_linears(model)
    packed = model[0]
    with unpacked(model):
        assert model[0] is plain
    assert model[0] is packed
