"""The step -> (learning rate, training sequences) schedule both trainers share: functions of the
step alone, so a run resumed from a checkpoint repeats an uninterrupted one exactly."""

from __future__ import annotations

import math

import numpy as np


def learning_rate(step: int, peak: float, warmup_steps: int, steps: int) -> float:
    """Linear warmup to `peak`, then cosine decay to a tenth of it at `steps`."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, steps - warmup_steps)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def batch_rows(step: int, batch_size: int, count: int, seed: int) -> np.ndarray:
    """The `batch_size` sequences (of `count`) of `step`: epoch e visits all of them in a
    permutation seeded by (seed, e)."""
    permutations: dict[int, np.ndarray] = {}  # one per epoch the batch touches (at most two)
    rows = []
    for sample in range(step * batch_size, (step + 1) * batch_size):
        epoch, position = divmod(sample, count)
        if epoch not in permutations:
            permutations[epoch] = np.random.default_rng([seed, epoch]).permutation(count)
        rows.append(permutations[epoch][position])
    return np.array(rows)
