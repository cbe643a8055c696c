"""The dataclasses that pass between stages: propose -> fuse -> verify -> accept -> commit.

Trees are parent-index arrays. Node i's parent is `parents[i]`; ROOT (-1) is the pending token
(the last committed token, whose KV is not yet in the cache). Parents always come before their
children (`parents[i] < i`), so one pass over the arrays visits a tree top-down.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # annotations only: the drafting core imports without torch (vLLM proposer)
    import torch

ROOT = -1


@dataclass(frozen=True)
class ModelDraws:
    """Tokens a model drafter drew at random, in draw order, without replacement, from `probs`.

    Draw i came from `probs` with draws 0..i-1 removed and renormalised: lossless sampling
    (ragspec.sampling.acceptance) needs exactly that distribution for its residual rejection.
    A draw stays listed even if its node was pruned from the tree.
    """

    probs: torch.Tensor  # [vocab] float32, the drafter's distribution at the parent (sampling applied)
    tokens: tuple[int, ...]  # [draws] distinct token ids, in the order they were drawn
    source: str = ""  # the drafter that drew them, where one says so (RAPID's lossy transfer reads its q)


@dataclass(frozen=True)
class DraftTree:
    """A draft token tree. Retrieval drafters fill the first four arrays only; model drafters
    also say what their model thinks of each node (`draft_probs`) and, when sampling, which
    children they drew at random from which distribution (`draws`).

    `deterministic[i]`: node i was proposed whatever the random draws (every retrieval node,
    and a model's top-k children); lossless sampling treats it as a point-mass candidate. A node
    drawn at random by a model and proposed by no one else is not deterministic. None: all are.
    """

    token_ids: np.ndarray  # [num_nodes] int64
    parents: np.ndarray  # [num_nodes] int64, ROOT or an index < own index
    scores: np.ndarray  # [num_nodes] float64, estimated P(this node is accepted); never above the parent's
    sources: tuple[str, ...]  # [num_nodes] the drafter that proposed each node (first proposer wins)
    draft_probs: np.ndarray | None = None  # [num_nodes] float64, a model's P(token | parent path); NaN: none
    deterministic: np.ndarray | None = None  # [num_nodes] bool; None: every node
    draws: dict[int, tuple[ModelDraws, ...]] = field(default_factory=dict)  # parent node (ROOT too) -> draws

    def __post_init__(self) -> None:
        n = len(self.token_ids)
        if not (len(self.parents) == len(self.scores) == len(self.sources) == n):
            raise ValueError("DraftTree arrays must have one entry per node")
        if n and np.any(self.parents >= np.arange(n)):
            raise ValueError("DraftTree parents must come before their children")
        for name in ("draft_probs", "deterministic"):
            values = getattr(self, name)
            if values is not None and len(values) != n:
                raise ValueError(f"DraftTree {name} must have one entry per node")
        if any(parent != ROOT and not 0 <= parent < n for parent in self.draws):
            raise ValueError("DraftTree draws must be keyed by ROOT or a node of the tree")

    @property
    def num_nodes(self) -> int:
        return len(self.token_ids)

    def is_deterministic(self) -> np.ndarray:
        """`deterministic`, filled in: [num_nodes] bool."""
        return np.ones(self.num_nodes, dtype=bool) if self.deterministic is None else self.deterministic

    def model_probs(self) -> np.ndarray:
        """`draft_probs`, filled in with NaN: [num_nodes] float64."""
        return np.full(self.num_nodes, np.nan) if self.draft_probs is None else self.draft_probs

    @classmethod
    def empty(cls) -> "DraftTree":
        return cls(
            token_ids=np.zeros(0, dtype=np.int64),
            parents=np.zeros(0, dtype=np.int64),
            scores=np.zeros(0, dtype=np.float64),
            sources=(),
        )


@dataclass(frozen=True)
class VerifyOutput:
    """Target logits for the pending token (row 0) and every tree node (row i + 1)."""

    logits: torch.Tensor  # [1 + num_nodes, vocab] float32
    verify_s: float
    hidden: TargetHidden | None = None  # only while a drafter asked for them (LoadedModel.tap_hidden)


@dataclass(frozen=True)
class TargetHidden:
    """The target's final hidden states (its LM head's input) for the rows one forward fed: a
    verify's [pending token, node 0, ...], or a prefill's prompt tokens after the reused prefix."""

    start: int  # position of row 0 in the sequence
    values: torch.Tensor  # [rows, hidden] in the target's dtype


@dataclass(frozen=True)
class AcceptResult:
    accepted_nodes: list[int]  # tree node indices along the accepted path, top-down
    accepted_tokens: list[int]  # their token ids (same length)
    bonus_token: int  # the target's own token after the accepted path; the next pending token

    @property
    def num_accepted(self) -> int:
        return len(self.accepted_tokens)


@dataclass(frozen=True)
class StepResult:
    """What one decoding step committed, handed to every drafter's `observe`."""

    tree: DraftTree
    accept: AcceptResult
    logits: torch.Tensor  # [1 + num_nodes, vocab] the verify logits (recycling drafters read them)
    draft_s: float
    verify_s: float
    pending_token: int = -1  # the token verify row 0 stands for (the last committed token)
    hidden: TargetHidden | None = None  # the verify's (or the prefill's) hidden states, when tapped


@dataclass
class SpecStats:
    """Per-request speculation metrics. Names follow vLLM's where one exists."""

    num_steps: int = 0
    num_generated_tokens: int = 0
    num_draft_tokens: int = 0  # tree nodes verified
    num_accepted_tokens: int = 0  # draft tokens accepted (bonus tokens excluded)
    prefill_s: float = 0.0
    cached_prompt_tokens: int = 0  # leading prompt tokens whose KV came from the prefix cache
    draft_s: float = 0.0
    verify_s: float = 0.0
    total_s: float = 0.0
    time_to_first_token_s: float = 0.0
    accepted_per_depth: list[int] = field(default_factory=list)  # [depth] accepted tokens at depth d+1
    acceptance_histogram: list[int] = field(default_factory=list)  # [k] steps that accepted k drafts
    accepted_per_source: dict[str, int] = field(default_factory=dict)
    drafted_per_source: dict[str, int] = field(default_factory=dict)
    draft_latencies_s: dict[str, list[float]] = field(default_factory=dict)  # [steps] per source

    def record(self, step: StepResult) -> None:
        self.num_steps += 1
        self.num_draft_tokens += step.tree.num_nodes
        self.num_accepted_tokens += step.accept.num_accepted
        self.draft_s += step.draft_s
        self.verify_s += step.verify_s
        k = step.accept.num_accepted
        _bump(self.acceptance_histogram, k)
        for depth in range(k):
            _bump(self.accepted_per_depth, depth)
        for source in step.tree.sources:
            self.drafted_per_source[source] = self.drafted_per_source.get(source, 0) + 1
        for node in step.accept.accepted_nodes:
            source = step.tree.sources[node]
            self.accepted_per_source[source] = self.accepted_per_source.get(source, 0) + 1

    @property
    def mean_acceptance_length(self) -> float:
        """Tokens committed per target forward, bonus token included (1.0 = plain decoding)."""
        return (self.num_accepted_tokens + self.num_steps) / self.num_steps if self.num_steps else 0.0

    @property
    def draft_acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.num_generated_tokens / self.total_s if self.total_s > 0 else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        decode_s = self.total_s - self.prefill_s
        return self.num_generated_tokens / decode_s if decode_s > 0 else 0.0

    def as_dict(self) -> dict:
        return {
            "num_steps": self.num_steps,
            "num_generated_tokens": self.num_generated_tokens,
            "num_draft_tokens": self.num_draft_tokens,
            "num_accepted_tokens": self.num_accepted_tokens,
            "mean_acceptance_length": self.mean_acceptance_length,
            "draft_acceptance_rate": self.draft_acceptance_rate,
            "tokens_per_s": self.tokens_per_s,
            "decode_tokens_per_s": self.decode_tokens_per_s,
            "time_to_first_token_s": self.time_to_first_token_s,
            "prefill_s": self.prefill_s,
            "cached_prompt_tokens": self.cached_prompt_tokens,
            "draft_s": self.draft_s,
            "verify_s": self.verify_s,
            "total_s": self.total_s,
            "accepted_per_depth": list(self.accepted_per_depth),
            "acceptance_histogram": list(self.acceptance_histogram),
            "accepted_per_source": dict(self.accepted_per_source),
            "drafted_per_source": dict(self.drafted_per_source),
            "draft_latency_p50_ms": {k: 1000 * float(np.median(v)) for k, v in self.draft_latencies_s.items()},
        }


def _bump(counts: list[int], index: int) -> None:
    while len(counts) <= index:
        counts.append(0)
    counts[index] += 1


class TokenBuffer:
    """Growable int64 array of the request's tokens: committed ones, then the pending one."""

    def __init__(self, tokens: Sequence[int]):
        self._data = np.zeros(max(64, 2 * len(tokens)), dtype=np.int64)
        self._length = 0
        self.extend(tokens)

    def extend(self, tokens: Sequence[int]) -> None:
        end = self._length + len(tokens)
        if end > len(self._data):
            self._data = np.concatenate([self._data, np.zeros(end, dtype=np.int64)])
        self._data[self._length : end] = tokens
        self._length = end

    def view(self) -> np.ndarray:
        return self._data[: self._length]

    def __len__(self) -> int:
        return self._length
