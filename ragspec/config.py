"""Frozen configuration dataclasses, validated when built."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from ragspec.errors import ConfigError

MAX_SEED = 2**64 - 1  # what torch.Generator.manual_seed takes
# Below this, logits / temperature overflows float32 for ordinary logits (1e-45 gives inf and a
# crash in sampling); such a temperature means "always the top token": 0 (greedy) says that.
MIN_TEMPERATURE = 1e-3


@dataclass(frozen=True)
class SamplingConfig:
    """How the next token is chosen. temperature 0 means greedy."""

    temperature: float = 0.0
    top_k: int = 0  # 0 = no top-k filter
    top_p: float = 1.0  # 1.0 = no nucleus filter
    seed: int | None = None

    def __post_init__(self) -> None:
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise ConfigError(f"temperature must be >= 0, got {self.temperature}")
        if 0 < self.temperature < MIN_TEMPERATURE:
            raise ConfigError(f"temperature {self.temperature} is too close to 0 to sample with: use 0 for "
                              f"greedy decoding, or {MIN_TEMPERATURE} or more")
        if self.seed is not None and not 0 <= self.seed <= MAX_SEED:
            raise ConfigError(f"seed must be in 0..2**64-1, got {self.seed}")
        if self.top_k < 0:
            raise ConfigError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0




def _default_drafters() -> tuple[str, ...]:
    from ragspec.drafting.registry import default_drafters

    return default_drafters()


@dataclass(frozen=True)
class SpecConfig:
    """Speculation knobs. Defaults suit the embedded model on a CPU and a GPU alike."""

    enabled: bool = True
    max_nodes: int = 64  # hard cap on draft-tree nodes verified per step (the pending token excluded)
    min_nodes: int = 0  # 0 lets the budget switch speculation off for a step
    # context suffix drafter
    max_match: int = 64  # longest suffix match measured, in tokens
    max_occurrences: int = 32  # earlier occurrences of the match turned into tree branches
    max_depth: int = 32  # deepest continuation drafted
    # which drafters run, by name in ragspec.drafting.registry (default: its default ones):
    # context (this request's tokens), past (earlier answers), recycling (the target's own
    # earlier top-k), datastore (the index, for requests that use one), ...
    drafters: tuple[str, ...] = field(default_factory=_default_drafters)
    options: tuple = ()  # config dataclass instances of the drafters that have one (registry)
    # fusion (RASD): where a model drafter left its distribution at a tree node, children it gives
    # less than this probability are dropped with their subtrees. 0 (the default) keeps every
    # node: with the draft model trained here (22% top-1 agreement) pruning at 0.02 cut the mean
    # acceptance length from 1.51 to 1.30 (docs/bench/cpu-fp32-fusion-ablation.md); it pays only
    # with a draft model that judges retrieved tokens well
    min_draft_prob: float = 0.0
    datastore_scope: str = "retrieved"  # "retrieved" chunks of the request, or the whole "index"
    # past responses: one store per "index" (requests without one share another), or one "global"
    # store; with Engine(persist_state=True) a per-index store is saved in the index directory
    past_scope: str = "index"

    def with_drafter(self, name: str, option=None) -> "SpecConfig":
        """This config with drafter `name` added (once), and `option` replacing any option of its type."""
        drafters = self.drafters if name in self.drafters else (*self.drafters, name)
        options = self.options
        if option is not None:
            options = (*(kept for kept in options if type(kept) is not type(option)), option)
        return replace(self, drafters=drafters, options=options)

    def __post_init__(self) -> None:
        if self.max_nodes < 0 or self.min_nodes < 0 or self.min_nodes > self.max_nodes:
            raise ConfigError(
                f"need 0 <= min_nodes <= max_nodes, got {self.min_nodes} and {self.max_nodes}"
            )
        if self.max_depth < 1 or self.max_occurrences < 1 or self.max_match < 1:
            raise ConfigError("max_depth, max_occurrences and max_match must be >= 1")
        from ragspec.drafting.registry import REGISTRY

        unknown = set(self.drafters) - set(REGISTRY)
        if unknown:
            raise ConfigError(f"unknown drafters {sorted(unknown)}: choose from {', '.join(REGISTRY)}")
        object.__setattr__(self, "drafters", tuple(self.drafters))
        if not 0.0 <= self.min_draft_prob < 1.0:
            raise ConfigError(f"min_draft_prob must be in [0, 1), got {self.min_draft_prob}")
        if self.datastore_scope not in ("retrieved", "index"):
            raise ConfigError(f"datastore_scope must be 'retrieved' or 'index', got {self.datastore_scope!r}")
        if self.past_scope not in ("index", "global"):
            raise ConfigError(f"past_scope must be 'index' or 'global', got {self.past_scope!r}")
