"""What this CPU and this torch build actually run: each kernel is tried once on a tiny input.

CPU flags alone do not say it: oneDNN may be limited below the hardware (`ONEDNN_MAX_CPU_ISA`),
a torch build may lack an op, and the bf16 weight prepack needs avx512bw/vl/dq or avx_ne_convert
even on CPUs that run bf16 matmuls otherwise. So every fast path is run here and compared with
the plain op it replaces; a probe returns None when the path works, else the reason it cannot
be used (the RuntimeError's first line, or the mismatch).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch

# /proc/cpuinfo flags that decide which CPU kernels oneDNN / ATen can use (shown by `ragspec info`).
KERNEL_FLAGS = (
    "avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni", "avx512_bf16",
    "avx512_fp16", "avx_vnni", "avx_ne_convert", "amx_tile", "amx_bf16",
)
PACKED_DTYPES = (torch.float32, torch.bfloat16)
_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 5e-2}


def cpu_flags() -> tuple[str, ...]:
    """The KERNEL_FLAGS this CPU reports (empty where /proc/cpuinfo is unreadable)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ()
    line = next((line for line in text.splitlines() if line.startswith("flags")), "")
    present = set(line.partition(":")[2].split())
    return tuple(flag for flag in KERNEL_FLAGS if flag in present)


def onednn_bf16_supported() -> bool:
    """oneDNN's own answer: does it run bf16 natively here (honours ONEDNN_MAX_CPU_ISA)?"""
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    if not torch.backends.mkldnn.is_available() or check is None:
        return False
    try:
        return bool(check())
    except RuntimeError:
        return False


def cpu_has_fast_bf16() -> bool:
    """bf16 runs faster than fp32 here: the CPU has bf16 instructions, oneDNN uses them, and the
    bf16 packed linear runs (all three: an AVX2 limit on oneDNN disables the first's benefit)."""
    flags = cpu_flags()
    hardware = "avx512_bf16" in flags or "amx_bf16" in flags
    return hardware and onednn_bf16_supported() and probe_packed_linear(torch.bfloat16) is None


@lru_cache(maxsize=None)
def probe_packed_linear(dtype: torch.dtype) -> str | None:
    """None if a oneDNN-prepacked linear runs in `dtype` here and equals nn.Linear; else why not."""
    from ragspec.kernels.linear import PackedLinear, packing_available

    if not packing_available():
        return "this torch build has no oneDNN linear packing ops"
    if dtype not in PACKED_DTYPES:
        return f"no packed linear for {str(dtype).removeprefix('torch.')}"
    generator = torch.Generator().manual_seed(0)
    linear = torch.nn.Linear(32, 24).to(dtype)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(24, 32, generator=generator))
    x = torch.randn(3, 32, generator=generator).to(dtype)
    try:
        with torch.inference_mode():
            out, expected = PackedLinear(linear)(x), linear(x)
    except RuntimeError as exc:
        return _first_line(exc)
    return _mismatch(out, expected, dtype, "packed linear")


@lru_cache(maxsize=None)
def probe_small_query_attention(dtype: torch.dtype) -> str | None:
    """None if the matmul attention runs in `dtype` here and equals SDPA; else why not."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from ragspec.kernels.attention import small_query_attention

    module = torch.nn.Module().eval()
    module.num_key_value_groups = 2
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(1, 4, 3, 8, generator=generator).to(dtype)
    key, value = (torch.randn(1, 2, 11, 8, generator=generator).to(dtype) for _ in range(2))
    mask = torch.ones(1, 1, 3, 11, dtype=torch.bool).tril(diagonal=8)
    try:
        with torch.inference_mode():
            out, _ = small_query_attention(module, query, key, value, mask, scaling=0.35)
            expected, _ = sdpa_attention_forward(module, query, key, value, mask, scaling=0.35)
    except RuntimeError as exc:
        return _first_line(exc)
    return _mismatch(out, expected, dtype, "matmul attention")


def _mismatch(out: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str) -> str | None:
    tolerance = _TOLERANCE.get(dtype, 5e-2)
    if torch.allclose(out.float(), expected.float(), atol=tolerance, rtol=tolerance):
        return None
    error = (out.float() - expected.float()).abs().max().item()
    return f"{what} differs from the plain op by {error:.3g}"


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
