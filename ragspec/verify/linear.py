"""fp32 linear layers on CPUs with a oneDNN-prepacked weight.

PyTorch's fp32 CPU matmul (MKL) re-packs the whole weight on every call with a few rows, so
verifying a small tree cost far more than a one-row step. Measured on the embedded model (2-core
EPYC, 400-token cache, one forward, variants interleaved): 2 / 4 / 8 / 16 rows took 123 / 113 /
132 / 165 ms with nn.Linear and 112 / 97 / 104 / 122 ms prepacked; one row 61.7 vs 54.1 ms. bf16
is the other way round (oneDNN already serves it well; prepacking made a one-row forward about
1.4x slower), so only fp32 is packed. The dense weight stays (transformers reads it, the input
embedding may share it), so packing costs a second copy of every linear weight: MAX_PACKED_BYTES.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)

MAX_PACKED_BYTES = 2 << 30  # skip packing models whose linear weights would need more extra memory


class PackedLinear(torch.nn.Module):
    """`linear` computed with a prepacked copy of its fp32 weight (equal within ~1e-5)."""

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
        if torch.is_grad_enabled():  # the packed copy is inference-only
            return self.dense(x)
        rows = x.numel() // x.shape[-1]
        flat = x.reshape(rows, x.shape[-1]).to_mkldnn()
        out = torch._C._nn.mkldnn_linear(flat, self.packed_weight, self.packed_bias)
        return out.to_dense().reshape(*x.shape[:-1], -1)


def pack_linears(model: torch.nn.Module) -> bool:
    """Swap every nn.Linear of an fp32 CPU model for a PackedLinear; False if not worth it
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
        setattr(parent, name, PackedLinear(child))
    return True
