"""Every drafter ragspec can run, by name: the one place a new drafter is added.

An entry is a factory, called once per request with a `DraftRequest`, and the drafter's own
config dataclass (None for drafters whose knobs are SpecConfig's shared suffix-match ones).
`SpecConfig.drafters` names the entries a request runs; `SpecConfig.options` holds config
instances (the default instance of an entry's config type otherwise). The lossless tests are
parametrised over this table, so a drafter is tested the day it is registered.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ragspec.config import SamplingConfig
    from ragspec.drafting.base import Drafter
    from ragspec.engine import Engine
    from ragspec.engine.rag import RagPrompt


@dataclass(frozen=True)
class DraftRequest:
    """What a drafter factory may read about the request being set up."""

    engine: Engine  # the target (engine.target), the SpecConfig, state shared across requests
    prompt_ids: list[int]  # [prompt tokens]
    sampling: SamplingConfig
    index: Any = None  # the request's opened Index, or None
    rag: RagPrompt | None = None  # its retrieved chunks (index or documents), or None
    draft_prompt_ids: list[int] | None = None  # [draft prompt tokens]: what the RAPID drafter reads
    # instead of prompt_ids (GenerationRequest.draft_prompt, encoded), or None


DrafterFactoryFn = Callable[[DraftRequest, Any], "Drafter | None"]  # (request, config) -> drafter, None: skip


@dataclass(frozen=True)
class DrafterEntry:
    factory: DrafterFactoryFn
    # the drafter's own config dataclass, or "module:Class" imported on first use (keeps this
    # table, and so SpecConfig and the retrieval drafters, importable without torch)
    config_ref: type | str | None = None
    default: bool = True  # runs unless SpecConfig.drafters says otherwise
    summary: str = ""

    @property
    def config_type(self) -> type | None:
        if isinstance(self.config_ref, str):
            module, _, name = self.config_ref.partition(":")
            return getattr(importlib.import_module(module), name)
        return self.config_ref


def _context(request: DraftRequest, _config) -> Drafter:
    from ragspec.drafting.context_suffix import ContextSuffixDrafter
    from ragspec.drafting.continuations import new_match_estimate

    engine = request.engine
    return ContextSuffixDrafter(engine.spec, engine.shared_state("context-estimate", new_match_estimate))


def _past(request: DraftRequest, _config) -> Drafter:
    """The past-responses store of the request's index (or the one for requests without one)."""
    from ragspec.drafting.past_responses import PastResponsesDrafter
    from ragspec.index.store import PAST_RESPONSES_FILE

    engine = request.engine
    index = request.index if engine.spec.past_scope == "index" else None
    path = index.path if index is not None else None
    state = path / PAST_RESPONSES_FILE if path is not None and engine.persist_state else None

    def make() -> PastResponsesDrafter:
        return PastResponsesDrafter(engine.spec, state_path=state, vocab_size=engine.target.vocab_size)

    return engine.shared_state(f"past:{path or ''}", make)


def _recycling(request: DraftRequest, _config) -> Drafter:
    from ragspec.drafting.recycling import TokenRecyclingDrafter
    from ragspec.models import cache_dir

    engine, target = request.engine, request.engine.target

    def make() -> TokenRecyclingDrafter:
        # keyed by the model's identity (its files, or its weights), not its folder's name
        state = cache_dir() / "recycling" / f"{target.name}-{target.identity}-{target.tokenizer_fingerprint}.npy"
        return TokenRecyclingDrafter(target.vocab_size, state if engine.persist_state else None)

    return engine.shared_state("recycling", make)


def _datastore(request: DraftRequest, _config) -> Drafter | None:
    from ragspec.drafting.continuations import new_match_estimate
    from ragspec.drafting.datastore import DatastoreDrafter

    rag, engine = request.rag, request.engine
    if rag is None:
        return None
    estimate = engine.shared_state("datastore-estimate", new_match_estimate)
    if rag.datastore is not None:  # documents given with the request: all of them
        return DatastoreDrafter(rag.datastore, None, engine.spec, estimate)
    scope = rag.token_ranges if engine.spec.datastore_scope == "retrieved" else None
    return DatastoreDrafter(request.index.datastore, scope, engine.spec, estimate)


def _model(request: DraftRequest, config) -> Drafter:
    from ragspec.drafting.model import build_model_drafter

    return build_model_drafter(request, config)


def _rapid(request: DraftRequest, config) -> Drafter | None:
    from ragspec.drafting.rapid import build_rapid_drafter

    return build_rapid_drafter(request, config)


def _eagle(request: DraftRequest, config) -> Drafter:
    from ragspec.drafting.eagle import build_eagle_drafter

    return build_eagle_drafter(request, config)


def _self(request: DraftRequest, config) -> Drafter:
    from ragspec.drafting.layer_skip import build_self_drafter

    return build_self_drafter(request, config)


REGISTRY: dict[str, DrafterEntry] = {
    "context": DrafterEntry(_context, summary="suffix matches in this request's prompt and output"),
    "past": DrafterEntry(_past, summary="earlier answers (per index, or global)"),
    "recycling": DrafterEntry(_recycling, summary="the target's own earlier top-k successors"),
    "datastore": DrafterEntry(_datastore, summary="the index's token datastore (RAG requests)"),
    "model": DrafterEntry(_model, "ragspec.drafting.model:ModelDraftConfig", default=False,
                          summary="a small draft model with the target's tokenizer (dynamic tree)"),
    "eagle": DrafterEntry(_eagle, "ragspec.drafting.eagle:EagleDraftConfig", default=False,
                          summary="an EAGLE-style head over the target's own hidden states (dynamic tree)"),
    "self": DrafterEntry(_self, "ragspec.drafting.layer_skip:SelfDraftConfig", default=False,
                         summary="the target with some layers skipped (calibrated, no training)"),
    "rapid": DrafterEntry(_rapid, "ragspec.drafting.rapid:RapidConfig", default=False,
                          summary="RAPID: a model (the target itself by default) reading only the request's "
                                  "draft_prompt (retrieved chunks + question); skipped without one"),
}


def default_drafters() -> tuple[str, ...]:
    return tuple(name for name, entry in REGISTRY.items() if entry.default)


def build_drafters(names, request: DraftRequest, options: tuple = ()) -> list[Drafter]:
    """The drafters `names` make for `request`; `options`: config instances (SpecConfig.options)."""
    drafters = []
    for name in names:
        entry = REGISTRY[name]
        drafter = entry.factory(request, config_for(entry, options))
        if drafter is not None:
            drafters.append(drafter)
    return drafters


def config_for(entry: DrafterEntry, options: tuple):
    """The instance of the entry's config type in `options`, else its default one."""
    config_type = entry.config_type
    if config_type is None:
        return None
    return next((option for option in options if type(option) is config_type), None) or config_type()
