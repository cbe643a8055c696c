"""Attention for short query blocks (a decode step or a tree verify) over a long KV cache.

On CPUs, PyTorch's SDPA kernel is slow when a few query rows meet thousands of cached keys (one
row over a 5k-token cache: about 2x the time of two plain matmuls, measured on this project's
2-core CPU). `small_query_attention` does those steps as matmuls, with the query heads that share
a KV head stacked into one matrix (no `repeat_kv` copy), and hands everything else (prefill,
softcapping, position biases, dropout) to transformers' own SDPA path. Registered under
ATTENTION_NAME, with SDPA's mask function, so a model loaded with that name builds SDPA's masks.
Imported only where transformers is in use (`ragspec.kernels.select`).
"""

from __future__ import annotations

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

ATTENTION_NAME = "ragspec_small_query"
MAX_SMALL_QUERY = 160  # query rows (pending token + tree nodes) done as matmuls; more go to SDPA


def small_query_attention(
    module: torch.nn.Module,
    query: torch.Tensor,  # [batch, heads, q, head_dim]
    key: torch.Tensor,  # [batch, kv_heads, kv, head_dim]
    value: torch.Tensor,  # [batch, kv_heads, kv, head_dim]
    attention_mask: torch.Tensor | None,  # [batch, 1, q, kv]: bool (True = visible) or additive; None = all visible
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    batch, heads, rows, head_dim = query.shape
    causal_block = attention_mask is None and rows > 1  # SDPA applies causality itself
    special = dropout or kwargs.get("softcap") is not None or kwargs.get("position_bias") is not None
    if rows > MAX_SMALL_QUERY or causal_block or special or module.training:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    kv_heads, kv_length = key.shape[1], key.shape[2]
    group = heads // kv_heads
    scale = head_dim**-0.5 if scaling is None else scaling
    stacked = query.reshape(batch, kv_heads, group * rows, head_dim)  # heads h*group..: one KV head each
    scores = torch.matmul(stacked, key.transpose(2, 3)).mul_(scale)  # [batch, kv_heads, group * rows, kv]
    scores = scores.view(batch, kv_heads, group, rows, kv_length)
    if attention_mask is not None:
        mask = attention_mask[:, :, None]  # [batch, 1, 1, q, kv], broadcast over KV heads and groups
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + mask
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    output = torch.matmul(weights.view(batch, kv_heads, group * rows, kv_length), value)
    return output.view(batch, heads, rows, head_dim).transpose(1, 2).contiguous(), None  # [batch, q, heads, head_dim]


def register() -> str:
    """Make ATTENTION_NAME known to transformers (idempotent); returns the name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION_NAME, small_query_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
    return ATTENTION_NAME
