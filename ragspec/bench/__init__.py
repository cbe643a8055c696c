"""Benchmark harness: ragspec vs plain decoding vs transformers peers on real workloads."""

from ragspec.bench.experiments import EXPERIMENTS
from ragspec.bench.options import BenchOptions
from ragspec.bench.peers import DEFAULT_METHODS
from ragspec.bench.runner import run_benchmark
from ragspec.bench.workloads import (
    DEFAULT_WORKLOADS,
    FULL_WORKLOADS,
    Request,
    Workload,
    load_workload,
)

__all__ = [
    "DEFAULT_METHODS",
    "DEFAULT_WORKLOADS",
    "EXPERIMENTS",
    "FULL_WORKLOADS",
    "BenchOptions",
    "Request",
    "Workload",
    "load_workload",
    "run_benchmark",
]
