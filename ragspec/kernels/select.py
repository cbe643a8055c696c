"""Which CPU kernels a loaded model runs: probed, then, where both run, timed on its own shapes.

Each fast path (prepacked linears, matmul attention) replaces a plain one that always works
(nn.Linear, SDPA). A fast path that fails its probe (`ragspec.kernels.probe`) is not used. Where
both run, a few verify forwards of the loaded model (1, 4 and 16 rows over a 256-token cache,
the variants interleaved per round, the fastest per row count) decide: on an AVX2-only CPU the packed
linears or the matmul attention can lose to the plain ops they were written to beat. Timings are
cached per model, device and dtype in cache_dir()/kernels/, with the machine they were taken on.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ragspec.errors import ConfigError
from ragspec.kernels import probe

log = logging.getLogger(__name__)

PACKED, PLAIN_LINEAR = "packed", "nn.Linear"
MATMUL, SDPA = "matmul", "sdpa"
TIMING_ROWS = (1, 4, 16)  # a decode step, small and larger tree verifies
TIMING_CONTEXT = 256  # cached tokens while timing
MIN_ROUNDS, MAX_ROUNDS = 2, 5  # measured rounds, after one warm-up round
TIMING_BUDGET_S = 3.0  # no round after MIN_ROUNDS starts once timing has taken this long
CACHE_VERSION = 3  # 2: fastest instead of median forward; 3: linears packed for 8 rows


@dataclass
class KernelChoice:
    chosen: str  # PACKED / PLAIN_LINEAR, or MATMUL / SDPA
    reason: str  # why: the failed probe, the timings, or "not a CPU"
    timings_ms: dict[str, list[float]] = field(default_factory=dict)  # candidate: fastest ms per forward at TIMING_ROWS


@dataclass
class KernelPlan:
    linear: KernelChoice
    attention: KernelChoice

    @property
    def key(self) -> str:
        return f"{self.linear.chosen}+{self.attention.chosen}"


Variant = Callable[[], contextlib.AbstractContextManager]


MODES = ("auto", "fast", "plain")  # probe + time; probe only; always the plain ops


def choose_kernels(target, cache_path: Path | None = None, mode: str = "auto") -> KernelPlan:
    """Probe, time (or read the cached timings) and switch `target.model` (a LoadedModel's) to
    the chosen kernels; `cache_path` None times without caching. `mode` "fast" skips the timing
    (fast paths wherever they run), "plain" always takes nn.Linear and SDPA."""
    from ragspec.kernels.attention import register
    from ragspec.kernels.linear import pack_linears, packing_problem

    check_mode(mode)
    model, dtype = target.model, target.dtype
    if target.device.type != "cpu":
        why = f"{target.device.type} device: ragspec's CPU kernels are not used"
        return KernelPlan(KernelChoice(PLAIN_LINEAR, why), KernelChoice(model.config._attn_implementation, why))
    forced = "kernel mode plain" if mode == "plain" else None
    linear_problem = forced or packing_problem(model) or probe.probe_packed_linear(dtype)
    attention_problem = forced or probe.probe_small_query_attention(dtype)
    if linear_problem is None and not target.packed_linears:
        pack_linears(model)
    model.set_attn_implementation(register() if attention_problem is None else SDPA)
    needed = [kind for kind, problem in (("linear", linear_problem), ("attention", attention_problem))
              if problem is None and mode == "auto"]
    timings = _cached_timings(cache_path, needed) if needed else {}
    if timings is None:
        timings = measure_kernel_timings(target, needed)
        _write_cache(cache_path, timings)
    plan = KernelPlan(
        linear=_decide(linear_problem, timings.get("linear"), PACKED, PLAIN_LINEAR),
        attention=_decide(attention_problem, timings.get("attention"), MATMUL, SDPA),
    )
    _apply(target, plan)
    log.info("kernels for %s: linear %s (%s); attention %s (%s)", target.name, plan.linear.chosen,
             plan.linear.reason, plan.attention.chosen, plan.attention.reason)
    return plan


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ConfigError(f"unknown kernel mode {mode!r} (load_model's kernels, or RAGSPEC_KERNELS): "
                          f"use one of {', '.join(MODES)}")
    return mode


def _decide(problem: str | None, timings: dict[str, list[float]] | None, fast: str, plain: str) -> KernelChoice:
    if problem is not None:
        return KernelChoice(plain, f"{fast} not used: {problem}")
    if timings is None:
        return KernelChoice(fast, "runs here (not timed: kernel mode fast)")
    winner = fast if sum(timings[fast]) <= sum(timings[plain]) else plain
    rows = "/".join(map(str, TIMING_ROWS))
    shown = {name: "/".join(f"{ms:.1f}" for ms in timings[name]) for name in (fast, plain)}
    why = f"faster here: {fast} {shown[fast]} ms vs {plain} {shown[plain]} ms per forward of {rows} rows"
    return KernelChoice(winner, why, dict(timings))


def _apply(target, plan: KernelPlan) -> None:
    from ragspec.kernels.linear import unpack_linears

    if plan.linear.chosen == PLAIN_LINEAR and target.packed_linears:
        unpack_linears(target.model)
    if plan.attention.chosen == SDPA and target.model.config._attn_implementation != SDPA:
        target.model.set_attn_implementation(SDPA)


def measure_kernel_timings(target, kinds: list[str]) -> dict[str, dict[str, list[float]]]:
    """Per kernel kind ("linear", "attention"): candidate -> median ms of one verify forward at
    each of TIMING_ROWS. The model as set up (every fast path that runs) is timed, and beside it
    the model with one plain op swapped in per kind."""
    from ragspec.kernels.linear import unpacked

    model = target.model
    plain = {"linear": (PACKED, PLAIN_LINEAR, lambda: unpacked(model)),
             "attention": (MATMUL, SDPA, lambda: _attention(model, SDPA))}
    variants = {"as set up": contextlib.nullcontext, **{plain[kind][1]: plain[kind][2] for kind in kinds}}
    ms = _time_variants(target, variants)
    return {kind: {plain[kind][0]: ms["as set up"], plain[kind][1]: ms[plain[kind][1]]} for kind in kinds}


@contextlib.contextmanager
def _attention(model, name: str) -> Iterator[None]:
    before = model.config._attn_implementation
    model.set_attn_implementation(name)
    try:
        yield
    finally:
        model.set_attn_implementation(before)


@torch.inference_mode()
def _time_variants(target, variants: dict[str, Variant]) -> dict[str, list[float]]:
    """The fastest ms per TIMING_ROWS row count for each variant over MIN_ROUNDS to MAX_ROUNDS
    rounds after a warm-up one (fewer once TIMING_BUDGET_S has passed). Variants are interleaved,
    in a rotating order, within each round; the minimum, because a busy machine only ever adds
    time (a median of a few rounds there still picks whichever variant was unlucky less often)."""
    verifier, trees, pending = _timing_verifier(target)
    times = {name: [[] for _ in TIMING_ROWS] for name in variants}
    names = list(variants)
    start_all = time.perf_counter()
    for round_number in range(MAX_ROUNDS + 1):  # round 0 warms up
        if round_number > MIN_ROUNDS and time.perf_counter() - start_all > TIMING_BUDGET_S:
            break
        for name in names[round_number % len(names):] + names[: round_number % len(names)]:
            with variants[name]():
                for tree, row_times in zip(trees, times[name]):
                    start = time.perf_counter()
                    verifier.verify(pending, tree)
                    elapsed = time.perf_counter() - start
                    verifier.discard()
                    if round_number:
                        row_times.append(1000 * elapsed)
    return {name: [min(t) for t in per_rows] for name, per_rows in times.items()}


def _timing_verifier(target):
    """A verifier with TIMING_CONTEXT random tokens cached, chain trees for TIMING_ROWS, the pending token."""
    from ragspec.types import DraftTree
    from ragspec.verify import TreeVerifier

    vocab = int(target.model.config.vocab_size)
    context = torch.randint(0, vocab, (TIMING_CONTEXT,), generator=torch.Generator().manual_seed(0)).tolist()
    verifier = TreeVerifier(target)
    verifier.prefill(context)
    trees = [DraftTree(token_ids=np.asarray(context[: rows - 1], dtype=np.int64),
                       parents=np.arange(rows - 1, dtype=np.int64) - 1,
                       scores=np.ones(rows - 1), sources=("timing",) * (rows - 1)) for rows in TIMING_ROWS]
    return verifier, trees, context[-1]


def machine_key() -> dict:
    """What the timings depend on besides the model: timings taken elsewhere are not reused."""
    return {
        "torch": torch.__version__,
        "aten_capability": torch.backends.cpu.get_cpu_capability(),
        "onednn_isa_limit": os.environ.get("ONEDNN_MAX_CPU_ISA", ""),
        "cpu_flags": list(probe.cpu_flags()),
        "threads": torch.get_num_threads(),
        "rows": list(TIMING_ROWS),
    }


def _cached_timings(path: Path | None, kinds: list[str]) -> dict | None:
    if path is None or not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        timings = data["timings_ms"]
        usable = data["version"] == CACHE_VERSION and data["machine"] == machine_key()
        if usable and all(_well_formed(timings[kind]) for kind in kinds):
            return timings
    except (OSError, ValueError, KeyError, TypeError):
        log.warning("ignoring unreadable kernel timings %s", path)
    return None


def _well_formed(timings: object) -> bool:
    """Two candidates, each a positive ms value per TIMING_ROWS row count."""
    return isinstance(timings, dict) and len(timings) == 2 and all(
        isinstance(ms, list) and len(ms) == len(TIMING_ROWS) and all(isinstance(v, (int, float)) and v > 0 for v in ms)
        for ms in timings.values())


def _write_cache(path: Path | None, timings: dict) -> None:
    """Atomic: a unique temporary file renamed over the target, so concurrent writers never
    leave a torn file (the last one wins). A failed write only costs a re-timing later."""
    if path is None:
        return
    data = {"version": CACHE_VERSION, "machine": machine_key(), "timings_ms": timings}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as handle:
                json.dump(data, handle, indent=1)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    except OSError as exc:
        log.warning("could not cache kernel timings in %s: %s", path, exc)
