"""Self-speculation without training (SWIFT-style): the target drafts for itself with some of its
decoder layers skipped.

The view shares every weight with the target (embedding, kept layers, final norm, lm_head, rotary
embedding) and runs the target's own model class over a shorter layer list, so any transformers
decoder-only model works without per-architecture code. Its decoder layers keep their
`self_attn.layer_idx`, so it writes KV into those indices of its own lazily growing cache; the
skipped layers' entries stay empty (`ragspec.kvcache` ignores them).

Which layers to skip is chosen once per model by a short calibration (a greedy search measuring
the view's top-1 agreement with the target) and cached as JSON; a request whose measured acceptance
falls far below the calibration's prediction recalibrates on its own tokens.
"""

from __future__ import annotations

import copy
import json
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from ragspec.drafting.base import DraftContext, warn_once, write_atomically
from ragspec.errors import ConfigError
from ragspec.types import ROOT, DraftTree, StepResult

log = logging.getLogger(__name__)

CHOICE_VERSION = 1  # of the cached skip-set JSON
MAX_CHAIN = 8  # longest draft chain the speed estimate considers
MIN_RECALIBRATION_TOKENS = 64  # a request recalibrates on its own tokens once it has this many
# Used when neither the prompt nor `calibration_text_path` give enough tokens (no data folder).
CALIBRATION_TEXT = """\
The old lighthouse stood at the end of a narrow spit of land, and for as long as anyone in the
village could remember it had been kept by the same family. Every evening the keeper climbed the
ninety-two steps, trimmed the wick, polished the great lens and wrote a line in the log: the
weather, the ships that passed, the hour the light was lit. When the council decided to replace
the lamp with an automatic beacon, the keeper's daughter asked to read the logs before they were
sent away. She found storms that had lasted a week, a whale that had followed a fishing boat into
the harbour, and a winter so cold that the sea froze along the shore.

To summarise a document well, first identify its main claim, then the evidence offered for it,
and finally any limitations the authors acknowledge. A good summary is shorter than the original,
uses the reader's vocabulary, and does not add opinions that the source does not contain.

def moving_average(values, window):
    \"\"\"Return the mean of each run of `window` consecutive values.\"\"\"
    if window <= 0:
        raise ValueError("window must be positive")
    total = sum(values[:window])
    averages = [total / window]
    for i in range(window, len(values)):
        total += values[i] - values[i - window]
        averages.append(total / window)
    return averages

Question: What is the capital of France, and why is it important?
Answer: The capital of France is Paris. It is the country's political, economic and cultural
centre, home to the national government, major museums such as the Louvre, and many companies.
"""


@dataclass(frozen=True)
class SelfDraftConfig:
    """Knobs of the "self" drafter. `draft`: the model-tree drafter's own knobs
    (ragspec.drafting.model.ModelDraftConfig; None: its defaults)."""

    min_skip_ratio: float = 0.2  # skip at least this share of the layers ...
    max_skip_ratio: float = 0.7  # ... and at most this share
    calibration_tokens: int = 256  # tokens the skip set is chosen on (prompt, else the text)
    calibration_text_path: str | None = None  # a text file to calibrate on; None: a built-in text
    search_shortlist: int = 4  # greedy rounds after the first re-measure this many best candidates
    min_predicted_speedup: float = 1.0  # requests get no drafter while the skip set predicts less (0: always)
    recalibrate_below: float = 0.5  # recalibrate when measured agreement < this x predicted (0: never) ...
    monitor_steps: int = 32  # ... as an EMA over this many steps (and after at least this many)
    skipped: tuple[int, ...] | None = None  # a fixed skip set: no calibration, no recalibration
    draft: object | None = None  # ModelDraftConfig for the tree drafter

    def __post_init__(self) -> None:
        if self.skipped is not None:
            object.__setattr__(self, "skipped", tuple(sorted({int(i) for i in self.skipped})))
        if not 0.0 <= self.min_skip_ratio <= self.max_skip_ratio < 1.0:
            raise ConfigError(f"need 0 <= min_skip_ratio <= max_skip_ratio < 1, got {self.min_skip_ratio}, "
                              f"{self.max_skip_ratio}")
        if self.calibration_tokens < 8 or self.search_shortlist < 1 or self.monitor_steps < 1:
            raise ConfigError("calibration_tokens >= 8, search_shortlist >= 1 and monitor_steps >= 1 are needed")
        if self.min_predicted_speedup < 0:
            raise ConfigError(f"min_predicted_speedup must be >= 0, got {self.min_predicted_speedup}")
        if not 0.0 <= self.recalibrate_below <= 1.0:
            raise ConfigError(f"recalibrate_below must be in [0, 1], got {self.recalibrate_below}")


# ---------------------------------------------------------------------------------------------
# The view


def decoder_layers(model) -> torch.nn.ModuleList:
    """The decoder-layer list of a transformers causal LM (`model.model.layers` and alike)."""
    layers = getattr(getattr(model, model.base_model_prefix, None), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        from ragspec.errors import UnsupportedModel

        raise UnsupportedModel(f"{type(model).__name__} has no decoder-layer list: it cannot skip layers")
    return layers


def layer_skip_view(model, skipped: Sequence[int]) -> torch.nn.Module:
    """The target `model` running only the layers not in `skipped`, called like the target.

    The target's own model class is built on the meta device from a copy of its config with the
    kept layers only (per-layer settings such as `layer_types` cut to match), then every submodule
    is replaced by the target's: no weight is copied and the target is not changed. Its `config`
    describes the view (for masks: `layer_windows(view.config)`). Its caches must grow lazily
    (`new_view_cache()`), as it writes the target's layer indices: called without a cache, it uses
    none (unlike the target, which would make one from its config).
    """
    layers = decoder_layers(model)
    skipped_set = {int(i) for i in skipped}
    kept = [i for i in range(len(layers)) if i not in skipped_set]
    if not kept or not skipped_set <= set(range(len(layers))):
        raise ValueError(f"cannot skip layers {sorted(skipped_set)} of {len(layers)}")
    config = copy.deepcopy(model.config)
    if getattr(config, "layer_types", None):
        config.layer_types = [config.layer_types[i] for i in kept]
    config.num_hidden_layers = len(kept)
    config.use_cache = False  # a cache made from this config would hold too few layers: pass a lazy one
    with torch.device("meta"):
        view = type(model)(config)
    base, view_base = getattr(model, model.base_model_prefix), getattr(view, model.base_model_prefix)
    for name, child in base.named_children():
        setattr(view_base, name, torch.nn.ModuleList([layers[i] for i in kept]) if child is layers else child)
    for name, child in model.named_children():
        if child is not base:
            setattr(view, name, child)
    view.training = view_base.training = False  # the new containers only; the target's modules stay
    view.skipped_layers = tuple(sorted(skipped_set))
    _check_shares_weights(view, model)
    return view


def _check_shares_weights(view: torch.nn.Module, model: torch.nn.Module) -> None:
    """Every tensor of the view is one of the target's (none left on meta, none copied)."""
    owned = {t.data_ptr() for t in [*model.parameters(), *model.buffers()]}
    for name, tensor in [*view.named_parameters(), *view.named_buffers()]:
        if tensor.is_meta or tensor.data_ptr() not in owned:
            raise RuntimeError(f"layer-skip view: {name} is not a tensor of the target model")


def new_view_cache():
    """A cache for a view: layers appear as they are written, skipped ones stay empty."""
    from ragspec import kvcache

    return kvcache.new_cache()


# ---------------------------------------------------------------------------------------------
# Cost and speed estimates


def protected_layers(num_layers: int) -> set[int]:
    """Never skipped: the first layer, and the last one where there are at least 4."""
    return {0, num_layers - 1} if num_layers >= 4 else {0}


def view_cost(model, skipped: Sequence[int]) -> float:
    """A view forward's cost relative to a target forward, by weights read: kept decoder-layer
    weights plus the lm_head's over all of them (1-token forwards on CPU are bound by weight
    reads; the embedding is a lookup and not counted)."""
    layer_sizes = [sum(p.numel() for p in layer.parameters()) for layer in decoder_layers(model)]
    head = model.get_output_embeddings()
    head_size = head.weight.numel() if head is not None else 0
    kept = sum(size for i, size in enumerate(layer_sizes) if i not in set(skipped))
    return (kept + head_size) / (sum(layer_sizes) + head_size)


def predicted_speedup(agreement: float, cost: float, max_chain: int = MAX_CHAIN) -> float:
    """Expected tokens per unit of time, relative to plain decoding, of drafting chains of the best
    length with a drafter whose tokens are each accepted with probability `agreement` and cost
    `cost` of a target forward (Leviathan et al.: (1 - a^(k+1)) / ((1 - a)(k c + 1))). Below 1:
    the drafter loses whatever the chain length."""
    best = 0.0
    for length in range(1, max_chain + 1):
        tokens = length + 1.0 if agreement >= 1.0 else (1.0 - agreement ** (length + 1)) / (1.0 - agreement)
        best = max(best, tokens / (length * cost + 1.0))
    return best


# ---------------------------------------------------------------------------------------------
# Calibration


@dataclass(frozen=True)
class SkipChoice:
    """A calibrated skip set and what the calibration measured of it."""

    skipped: tuple[int, ...]  # [skipped layers], increasing
    num_layers: int
    agreement: float  # the view's top-1 agreement with the target over the calibration tokens
    cost: float  # view forward / target forward (view_cost)
    speedup: float  # predicted_speedup(agreement, cost)
    calibration_tokens: int
    source: str  # "prompt", "text" or "request" (recalibrated on a request's tokens)
    forwards: int = 0  # view forwards the search ran
    version: int = CHOICE_VERSION

    @classmethod
    def from_json(cls, data: dict, num_layers: int) -> SkipChoice:
        """Checked: a malformed or foreign record raises ValueError."""
        choice = cls(
            skipped=tuple(int(i) for i in data["skipped"]), num_layers=int(data["num_layers"]),
            agreement=float(data["agreement"]), cost=float(data["cost"]), speedup=float(data["speedup"]),
            calibration_tokens=int(data["calibration_tokens"]), source=str(data["source"]),
            forwards=int(data.get("forwards", 0)), version=int(data["version"]),
        )
        if choice.version != CHOICE_VERSION or choice.num_layers != num_layers:
            raise ValueError(f"record for {choice.num_layers} layers (version {choice.version})")
        if not choice.skipped or list(choice.skipped) != sorted(set(choice.skipped)):
            raise ValueError("skipped layers must be distinct and increasing")
        if set(choice.skipped) & protected_layers(num_layers) or choice.skipped[-1] >= num_layers:
            raise ValueError(f"cannot skip layers {choice.skipped} of {num_layers}")
        if not all(0.0 <= v <= 1.0 for v in (choice.agreement, choice.cost)):
            raise ValueError("agreement and cost must lie in [0, 1]")
        return choice


@torch.inference_mode()
def top1(module, tokens: torch.Tensor) -> torch.Tensor:
    """The argmax next token at every position of `tokens` ([1, n]), one forward. [n] int64"""
    return module(input_ids=tokens, use_cache=False).logits[0].argmax(-1)


def agreement_of(model, skipped: Sequence[int], tokens: torch.Tensor, target_top: torch.Tensor) -> float:
    """Share of positions where the view skipping `skipped` picks the target's top-1 token."""
    return float((top1(layer_skip_view(model, skipped), tokens) == target_top).float().mean())


def calibrate(model, tokens: torch.Tensor, config: SelfDraftConfig, source: str = "text") -> SkipChoice:
    """Choose the layers to skip on `tokens` ([1, n]) by a greedy search.

    Round 1 measures skipping each candidate layer alone; each later round adds one layer to the
    set, re-measuring only the `search_shortlist` candidates that scored best when last measured
    (a layer's effect changes little as the set grows). Along the way every set of an allowed size
    is scored by `predicted_speedup`; the best one wins (ties: fewer layers skipped). The search
    stops early once no larger set can win: agreement rarely rises as layers go, so the current
    agreement at the cheapest allowed cost bounds what is left.
    """
    num_layers = len(decoder_layers(model))
    candidates = [i for i in range(num_layers) if i not in protected_layers(num_layers)]
    lowest = max(1, math.ceil(config.min_skip_ratio * num_layers))
    highest = min(len(candidates), math.floor(config.max_skip_ratio * num_layers))
    if not candidates or highest < 1:
        raise ValueError(f"a {num_layers}-layer model leaves no layer to skip within the ratio bounds")
    target_top = top1(model, tokens)
    scores = {layer: agreement_of(model, [layer], tokens, target_top) for layer in candidates}
    forwards, skipped, best = len(candidates), [], None
    cheapest = view_cost(model, sorted(candidates, key=lambda c: -scores[c])[:highest])
    while len(skipped) < highest:
        remaining = sorted((c for c in candidates if c not in skipped), key=lambda c: -scores[c])
        if skipped:  # round 1's scores are fresh
            for layer in remaining[: config.search_shortlist]:
                scores[layer] = agreement_of(model, [*skipped, layer], tokens, target_top)
                forwards += 1
            remaining.sort(key=lambda c: -scores[c])
        skipped.append(remaining[0])
        agreement, cost = scores[remaining[0]], view_cost(model, skipped)
        speedup = predicted_speedup(agreement, cost)
        log.debug("self-draft calibration: skip %s: agreement %.3f, cost %.3f, predicted %.2fx",
                  sorted(skipped), agreement, cost, speedup)
        if len(skipped) >= lowest and (best is None or speedup > best.speedup):
            best = SkipChoice(tuple(sorted(skipped)), num_layers, agreement, cost, speedup,
                              int(tokens.shape[1]), source)
        if best is not None and predicted_speedup(agreement, cheapest) <= best.speedup:
            break
    assert best is not None
    log.info("self-draft calibration: skip %s of %d layers, top-1 agreement %.3f, cost %.3f, predicted %.2fx "
             "(%d view forwards over %d tokens)", list(best.skipped), num_layers, best.agreement, best.cost,
             best.speedup, forwards, tokens.shape[1])
    return replace(best, forwards=forwards)


def calibration_ids(tokenizer, prompt_ids: Sequence[int], config: SelfDraftConfig) -> tuple[list[int], str]:
    """The tokens to calibrate on and where they come from: the prompt's last
    `calibration_tokens` when it has that many, else the text file's (or the built-in text's)."""
    if len(prompt_ids) >= config.calibration_tokens:
        return list(prompt_ids[-config.calibration_tokens:]), "prompt"
    text = CALIBRATION_TEXT
    if config.calibration_text_path is not None:
        try:
            text = Path(config.calibration_text_path).read_text(encoding="utf-8", errors="replace")
        except OSError as exc:
            log.warning("cannot read calibration text %s (%s); using the built-in text", config.calibration_text_path, exc)
    ids = list(tokenizer(text[: 16 * config.calibration_tokens]).input_ids)[: config.calibration_tokens]
    return ids, "text"


# ---------------------------------------------------------------------------------------------
# The cached choice per model


def choice_path(target) -> Path:
    """Where the skip set of `target` (a LoadedModel) is cached: per fingerprint (model, shape,
    device, dtype, kernels) and identity (its weights: two in-process models of one name differ)."""
    from ragspec.models import cache_dir

    return cache_dir() / "self-draft" / f"{target.fingerprint}-{target.identity}.json"


def read_choice(path: Path, num_layers: int) -> SkipChoice | None:
    """The cached choice; None when absent, and None with a warning when unreadable or malformed."""
    if not path.is_file():
        return None
    try:
        return SkipChoice.from_json(json.loads(path.read_bytes()), num_layers)
    except Exception as exc:  # noqa: BLE001 - a bad cache file only costs a recalibration
        log.warning("ignoring unreadable self-draft skip set %s (%s: %s); recalibrating", path, type(exc).__name__, exc)
        return None


def save_choice(path: Path, choice: SkipChoice) -> bool:
    """Cache `choice` (atomic replace); False, with a warning once, when that fails."""
    payload = json.dumps(asdict(choice), indent=1).encode()
    try:
        write_atomically(path, lambda file: file.write(payload))
    except Exception as exc:  # noqa: BLE001 - an unwritable cache only costs recalibrating next time
        warn_once(path, "cannot save the self-draft skip set to %s: %s", path, exc)
        return False
    return True


def fits(choice: SkipChoice, config: SelfDraftConfig) -> bool:
    """The cached choice respects the config's skip-ratio bounds."""
    skipped = len(choice.skipped)
    return max(1, math.ceil(config.min_skip_ratio * choice.num_layers)) <= skipped <= math.floor(
        config.max_skip_ratio * choice.num_layers)


def load_or_calibrate(target, tokens: Sequence[int], config: SelfDraftConfig, source: str) -> SkipChoice:
    """The cached skip set of `target` (a LoadedModel) when it fits `config`, else a calibration
    on `tokens` (from `calibration_ids`), cached for next time."""
    path = choice_path(target)
    choice = read_choice(path, len(decoder_layers(target.model)))
    if choice is None or not fits(choice, config):
        choice = calibrate(target.model, torch.tensor([list(tokens)], device=target.device), config, source)
        save_choice(path, choice)
    return choice


# ---------------------------------------------------------------------------------------------
# The drafter


class SelfDraftState:
    """An engine's skip set and the view running it, shared by its requests. A recalibration
    replaces both (requests already running keep the view they drafted with until they switch)."""

    def __init__(self, target, config: SelfDraftConfig, prompt_ids: Sequence[int]):
        self.target = target
        self.config = config
        num_layers = len(decoder_layers(target.model))
        if config.skipped is not None:
            if not config.skipped or set(config.skipped) & protected_layers(num_layers) or config.skipped[-1] >= num_layers:
                from ragspec.errors import ConfigError

                raise ConfigError(f"SelfDraftConfig.skipped={config.skipped}: choose layers of 0..{num_layers - 1} "
                                  f"other than {sorted(protected_layers(num_layers))}")
            self.choice: SkipChoice | None = None
            self.view = layer_skip_view(target.model, config.skipped)
        else:
            ids, source = calibration_ids(target.tokenizer, prompt_ids, config)
            self._use(load_or_calibrate(target, ids, config, source))

    @property
    def predicted_agreement(self) -> float | None:
        """What the calibration measured; None for a fixed skip set (nothing to compare with)."""
        return None if self.choice is None else self.choice.agreement

    def recalibrate(self, tokens: Sequence[int], persist: bool) -> None:
        """Choose again on a request's own `tokens` (its last `calibration_tokens`)."""
        ids = list(tokens[-self.config.calibration_tokens:])
        choice = calibrate(self.target.model, torch.tensor([ids], device=self.target.device), self.config, "request")
        if persist:
            save_choice(choice_path(self.target), choice)
        self._use(choice)

    def _use(self, choice: SkipChoice) -> None:
        self.choice = choice
        self.view = layer_skip_view(self.target.model, choice.skipped)


class AgreementMonitor:
    """EMA over about `steps` drafted steps of whether the view's top-1 token at the pending
    position was the target's; `due` once it has that many samples and sits below `below` x the
    calibration's agreement."""

    def __init__(self, predicted: float, steps: int, below: float):
        self.predicted, self.steps, self.below = predicted, steps, below
        self.samples = 0
        self.rate = predicted

    def update(self, hit: bool) -> bool:
        self.samples += 1
        self.rate += (float(hit) - self.rate) / min(self.samples, self.steps)
        return self.samples >= self.steps and self.rate < self.below * self.predicted


class SelfSpecDrafter:
    """The "self" drafter: a `ModelTreeDrafter` over the engine's layer-skip view, which watches its
    own top-1 agreement and, when it falls far below the calibration's (the request's text is
    unlike the calibration text), recalibrates once on the request's tokens and drafts on with the
    new view (its own cache refilled from the context on the next propose)."""

    name = "self"

    def __init__(self, state: SelfDraftState, config: SelfDraftConfig,
                 make_inner: Callable[[torch.nn.Module], object], persist: bool):
        self.state = state
        self.config = config
        self._make_inner = make_inner
        self._persist = persist
        self.inner = make_inner(state.view)  # None once a recalibration predicts a loss: drafts nothing
        predicted = state.predicted_agreement
        self.monitor = None if predicted is None else AgreementMonitor(predicted, config.monitor_steps,
                                                                        config.recalibrate_below)
        self.recalibrated = False
        self._tokens: np.ndarray | None = None  # the last propose's context tokens
        self._view_top1: int | None = None  # the view's top-1 token at the last pending position

    def propose(self, context: DraftContext) -> DraftTree:
        if self.inner is None:
            return DraftTree.empty()
        self._tokens = context.tokens
        tree = self.inner.propose(context)
        self._view_top1 = root_top1(tree)
        return tree

    def observe(self, step: StepResult) -> None:
        if self.inner is None:
            return
        self.inner.observe(step)
        view_top1, self._view_top1 = self._view_top1, None
        if view_top1 is None or self.monitor is None or self.recalibrated:
            return
        if self.monitor.update(view_top1 == int(step.logits[0].argmax())):
            tokens = [*self._tokens.tolist(), *step.accept.accepted_tokens, step.accept.bonus_token]
            if len(tokens) >= min(self.config.calibration_tokens, MIN_RECALIBRATION_TOKENS):
                self._recalibrate(tokens)

    def _recalibrate(self, tokens: list[int]) -> None:
        """Costs the calibration's forwards (`SkipChoice.forwards` view forwards over up to
        `calibration_tokens` tokens), once per request."""
        before = self.monitor.rate
        self.state.recalibrate(tokens, self._persist)
        self.recalibrated = True
        choice = self.state.choice
        pays = choice.speedup >= self.config.min_predicted_speedup
        self.inner = self._make_inner(self.state.view) if pays else None
        log.info("self-draft: top-1 agreement %.2f fell below %.2f x %.2f predicted; recalibrated on the "
                 "request's %d tokens: skip %s, predicted %.2fx%s", before, self.monitor.below,
                 self.monitor.predicted, min(len(tokens), self.config.calibration_tokens), list(choice.skipped),
                 choice.speedup, "" if pays else ": drafting stops")


def root_top1(tree: DraftTree) -> int | None:
    """The draft model's most probable token at the pending position, if its tree says: the
    best-scoring child of the root (greedy: the top-k children hold it), or the argmax of the
    root's draw distribution (sampling: the children are random draws)."""
    draws = tree.draws.get(ROOT)
    if draws:
        return int(draws[0].probs.argmax())
    roots = np.flatnonzero(tree.parents == ROOT)
    if not len(roots) or tree.draft_probs is None:
        return None
    return int(tree.token_ids[roots[np.argmax(tree.draft_probs[roots])]])


_announced_off: set[SkipChoice] = set()  # choices whose "stays off" was already logged


def announce_off(choice: SkipChoice, message: str, *args) -> None:
    """Warn once per choice (then debug): every request would repeat it."""
    (log.debug if choice in _announced_off else log.warning)(message, *args)
    _announced_off.add(choice)


def build_self_drafter(request, config: SelfDraftConfig) -> SelfSpecDrafter | None:
    """The registry's factory: the view is built (and the skip set calibrated or read from the
    cache) once per engine and config; each request gets its own tree drafter and KV cache.

    None (no drafter for the request) while the calibrated skip set predicts a speedup below
    `min_predicted_speedup`: its view then agrees too rarely for what a forward costs, and even
    the tree drafter's cost rule, which would stop drafting after a few steps, still pays for
    those steps and for its periodic re-measuring."""
    from ragspec.drafting.model import (
        DraftCosts,
        DraftLM,
        ModelDraftConfig,
        ModelTreeDrafter,
    )

    engine, target = request.engine, request.engine.target
    if target.backend != "transformers":
        raise ConfigError(f"the 'self' drafter runs the target's own torch layers: it needs the transformers "
                          f"backend, not {target.backend}")
    key = f"self-draft:{(config.min_skip_ratio, config.max_skip_ratio, config.calibration_tokens, config.skipped)}"
    state = engine.shared_state(key, lambda: SelfDraftState(target, config, request.prompt_ids))
    if state.choice is not None and state.choice.speedup < config.min_predicted_speedup:
        choice = state.choice
        announce_off(choice, "self-draft: skipping %s of %d layers predicts %.2fx plain decoding (top-1 agreement "
                     "%.2f at %.2f of a target forward): the self drafter stays off", list(choice.skipped),
                     choice.num_layers, choice.speedup, choice.agreement, choice.cost)
        return None

    def make_inner(view: torch.nn.Module) -> ModelTreeDrafter:
        """A tree drafter over `view`; the cost rule's measurements are shared per skip set."""
        lm = DraftLM(view, view.config, device=target.device, dtype=target.dtype, new_cache=new_view_cache,
                     context_length=target.context_length)
        costs = engine.shared_state(f"self-draft-costs:{view.skipped_layers}", DraftCosts)
        return ModelTreeDrafter(lm, SelfSpecDrafter.name, config.draft or ModelDraftConfig(), engine.budget,
                                sampling=request.sampling, vocab_size=target.vocab_size,
                                costs=costs)

    return SelfSpecDrafter(state, config, make_inner, engine.persist_state)
