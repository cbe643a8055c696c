"""What a benchmark run is asked to do (the first module of bench/: everything else imports it)."""

from __future__ import annotations

from dataclasses import dataclass

from ragspec.bench.peers import DEFAULT_METHODS
from ragspec.bench.workloads import DEFAULT_WORKLOADS
from ragspec.config import SamplingConfig
from ragspec.errors import ConfigError

EXPERIMENT_NAMES = ("past-twice", "drafter-ablation", "longdoc-sessions")
DEFAULT_LIMIT = 3
FULL_LIMIT = 10
DEFAULT_DATA_DIR = "../shared/data"
DEFAULT_JSON = "bench-results/report.json"


@dataclass(frozen=True)
class BenchOptions:
    workloads: tuple[str, ...] = DEFAULT_WORKLOADS
    methods: tuple[str, ...] = DEFAULT_METHODS
    data_dir: str = DEFAULT_DATA_DIR
    limit: int | None = DEFAULT_LIMIT  # prompts per workload; None = all
    max_new_tokens: int = 128
    max_context_tokens: int = 5500  # long documents are cut to this many tokens
    min_document_tokens: int = 0  # long documents shorter than this (after the cut) are left out
    dtype: str | None = None  # None: the engine's own choice (bf16 on CPUs that run it fast)
    model: str | None = None  # None: the embedded model
    json_path: str = DEFAULT_JSON  # report.md and the PNG plots go beside it
    plots: bool = True
    warmup: bool = True
    experiments: tuple[str, ...] = ()  # EXPERIMENT_NAMES; run after the workloads
    experiment_limit: int | None = None  # questions; None: 10 for past-twice, `limit` per ablation category;
    # longdoc-sessions: documents per L-Eval set (None: 1), every question of each
    draft_model: str | None = None  # a draft model's path, or "auto" (trained here for the embedded
    # target); with one, `ragspec` fuses it with the retrieval drafters and ragspec-model/hf-assisted run
    eagle_head: str = "auto"  # ragspec-eagle / ragspec-plus-eagle's head folder ("auto": trained here if missing)
    temperature: float = 0.0  # > 0: every method samples (outputs are then not compared)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"limit must be >= 1, got {self.limit}")
        if not self.workloads or not self.methods:
            raise ConfigError("give at least one workload and one method")
        unknown = [name for name in self.experiments if name not in EXPERIMENT_NAMES]
        if unknown:
            raise ConfigError(f"unknown experiment {unknown[0]!r}: use {' or '.join(EXPERIMENT_NAMES)}")
        SamplingConfig(temperature=self.temperature, seed=self.seed)  # checks both
        if self.experiment_limit is not None and self.experiment_limit < 1:
            raise ConfigError(f"experiment_limit must be >= 1, got {self.experiment_limit}")
