"""What one more draft token costs vLLM's step, learned from the time between propose() calls.

The proposer cannot time vLLM's verify, but the wall time from the end of one propose() call to
the start of the next is one engine step (schedule, forward over every row's pending token and
drafts, sampling, bookkeeping). Across steps that verified different numbers of tokens, a least
squares fit of `seconds = fixed + per_token * tokens` gives the marginal cost of a token. A draft
token accepted with probability p adds p tokens to the step's output and `per_token` seconds to
its time, so it raises throughput only when p > per_token * (tokens committed per second now).
That threshold replaces the fixed `min_score` once the fit has seen enough varied steps; this is
ragspec's NodeBudget rule (expected tokens per second) with the latency curve measured inside
vLLM instead of profiled.
"""

from __future__ import annotations

from dataclasses import dataclass

MIN_STEPS = 6  # steps observed before the fit is trusted
MIN_SPREAD = 4.0  # variance of the verified-token counts (tokens^2) needed for a slope


@dataclass
class StepCost:
    weight: float = 0.05  # of the newest step in the moving averages
    steps: int = 0
    mean_tokens: float = 0.0  # EMA of tokens verified per step
    mean_seconds: float = 0.0  # EMA of seconds per step
    var_tokens: float = 0.0  # EMA of (tokens - mean)^2
    cov: float = 0.0  # EMA of (tokens - mean) * (seconds - mean)
    committed_per_s: float = 0.0  # EMA of tokens committed per second
    per_token_s: float | None = None  # the fitted marginal cost (kept when the spread vanishes)

    def observe(self, verified_tokens: int, committed_tokens: int, seconds: float) -> None:
        """One pure decode step: it verified `verified_tokens` (pending tokens + drafts of every
        row), committed `committed_tokens`, and took `seconds`."""
        if seconds <= 0 or verified_tokens <= 0:
            return
        self.steps += 1
        w = max(self.weight, 1.0 / self.steps)  # a plain mean over the first 1 / weight steps
        dx, dy = verified_tokens - self.mean_tokens, seconds - self.mean_seconds
        self.mean_tokens += w * dx
        self.mean_seconds += w * dy
        self.var_tokens = (1 - w) * (self.var_tokens + w * dx * dx)
        self.cov = (1 - w) * (self.cov + w * dx * dy)
        self.committed_per_s += w * (committed_tokens / seconds - self.committed_per_s)
        if self.steps >= MIN_STEPS and self.var_tokens >= MIN_SPREAD:
            self.per_token_s = max(self.cov / self.var_tokens, 0.0)

    def min_score(self, default: float) -> float:
        """The acceptance probability a draft token needs to pay for itself now (`default`
        until the fit is trusted)."""
        if self.per_token_s is None:
            return default
        return min(0.95, self.per_token_s * self.committed_per_s)


class StepCosts:
    """One StepCost per batch class (decoding rows 1, 2-3, 4-7, 8-15, 16-31, ...). A draft
    token's marginal cost depends on the batch: nearly free while a step is memory-bound at one
    row, a real share of the step at 16 (measured through vLLM here: a fit learned at batch 1
    kept drafting at batch 16, 0.75x no speculation on MT-Redundant), so each class learns its
    own and one class's fit never sets another's threshold."""

    def __init__(self) -> None:
        self._by_class: dict[int, StepCost] = {}

    def of(self, rows: int) -> StepCost:
        return self._by_class.setdefault(max(rows, 1).bit_length(), StepCost())
