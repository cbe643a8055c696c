"""fp32 linear layers on CPUs: a oneDNN-prepacked weight for the few-row inputs of a tree verify.

For inputs of 2 to ~32 rows, PyTorch's fp32 CPU matmul (MKL sgemm) re-packs the whole weight on
every call, so verifying a small tree costs far more than a one-row step. Measured on the embedded
model (2-core EPYC, 400-token cache, one forward): 1 / 2 / 4 / 8 / 16 rows took 73 / 123 / 113 /
132 / 165 ms with plain nn.Linear, and 73 / 112 / 97 / 104 / 122 ms with one-row inputs on the
dense weight and the rest on a prepacked copy (the copy alone is slower for one row). bf16 is the
other way round (oneDNN already serves it well; a prepacked copy made it slower), so only fp32 is
packed. The price is a second copy of every linear weight, hence `MAX_PACKED_BYTES`.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)

MAX_PACKED_BYTES = 2 << 30  # skip packing models whose linear weights would need more extra memory


class RowDispatchLinear(torch.nn.Module):
    """`linear` for one-row inputs, its prepacked fp32 copy for more rows (same result within ~1e-5)."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.dense = linear
        with torch.no_grad():
            self.packed_weight = linear.weight.detach().to_mkldnn()
            self.packed_bias = None if linear.bias is None else linear.bias.detach().to_mkldnn()

    @property
    def weight(self) -> torch.Tensor:  # what transformers reads (tied embeddings, dtype checks)
        return self.dense.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        if rows == 1 or torch.is_grad_enabled():
            return self.dense(x)
        flat = x.reshape(rows, x.shape[-1]).to_mkldnn()
        out = torch._C._nn.mkldnn_linear(flat, self.packed_weight, self.packed_bias)
        return out.to_dense().reshape(*x.shape[:-1], -1)


def pack_linears(model: torch.nn.Module) -> bool:
    """Swap every nn.Linear of an fp32 CPU model for a RowDispatchLinear; False if not worth it
    (another dtype or device, no oneDNN, or more than MAX_PACKED_BYTES of weights)."""
    linears = [(parent, name, child) for parent in model.modules()
               for name, child in parent.named_children() if type(child) is torch.nn.Linear]
    if not linears or not torch.backends.mkldnn.is_available():
        return False
    weights = [child.weight for _, _, child in linears]
    if any(w.dtype != torch.float32 or w.device.type != "cpu" for w in weights):
        return False
    extra = sum(w.numel() * w.element_size() for w in weights)
    if extra > MAX_PACKED_BYTES:
        log.info("not prepacking linear weights: %.1f GiB more memory", extra / 2**30)
        return False
    for parent, name, child in linears:
        setattr(parent, name, RowDispatchLinear(child))
    return True
