"""ragspec's retrieval drafters as a vLLM speculative proposer (`method="custom_class"`).

    LLM(model=..., speculative_config={"method": "custom_class",
                                       "model": "ragspec.vllm.RagspecProposer",
                                       "num_speculative_tokens": 6},
        additional_config={"ragspec": {"index": "/srv/indexes/docs", "drafters": ["context", "past", "datastore"]}})

vLLM calls `propose(sampled_token_ids, num_tokens_no_spec, token_ids_cpu)` once per step with
one row per running request and no request ids (docs/scaling.md). Each row is drafted like a
ragspec request (context suffix over the row's own tokens, earlier answers, the index's token
datastore), the drafts are fused into one tree, and the tree is cut to its best chain by the
NodeBudget's calibrated scores, because vLLM verifies chains only (never more than
`num_speculative_tokens` tokens: more crashes the engine). The step is then planned as a whole
(step_cost.py): the rows' chain tokens, ranked by calibrated P(accepted), are kept while they
raise expected committed tokens per second on the step-cost curve measured between propose()
calls. Drafts never change vLLM's output: it verifies every token, so a wrong match only costs
speed.

Requests are recognised by content (`row_keys`): a row whose tokens extend a known request's by
exactly the tokens sampled this step continues that request, wherever the row moved to. A
request whose row is gone has finished or was preempted: its answer goes to the past-responses
store, and its state waits in a small pool for a resume (vLLM re-prefills a preempted request
with all its tokens, so its row key matches again).

Imports numpy-only ragspec modules: no torch, no transformers (vLLM pins its own).

Speed (scripts/vllm_propose_timing.py): a step's work per row is proportional to its new tokens,
not its length: the content keys of every row come from one vectorised gather, the suffix
indexes grow by the sampled tokens, and each row's trie, scores and best chain are built on
Python lists (a few dozen nodes, where numpy's per-call overhead is most of the cost).
"""

from __future__ import annotations

import atexit
import hashlib
import json
import logging
import os
import platform
import time
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from ragspec.config import SpecConfig
from ragspec.drafting.base import AcceptanceEstimate, DraftContext
from ragspec.drafting.context_suffix import ContextSuffixDrafter
from ragspec.drafting.continuations import ContinuationDrafter, ScoredTrie, new_match_estimate
from ragspec.drafting.datastore import DatastoreDrafter
from ragspec.drafting.past_responses import PastResponsesDrafter
from ragspec.drafting.tree import fuse
from ragspec.engine.budget import LatencyCurve, NodeBudget, calibrate
from ragspec.errors import ConfigError
from ragspec.types import ROOT, DraftTree, TokenBuffer
from ragspec.vllm.step_cost import StepCosts, plan_step

log = logging.getLogger(__name__)

KEY_TOKENS = 16  # tokens hashed at each end of a row for its content key
SAVE_EVERY_STEPS = 16  # measured steps between saves of the step-cost curves ...
SAVE_EVERY_S = 10.0  # ... and seconds
SUPPORTED_DRAFTERS = ("context", "past", "datastore")  # the drafters that need no model


@dataclass(frozen=True)
class ProposerSettings:
    """`additional_config={"ragspec": {...}}`; every field optional."""

    drafters: tuple[str, ...] = ("context", "past")  # "datastore" is added when `index` is set
    index: str | None = None  # an index directory (or a name under $RAGSPEC_INDEX_HOME), opened read-only
    past_responses: str | None = None  # a .npy file shared by replicas (loaded at start, saved per answer)
    past_max_tokens: int = 200_000  # tokens of earlier answers held in memory
    max_match: int = 32  # longest suffix match measured (SpecConfig.max_match)
    max_occurrences: int = 8  # earlier occurrences turned into branches (SpecConfig.max_occurrences)
    min_score: float = 0.05  # a chain stops at the first node whose calibrated P(accepted) is lower
    adaptive: bool = True  # the step's drafts planned on the step-cost curve learned from vLLM's step times (step_cost.py)
    persist_step_cost: bool = True  # the curves saved under cache_dir() per model/device, loaded at start
    resume_pool: int = 256  # departed requests kept (tokens only) for a resume after preemption

    def __post_init__(self) -> None:
        drafters = tuple(self.drafters)
        if self.index is not None and "datastore" not in drafters:
            drafters += ("datastore",)
        unknown = set(drafters) - set(SUPPORTED_DRAFTERS)
        if unknown:
            raise ConfigError(f"RagspecProposer runs {', '.join(SUPPORTED_DRAFTERS)}; not {sorted(unknown)} "
                              "(vLLM gives a proposer no logits and no model)")
        if "datastore" in drafters and self.index is None:
            raise ConfigError("the datastore drafter needs additional_config ragspec.index")
        if not 0.0 <= self.min_score < 1.0:
            raise ConfigError(f"min_score must be in [0, 1), got {self.min_score}")
        object.__setattr__(self, "drafters", drafters)

    @classmethod
    def from_mapping(cls, values: dict[str, Any] | None) -> "ProposerSettings":
        values = dict(values or {})
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ConfigError(f"unknown ragspec settings {sorted(unknown)}: choose from {', '.join(sorted(known))}")
        if "drafters" in values:
            values["drafters"] = tuple(values["drafters"])
        return cls(**values)


RowKey = tuple[int, bytes]  # (length, the row's first and last KEY_TOKENS tokens as int64 bytes)


def row_keys(tokens: np.ndarray, rows: np.ndarray, lengths: np.ndarray) -> list[RowKey]:
    """The content key of row `rows[i]` of `tokens` [rows, width] at length `lengths[i]`, for
    every i. One gather for the whole batch (per-row slicing and hashing cost more than the rest
    of a step's work); places past a short row's end hold -1, which no token id is. Exact bytes
    rather than a hash: no collisions."""
    offsets = np.arange(2 * KEY_TOKENS)  # the first KEY_TOKENS tokens, then the last KEY_TOKENS
    tail_start = np.maximum(lengths - KEY_TOKENS, 0)
    columns = np.where(offsets < KEY_TOKENS, offsets, (tail_start - KEY_TOKENS)[:, None] + offsets)
    window = tokens[rows[:, None], np.minimum(columns, tokens.shape[1] - 1)].astype(np.int64)
    window[columns >= lengths[:, None]] = -1
    data, size = window.tobytes(), window.shape[1] * window.itemsize
    return [(length, data[i * size : (i + 1) * size]) for i, length in enumerate(lengths.tolist())]


class CalibrationFactors(dict):
    """source -> NodeBudget.calibration(source), computed on first use: the budget learns only
    before a step's drafting, so one step's trees share their factors."""

    def __init__(self, budget: NodeBudget):
        super().__init__()
        self.budget = budget

    def __missing__(self, source: str) -> float:
        self[source] = factor = self.budget.calibration(source)
        return factor


@dataclass
class Proposal:
    """What was proposed for a request last step, kept until the next step shows what was accepted."""

    tokens: list[int]  # the chain sent to vLLM
    sources: tuple[str, ...]  # [len(tokens)] the drafter of each token ...
    scores: list[float]  # [len(tokens)] ... and its raw score: what the budget learns from
    tries: list[tuple[AcceptanceEstimate, ScoredTrie]]  # each drafter's own trie, and the estimate learning from it
    probabilities: list[float] = field(default_factory=list)  # [len(tokens)] calibrated P(accepted): what the step plan ranks

    def keep(self, length: int) -> None:
        """Cut the chain to its first `length` tokens (the step plan's choice)."""
        del self.tokens[length:], self.scores[length:], self.probabilities[length:]
        self.sources = self.sources[:length]


@dataclass
class RequestState:
    tokens: TokenBuffer  # every token of the request seen so far (the row's content)
    prompt_length: int  # tokens before its first sampled one, as first seen
    drafters: list[ContinuationDrafter]  # its own context / datastore drafters (the past store is shared)
    proposal: Proposal | None = None
    answered: int = 0  # output tokens already handed to the past-responses store


@dataclass
class StepTimes:
    """Seconds spent in propose(), per call (for the drafting-latency target): wall clock, and
    this thread's CPU time (what the call costs when the machine is shared and it waits for a core)."""

    seconds: list[float] = field(default_factory=list)
    cpu_seconds: list[float] = field(default_factory=list)

    def p50_ms(self) -> float:
        return 1000 * float(np.median(self.seconds)) if self.seconds else 0.0


class RagspecProposer:
    """vLLM custom-class proposer: `__init__(vllm_config)`, `load_model(model)`, `propose(...)`."""

    def __init__(self, vllm_config: Any = None, *, settings: ProposerSettings | None = None,
                 num_speculative_tokens: int | None = None):
        """`vllm_config`: vLLM's VllmConfig (read: speculative_config.num_speculative_tokens and
        additional_config["ragspec"]); tests pass `settings` and `num_speculative_tokens`."""
        if settings is None:
            extra = getattr(vllm_config, "additional_config", None) or {}
            settings = ProposerSettings.from_mapping(extra.get("ragspec"))
        if num_speculative_tokens is None:
            num_speculative_tokens = int(vllm_config.speculative_config.num_speculative_tokens)
        if num_speculative_tokens < 1:
            raise ConfigError(f"num_speculative_tokens must be >= 1, got {num_speculative_tokens}")
        self.settings = settings
        self.k = num_speculative_tokens
        self.spec = SpecConfig(max_nodes=64, max_match=settings.max_match, max_occurrences=settings.max_occurrences,
                               max_depth=num_speculative_tokens, drafters=tuple(d for d in settings.drafters))
        # Chains only: the budget's latency model is not used (vLLM verifies, not ragspec), only
        # its per-source calibration of scores.
        self.budget = NodeBudget(LatencyCurve(rows=(1,), seconds=(1.0,), adapt=False), max_nodes=self.k)
        self._estimates = {"context": new_match_estimate(), "datastore": new_match_estimate()}
        self.index = self._open_index(settings.index)
        self.past = self._past_store(settings, self.spec) if "past" in settings.drafters else None
        self._active: dict[RowKey, list[RequestState]] = {}  # key after the last step -> its requests
        self._departed: OrderedDict[RowKey, list[RequestState]] = OrderedDict()  # waiting for a resume
        self.times = StepTimes()
        self._cost_path = step_cost_path(vllm_config) if settings.adaptive and settings.persist_step_cost else None
        self.costs = StepCosts.load(self._cost_path) if self._cost_path is not None else StepCosts()
        self._unsaved = 0  # steps observed since the curves were last saved
        self._saved_at = time.monotonic()
        if self._cost_path is not None:  # a server stopped normally keeps what it learned since the last save
            atexit.register(_save_costs_at_exit, weakref.ref(self))
        self._last_end: float | None = None  # when the last propose() returned
        self._last_verified = 0  # tokens the step after it verifies: each decoding row's pending token + drafts
        self._last_rows = 0  # decoding rows in that step
        self.counts = {"new": 0, "continued": 0, "resumed": 0, "departed": 0, "answers": 0}

    # ------------------------------------------------------------------ vLLM interface

    def load_model(self, *args, **kwargs) -> None:
        """No model: the drafts come from retrieval."""

    def propose(self, sampled_token_ids: list[list[int]], num_tokens_no_spec, token_ids_cpu,
                slot_mappings=None) -> list[list[int]]:
        """One draft chain per row: `sampled_token_ids[i]` the tokens row i committed last step
        (accepted drafts + the bonus; empty in prefill), `token_ids_cpu[i, :num_tokens_no_spec[i]]`
        its tokens so far (those included). Returns at most k tokens per row."""
        start, start_cpu = time.perf_counter(), time.thread_time()
        num_rows = len(sampled_token_ids)
        tokens = np.asarray(token_ids_cpu)[:num_rows]
        lengths = np.asarray(num_tokens_no_spec).reshape(-1)[:num_rows].astype(np.int64)
        before = np.maximum(lengths - np.fromiter(map(len, sampled_token_ids), np.int64, num_rows), 0)
        row_ids = np.arange(num_rows)
        keys = row_keys(tokens, np.concatenate([row_ids, row_ids]), np.concatenate([before, lengths]))
        keys_before, keys_after = keys[:num_rows], keys[num_rows:]
        previous, self._active = self._active, {}
        new_before = self.counts["new"] + self.counts["resumed"]
        rows = [self._match_row(previous, tokens[i], keys_before[i], keys_after[i], sampled)
                for i, sampled in enumerate(sampled_token_ids)]
        self._observe_step(start, rows, sampled_token_ids, new_before)
        self._depart(previous)  # first: a finished answer can draft for a request arriving now
        decoding = sum(1 for sampled in sampled_token_ids if sampled)
        factors = CalibrationFactors(self.budget)
        drafts = [[] if state is None or not sampled else self._draft(state, self.settings.min_score, factors)
                  for state, sampled in zip(rows, sampled_token_ids)]
        if self.settings.adaptive:
            self._plan(drafts, rows, decoding)
        self._last_verified = sum(1 + len(d) for d, sampled in zip(drafts, sampled_token_ids) if sampled)
        self._last_rows = decoding
        self._last_end = time.perf_counter()
        self.times.seconds.append(self._last_end - start)
        self.times.cpu_seconds.append(time.thread_time() - start_cpu)
        return drafts

    def _observe_step(self, now: float, rows: list, sampled_token_ids: list[list[int]], new_before: int) -> None:
        """Time the engine step that just ran, when it was decoding only (no prefill in it: no new
        or resumed request, no row without sampled tokens), against the tokens it verified."""
        pure = self.counts["new"] + self.counts["resumed"] == new_before and all(
            sampled or state is None for state, sampled in zip(rows, sampled_token_ids))
        if self._last_end is not None and pure and self._last_rows:
            self.costs.of(self._last_rows).observe(self._last_rows, self._last_verified, now - self._last_end)
            self._unsaved += 1
            if self._cost_path is not None and self._unsaved >= SAVE_EVERY_STEPS \
                    and time.monotonic() - self._saved_at >= SAVE_EVERY_S:
                self.save_step_costs()

    def _plan(self, drafts: list[list[int]], rows: list, decoding: int) -> None:
        """Cut the rows' chains to the step `plan_step` chooses on this batch class's cost curve
        (`drafts` and the rows' proposals, in place)."""
        drafted = [i for i, draft in enumerate(drafts) if draft]
        if not drafted:
            return
        proposals = [rows[i].proposal for i in drafted]
        lengths = plan_step(self.costs.of(decoding), decoding, [p.probabilities for p in proposals], self.k)
        for i, proposal, length in zip(drafted, proposals, lengths):
            if length < len(drafts[i]):
                drafts[i] = drafts[i][:length]
                proposal.keep(length)
                if not length:
                    rows[i].proposal = None

    def save_step_costs(self) -> bool:
        """Write the learned step-cost curves to the cache (also done every SAVE_EVERY_STEPS
        measured steps, at most every SAVE_EVERY_S seconds, and at exit)."""
        if self._cost_path is None:
            return False
        self._unsaved, self._saved_at = 0, time.monotonic()
        return self.costs.save(self._cost_path)

    # ------------------------------------------------------------------ one row

    def _match_row(self, previous: dict[RowKey, list[RequestState]], row: np.ndarray, key_before: RowKey,
                   key_after: RowKey, sampled: list[int]) -> RequestState | None:
        """The request in this row (found, resumed or new), brought up to the row's tokens, and
        taught what vLLM accepted of its last chain. None for an empty row. `key_before`: the
        row's key without this step's sampled tokens; `key_after`: with them."""
        length, before = key_after[0], key_before[0]
        if length <= 0:
            return None
        state = self._find(previous, key_before) if before > 0 else None
        if state is None:
            state = self._new_state(before if sampled else length)
            state.tokens.extend(row[:before])
        if sampled and state.proposal is not None:
            self._learn(state.proposal, sampled)
        state.proposal = None
        state.tokens.extend(row[len(state.tokens) : length])
        self._active.setdefault(key_after, []).append(state)
        return state

    def _find(self, previous: dict[RowKey, list[RequestState]], key: RowKey) -> RequestState | None:
        """The request this row continues: its tokens before this step's sampled ones match a known
        request's, among last step's rows first, then departed (preempted) ones."""
        for pool in (previous, self._departed):
            states = pool.get(key)
            if states:
                state = states.pop()
                if not states:
                    del pool[key]
                if pool is self._departed:  # resumed after preemption
                    state.drafters = self._new_drafters()
                self.counts["resumed" if pool is self._departed else "continued"] += 1
                return state
        return None

    def _new_state(self, prompt_length: int) -> RequestState:
        self.counts["new"] += 1
        return RequestState(tokens=TokenBuffer([]), prompt_length=prompt_length, drafters=self._new_drafters())

    def _new_drafters(self) -> list[ContinuationDrafter]:
        """A request's own drafters (per-request state: its suffix index, its last tree); the
        match-rate estimates are shared by all requests."""
        drafters: list[ContinuationDrafter] = []
        if "context" in self.settings.drafters:
            drafters.append(ContextSuffixDrafter(self.spec, self._estimates["context"]))
        if self.index is not None:
            drafters.append(DatastoreDrafter(self.index.datastore, None, self.spec, self._estimates["datastore"]))
        return drafters

    def _draft(self, state: RequestState, min_score: float, factors: CalibrationFactors) -> list[int]:
        """The best chain of the row's drafters' tries fused (most rows have one trie or none:
        then no DraftTree is built), remembered for learning from the next step."""
        context = DraftContext(tokens=state.tokens.view(), max_nodes=self.spec.max_nodes)
        tries = [(drafter.estimate, trie) for drafter in state.drafters
                 if (trie := drafter.propose_trie(context)) is not None and trie.tokens]
        if self.past is not None:
            trie = self.past.propose_trie(context, self._suffix_keys(state, context))
            if trie is not None and trie.tokens:
                tries.append((self.past.estimate, trie))
        if not tries:
            return []
        if len(tries) == 1:
            trie = tries[0][1]
            tokens, parents, raw, sources = trie.tokens, trie.parents, trie.scores, (trie.source,) * len(trie.tokens)
        else:
            tree = fuse([trie.tree() for _, trie in tries])
            tokens, parents, raw, sources = tree.token_ids.tolist(), tree.parents.tolist(), tree.scores.tolist(), tree.sources
        scores = calibrate(raw, sources, parents, factors)
        path = best_path(parents, scores, self.k, min_score)
        if not path:
            return []
        chain = [tokens[node] for node in path]
        state.proposal = Proposal(chain, tuple(sources[node] for node in path), [raw[node] for node in path], tries,
                                  [scores[node] for node in path])
        return chain

    def _suffix_keys(self, state: RequestState, context: DraftContext) -> list[int] | None:
        """The row's suffix n-gram keys, from its context index (which just looked them up)
        when it holds the row's tokens and shares the past store's n-gram sizes."""
        for drafter in state.drafters:
            if isinstance(drafter, ContextSuffixDrafter):
                index = drafter.index
                if len(index) == len(context.tokens) and index.sizes == self.past.index.sizes:
                    return index.own_suffix_keys()
        return None

    def _learn(self, proposal: Proposal, sampled: list[int]) -> None:
        """What vLLM committed after our chain: its accepted drafts, then the bonus token."""
        drafted = proposal.tokens
        accepted, most = 0, min(len(sampled) - 1, len(drafted))
        while accepted < most and sampled[accepted] == drafted[accepted]:
            accepted += 1
        self.budget.observe_scores(proposal.sources, proposal.scores, list(range(accepted)))
        continuation = [int(token) for token in sampled[: accepted + 1]]
        for estimate, trie in proposal.tries:
            estimate.learn_nodes(trie.tokens, trie.parents, trie.buckets, continuation)

    # ------------------------------------------------------------------ departures

    def _depart(self, unmatched: dict[RowKey, list[RequestState]]) -> None:
        """Requests no row continued: finished, or preempted (kept a while for a resume)."""
        for key, states in unmatched.items():
            for state in states:
                state.proposal = None  # never verified: nothing to learn from it
                state.drafters = []  # their indexes are rebuilt from the tokens on a resume
                self.counts["departed"] += 1
                self._answer(state)
                self._departed.setdefault(key, []).append(state)
        while sum(map(len, self._departed.values())) > self.settings.resume_pool:
            self._departed.popitem(last=False)

    def _answer(self, state: RequestState) -> None:
        tokens = state.tokens.view()
        output = tokens[state.prompt_length :]
        if self.past is None or len(output) <= state.answered:
            return
        self.past.finish_request(tokens[: state.prompt_length].tolist(), output.tolist())
        state.answered = len(output)
        self.counts["answers"] += 1

    # ------------------------------------------------------------------ setup

    @staticmethod
    def _open_index(where: str | None):
        if where is None:
            return None
        from ragspec.index.index import open_index

        index = open_index(where)  # arrays memory-mapped read-only: shared by every worker's page cache
        index.datastore.prepare()
        return index

    @staticmethod
    def _past_store(settings: ProposerSettings, spec: SpecConfig) -> PastResponsesDrafter:
        path = Path(settings.past_responses).expanduser() if settings.past_responses else None
        return PastResponsesDrafter(spec, max_tokens=settings.past_max_tokens, state_path=path)


def step_cost_path(vllm_config: Any) -> Path | None:
    """Where this model/device's step-cost curves are kept: cache_dir()/vllm-step-cost/<key>.json,
    the key a hash of the model, its dtype, the device, the parallel layout and the machine's CPU
    count (a step's cost depends on all of them). None without a vLLM config (tests) or where
    ragspec.models cannot be imported (it needs torch, which vLLM's environment has)."""
    model_config = getattr(vllm_config, "model_config", None)
    if model_config is None:
        return None
    try:
        from ragspec.models import cache_dir
    except Exception as exc:  # noqa: BLE001 - persistence is optional: never fail vLLM's start for it
        log.warning("step-cost curves not persisted: %s", exc)
        return None
    device = getattr(vllm_config, "device_config", None)
    parallel = getattr(vllm_config, "parallel_config", None)
    identity = {"model": str(getattr(model_config, "model", "")), "dtype": str(getattr(model_config, "dtype", "")),
                "device": str(getattr(device, "device_type", getattr(device, "device", ""))),
                "tp": getattr(parallel, "tensor_parallel_size", 1), "pp": getattr(parallel, "pipeline_parallel_size", 1),
                "machine": platform.machine(), "cpus": os.cpu_count()}
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir() / "vllm-step-cost" / f"{key}.json"


def _save_costs_at_exit(proposer_ref: "weakref.ref[RagspecProposer]") -> None:
    proposer = proposer_ref()
    if proposer is not None and proposer._unsaved:
        proposer.save_step_costs()


def best_chain(tree: DraftTree, scores: np.ndarray | list[float], max_length: int, min_score: float = 0.0) -> DraftTree:
    """The root path of at most `max_length` nodes with the largest summed `scores` (the expected
    accepted tokens of a chain), cut before the first node scored below `min_score`. The chain
    keeps the tree's raw scores and sources. `scores` [num_nodes], none above its parent's."""
    if not tree.num_nodes:
        return tree
    values = scores.tolist() if isinstance(scores, np.ndarray) else list(scores)
    path = best_path(tree.parents.tolist(), values, max_length, min_score)
    return chain_of(tree, path) if path else DraftTree.empty()


def best_path(parents: list[int], scores: list[float], max_length: int, min_score: float) -> list[int]:
    """`best_chain`'s nodes, root first ([] when no node qualifies), on plain lists: one pass
    top-down (parents come first), ties to the first (shallower or earlier) node."""
    depth: list[int] = []
    gain: list[float] = []
    usable: list[bool] = []
    best, best_gain = ROOT, 0.0
    for node, parent in enumerate(parents):
        top = parent == ROOT
        depth.append(1 if top else depth[parent] + 1)
        gain.append(scores[node] + (0.0 if top else gain[parent]))
        ok = scores[node] >= min_score and depth[node] <= max_length and (top or usable[parent])
        usable.append(ok)
        if ok and (best == ROOT or gain[node] > best_gain):
            best, best_gain = node, gain[node]
    path = []
    while best != ROOT:
        path.append(best)
        best = parents[best]
    path.reverse()
    return path


def chain_of(tree: DraftTree, path: list[int]) -> DraftTree:
    """The nodes `path` (root first) of `tree` as a chain, with their raw scores and sources."""
    return DraftTree(
        token_ids=tree.token_ids[path],
        parents=np.arange(len(path), dtype=np.int64) - 1,
        scores=tree.scores[path],
        sources=tuple(tree.sources[i] for i in path),
    )
