"""How many tree nodes to verify: the count that maximises expected tokens per second.

Verifying n nodes over a cache of c committed tokens costs `latency(1 + n, c)` (the pending token
plus the nodes), measured once per model/device/dtype and cached; it yields 1 + (sum of the n best
node scores) tokens in expectation. When no n beats plain decoding's 1 / latency(1, c), the step
runs with no tree. The curve is kept as measured, dips included: where 8 rows cost less than 3,
the budget verifies 7 nodes rather than 2.

Cache length matters on long documents: every verified row attends over the whole cache, so on a
5k-token cache an extra row costs far more than on a 256-token one. The curve is profiled at
PROFILE_CONTEXT cached tokens for every row count in PROFILE_ROWS, and at a few longer caches
(LONG_CONTEXTS, capped by the model's context) for the row counts in LONG_PROFILE_ROWS; the
extra seconds a longer cache adds are interpolated over rows and piecewise linearly over the cache
length (extrapolated linearly past the longest profiled cache). The long caches are not prefilled:
the 256 profiled tokens' KV rows are tiled up to the length (attention costs the same whatever the
keys hold), so the long profile takes seconds, not a long prefill.
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ragspec.drafting.base import ema, warn_once, write_atomically
from ragspec.drafting.tree import monotone_score_list, prune
from ragspec.types import DraftTree

if TYPE_CHECKING:  # NodeBudget imports without torch (the vLLM proposer calibrates with it)
    from ragspec.models import LoadedModel

log = logging.getLogger(__name__)

# Every small row count: the curve need not be monotone there (plain nn.Linear in fp32 on a 2-core
# CPU: 2 or 3 rows cost more than 4 or 8), and the budget exploits the dips.
PROFILE_ROWS = (*range(1, 17), 20, 24, 32, 48, 64, 96, 128)
PROFILE_CONTEXT = 256  # committed tokens in the cache while profiling `LatencyCurve.seconds`
LONG_CONTEXTS = (2048, 8192)  # longer caches profiled too (capped by the model's context)
LONG_PROFILE_ROWS = (1, 2, 4, 8, 16, 32, 64)  # row counts profiled at the longer caches
CURVE_VERSION = 3  # of the cached curve's JSON (2: longer caches; 3: KV appended in place); older ones re-measured
CACHE_BUCKET_BASE = 512  # online corrections are kept per cache-length bucket: < 512, < 1k, < 2k, ...
LATENCY_EMA = 0.1  # weight of the newest step in the online latency corrections
EXPLORE_EVERY = 32  # steps without a plain (or a tree) step before one is taken to re-measure it


@dataclass(frozen=True)
class LatencyCurve:
    """Verify latency by row count, at PROFILE_CONTEXT cached tokens (`rows`, `seconds`) and, when
    `contexts` is not empty, at longer caches (`context_seconds[i][j]`: `context_rows[j]` rows over
    `contexts[i]` cached tokens). Without `contexts` the cost does not depend on the cache length."""

    rows: tuple[int, ...]  # verify rows (pending token + nodes), increasing
    seconds: tuple[float, ...]  # median forward latency at each row count, PROFILE_CONTEXT cached
    adapt: bool = True  # the budget corrects it online from measured steps; False: used as given (tests)
    contexts: tuple[int, ...] = ()  # longer cache lengths profiled, increasing, > PROFILE_CONTEXT
    context_rows: tuple[int, ...] = ()  # row counts profiled at those, increasing
    context_seconds: tuple[tuple[float, ...], ...] = ()  # [contexts][context_rows] median latency

    def __call__(self, rows: int | np.ndarray, cache_length: int | None = None) -> np.ndarray:
        base = np.interp(rows, self.rows, self.seconds)
        if cache_length is None or not self.contexts or cache_length <= PROFILE_CONTEXT:
            return base
        return np.maximum(base + self._extra_seconds(rows, cache_length), 1e-6)

    def _extra_seconds(self, rows: int | np.ndarray, cache_length: int) -> np.ndarray:
        """Seconds a cache of `cache_length` adds over PROFILE_CONTEXT's, at `rows`: measured
        extras interpolated over rows, then piecewise linear in the cache length."""
        lengths = np.asarray((PROFILE_CONTEXT, *self.contexts), dtype=np.float64)
        extras = [np.zeros(np.shape(rows))] + [
            np.interp(rows, self.context_rows, np.asarray(seconds) - np.interp(self.context_rows, self.rows, self.seconds))
            for seconds in self.context_seconds
        ]
        upper = min(int(np.searchsorted(lengths, cache_length)), len(lengths) - 1)  # past the last: extrapolate
        lower = upper - 1
        weight = (cache_length - lengths[lower]) / (lengths[upper] - lengths[lower])
        return extras[lower] + weight * (extras[upper] - extras[lower])

    def check(self) -> None:
        """ValueError unless the curve is well formed (a cached file may not be)."""
        rows, seconds = np.asarray(self.rows), np.asarray(self.seconds)
        if not len(rows) or len(rows) != len(seconds) or rows[0] < 1 or np.any(np.diff(rows) <= 0):
            raise ValueError("rows must be increasing counts >= 1, one latency each")
        if not np.all(np.isfinite(seconds)) or np.any(seconds <= 0):
            raise ValueError("latencies must be finite and positive")
        if not self.contexts:
            return
        contexts, context_rows = np.asarray(self.contexts), np.asarray(self.context_rows)
        grid = np.asarray(self.context_seconds, dtype=np.float64)
        if contexts[0] <= PROFILE_CONTEXT or np.any(np.diff(contexts) <= 0):
            raise ValueError(f"longer contexts must increase from above {PROFILE_CONTEXT}")
        if not len(context_rows) or context_rows[0] < 1 or np.any(np.diff(context_rows) <= 0):
            raise ValueError("context rows must be increasing counts >= 1")
        if grid.shape != (len(contexts), len(context_rows)) or not np.all(np.isfinite(grid)) or np.any(grid <= 0):
            raise ValueError("one finite positive latency per longer context and context row")


def cache_bucket(cache_length: int | None) -> int:
    """The bucket of the online latency corrections: 0 below CACHE_BUCKET_BASE, then one per doubling."""
    if not cache_length or cache_length < CACHE_BUCKET_BASE:
        return 0
    return 1 + int(np.log2(cache_length / CACHE_BUCKET_BASE))


class NodeBudget:
    """Picks the nodes to verify per step from the curve and the tree's scores.

    Corrections are learned online from every verified step. Latency, per kind of step: plain
    steps (one row) by their measured seconds, tree steps by their measured / predicted ratio, so
    that a curve profiled on a busy machine, or stale, cannot keep the budget speculating at a
    loss: what decides is the tree step's cost relative to a plain step as measured now. A kind
    of step unseen for EXPLORE_EVERY steps is taken once to re-measure it (a plain step costs no
    more than plain decoding; a tree step at most one step's gain), and a plain step is taken
    right after the first tree step so that both kinds are measured from the start. Both
    corrections are ratios of measured to curve seconds, kept per cache-length bucket
    (`cache_bucket`): the curve models how the cache length moves the cost, the ratio what the
    machine does to it now, and a bucket not yet measured borrows the nearest measured one's.
    `cache_length`: the cached tokens of the step being planned; the decoding loop sets it
    before drafting (a model drafter's cost rule reads `predicted_seconds` too).
    Scores, per draft source: a calibration factor (the source's accepted nodes over its nodes'
    summed scores). Per source, because a fused tree tags a node with the first source that
    proposed it: a node only the past-responses or recycling drafter proposed is likelier wrong
    than that drafter's average node (measured: 0.03-0.15 accepted where 0.2-0.5 was predicted),
    while context nodes were underestimated.
    """

    def __init__(self, curve: LatencyCurve, max_nodes: int, min_nodes: int = 0):
        self.curve = curve
        self.max_nodes = max_nodes
        self.min_nodes = min_nodes
        self.cache_length: int | None = None  # cached tokens of the step being planned; None: the profile's
        self._plain_ratio: dict[int, float] = {}  # per cache bucket: EMA of measured / curve seconds, plain steps
        self._tree_ratio: dict[int, float] = {}  # per cache bucket: the same for tree steps
        self._since_plain = 0  # steps since a plain step was measured
        self._since_tree = 0  # steps since a tree step was measured
        self._accepted: dict[str, float] = {}  # per source: EMA of accepted nodes per step
        self._predicted: dict[str, float] = {}  # per source: EMA of its nodes' summed scores per step

    def calibration(self, source: str) -> float:
        """Factor for `source`'s scores (1 until the source has been verified)."""
        return float(np.clip(self._accepted.get(source, 1.0) / self._predicted.get(source, 1.0), 0.25, 4.0))

    def calibrated_scores(self, tree: DraftTree) -> np.ndarray:
        """P(node accepted) after calibration, capped at 1 and at the parent's. [num_nodes]"""
        factor_of = {source: self.calibration(source) for source in set(tree.sources)}  # a few sources, many nodes
        return np.asarray(calibrate(tree.scores.tolist(), tree.sources, tree.parents.tolist(), factor_of),
                          dtype=np.float64)

    def select(self, tree: DraftTree, limit: int | None = None, explore: bool = False) -> DraftTree:
        """The best nodes worth verifying, by calibrated score (the tree keeps its raw scores)."""
        scores = self.calibrated_scores(tree)
        return prune(tree, self.choose(tree, limit, scores, explore), scores)

    def choose(self, tree: DraftTree, limit: int | None = None, scores: np.ndarray | None = None,
               explore: bool = False) -> int:
        """How many of the best nodes to verify; `scores` default to the calibrated ones. With
        `explore` (the decoding loop), a kind of step unseen for EXPLORE_EVERY steps is taken."""
        cap = min(tree.num_nodes, self.max_nodes, tree.num_nodes if limit is None else limit)
        if cap <= 0:
            return 0
        scores = self.calibrated_scores(tree) if scores is None else scores
        best_scores = np.sort(scores)[::-1][:cap]
        expected_tokens = 1.0 + np.concatenate([[0.0], np.cumsum(best_scores)])  # [cap + 1]
        throughput = expected_tokens / np.maximum(self.predicted_seconds(cap), 1e-6)
        throughput[: self.min_nodes] = -1.0
        best = int(np.argmax(throughput))
        if not explore or not self.curve.adapt:
            return best
        bucket = cache_bucket(self.cache_length)
        plain_unknown = bucket not in self._plain_ratio and bucket in self._tree_ratio  # trees measured, plain never
        if best > 0 and self.min_nodes == 0 and (plain_unknown or self._since_plain >= EXPLORE_EVERY):
            return 0  # measure a plain step
        if best == 0 and self._since_tree >= EXPLORE_EVERY:
            return 1 + int(np.argmax(throughput[1:]))  # re-measure a tree step
        return best

    def predicted_seconds(self, max_nodes: int, cache_length: int | None = None) -> np.ndarray:
        """Seconds of a step verifying 0..max_nodes nodes over `cache_length` cached tokens
        (default: `self.cache_length`), as corrected by what was measured. Before any step of a
        kind was measured, it takes the other kind's correction. [max_nodes + 1]"""
        cache_length = self.cache_length if cache_length is None else cache_length
        seconds = self.curve(np.arange(1, max_nodes + 2), cache_length)
        if not self.curve.adapt:
            return seconds
        plain_ratio, tree_ratio = self._ratios(cache_bucket(cache_length))
        seconds = seconds * tree_ratio
        seconds[0] *= plain_ratio / tree_ratio
        return seconds

    def _ratios(self, bucket: int) -> tuple[float, float]:
        """(plain, tree) corrections for `bucket`: its own, else the nearest measured bucket's; a
        kind unmeasured there takes the other kind's; 1.0 before anything was measured."""
        measured = set(self._plain_ratio) | set(self._tree_ratio)
        if bucket not in measured and measured:
            bucket = min(measured, key=lambda b: (abs(b - bucket), b))
        plain, tree = self._plain_ratio.get(bucket), self._tree_ratio.get(bucket)
        plain = plain if plain is not None else tree if tree is not None else 1.0
        return plain, tree if tree is not None else plain

    def observe(self, tree: DraftTree, accepted_nodes: list[int], seconds: float) -> None:
        """Learn from one verify: `tree` as verified (raw scores), the nodes the target accepted."""
        if self.curve.adapt:
            self._observe_latency(tree.num_nodes, seconds)
        self.observe_scores(tree.sources, tree.scores, accepted_nodes)

    def observe_scores(self, sources: tuple[str, ...], scores: np.ndarray | list[float],
                       accepted_nodes: list[int]) -> None:
        """The calibration half of `observe`: the verified nodes' sources and raw scores [nodes]
        (the vLLM proposer learns from chains it never builds as trees)."""
        if len(set(sources)) == 1:  # the common case (a chain, one drafter's tree): no masks
            self._learn_source(sources[0], float(np.add.reduce(np.asarray(scores, dtype=np.float64))),
                               float(len(set(accepted_nodes))))
            return
        scores, source_of = np.asarray(scores, dtype=np.float64), np.asarray(sources)
        accepted = np.zeros(len(sources), dtype=bool)
        accepted[list(accepted_nodes)] = True
        for source in set(sources):
            mine = source_of == source
            self._learn_source(source, float(scores[mine].sum()), float(accepted[mine].sum()))

    def _learn_source(self, source: str, predicted_now: float, accepted_now: float) -> None:
        """One step's summed scores and accepted nodes of `source`, into its moving averages."""
        predicted = self._predicted.get(source, 1.0)
        self._predicted[source] = predicted + 0.05 * (predicted_now - predicted)
        hits = self._accepted.get(source, 1.0)
        self._accepted[source] = hits + 0.05 * (accepted_now - hits)

    def _observe_latency(self, nodes: int, seconds: float) -> None:
        """A step of `nodes` nodes over `self.cache_length` cached tokens took `seconds`."""
        bucket = cache_bucket(self.cache_length)
        ratio = seconds / max(float(self.curve(1 + nodes, self.cache_length)), 1e-9)
        if nodes == 0:
            self._plain_ratio[bucket] = ema(self._plain_ratio.get(bucket), ratio, LATENCY_EMA)
            self._since_plain, self._since_tree = 0, self._since_tree + 1
        else:
            self._tree_ratio[bucket] = ema(self._tree_ratio.get(bucket), ratio, LATENCY_EMA)
            self._since_plain, self._since_tree = self._since_plain + 1, 0


def calibrate(scores: list[float], sources: Sequence[str], parents: list[int],
              factor_of: Mapping[str, float]) -> list[float]:
    """Each raw score times its source's calibration factor (`factor_of`), capped at 1 and at
    its parent's: `NodeBudget.calibrated_scores` on plain lists."""
    scaled = [min(1.0, score * factor_of[source]) for score, source in zip(scores, sources)]
    return monotone_score_list(scaled, parents)


def load_or_measure_curve(target: LoadedModel, rows: tuple[int, ...] = PROFILE_ROWS) -> LatencyCurve:
    """The cached curve for this model/device/dtype, measured (a few seconds) when missing or
    unreadable. The cache file is written like learned state (`write_atomically`): concurrent
    processes each measure and the last one's curve is kept; a failed write is only a warning."""
    from ragspec.models import cache_dir

    path = cache_dir() / "latency" / f"{target.fingerprint}.json"
    curve = read_curve(path)
    if curve is None:
        curve = measure_latency_curve(target, rows)
        save_curve(path, curve)
    return curve


def read_curve(path: Path) -> LatencyCurve | None:
    """The curve cached at `path`; None (with a warning) when absent, unreadable or malformed."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_bytes())
        if not isinstance(data, dict) or data.get("version") != CURVE_VERSION:
            raise ValueError(f"not a version {CURVE_VERSION} latency curve (an older ragspec's, or no curve)")
        curve = LatencyCurve(
            rows=tuple(int(r) for r in data["rows"]), seconds=tuple(float(s) for s in data["seconds"]),
            contexts=tuple(int(c) for c in data.get("contexts", ())),
            context_rows=tuple(int(r) for r in data.get("context_rows", ())),
            context_seconds=tuple(tuple(float(s) for s in row) for row in data.get("context_seconds", ())),
        )
        curve.check()
        return curve
    except Exception as exc:  # noqa: BLE001 - a bad cache file is re-measured, never fatal
        log.warning("ignoring unreadable latency cache %s (%s: %s); measuring again", path, type(exc).__name__, exc)
        return None


def save_curve(path: Path, curve: LatencyCurve) -> bool:
    """Cache `curve` at `path` (atomic replace); False, with a warning once, when that fails."""
    payload = json.dumps({"version": CURVE_VERSION, **asdict(curve)}).encode()
    try:
        write_atomically(path, lambda file: file.write(payload))
    except Exception as exc:  # noqa: BLE001 - an unwritable cache only costs re-measuring
        warn_once(path, "cannot save the latency curve to %s: %s", path, exc)
        return False
    return True


def measure_latency_curve(
    target: LoadedModel, rows: tuple[int, ...] = PROFILE_ROWS, repeats: int = 3,
    contexts: tuple[int, ...] | None = None,
) -> LatencyCurve:
    """Median latency of one tree-verify forward (chain tree) per row count over PROFILE_CONTEXT
    cached tokens, and over each longer cache of `contexts` (default LONG_CONTEXTS; capped by
    the model's context; () for none) for the LONG_PROFILE_ROWS up to max(rows)."""
    import torch

    with torch.inference_mode():
        return _measure_latency_curve(target, rows, repeats, contexts, torch)


def _measure_latency_curve(target: LoadedModel, rows, repeats, contexts, torch) -> LatencyCurve:
    vocab = target.vocab_size
    generator = torch.Generator().manual_seed(0)
    context = torch.randint(0, vocab, (PROFILE_CONTEXT,), generator=generator).tolist()
    verifier = target.new_verifier()  # the target's own backend: its curve is keyed by target.fingerprint
    verifier.prefill(context)
    seconds = _median_latencies(verifier, context, rows, repeats)
    long_rows = tuple(sorted({1, *(r for r in LONG_PROFILE_ROWS if r <= max(rows))}))
    lengths = long_contexts(target.context_length, max(long_rows), LONG_CONTEXTS if contexts is None else contexts)
    grid = []
    for length in lengths:
        _grow_cache(verifier, context, length)
        grid.append(_median_latencies(verifier, context, long_rows, repeats))
    return LatencyCurve(rows=tuple(rows), seconds=seconds, contexts=lengths,
                        context_rows=long_rows if lengths else (), context_seconds=tuple(grid))


def long_contexts(context_length: int, max_rows: int, wanted: tuple[int, ...]) -> tuple[int, ...]:
    """The longer caches to profile: `wanted`, each capped to leave room for `max_rows` rows in
    the model's context, those not above PROFILE_CONTEXT dropped."""
    room = context_length - max_rows - 1
    return tuple(sorted({min(length, room) for length in wanted if min(length, room) > PROFILE_CONTEXT}))


def _median_latencies(verifier, context: list[int], rows, repeats: int) -> tuple[float, ...]:
    """Median seconds of verifying a chain of n - 1 nodes, per n in `rows`; row counts are
    interleaved in each round so that a slow moment of the machine spreads over all of them."""
    trees = [_chain_tree(context[: n - 1]) for n in rows]
    times: list[list[float]] = [[] for _ in rows]
    for round_number in range(repeats + 1):  # round 0 warms up
        for tree, row_times in zip(trees, times):
            start = time.perf_counter()
            verifier.verify(context[-1], tree)
            if round_number:
                row_times.append(time.perf_counter() - start)
            verifier.discard()
    return tuple(statistics.median(t) for t in times)


def _grow_cache(verifier, context: list[int], length: int) -> None:
    """Make `verifier` hold `length` committed tokens. A transformers verifier's KV rows are tiled
    from its first PROFILE_CONTEXT rows (no forward: latency does not depend on what the keys
    hold); another backend prefills repeated tokens."""
    from ragspec import kvcache

    cache = getattr(verifier, "cache", None)
    layers = getattr(cache, "layers", None)
    if layers is None or not hasattr(verifier, "cached_ids"):
        tokens = (context * (length // len(context) + 1))[:length]
        verifier.prefill([*tokens, context[-1]])
        return
    kvcache.crop(cache, PROFILE_CONTEXT)
    for layer in layers:
        held = layer.get_seq_length()
        if held:
            copies = -(-length // held)
            layer.keys = layer.keys.repeat(1, 1, copies, 1)[:, :, :length].contiguous()
            layer.values = layer.values.repeat(1, 1, copies, 1)[:, :, :length].contiguous()
    verifier.cached_ids = (context * (length // len(context) + 1))[:length]


def _chain_tree(tokens: list[int]) -> DraftTree:
    n = len(tokens)
    return DraftTree(
        token_ids=np.asarray(tokens, dtype=np.int64),
        parents=np.arange(n, dtype=np.int64) - 1,
        scores=np.ones(n),
        sources=("profile",) * n,
    )
