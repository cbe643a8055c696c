"""OS3, RaLMSpec's optimal speculation stride scheduler: how many strides to speculate before one
batched verification, from what was measured so far.

With `a` the latency of one speculative stride (query embedding, cache lookup, the stride's
decoding), `b` the latency of a batched verification and `gamma` the chance that a speculated
retrieval is right, a batch of `s` strides gains E(s) = (1 - gamma^s) / (1 - gamma) verified
strides (the strides before the first miss, plus the missed one redone on the right passage).
Its cost is s*a + b + (1 - gamma^s)*a synchronously; asynchronously the verification hides
behind the next batch's speculation when every guess was right (cost max(s*a, b)), and on a
miss the speculation done meanwhile is lost (s*a + b + a). OS3 picks the s in [min, max] with
the most strides per second. `gamma` is the hit rate over a window of recent speculations.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from ragspec.errors import ConfigError


@dataclass(frozen=True)
class StrideBounds:
    initial: int = 3  # strides per verification before anything is measured (and when OS3 is off)
    low: int = 1
    high: int = 8
    window: int = 32  # recent speculations the hit rate is measured over

    def __post_init__(self) -> None:
        if not 1 <= self.low <= self.initial <= self.high:
            raise ConfigError(f"need 1 <= low <= initial <= high, got {self.low}, {self.initial}, {self.high}")


def expected_gain(s: int, gamma: float) -> float:
    """Expected strides a batch of s speculations advances the answer by."""
    if gamma >= 1.0:
        return float(s)
    return (1.0 - gamma ** s) / (1.0 - gamma)


def batch_cost(s: int, gamma: float, a: float, b: float, asynchronous: bool) -> float:
    """Expected seconds of a batch of s speculations and its verification."""
    all_right = gamma ** s
    if asynchronous:
        return all_right * max(s * a, b) + (1.0 - all_right) * (s * a + b + a)
    return s * a + b + (1.0 - all_right) * a


def optimal_strides(gamma: float, a: float, b: float, low: int, high: int, asynchronous: bool) -> int:
    """The s in [low, high] with the most expected strides per second (the smallest on ties)."""
    rates = {s: expected_gain(s, gamma) / max(batch_cost(s, gamma, a, b, asynchronous), 1e-12)
             for s in range(low, high + 1)}
    return max(rates, key=lambda s: (rates[s], -s))


class StrideScheduler:
    """OS3 when `adaptive`, else always `bounds.initial` strides per verification."""

    def __init__(self, bounds: StrideBounds = StrideBounds(), adaptive: bool = True, asynchronous: bool = False):
        self.bounds = bounds
        self.adaptive = adaptive
        self.asynchronous = asynchronous
        self._hits: deque[bool] = deque(maxlen=bounds.window)
        self._stride_s: float | None = None  # a: seconds per speculative stride (mean)
        self._verify_s: float | None = None  # b: seconds per batched verification (mean)
        self._counts = [0, 0]

    def observe_stride(self, seconds: float) -> None:
        self._stride_s = _running_mean(self._stride_s, seconds, self._counts, 0)

    def observe_verification(self, seconds: float, hits: list[bool]) -> None:
        """A batch's FAISS latency and, stride by stride up to the first miss, whether it was right."""
        self._verify_s = _running_mean(self._verify_s, seconds, self._counts, 1)
        self._hits.extend(hits)

    @property
    def hit_rate(self) -> float | None:
        return sum(self._hits) / len(self._hits) if self._hits else None

    def strides(self) -> int:
        """Strides to speculate before the next verification."""
        if not self.adaptive or self._stride_s is None or self._verify_s is None or self.hit_rate is None:
            return self.bounds.initial
        gamma = min(self.hit_rate, 0.999)
        return optimal_strides(gamma, self._stride_s, self._verify_s, self.bounds.low, self.bounds.high,
                               self.asynchronous)


def _running_mean(mean: float | None, value: float, counts: list[int], slot: int) -> float:
    counts[slot] += 1
    return value if mean is None else mean + (value - mean) / counts[slot]
