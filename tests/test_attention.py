"""Matmul attention for short query blocks equals the textbook formula (and SDPA) in fp32."""

from __future__ import annotations

import pytest
import torch

from ragspec.kernels.attention import MAX_SMALL_QUERY, small_query_attention


class _Module(torch.nn.Module):
    pass


def reference_attention(query, key, value, visible, scaling):
    """softmax(q k^T * scaling, masked) v, KV heads repeated for their query heads. [b, q, h, d]"""
    group = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(group, dim=1), value.repeat_interleave(group, dim=1)
    scores = query @ key.transpose(2, 3) * scaling
    if visible is not None:
        scores = scores.masked_fill(~visible, float("-inf"))
    return (torch.softmax(scores, dim=-1) @ value).transpose(1, 2)


@pytest.mark.parametrize("kv_heads", [1, 2, 6])
@pytest.mark.parametrize(("rows", "mask_kind"), [(1, "none"), (1, "bool"), (7, "bool"), (7, "additive")])
def test_matches_the_reference(kv_heads: int, rows: int, mask_kind: str) -> None:
    generator = torch.Generator().manual_seed(rows * 10 + kv_heads)
    batch, heads, cached, dim = 1, 6, 50, 16
    query = torch.randn(batch, rows, heads, dim, generator=generator).transpose(1, 2)  # non-contiguous, as in models
    key = torch.randn(batch, kv_heads, cached + rows, dim, generator=generator)
    value = torch.randn(batch, kv_heads, cached + rows, dim, generator=generator)
    visible = torch.rand(batch, 1, rows, cached + rows, generator=generator) > 0.3
    visible[..., -1] = True  # every row sees at least one key
    if mask_kind == "none":  # one decode row sees everything (a block without a mask is causal: SDPA's case)
        mask, visible = None, None
    elif mask_kind == "bool":
        mask = visible
    else:
        mask = torch.zeros(visible.shape).masked_fill_(~visible, torch.finfo(torch.float32).min)
    out, _ = small_query_attention(_Module().eval(), query, key, value, mask, scaling=0.25)
    expected = reference_attention(query, key, value, visible, 0.25)
    assert out.shape == (batch, rows, heads, dim) and out.is_contiguous()
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_long_and_causal_blocks_go_to_sdpa() -> None:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    module = _Module().eval()
    module.num_key_value_groups = 2
    generator = torch.Generator().manual_seed(0)
    for rows in (5, MAX_SMALL_QUERY + 1):  # a causal prefill block, and a block too long for matmuls
        query = torch.randn(1, 4, rows, 8, generator=generator)
        key = torch.randn(1, 2, rows, 8, generator=generator)
        value = torch.randn(1, 2, rows, 8, generator=generator)
        out, _ = small_query_attention(module, query, key, value, None, scaling=0.3)
        expected, _ = sdpa_attention_forward(module, query, key, value, None, scaling=0.3)
        torch.testing.assert_close(out, expected)
