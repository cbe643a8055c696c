"""The drafter protocol and the bookkeeping every drafter shares.

A drafter never touches the target. Two verbs: `propose(context) -> DraftTree` and
`observe(step)`, called after each verify with what the target accepted.
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Protocol

import numpy as np

from ragspec.types import ROOT, DraftTree, StepResult

log = logging.getLogger(__name__)

TEMP_SUFFIX = ".tmp"
STALE_TEMP_S = 600.0  # a temporary file this old belongs to a writer that was killed
_warned_paths: set[Path] = set()  # paths whose failed save was already reported


@dataclass(frozen=True)
class DraftContext:
    tokens: np.ndarray  # [length] int64: committed tokens, then the pending token last
    max_nodes: int  # the most nodes worth proposing this step


class Drafter(Protocol):
    """Optionally also `finish_request(prompt_ids, generated_ids)`: called once a request ends
    (drafters that outlive requests learn from whole answers or save their state there)."""

    name: str

    def propose(self, context: DraftContext) -> DraftTree: ...

    def observe(self, step: StepResult) -> None: ...


def save_state(path: Path, array: np.ndarray) -> bool:
    """Save a drafter's learned state as .npy; False (and a warning, once per path) when it fails.

    Never raises: learned state is a cache, and a request that produced its answer must not
    fail because the cache dir is read-only or full. See `write_atomically` for what readers
    and concurrent writers see.
    """
    try:
        write_atomically(path, lambda file: np.save(file, array, allow_pickle=False))
    except Exception as exc:  # noqa: BLE001 - any failure to write a cache is only a warning
        warn_once(path, "cannot save learned state to %s: %s", path, exc)
        return False
    return True


def write_atomically(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Write `path` through a unique temporary file in its directory, fsynced, then renamed over it.

    Readers see the old file or the new one, whole, never a part. Concurrent writers (two
    processes sharing a cache dir or an index) each write their own temporary file; the last
    rename wins, the other writer's version is dropped whole (learned state: the loser's
    learning since it loaded stays in its memory and reaches the file at its next save). A
    process killed mid-write leaves only an orphaned `.<name>.*.tmp` file, which
    `remove_stale_temporaries` deletes later. On failure the temporary file is removed and the
    error raised.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as file:
            os.fchmod(file.fileno(), _mode_for(path))  # not mkstemp's 0600: others may read an index
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp_name)
        raise


def _mode_for(path: Path) -> int:
    """The permission bits of the file being replaced, or rw-r--r-- for a new one."""
    try:
        return path.stat().st_mode & 0o777
    except OSError:
        return 0o644


def remove_stale_temporaries(path: Path, older_than_s: float = STALE_TEMP_S) -> int:
    """Delete the temporary files of writes to `path` that were killed (older than any live
    write could be). Returns how many were removed; errors are ignored."""
    removed, now = 0, time.time()
    with contextlib.suppress(OSError):
        for tmp in path.parent.glob(f".{glob.escape(path.name)}.*{TEMP_SUFFIX}"):
            with contextlib.suppress(OSError):
                if now - tmp.stat().st_mtime > older_than_s:
                    tmp.unlink()
                    removed += 1
    return removed


def load_state(path: Path | None, what: str) -> np.ndarray | None:
    """A saved .npy array, or None when there is none or it cannot be read (with a warning).

    Catches everything: an empty, truncated or foreign file must never fail a request, it only
    costs the learned state. Pickled arrays are refused. Callers check shape and values.
    """
    if path is None or not path.is_file():
        return None
    remove_stale_temporaries(path)
    try:
        return np.load(path, allow_pickle=False)
    except Exception as exc:  # noqa: BLE001 - unreadable learned state is only a warning
        log.warning("ignoring unreadable %s %s (%s: %s); starting fresh", what, path, type(exc).__name__, exc)
        return None


def warn_once(path: Path, message: str, *args) -> None:
    if path in _warned_paths:
        log.debug(message, *args)
    else:
        _warned_paths.add(path)
        log.warning(message, *args)


def ema(average: float | None, value: float, weight: float) -> float:
    """Exponential moving average: `value` itself when there is no average yet."""
    return value if average is None else average + weight * (value - average)


def target_continuation(step: StepResult) -> list[int]:
    """What the target produced after the pending token: accepted drafts, then the bonus."""
    return [*step.accept.accepted_tokens, step.accept.bonus_token]


def judge_own_tree(tree: DraftTree, continuation: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Which of a drafter's own nodes were put to the test, and which the target agreed with.

    A node is tested when its parent path matches the target's continuation (so the target's
    token at its depth is known, verified or not); it is correct when its token matches too.
    Returns (tested, correct), each [num_nodes] bool.
    """
    tested = np.zeros(tree.num_nodes, dtype=bool)
    correct = np.zeros(tree.num_nodes, dtype=bool)
    for node, right in tested_nodes(tree.token_ids.tolist(), tree.parents.tolist(), continuation):
        tested[node], correct[node] = True, right
    return tested, correct


def tested_nodes(tokens: list[int], parents: list[int], continuation: list[int]) -> list[tuple[int, bool]]:
    """`judge_own_tree` of the tree `tokens`, `parents` as (node, correct) for each tested node,
    in node order: plain lists, since a drafter learns from its own tree after every step."""
    depth: list[int] = []
    correct: list[bool] = []
    judged: list[tuple[int, bool]] = []
    for node, (token, parent) in enumerate(zip(tokens, parents)):
        if parent == ROOT:
            depth.append(1)
            parent_ok = True
        else:
            depth.append(depth[parent] + 1)
            parent_ok = correct[parent]
        right = parent_ok and depth[node] <= len(continuation) and continuation[depth[node] - 1] == token
        correct.append(right)
        if parent_ok and depth[node] <= len(continuation):
            judged.append((node, right))
    return judged


class AcceptanceEstimate:
    """P(draft token correct | its parent was), learned online per feature bucket.

    Beta counts per bucket, started at a prior mean with a small pseudo-count so a few steps
    of evidence move it.
    """

    def __init__(self, prior: dict[object, float], default: float = 0.3, strength: float = 4.0):
        self._hits = {k: p * strength for k, p in prior.items()}
        self._trials = {k: strength for k in prior}
        self._default = default
        self._strength = strength

    def rate(self, bucket: object) -> float:
        trials = self._trials.get(bucket)
        return self._default if trials is None else self._hits[bucket] / trials

    def learn(self, tree: DraftTree, buckets: list, step: StepResult) -> None:
        """Update from one verify: buckets[i] is the bucket of the drafter's own node i."""
        self.learn_nodes(tree.token_ids.tolist(), tree.parents.tolist(), buckets, target_continuation(step))

    def learn_nodes(self, tokens: list[int], parents: list[int], buckets: list, continuation: list[int]) -> None:
        """`learn` for the tree `tokens`, `parents`, given what the target produced after the
        pending token (accepted drafts, then the bonus): all the vLLM proposer sees."""
        for node, right in tested_nodes(tokens, parents, continuation):
            self.update(buckets[node], 1, int(right))

    def update(self, bucket: object, tested: int, correct: int) -> None:
        if bucket not in self._trials:
            self._hits[bucket] = self._default * self._strength
            self._trials[bucket] = self._strength
        self._hits[bucket] += correct
        self._trials[bucket] += tested
