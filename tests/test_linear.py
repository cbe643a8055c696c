"""The CPU linear with a prepacked weight computes what nn.Linear computes."""

from __future__ import annotations

import pytest
import torch

from ragspec.verify.linear import PackedLinear, pack_linears, unpacked


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


def test_bf16_packed_linear_equals_linear():
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 96).to(torch.bfloat16)
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    with torch.inference_mode():
        torch.testing.assert_close(PackedLinear(linear)(x), linear(x), atol=0.05, rtol=0.02)


def test_pack_linears_swaps_cpu_layers_of_fp32_and_bf16_only():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    assert pack_linears(model)
    assert [type(m).__name__ for m in model] == ["PackedLinear", "ReLU", "PackedLinear"]
    assert pack_linears(torch.nn.Sequential(torch.nn.Linear(8, 8).to(torch.bfloat16)))
    assert not pack_linears(torch.nn.Sequential(torch.nn.Linear(8, 8).to(torch.float16)))


def test_pack_linears_respects_the_memory_cap(monkeypatch):
    monkeypatch.setattr("ragspec.verify.linear.MAX_PACKED_BYTES", 100)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8))
    assert not pack_linears(model)
    assert type(model[0]) is torch.nn.Linear


def test_unpacked_restores_the_plain_layers_for_a_block():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU())
    plain = model[0]
    pack_linears(model)
    packed = model[0]
    with unpacked(model):
        assert model[0] is plain
    assert model[0] is packed
