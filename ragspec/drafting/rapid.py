"""RAPID drafting (retrieval-augmented speculative decoding for long contexts): a model drafter
that reads a short prompt, the question with the document's few retrieved chunks, instead of the
whole document the target reads.

The drafter is `ModelTreeDrafter` over a `DraftLM` of its own (see ragspec.drafting.model); only
its context differs. The target's context is `prompt_ids + generated`; the drafter's is
`draft_prompt_ids + generated`: the prompt part is replaced, the generated tokens (and the pending
token) are the same. So its KV cache holds ~1k tokens where the target's holds the whole document,
and a draft forward costs attention over the short cache only. With `model="target"` the drafter is
the target's own weights reading the short context (no second model, its own small KV cache),
which pays where attention over the long cache dominates a step; a path or "auto" drafts with a
small trained draft model instead.

Lossless by default: its nodes are verified by the target like every draft (greedy: identical
output; sampling: each node carries its draft distribution for residual rejection). Opt-in and
LOSSY: `RapidConfig.lossy_transfer_eta` > 0 turns on the paper's knowledge transfer (the target's
distribution shifted toward the drafter's on its confident tokens, ragspec.drafting.
rapid_transfer): answers then differ from the target's own. The draft cost rule
is the model drafter's: a depth is drafted only while its expected accepted tokens are worth
more than its forward, a token being worth a plain target step at the current cache length.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import numpy as np

from ragspec.drafting.base import DraftContext
from ragspec.drafting.model import DraftCosts, DraftLM, ModelDraftConfig, ModelTreeDrafter, engine_draft_model
from ragspec.drafting.rapid_transfer import DEFAULT_CONFIDENCE, LossyTransfer
from ragspec.errors import ConfigError
from ragspec.models import LoadedModel
from ragspec.types import DraftTree, StepResult

if TYPE_CHECKING:
    from ragspec.drafting.registry import DraftRequest

log = logging.getLogger(__name__)

TARGET_AS_DRAFTER = "target"  # RapidConfig.model: the target's own weights read the short context
RAPID_TOP_K = 4  # chunks in the draft prompt (4 x ~192 tokens: a ~1k-token draft context)


@dataclass(frozen=True)
class RapidConfig:
    """The "rapid" drafter's knobs. `model`: "target" (the target itself, with its own KV cache of
    the short context), an HF model directory / .gguf path, "auto" (the draft model `ragspec draft
    train` made for this target) or a LoadedModel. `chunks`: how many retrieved chunks the draft
    prompt holds (read by whoever builds the draft prompt, e.g. `ragspec.longdoc`). `top_k`,
    `width`, `max_depth`, `cost_aware`: the tree, as ModelDraftConfig's.
    `lossy_transfer_eta`: RAPID's knowledge transfer, LOSSY and off (0) by default: > 0 shifts the
    target's distribution toward the drafter's on the drafter's confident tokens (q >= 
    `lossy_transfer_confidence` * max q) with this strength (the paper's eta; its code's example
    uses 10), so outputs are no longer the target's own (see ragspec.drafting.rapid_transfer).
    With it on, the drafter drafts every step (`cost_aware` is ignored): which rows get the shift
    must not depend on measured timings."""

    model: str | LoadedModel = field(default=TARGET_AS_DRAFTER, hash=False)
    chunks: int = RAPID_TOP_K
    top_k: int = 4
    width: int = 4
    max_depth: int = 6
    cost_aware: bool = True
    lossy_transfer_eta: float = 0.0
    lossy_transfer_confidence: float = DEFAULT_CONFIDENCE

    def __post_init__(self) -> None:
        if self.chunks < 1:
            raise ConfigError(f"RapidConfig.chunks must be >= 1, got {self.chunks}")
        if not (self.lossy_transfer_eta >= 0 and self.lossy_transfer_eta < float("inf")):
            raise ConfigError(f"RapidConfig.lossy_transfer_eta must be >= 0 (0: lossless), got {self.lossy_transfer_eta}")
        self.lossy_transfer()  # checks the confidence
        self.tree()  # checks top_k, width, max_depth

    def tree(self) -> ModelDraftConfig:
        """The tree drafter's config (the model is resolved separately)."""
        return ModelDraftConfig(model=None, top_k=self.top_k, width=self.width, max_depth=self.max_depth,
                                cost_aware=self.cost_aware and self.lossy_transfer_eta == 0)

    def lossy_transfer(self) -> LossyTransfer | None:
        """The knowledge transfer the decoding loop applies before acceptance; None when off (eta 0)."""
        if self.lossy_transfer_eta == 0:
            return None
        return LossyTransfer(self.lossy_transfer_eta, self.lossy_transfer_confidence, source="rapid")


class RapidDrafter:
    """A ModelTreeDrafter whose context is the draft prompt + the tokens generated so far."""

    def __init__(self, inner: ModelTreeDrafter, prompt_length: int, draft_prompt_ids: list[int],
                 lossy_target: LossyTransfer | None = None):
        self.inner = inner
        self.name = inner.name
        self.prompt_length = prompt_length  # target prompt tokens replaced by the draft prompt
        self.draft_prompt_ids = np.asarray(draft_prompt_ids, dtype=np.int64)  # [draft prompt tokens]
        # the decoding loop's hook: acceptance against the shifted target (None: lossless)
        self.lossy_target = lossy_target

    def draft_tokens(self, tokens: np.ndarray) -> np.ndarray:
        """The drafter's context for the target context `tokens` (prompt, generated, pending; at
        the first step the prompt's last token is the pending one, and the draft prompt's too)."""
        if len(tokens) < self.prompt_length:
            raise ValueError("the target context must hold the prompt")
        return np.concatenate([self.draft_prompt_ids, np.asarray(tokens[self.prompt_length :], dtype=np.int64)])

    def propose(self, context: DraftContext) -> DraftTree:
        tree = self.inner.propose(DraftContext(self.draft_tokens(context.tokens), context.max_nodes))
        if self.lossy_target is None:
            return tree
        # say whose q each ModelDraws is, so that the transfer finds it after fusion and pruning
        return replace(tree, draws={parent: tuple(replace(d, source=self.lossy_target.source) for d in draws)
                                    for parent, draws in tree.draws.items()})

    def observe(self, step: StepResult) -> None:
        self.inner.observe(step)

    @property
    def drafted_steps(self) -> int:
        return self.inner.drafted_steps

    @property
    def skipped_steps(self) -> int:
        return self.inner.skipped_steps


def rapid_draft_model(engine, model: str | LoadedModel) -> LoadedModel:
    """The target itself for "target"; otherwise the draft model (loaded once per engine)."""
    return engine.target if model == TARGET_AS_DRAFTER else engine_draft_model(engine, model)


_announced_backends: set[str] = set()


def _announce_no_torch_target(backend: str) -> None:
    """RAPID with the target as drafter runs the target's torch modules on the short context; on
    another backend (llama.cpp) it stays off, said once per backend (a draft model still works)."""
    if backend not in _announced_backends:
        _announced_backends.add(backend)
        log.warning("rapid: the target drafts for itself only on the transformers backend, not %s; RAPID stays "
                    "off (RapidConfig(model=PATH or 'auto') drafts with a draft model instead)", backend)


def build_rapid_drafter(request: DraftRequest, config: RapidConfig) -> RapidDrafter | None:
    """A fresh drafter (its own KV cache) per request that has a draft prompt; None otherwise."""
    if not request.draft_prompt_ids:
        return None
    engine = request.engine
    if config.model == TARGET_AS_DRAFTER and engine.target.backend != "transformers":
        _announce_no_torch_target(engine.target.backend)
        return None
    draft = rapid_draft_model(engine, config.model)
    costs = engine.shared_state(f"rapid-draft-costs:{draft.name}-{draft.identity}", DraftCosts)
    inner = ModelTreeDrafter(
        DraftLM.of(draft), "rapid", config.tree(), engine.budget, sampling=request.sampling,
        vocab_size=engine.target.vocab_size, costs=costs,
    )
    return RapidDrafter(inner, len(request.prompt_ids), list(request.draft_prompt_ids), config.lossy_transfer())
