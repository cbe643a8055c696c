"""What a loaded model runs on here, and why (`ragspec info`): device, dtype, the CPU flags the
kernels depend on, the torch build, the kernels chosen with their probe and timing results, and
the cached verify-latency curve."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ragspec.kernels import probe
from ragspec.kernels.select import KernelPlan

if TYPE_CHECKING:
    from ragspec.engine.budget import LatencyCurve


@dataclass
class RuntimeInfo:
    model: str
    device: str
    dtype: str
    fingerprint: str  # the latency curve's cache key (model, device, dtype, kernels)
    cpu_flags: tuple[str, ...]  # the probe.KERNEL_FLAGS this CPU reports
    aten_capability: str  # the SIMD level ATen's CPU kernels use (ATEN_CPU_CAPABILITY lowers it)
    onednn_isa_limit: str  # ONEDNN_MAX_CPU_ISA, "" when unset
    onednn_bf16: bool  # oneDNN runs bf16 natively here
    fast_bf16: bool  # the auto dtype on this CPU is bf16
    torch_version: str
    torch_build: str  # BLAS/oneDNN/CUDA of this torch build
    threads: int
    kernels: KernelPlan | None  # None when the model was not loaded through load_model
    latency_curve: LatencyCurve | None  # the cached curve for `fingerprint`, if measured
    latency_curve_path: str


def runtime_info(target) -> RuntimeInfo:
    """The report for a LoadedModel (see `ragspec.load_model`)."""
    from ragspec.engine.budget import read_curve
    from ragspec.models import cache_dir

    curve_path = cache_dir() / "latency" / f"{target.fingerprint}.json"
    return RuntimeInfo(
        model=target.name,
        device=str(target.device),
        dtype=str(target.dtype).removeprefix("torch."),
        fingerprint=target.fingerprint,
        cpu_flags=probe.cpu_flags(),
        aten_capability=torch.backends.cpu.get_cpu_capability(),
        onednn_isa_limit=os.environ.get("ONEDNN_MAX_CPU_ISA", ""),
        onednn_bf16=probe.onednn_bf16_supported(),
        fast_bf16=probe.cpu_has_fast_bf16(),
        torch_version=torch.__version__,
        torch_build=torch_build(),
        threads=torch.get_num_threads(),
        kernels=target.kernels,
        latency_curve=read_curve(curve_path),
        latency_curve_path=str(curve_path),
    )


def torch_build() -> str:
    """The oneDNN and BLAS versions and CUDA of this torch build, in one line."""
    shown = torch.__config__.show()
    onednn = re.search(r"MKL-DNN (v[\d.]+)", shown)
    blas = re.search(r"BLAS_INFO=(\w+)", shown)
    parts = [
        f"oneDNN {onednn.group(1)}" if onednn else "no oneDNN",
        f"BLAS {blas.group(1)}" if blas else "BLAS unknown",
        f"CUDA {torch.version.cuda}" if torch.version.cuda else "no CUDA",
    ]
    return ", ".join(parts)


def format_info(info: RuntimeInfo) -> list[str]:
    """The report as lines of text."""
    lines = [
        f"model: {info.model}",
        f"device: {info.device}   dtype: {info.dtype}   threads: {info.threads}",
        f"torch: {info.torch_version} ({info.torch_build})",
        f"cpu flags: {' '.join(info.cpu_flags) or 'none found'}",
        f"ATen CPU capability: {info.aten_capability}; oneDNN ISA limit: {info.onednn_isa_limit or 'none'}; "
        f"oneDNN bf16: {'yes' if info.onednn_bf16 else 'no'}; auto dtype on this CPU: "
        f"{'bfloat16' if info.fast_bf16 else 'float32'}",
    ]
    if info.kernels is not None:
        lines += [f"kernel linear: {info.kernels.linear.chosen} ({info.kernels.linear.reason})",
                  f"kernel attention: {info.kernels.attention.chosen} ({info.kernels.attention.reason})"]
    curve = info.latency_curve
    if curve is None:
        lines.append(f"latency curve: not measured yet (measured on first generate; cached in {info.latency_curve_path})")
    else:
        points = ", ".join(f"{rows}: {seconds * 1000:.1f}" for rows, seconds in zip(curve.rows, curve.seconds))
        lines.append(f"latency curve (verify rows: ms): {points}")
        lines.append(f"  cached in {info.latency_curve_path}")
    return lines
