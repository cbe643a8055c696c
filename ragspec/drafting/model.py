"""Draft-model drafting: a small causal LM with the target's tokenizer grows a dynamic token tree.

Two parts:

- `DraftLM` runs any module called like a transformers causal LM over its own KV cache: the
  committed tokens (`cached_ids`), then a "block" of rows for this step: the pending token (block
  row 0) and the tree rows fed so far. Tree rows see the committed rows, the pending row, their
  own ancestors and themselves, at position committed length + depth: the verifier's tree
  attention, applied to the drafter's own cache.
- `ModelTreeDrafter` grows an EAGLE-2-style tree with it. One forward of the pending token gives
  the draft distribution q at the root and its best children; then, per depth, the `width`
  newest candidates with the highest cumulative score (product of q along the path, so scores
  never rise from parent to child) are fed in one batched forward and their best `top_k`
  children join the candidates. Greedy requests take the top-k children (deterministic nodes);
  sampling requests draw them at random without replacement from q (processed like the target's
  distribution) and record the draws (`DraftTree.draws`) for lossless residual rejection. Either
  way q at every expanded node stays in `draws` (greedy: with no tokens drawn), for the
  fusion's RASD pruning of other drafters' nodes the model finds implausible.

After verify, `observe` keeps the cache rows of the pending token and of the accepted nodes
that were fed and drops the rest, so the next step feeds only what is missing (the bonus token,
or an accepted leaf). Whatever happens in between (a skipped step, another request's tokens),
the next `propose` syncs the cache to the committed tokens by their longest common prefix.

Draft cost: see `ModelTreeDrafter` (a depth is drafted only when its expected extra accepted
tokens are worth more than its forward costs).
"""

from __future__ import annotations

import hashlib
import inspect
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING

import numpy as np
import torch

from ragspec import kvcache
from ragspec.config import SamplingConfig
from ragspec.drafting.base import DraftContext, ema
from ragspec.drafting.tree import prune
from ragspec.errors import ConfigError
from ragspec.models import LoadedModel
from ragspec.types import ROOT, DraftTree, ModelDraws, StepResult
from ragspec.verify.tree_attention import layer_windows, tree_attention_masks, tree_position_ids

if TYPE_CHECKING:
    from ragspec.drafting.registry import DraftRequest
    from ragspec.engine.budget import NodeBudget

SYNC_CHUNK = 256  # committed tokens fed per forward when catching up (bounds the mask's size)
EXPLORE_EVERY = 32  # steps skipped by the cost rule before one is drafted anyway to re-measure ...
MAX_EXPLORE_EVERY = 1024  # ... doubling after each re-measure that still does not pay, up to this
COST_EMA = 0.2  # weight of the newest forward in the draft-cost averages
CALIBRATION_EMA = 0.05  # weight of the newest step in the accepted / predicted averages, once
# enough steps were seen: before that the averages are plain means (the prior counting as one
# step), so a poor draft model is found out in a few steps rather than ~20-30


@dataclass(frozen=True)
class ModelDraftConfig:
    """The "model" drafter's knobs. `model`: an HF model directory or .gguf file loaded on the
    target's device and dtype, or a LoadedModel; it must share the target's tokenizer."""

    model: str | LoadedModel | None = field(default=None, hash=False)
    top_k: int = 4  # children added per expanded node
    width: int = 6  # candidates expanded (fed) per depth
    max_depth: int = 6  # deepest node drafted
    cost_aware: bool = True  # False: always draft to max_depth (tests, acceptance measurements)

    def __post_init__(self) -> None:
        for name in ("top_k", "width", "max_depth"):
            if getattr(self, name) < 1:
                raise ConfigError(f"ModelDraftConfig.{name} must be >= 1, got {getattr(self, name)}")


class DraftLM:
    """A causal LM and its own KV cache: `cached_ids` (committed tokens, cache rows [0, P)), then
    the block rows of the step being drafted (`block_tokens`, `block_parents`: row 0 the pending
    token, each later row a tree node whose parent is an earlier block row).

    `module` is called as `module(input_ids=[1, m], attention_mask=additive 4D [1, 1, m, rows]
    (or one per layer type), position_ids=[1, m], cache=cache, use_cache=True)` and returns
    `.logits` [1, m, vocab]. Every call passes explicit masks and positions, and lengths come
    from `kvcache.cache_length`, so caches that leave layers empty (a layer-skipping view of the
    target) work too. `new_cache` makes an empty cache (default `kvcache.new_cache(config)`).
    """

    def __init__(self, module, config, *, device: torch.device | str, dtype: torch.dtype,
                 new_cache: Callable[[], object] | None = None, context_length: int | None = None):
        self.module = module
        self.config = config
        self.windows = layer_windows(config)
        self.device = torch.device(device)
        self.dtype = dtype
        self.context_length = context_length or int(getattr(config, "max_position_embeddings", 2048))
        self._new_cache = new_cache or partial(kvcache.new_cache, config)
        self.cache = self._new_cache()
        self.cached_ids: list[int] = []  # [P] committed tokens held in cache rows [0, P)
        self.block_tokens: list[int] = []  # [block rows] pending token, then fed tree nodes
        self.block_parents: list[int] = []  # [block rows] parent block row; -1 for the pending row
        self._keeps_logits = _accepts_argument(module, "logits_to_keep")

    @classmethod
    def of(cls, loaded: LoadedModel) -> "DraftLM":
        return cls(loaded.model, loaded.model.config, device=loaded.device, dtype=loaded.dtype,
                   context_length=loaded.context_length)

    @property
    def past_length(self) -> int:
        return len(self.cached_ids)

    def sync(self, tokens: Sequence[int]) -> int:
        """Make the cache hold exactly `tokens[:-1]` (tokens: committed, then the pending token),
        keeping the longest common prefix; returns the tokens fed."""
        committed = np.asarray(tokens[:-1], dtype=np.int64).tolist()
        missing = self._drop_to_common_prefix(committed)
        self._feed_causal(missing)
        self.cached_ids = committed
        return len(missing)

    def open_block(self, tokens: Sequence[int]) -> tuple[torch.Tensor, int]:
        """`sync(tokens)` and feed the pending token `tokens[-1]` as block row 0, in one forward.
        Returns its logits [vocab] float32 and the rows fed (missing committed tokens + 1)."""
        committed = np.asarray(tokens[:-1], dtype=np.int64).tolist()
        missing = self._drop_to_common_prefix(committed)
        pending = int(tokens[-1])
        logits = self._feed_causal([*missing, pending])
        self.cached_ids = committed
        self.block_tokens, self.block_parents = [pending], [-1]
        return logits, len(missing) + 1

    @torch.inference_mode()
    def feed(self, tokens: Sequence[int], parents: Sequence[int]) -> torch.Tensor:
        """Feed tree rows in one forward. parents[i]: the block row of token i's parent (an
        existing row, or an earlier row of this call). Returns logits [m, vocab] float32."""
        if not self.block_tokens:
            raise RuntimeError("DraftLM.feed needs an open block (open_block first)")
        first = len(self.block_tokens)
        if any(not 0 <= p < first + i for i, p in enumerate(parents)):
            raise ValueError("tree rows' parents must be earlier block rows")
        self.block_tokens += [int(t) for t in tokens]
        self.block_parents += [int(p) for p in parents]
        tree_parents = np.asarray(self.block_parents[1:], dtype=np.int64) - 1  # block row r = node r - 1
        return self._forward([int(t) for t in tokens], tree_parents, self.past_length, len(tokens), last_only=False,
                             parent_rows=[int(p) for p in parents])

    @torch.inference_mode()
    def commit(self, rows: Sequence[int]) -> None:
        """Keep block `rows` (0 first, then a path of its descendants, top-down) as committed
        tokens; drop every other block row."""
        rows = [int(r) for r in rows]
        if rows and (rows[0] != 0 or any(self.block_parents[b] != a for a, b in zip(rows, rows[1:]))):
            raise ValueError("committed block rows must be the pending row and a path below it")
        base = self.past_length
        kvcache.keep_rows(self.cache, base, base + np.asarray(rows, dtype=np.int64))
        self.cached_ids += [self.block_tokens[r] for r in rows]
        self.block_tokens, self.block_parents = [], []

    def drop_block(self) -> None:
        kvcache.crop(self.cache, self.past_length)
        self.block_tokens, self.block_parents = [], []

    def _drop_to_common_prefix(self, committed: list[int]) -> list[int]:
        """Crop the cache to the rows `committed` starts with; return the tokens still missing."""
        shared = kvcache.common_prefix_length(self.cached_ids, committed)
        kvcache.crop(self.cache, shared)
        self.cached_ids = self.cached_ids[:shared]
        self.block_tokens, self.block_parents = [], []
        return committed[shared:]

    @torch.inference_mode()
    def _feed_causal(self, tokens: list[int]) -> torch.Tensor | None:
        """Append `tokens` as ordinary causal rows, SYNC_CHUNK per forward; the last row's
        logits [vocab] float32 (None when nothing was fed). Updates `cached_ids` as it goes."""
        logits = None
        for start in range(0, len(tokens), SYNC_CHUNK):
            chunk = tokens[start : start + SYNC_CHUNK]
            chain = np.arange(len(chunk) - 1, dtype=np.int64) - 1  # row i's parent is row i - 1
            past = kvcache.cache_length(self.cache)
            logits = self._forward(chunk, chain, past, len(chunk), last_only=True)[-1]
            self.cached_ids = self.cached_ids + chunk
        return logits

    def _forward(self, ids: list[int], tree_parents: np.ndarray, past: int, new_rows: int,
                 last_only: bool, parent_rows: list[int] | None = None) -> torch.Tensor:
        """Feed the last `new_rows` rows of the tree [row 0, nodes with `tree_parents`] that sits on
        `past` committed rows (the earlier rows are already in the cache). `parent_rows`: the fed
        rows' parents as block rows when they are tree rows (None: causal rows)."""
        device = self.device
        positions = tree_position_ids(tree_parents, past, device)
        masks = tree_attention_masks(self.windows, tree_parents, past, self.dtype, device, positions)
        mask = {kind: m[:, :, -new_rows:] for kind, m in masks.items()} if isinstance(masks, dict) else masks[:, :, -new_rows:]
        return self._run(ids, mask, positions[:, -new_rows:], last_only, parent_rows)

    def _run(self, ids: list[int], mask, positions: torch.Tensor, last_only: bool,
             parent_rows: list[int] | None) -> torch.Tensor:
        """The module over the fed rows: logits [rows (1 if last_only), vocab] float32."""
        arguments = dict(input_ids=torch.tensor([ids], device=self.device), attention_mask=mask,
                         position_ids=positions, cache=self.cache, use_cache=True)
        if last_only and self._keeps_logits:
            arguments["logits_to_keep"] = 1
        logits = self.module(**arguments).logits[0]
        return (logits[-1:] if last_only else logits).float()


def _accepts_argument(module, name: str) -> bool:
    try:
        return name in inspect.signature(getattr(module, "forward", module)).parameters
    except (TypeError, ValueError):
        return False


@dataclass
class _Candidates:
    """The tree being drafted, parents first. `row[i]`: node i's block row once fed, else -1."""

    token_ids: list[int] = field(default_factory=list)
    parents: list[int] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)  # product of q along the path
    draft_probs: list[float] = field(default_factory=list)  # q(token | parent path)
    deterministic: list[bool] = field(default_factory=list)
    depths: list[int] = field(default_factory=list)
    rows: list[int] = field(default_factory=list)
    draws: dict[int, tuple[ModelDraws, ...]] = field(default_factory=dict)
    index: dict[tuple[int, int], int] = field(default_factory=dict)  # (parent, token) -> node

    def __len__(self) -> int:
        return len(self.token_ids)

    def add(self, parent: int, token: int, prob: float, deterministic: bool) -> None:
        parent_score, parent_depth = (1.0, 0) if parent == ROOT else (self.scores[parent], self.depths[parent])
        self.index[parent, token] = len(self.token_ids)
        self.token_ids.append(token)
        self.parents.append(parent)
        self.scores.append(parent_score * prob)
        self.draft_probs.append(prob)
        self.deterministic.append(deterministic)
        self.depths.append(parent_depth + 1)
        self.rows.append(-1)

    def child(self, parent: int, token: int) -> int | None:
        """Node index of `token` under `parent`, if drafted."""
        return self.index.get((parent, token))

    def build(self, source: str) -> DraftTree:
        deterministic = np.asarray(self.deterministic, dtype=bool)
        return DraftTree(
            token_ids=np.asarray(self.token_ids, dtype=np.int64),
            parents=np.asarray(self.parents, dtype=np.int64),
            scores=np.asarray(self.scores, dtype=np.float64),
            sources=(source,) * len(self),
            draft_probs=np.asarray(self.draft_probs, dtype=np.float64),
            deterministic=None if deterministic.all() else deterministic,
            draws=dict(self.draws),
        )


@dataclass
class _Proposal:
    """What `propose` left for `observe`: the pending token and the candidates it drafted."""

    pending_token: int
    candidates: _Candidates


@dataclass
class DraftCosts:
    """What the cost rule learns. One per engine and draft model, shared by its requests, so a
    request starts from what earlier ones measured (and one that would not pay skips at once,
    without even feeding the draft model its prompt)."""

    root_s: float | None = None  # EMA seconds of a root forward feeding few rows
    tree_s: float | None = None  # EMA seconds of a batched tree forward (incl. choosing children)
    child_mass: float | None = None  # EMA of the top-k children's summed q per expanded node
    accepted: float = 1.0  # EMA of the accepted nodes only this drafter proposed, per verified step
    predicted: float = 1.0  # EMA of their summed scores per verified step
    verified_steps: int = 0  # steps that verified some of the drafter's nodes
    step_s: float | None = None  # EMA of observed verify seconds (plain steps preferred)
    plain_seen: bool = False
    skipped: int = 0  # steps skipped in a row
    explore_every: int = EXPLORE_EVERY  # skipped steps before the next re-measuring step

    def calibration(self) -> float:
        return float(np.clip(self.accepted / self.predicted, 0.1, 4.0))


class ModelTreeDrafter:
    """EAGLE-2-style dynamic tree drafting with a `DraftLM` (see the module docstring).

    Draft cost. Drafting a depth costs one forward of the draft model (EMA of measured seconds;
    the root forward, which also catches the cache up, separately). Expanding frontier nodes
    with summed cumulative scores S adds, in expectation, about c * m * S accepted tokens: m is
    the q mass of the top-k children per expanded node (EMA, measured in our own forwards) and c
    the drafter's calibration (its nodes' accepted count over their summed scores, among the
    nodes the target verified; EMA, learned in `observe`). A token is worth the seconds of a
    plain target step (`budget().predicted_seconds(0)[0]`, else the measured verify time of
    observed steps). A depth is drafted only if c * m * S * token_seconds > forward seconds;
    when even the root forward does not pay, the step proposes an empty tree and feeds nothing
    (the next drafted step catches the cache up in one forward). After EXPLORE_EVERY skipped
    steps one step is drafted anyway, to re-measure the costs and the calibration; while such
    steps keep finding that drafting does not pay, the interval doubles (up to
    MAX_EXPLORE_EVERY). `costs` (DraftCosts) may be shared by the drafters of one draft model.
    """

    def __init__(
        self,
        lm: DraftLM,
        name: str,
        config: ModelDraftConfig,
        budget: Callable[[], NodeBudget | None] | None = None,
        *,
        sampling: SamplingConfig | None = None,
        generator: torch.Generator | None = None,
        vocab_size: int | None = None,
        costs: DraftCosts | None = None,
    ):
        """`vocab_size`: the target's; draft logits are cut or padded (-inf) to it. `generator`:
        for sampled children (default: seeded by `drafter_generator(sampling.seed, name)`).
        `costs`: the cost rule's measurements, shared across requests (default: this one's own)."""
        self.lm = lm
        self.name = name
        self.config = config
        self.budget = budget
        self.sampling = sampling or SamplingConfig()
        self.generator = generator or drafter_generator(self.sampling.seed, name)
        self.vocab_size = vocab_size
        self._proposal: _Proposal | None = None
        self.costs = costs or DraftCosts()
        self.drafted_steps = 0  # steps that ran the draft model (stats, tests)
        self.skipped_steps = 0

    # ---- propose -------------------------------------------------------------------------

    def propose(self, context: DraftContext) -> DraftTree:
        """The `context.max_nodes` best candidates by cumulative score (a connected tree)."""
        self._proposal = None
        tokens = context.tokens
        limit = context.max_nodes
        max_depth = min(self.config.max_depth, limit, self.lm.context_length - len(tokens))  # positions left
        if max_depth <= 0:
            return DraftTree.empty()
        costs = self.costs
        if self._pays(1.0, costs.root_s):
            costs.explore_every = EXPLORE_EVERY
        elif costs.skipped < costs.explore_every:
            costs.skipped += 1
            self.skipped_steps += 1
            return DraftTree.empty()
        else:  # re-measure, and wait longer before the next time if it still does not pay
            costs.explore_every = min(2 * costs.explore_every, MAX_EXPLORE_EVERY)
        costs.skipped = 0
        self.drafted_steps += 1
        candidates = _Candidates()
        start = time.perf_counter()
        logits, fed = self.lm.open_block(tokens)
        self._add_children(candidates, [ROOT], logits[None])
        if fed <= 2:  # a usual step (the pending token, maybe one accepted leaf), not a catch-up
            costs.root_s = ema(costs.root_s, time.perf_counter() - start, COST_EMA)
        for _depth in range(2, max_depth + 1):
            frontier = self._frontier(candidates, limit)
            if not frontier or not self._pays(sum(candidates.scores[n] for n in frontier), costs.tree_s):
                break
            start = time.perf_counter()
            self._expand(candidates, frontier)
            costs.tree_s = ema(costs.tree_s, time.perf_counter() - start, COST_EMA)
        self._proposal = _Proposal(int(tokens[-1]), candidates)
        return prune(candidates.build(self.name), limit)

    def _frontier(self, candidates: _Candidates, limit: int) -> list[int]:
        """The nodes to expand next: of the deepest depth's, the `width` best by cumulative score
        (ties: older first) that could still enter the final tree. A child scores at most its
        parent, so once `limit` candidates exist, a node scoring no more than the limit-th best
        cannot add a node to the best `limit` (EAGLE-2's reranking, stopped early)."""
        deepest = max(candidates.depths, default=0)
        newest = [n for n in range(len(candidates)) if candidates.depths[n] == deepest and candidates.scores[n] > 0]
        if len(candidates) >= limit:
            bar = sorted(candidates.scores, reverse=True)[limit - 1]
            newest = [n for n in newest if candidates.scores[n] > bar]
        newest.sort(key=lambda n: -candidates.scores[n])
        return sorted(newest[: self.config.width])

    def _expand(self, candidates: _Candidates, frontier: list[int]) -> None:
        """Feed the frontier nodes in one batched forward; add their children."""
        first_row = len(self.lm.block_tokens)
        parent_rows = [0 if candidates.parents[n] == ROOT else candidates.rows[candidates.parents[n]] for n in frontier]
        logits = self.lm.feed([candidates.token_ids[n] for n in frontier], parent_rows)
        for offset, node in enumerate(frontier):
            candidates.rows[node] = first_row + offset
        self._add_children(candidates, frontier, logits)

    def _add_children(self, candidates: _Candidates, parents: list[int], logits: torch.Tensor) -> None:
        """Children of each parent (ROOT or a node) from its logits row [len(parents), vocab]: top-k
        (greedy) or drawn without replacement (sampling); q at each parent goes into `draws`."""
        probs = self._draft_probs(logits).cpu()  # [rows, vocab]
        k = min(self.config.top_k, probs.shape[-1])
        if self.sampling.greedy:
            chosen_probs, chosen = probs.topk(k, dim=-1)  # [rows, k]
            drawn = list(zip(chosen.tolist(), chosen_probs.tolist()))
        else:
            drawn = [draw_without_replacement(row, k, self.generator) for row in probs]
        for parent, row, (tokens, token_probs) in zip(parents, probs, drawn):
            # q at the parent: the tokens drawn from it when sampling; greedy top-k children are
            # no draws, but q stays for the fusion's RASD pruning (drop_implausible)
            candidates.draws[parent] = (ModelDraws(probs=row, tokens=() if self.sampling.greedy else tuple(tokens)),)
            for token, q in zip(tokens, token_probs):
                if q > 0:
                    candidates.add(parent, token, q, deterministic=self.sampling.greedy)
            self.costs.child_mass = ema(self.costs.child_mass, float(sum(token_probs)), COST_EMA)

    def _draft_probs(self, logits: torch.Tensor) -> torch.Tensor:
        """q over the target's vocabulary: greedy requests the plain softmax, sampling ones the
        target's processing (temperature, top-k, top-p). [rows, vocab] float32."""
        if self.vocab_size is not None and logits.shape[-1] != self.vocab_size:
            if logits.shape[-1] > self.vocab_size:
                logits = logits[:, : self.vocab_size]
            else:
                pad = logits.new_full((logits.shape[0], self.vocab_size - logits.shape[-1]), float("-inf"))
                logits = torch.cat([logits, pad], dim=-1)
        if self.sampling.greedy:
            return logits.float().softmax(-1)
        from ragspec.sampling import target_probs

        return target_probs(logits, self.sampling)

    # ---- the cost rule -------------------------------------------------------------------

    def token_seconds(self) -> float | None:
        """What one more committed token is worth: a plain target step's seconds."""
        budget = self.budget() if self.budget is not None else None
        if budget is not None:
            return float(budget.predicted_seconds(0)[0])
        return self.costs.step_s

    def _pays(self, frontier_score: float, forward_s: float | None) -> bool:
        """Whether expanding frontier nodes with summed cumulative score `frontier_score` is worth
        a forward of `forward_s` seconds (unknown costs are measured by drafting)."""
        if not self.config.cost_aware or forward_s is None:
            return True
        token_s = self.token_seconds()
        if token_s is None:
            return True
        mass = 1.0 if self.costs.child_mass is None else self.costs.child_mass
        return self.costs.calibration() * mass * frontier_score * token_s > forward_s

    # ---- observe -------------------------------------------------------------------------

    def observe(self, step: StepResult) -> None:
        self._learn_step_seconds(step)
        proposal, self._proposal = self._proposal, None
        if proposal is None:
            return
        if step.pending_token != proposal.pending_token or not self.lm.block_tokens:
            self.lm.drop_block()
            return
        candidates = proposal.candidates
        rows, node = [0], ROOT
        for token in step.accept.accepted_tokens:
            node = candidates.child(node, token)
            if node is None or candidates.rows[node] < 0:
                break
            rows.append(candidates.rows[node])
        self.lm.commit(rows)
        self._learn_calibration(step, candidates)

    def _learn_step_seconds(self, step: StepResult) -> None:
        if step.verify_s <= 0:
            return
        costs, plain = self.costs, step.tree.num_nodes == 0
        if plain and not costs.plain_seen:
            costs.plain_seen, costs.step_s = True, None  # plain steps replace tree-step estimates
        if plain or not costs.plain_seen:
            costs.step_s = ema(costs.step_s, step.verify_s, COST_EMA)

    def _learn_calibration(self, step: StepResult, candidates: _Candidates) -> None:
        """The tokens this drafter's drafting adds, per unit of its predicted score: accepted nodes
        that it alone proposed (a fused tree credits a shared node to the drafter listed first,
        and the model drafters come after the retrieval ones), over the summed scores of all its
        nodes the target verified. Alone, every node is its own; fused, nodes a retrieval drafter
        proposed too would be accepted without it, so they do not pay for its forwards."""
        mine: list[int | None] = []  # step-tree node -> my node
        for token, parent in zip(step.tree.token_ids.tolist(), step.tree.parents.tolist()):
            my_parent = ROOT if parent == ROOT else mine[parent]
            mine.append(None if my_parent is None else candidates.child(my_parent, token))
        verified = [node for node in mine if node is not None]
        if not verified:
            return
        predicted = sum(candidates.scores[node] for node in verified)
        sources = step.tree.sources
        accepted = sum(1 for node in step.accept.accepted_nodes if mine[node] is not None and sources[node] == self.name)
        costs = self.costs
        costs.verified_steps += 1
        weight = max(CALIBRATION_EMA, 1.0 / (costs.verified_steps + 1))  # a mean with the prior, then an EMA
        costs.predicted = ema(costs.predicted, predicted, weight)
        costs.accepted = ema(costs.accepted, accepted, weight)



def draw_without_replacement(probs: torch.Tensor, k: int, generator: torch.Generator) -> tuple[list[int], list[float]]:
    """Up to `k` distinct tokens drawn from `probs` [vocab] (CPU) without replacement, in draw
    order, and their probabilities. Gumbel-top-k: sorting log p - log E (E ~ Exp(1), one per
    token) gives the order of successive draws, each from p with the earlier ones removed."""
    noise = torch.empty(probs.shape, dtype=torch.float64).exponential_(generator=generator)
    keys = probs.double().log() - noise.log()
    order = keys.topk(min(k, int((probs > 0).sum()))).indices.tolist()
    return order, probs[order].tolist()


def drafter_generator(seed: int | None, name: str) -> torch.Generator:
    """A CPU generator for a drafter's random draws. Seeded requests get a seed derived from the
    request's and the drafter's name, never the request seed itself: the acceptance step draws
    from a generator seeded with that, and draws must not share its random numbers."""
    generator = torch.Generator()
    if seed is None:
        generator.seed()
    else:
        digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
        generator.manual_seed(int.from_bytes(digest[:8], "little") >> 1)
    return generator


# ---- the registry's factory ------------------------------------------------------------------


def load_draft_model(model: str | LoadedModel | None, target: LoadedModel) -> LoadedModel:
    """The draft model: a LoadedModel as given, or a path loaded on the target's device and in
    its dtype ("auto": the one `ragspec draft train` made for this target, trained first if
    missing). Refused (ConfigError) unless it has the target's tokenizer."""
    if model is None:
        raise ConfigError('the "model" drafter needs a draft model: SpecConfig(drafters=(..., "model"), '
                          'options=(ModelDraftConfig(model="path/to/model"),)) or --draft-model PATH')
    if isinstance(model, LoadedModel):
        draft = model
    else:
        from ragspec.models import load_model
        from ragspec.training.resolve import AUTO, resolve_draft_model

        path = resolve_draft_model(model, target) if model == AUTO else model
        draft = load_model(str(path), device=str(target.device), dtype=target.dtype)
    check_tokenizer(draft, target)
    return draft


def check_tokenizer(draft: LoadedModel, target: LoadedModel) -> None:
    if draft.tokenizer_fingerprint != target.tokenizer_fingerprint:
        raise ConfigError(
            f"draft model {draft.name} has another tokenizer than target {target.name}: vocabulary "
            f"fingerprints {draft.tokenizer_fingerprint} and {target.tokenizer_fingerprint} differ "
            "(a draft model must share the target's tokenizer)"
        )


def engine_draft_model(engine, model: str | LoadedModel | None) -> LoadedModel:
    """The draft model for `engine`: a LoadedModel as given, a path loaded once per engine."""
    if isinstance(model, LoadedModel) or model is None:
        return load_draft_model(model, engine.target)
    return engine.shared_state(f"draft-model:{model}", lambda: load_draft_model(model, engine.target))


def build_model_drafter(request: DraftRequest, config: ModelDraftConfig) -> ModelTreeDrafter:
    """A fresh drafter (own KV cache and generator) per request; the weights and the cost rule's
    measurements are shared."""
    engine = request.engine
    draft = engine_draft_model(engine, config.model)
    costs = engine.shared_state(f"model-draft-costs:{draft.name}-{draft.identity}", DraftCosts)
    return ModelTreeDrafter(
        DraftLM.of(draft), "model", config, engine.budget, sampling=request.sampling,
        vocab_size=engine.target.vocab_size, costs=costs,
    )
