"""Linear layers on CPUs with a oneDNN-prepacked weight (fp32 and bf16).

nn.Linear hands the CPU matmul kernel the plain weight on every call; PyTorch's own CPU compiler
instead packs each weight once into the kernel's layout (`mkldnn._reorder_linear_weight`) and
calls `mkldnn._linear_pointwise`, and so does this module. With one to a few dozen input rows
(decode and tree-verify steps) that is much faster on AVX-512 CPUs. Measured on the embedded
model (2-core EPYC with avx512_bf16, 400-token cache, one forward, median of 11 interleaved
rounds), ms for 1 / 2 / 4 / 8 / 16 rows:

    fp32  nn.Linear 62.2 / 102.3 / 89.7 / 95.0 / 111.9   packed 53.4 / 61.2 / 64.7 / 66.3 / 81.3
    bf16  nn.Linear 40.7 / 43.0 / 44.6 / 51.0 / 58.4     packed 32.5 / 34.5 / 33.6 / 37.0 / 45.0

The packed layout is chosen for PACK_BATCH_ROWS input rows. Packed for one row (the first
version), fp32 verify forwards of the embedded model took 49.9 / 64.0 / 74.8 / 90.3 ms for 1 / 4
/ 8 / 16 rows; packed for 8 rows, 49.8 / 47.8 / 56.9 / 72.2 ms (768-token cache, median of 8
interleaved rounds, same machine). With the 8-row layout a row's result also no longer depends on
how many rows share the call, for layers with 576 inputs (the 1-row layout changed them by up to
~6e-5), so a tree verify's rows match one-token decoding more often. bf16 times do not move.

Not everywhere: oneDNN's bf16 prepack needs avx512bw/vl/dq or avx_ne_convert, and on AVX2-only
CPUs the packed fp32 path can lose to nn.Linear. `ragspec.kernels.select` therefore probes it and
times it against nn.Linear on the loaded model before using it.

The dense weight stays (transformers reads it, the input embedding may share it), so packing
costs a second copy of every linear weight: MAX_PACKED_BYTES caps that.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator

import torch

log = logging.getLogger(__name__)

MAX_PACKED_BYTES = 2 << 30  # skip packing models whose linear weights would need more extra memory
PACK_BATCH_ROWS = 8  # the input rows oneDNN lays the packed weight out for (see the module docstring)


class PackedLinear(torch.nn.Module):
    """`linear` computed with a prepacked copy of its weight (fp32: equal within ~1e-5 relative)."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.dense = linear
        with torch.no_grad():
            self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), PACK_BATCH_ROWS)

    @property
    def weight(self) -> torch.Tensor:  # what transformers reads (tied embeddings, dtype checks)
        return self.dense.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():  # the packed copy is inference-only
            return self.dense(x)
        flat = x.reshape(-1, x.shape[-1])
        out = torch.ops.mkldnn._linear_pointwise(flat, self.packed_weight, self.dense.bias, "none", [], "")
        return out.reshape(*x.shape[:-1], -1)


def packing_available() -> bool:
    """The oneDNN ops PyTorch's own CPU compiler packs linear weights with."""
    ops = torch.ops.mkldnn
    return torch.backends.mkldnn.is_available() and all(
        hasattr(ops, name) for name in ("_reorder_linear_weight", "_linear_pointwise")
    )


def packing_problem(model: torch.nn.Module) -> str | None:
    """Why `model`'s linears are not packed (no linears, no oneDNN, another dtype or device, more
    than MAX_PACKED_BYTES of weights); None if they can be. Whether oneDNN runs the packed op on
    this CPU is `ragspec.kernels.probe.probe_packed_linear`'s question."""
    weights = [child.weight for _, _, child in _children(model, lambda child: type(child) is torch.nn.Linear)]
    if not weights:
        return "no nn.Linear layers"
    if not packing_available():
        return "this torch build has no oneDNN linear packing ops"
    if any(w.dtype not in (torch.float32, torch.bfloat16) or w.device.type != "cpu" for w in weights):
        return "packing is for fp32/bf16 weights on a CPU"
    extra = sum(w.numel() * w.element_size() for w in weights)
    if extra > MAX_PACKED_BYTES:
        return f"packed copies would take {extra / 2**30:.1f} GiB more memory"
    return None


def pack_linears(model: torch.nn.Module) -> bool:
    """Swap every nn.Linear of an fp32 or bf16 CPU model for a PackedLinear; False if not
    possible or not worth it (see `packing_problem`). The caller checks that oneDNN runs the
    packed op here (`ragspec.kernels.probe`): this raises RuntimeError where it does not."""
    problem = packing_problem(model)
    if problem is not None:
        log.info("not prepacking linear weights: %s", problem)
        return False
    for parent, name, child in _children(model, lambda child: type(child) is torch.nn.Linear):
        setattr(parent, name, PackedLinear(child))
    return True


def unpack_linears(model: torch.nn.Module) -> None:
    """Give `model` its plain nn.Linear layers back for good (dropping the packed copies)."""
    for parent, name, child in _children(model, lambda child: isinstance(child, PackedLinear)):
        setattr(parent, name, child.dense)


@contextlib.contextmanager
def unpacked(model: torch.nn.Module) -> Iterator[None]:
    """Inside the block, `model` runs its plain nn.Linear layers again."""
    swaps = _children(model, lambda child: isinstance(child, PackedLinear))
    for parent, name, child in swaps:
        setattr(parent, name, child.dense)
    try:
        yield
    finally:
        for parent, name, child in swaps:
            setattr(parent, name, child)


def _children(model: torch.nn.Module, wanted: Callable[[torch.nn.Module], bool]) -> list[tuple]:
    """(parent, attribute name, child) for every submodule `wanted` picks."""
    return [(parent, name, child) for parent in model.modules()
            for name, child in parent.named_children() if wanted(child)]
