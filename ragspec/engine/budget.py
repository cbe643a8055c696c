"""How many tree nodes to verify: the count that maximises expected tokens per second.

Verifying n nodes costs `latency(1 + n)` (the pending token plus the nodes), measured once per
model/device/dtype and cached; it yields 1 + (sum of the n best node scores) tokens in
expectation. When no n beats plain decoding's 1 / latency(1), the step runs with no tree. The
curve is kept as measured, dips included: where 8 rows cost less than 3, the budget verifies 7
nodes rather than 2.
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ragspec.drafting.base import ema, warn_once, write_atomically
from ragspec.drafting.tree import monotone_scores, prune
from ragspec.types import DraftTree

if TYPE_CHECKING:  # NodeBudget imports without torch (the vLLM proposer calibrates with it)
    from ragspec.models import LoadedModel

log = logging.getLogger(__name__)

# Every small row count: the curve need not be monotone there (plain nn.Linear in fp32 on a 2-core
# CPU: 2 or 3 rows cost more than 4 or 8), and the budget exploits the dips.
PROFILE_ROWS = (*range(1, 17), 20, 24, 32, 48, 64, 96, 128)
PROFILE_CONTEXT = 256  # committed tokens in the cache while profiling
LATENCY_EMA = 0.1  # weight of the newest step in the online latency corrections
EXPLORE_EVERY = 32  # steps without a plain (or a tree) step before one is taken to re-measure it


@dataclass(frozen=True)
class LatencyCurve:
    rows: tuple[int, ...]  # verify rows (pending token + nodes), increasing
    seconds: tuple[float, ...]  # median forward latency at each row count
    adapt: bool = True  # the budget corrects it online from measured steps; False: used as given (tests)

    def __call__(self, rows: int | np.ndarray) -> np.ndarray:
        return np.interp(rows, self.rows, self.seconds)


class NodeBudget:
    """Picks the nodes to verify per step from the curve and the tree's scores.

    Corrections are learned online from every verified step. Latency, per kind of step: plain
    steps (one row) by their measured seconds, tree steps by their measured / predicted ratio, so
    that a curve profiled on a busy machine, or stale, cannot keep the budget speculating at a
    loss: what decides is the tree step's cost relative to a plain step as measured now. A kind
    of step unseen for EXPLORE_EVERY steps is taken once to re-measure it (a plain step costs no
    more than plain decoding; a tree step at most one step's gain), and a plain step is taken
    right after the first tree step so that both kinds are measured from the start.
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
        self._plain_s: float | None = None  # EMA of measured plain-step seconds
        self._tree_ratio: float | None = None  # EMA of measured / curve seconds of tree steps
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
        factors = np.array([factor_of[source] for source in tree.sources])
        return monotone_scores(np.minimum(1.0, tree.scores * factors), tree.parents)

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
        plain_unknown = self._plain_s is None and self._tree_ratio is not None  # trees measured, plain never
        if best > 0 and self.min_nodes == 0 and (plain_unknown or self._since_plain >= EXPLORE_EVERY):
            return 0  # measure a plain step
        if best == 0 and self._since_tree >= EXPLORE_EVERY:
            return 1 + int(np.argmax(throughput[1:]))  # re-measure a tree step
        return best

    def predicted_seconds(self, max_nodes: int) -> np.ndarray:
        """Seconds of a step verifying 0..max_nodes nodes, as corrected by what was measured.
        Before any step of a kind was measured, it takes the other kind's correction. [max_nodes + 1]"""
        if not self.curve.adapt:
            return self.curve(np.arange(1, max_nodes + 2))
        plain_curve = float(self.curve(1))
        ratio = self._tree_ratio
        if ratio is None:
            ratio = 1.0 if self._plain_s is None else self._plain_s / plain_curve
        seconds = self.curve(np.arange(1, max_nodes + 2)) * ratio
        if self._plain_s is not None:
            seconds[0] = self._plain_s
        return seconds

    def observe(self, tree: DraftTree, accepted_nodes: list[int], seconds: float) -> None:
        """Learn from one verify: `tree` as verified (raw scores), the nodes the target accepted."""
        if self.curve.adapt:
            self._observe_latency(tree.num_nodes, seconds)
        sources = np.asarray(tree.sources)
        accepted = np.zeros(tree.num_nodes, dtype=bool)
        accepted[list(accepted_nodes)] = True
        for source in set(tree.sources):
            mine = sources == source
            predicted = self._predicted.get(source, 1.0)
            self._predicted[source] = predicted + 0.05 * (float(tree.scores[mine].sum()) - predicted)
            hits = self._accepted.get(source, 1.0)
            self._accepted[source] = hits + 0.05 * (float(accepted[mine].sum()) - hits)

    def _observe_latency(self, nodes: int, seconds: float) -> None:
        if nodes == 0:
            self._plain_s = ema(self._plain_s, seconds, LATENCY_EMA)
            self._since_plain, self._since_tree = 0, self._since_tree + 1
        else:
            ratio = seconds / max(float(self.curve(1 + nodes)), 1e-9)
            self._tree_ratio = ema(self._tree_ratio, ratio, LATENCY_EMA)
            self._since_plain, self._since_tree = self._since_plain + 1, 0


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
        curve = LatencyCurve(rows=tuple(int(r) for r in data["rows"]), seconds=tuple(float(s) for s in data["seconds"]))
        rows, seconds = np.asarray(curve.rows), np.asarray(curve.seconds)
        if not len(rows) or len(rows) != len(seconds) or rows[0] < 1 or np.any(np.diff(rows) <= 0):
            raise ValueError("rows must be increasing counts >= 1, one latency each")
        if not np.all(np.isfinite(seconds)) or np.any(seconds <= 0):
            raise ValueError("latencies must be finite and positive")
        return curve
    except Exception as exc:  # noqa: BLE001 - a bad cache file is re-measured, never fatal
        log.warning("ignoring unreadable latency cache %s (%s: %s); measuring again", path, type(exc).__name__, exc)
        return None


def save_curve(path: Path, curve: LatencyCurve) -> bool:
    """Cache `curve` at `path` (atomic replace); False, with a warning once, when that fails."""
    payload = json.dumps(asdict(curve)).encode()
    try:
        write_atomically(path, lambda file: file.write(payload))
    except Exception as exc:  # noqa: BLE001 - an unwritable cache only costs re-measuring
        warn_once(path, "cannot save the latency curve to %s: %s", path, exc)
        return False
    return True


def measure_latency_curve(
    target: LoadedModel, rows: tuple[int, ...] = PROFILE_ROWS, repeats: int = 3
) -> LatencyCurve:
    """Median latency of one tree-verify forward (chain tree) per row count, row counts interleaved
    in each round so that a slow moment of the machine spreads over all of them."""
    import torch

    from ragspec.verify import TreeVerifier

    with torch.inference_mode():
        return _measure_latency_curve(target, rows, repeats, torch, TreeVerifier)


def _measure_latency_curve(target: LoadedModel, rows, repeats, torch, TreeVerifier) -> LatencyCurve:
    vocab = target.vocab_size
    generator = torch.Generator().manual_seed(0)
    context = torch.randint(0, vocab, (PROFILE_CONTEXT,), generator=generator).tolist()
    verifier = target.new_verifier()  # the target's own backend: its curve is keyed by target.fingerprint
    verifier.prefill(context)
    trees = [_chain_tree(context[: n - 1]) for n in rows]
    times: list[list[float]] = [[] for _ in rows]
    for round_number in range(repeats + 1):  # round 0 warms up
        for tree, row_times in zip(trees, times):
            start = time.perf_counter()
            verifier.verify(context[-1], tree)
            if round_number:
                row_times.append(time.perf_counter() - start)
            verifier.discard()
    return LatencyCurve(rows=tuple(rows), seconds=tuple(statistics.median(t) for t in times))


def _chain_tree(tokens: list[int]) -> DraftTree:
    n = len(tokens)
    return DraftTree(
        token_ids=np.asarray(tokens, dtype=np.int64),
        parents=np.arange(n, dtype=np.int64) - 1,
        scores=np.ones(n),
        sources=("profile",) * n,
    )
