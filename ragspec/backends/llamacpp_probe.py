"""How many rows one llama_decode takes with logits equal to one-token decoding's: probed, cached.

llama.cpp picks its matmul kernels by batch size, CPU features, threads and quantisation type: on
one build a decode of up to 63 rows gives every logit bit-identical to one-token decoding while a
64-row decode changes every row (by up to 1.3, with argmax flips); on another build or CPU the
switch sits elsewhere, or nowhere. A tree verify is only lossless against llama.cpp's own greedy
loop below that switch, so the llama.cpp backend caps its trees at the largest row count this
probe found exact, on this GGUF, build, CPU and thread count.

The probe: a fixed English passage is prefilled, then its next tokens are decoded one at a time
(the reference logits), then verified as chains of growing row counts (PROBE_ROWS) in one decode
each. The first count whose logits differ by more than EXACT_TOLERANCE anywhere, or flip an
argmax, ends the growth; the count just below it is checked next (kernel switches sit at powers of
two), then a bisection between the last exact count and the first inexact one finds the switch. The
result is cached in cache_dir()/llamacpp/ under a key of everything it depends on.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ragspec.types import DraftTree

log = logging.getLogger(__name__)

PROBE_VERSION = 1
# Row counts checked, growing (the last: SpecConfig's default max_nodes + the pending token). Each
# costs about a one-token decode per row on a small model on the CPU, so few of them.
PROBE_ROWS = (2, 8, 32, 64, 65)
# Largest |verify logit - one-token logit| counted as exact. Exact rows measure 0 on the embedded
# Q4_1 GGUF; rows past the switch differ by 0.1 to 1.3 there (tests/test_llamacpp_backend.py).
EXACT_TOLERANCE = 1e-3
PREFIX_TOKENS = 24  # prompt tokens before the probed chain

PROBE_TEXT = (
    "The river town woke slowly that autumn. Fishermen pulled their boats onto the gravel, the baker "
    "opened his shutters before the bells rang, and children ran along the embankment with kites made "
    "of newspaper and string. Nobody expected the letter that arrived with the morning post, and nobody "
    "could say afterwards who had first read it aloud in the square. It announced that the old bridge, "
    "built of stone three centuries before, would be closed for repairs until the spring, and that "
    "every cart, every bicycle and every flock of sheep would have to cross by the ferry instead. The "
    "ferryman, a quiet man who had carried perhaps a dozen passengers a week for twenty years, read the "
    "letter twice, folded it into his coat, and went down to the water to count his ropes. By noon the "
    "queue on the landing stretched past the church, and by evening the town had learned more about "
    "its neighbours' errands than in all the years the bridge had stood."
)


@dataclass(frozen=True)
class ExactRows:
    """The probe's answer: `rows`, the largest row count found exact (1: only one-token decodes)."""

    rows: int
    checked: dict[int, float]  # row count -> max |verify - one-token| logit over its rows (inf: an argmax flipped)
    seconds: float  # how long the probe took

    def describe(self) -> str:
        shown = ", ".join(f"{rows}: {diff:.3g}" for rows, diff in sorted(self.checked.items()))
        return f"{self.rows} rows exact (max |logit diff| per row count: {shown}; {self.seconds:.1f} s)"


def exact_rows(target, limit: int) -> ExactRows:
    """The cached probe result for `target` (a LlamaCppTarget), probing up to `limit` rows when
    nothing is cached for this GGUF, build, CPU and threads."""
    from ragspec.models import cache_dir

    key = probe_key(target, limit)
    path = cache_dir() / "llamacpp" / f"exact-rows-{hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]}.json"
    found = _read(path, key)
    if found is not None:
        log.info("llama.cpp verify on %s: %s (cached %s)", target.name, found.describe(), path)
        return found
    found = measure_exact_rows(target, limit)
    _write(path, key, found)
    log.info("llama.cpp verify on %s: %s", target.name, found.describe())
    return found


def probe_key(target, limit: int) -> dict:
    """What the answer depends on: the GGUF file, the llama.cpp library build, CPU features, threads."""
    from ragspec.kernels.probe import cpu_flags

    llama = target._llama
    library = Path(getattr(getattr(llama.llama_cpp, "_lib", None), "_name", "") or "")
    built = [str(library), library.stat().st_size, library.stat().st_mtime_ns] if library.is_file() else []
    return {
        "version": PROBE_VERSION,
        "gguf": target.identity,
        "llama_cpp": getattr(llama, "__version__", "?"),
        "library": built,
        "system_info": llama.llama_print_system_info().decode(errors="replace").strip(),
        "cpu_flags": list(cpu_flags()),
        "threads": list(target.options.threads()),
        "n_batch": target.options.n_batch,
        "rows": [r for r in PROBE_ROWS if r < limit] + [limit],
        "tolerance": EXACT_TOLERANCE,
    }


def measure_exact_rows(target, limit: int) -> ExactRows:
    """Probe: the largest row count up to `limit` whose chain verify matches one-token decoding."""
    start = time.perf_counter()
    tokens = _probe_tokens(target, PREFIX_TOKENS + limit)
    prefix, chain = tokens[:PREFIX_TOKENS], tokens[PREFIX_TOKENS:]
    verifier = target.new_verifier()
    reference = _one_token_logits(verifier, prefix, chain[: limit - 1])  # [limit, vocab]
    verifier.prefill(prefix)
    checked: dict[int, float] = {}

    def exact(rows: int) -> bool:
        if rows not in checked:
            checked[rows] = _difference(verifier, prefix[-1], chain[: rows - 1], reference[:rows])
        return checked[rows] <= EXACT_TOLERANCE

    good, bad = 1, None
    for rows in [r for r in PROBE_ROWS if r < limit] + [limit]:
        if not exact(rows):
            bad = rows
            break
        good = rows
    if bad is not None and bad - good > 1:  # the switch lies between: first just below it
        good, bad = (bad - 1, bad) if exact(bad - 1) else (good, bad - 1)
    while bad is not None and bad - good > 1:  # then bisect
        middle = (good + bad) // 2
        good, bad = (middle, bad) if exact(middle) else (good, middle)
    return ExactRows(rows=good, checked=checked, seconds=time.perf_counter() - start)


def _probe_tokens(target, count: int) -> list[int]:
    """`count` tokens of PROBE_TEXT (repeated if the tokenizer makes fewer)."""
    ids = list(target.tokenizer(PROBE_TEXT).input_ids)
    return (ids * (count // len(ids) + 1))[:count]


def _one_token_logits(verifier, prefix: list[int], chain: list[int]) -> np.ndarray:
    """Logits after prefix[-1] and after each token of `chain`, one decode per token. [1 + len, vocab]"""
    from ragspec.types import AcceptResult

    verifier.prefill(prefix)
    rows, pending = [], prefix[-1]
    for token in [*chain, None]:
        rows.append(verifier.verify(pending, DraftTree.empty()).logits[0].numpy())
        if token is not None:
            verifier.commit(AcceptResult([], [], token))
            pending = token
    return np.stack(rows)


def _difference(verifier, pending: int, chain: list[int], reference: np.ndarray) -> float:
    """Max |logit diff| of a chain verify against `reference`; inf where an argmax flips."""
    n = len(chain)
    tree = DraftTree(token_ids=np.asarray(chain, dtype=np.int64), parents=np.arange(n, dtype=np.int64) - 1,
                     scores=np.ones(n), sources=("probe",) * n)
    logits = verifier.verify(pending, tree).logits.numpy()
    verifier.discard()
    if np.any(logits.argmax(axis=1) != reference.argmax(axis=1)):
        return float("inf")
    return float(np.abs(logits - reference).max())


def _read(path: Path, key: dict) -> ExactRows | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        if data["key"] != key:
            return None
        found = ExactRows(rows=int(data["rows"]), checked={int(r): float(d) for r, d in data["checked"].items()},
                          seconds=float(data["seconds"]))
        if found.rows < 1:
            raise ValueError(f"rows {found.rows}")
        return found
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        log.warning("ignoring unreadable llama.cpp probe cache %s (%s); probing again", path, exc)
        return None


def _write(path: Path, key: dict, found: ExactRows) -> None:
    """Atomic (write_atomically); a failed write only costs probing again next load."""
    from ragspec.drafting.base import write_atomically

    payload = json.dumps({"key": key, **asdict(found), "checked": {str(r): d for r, d in found.checked.items()}},
                         indent=1).encode()
    try:
        write_atomically(path, lambda file: file.write(payload))
    except OSError as exc:
        log.warning("could not cache the llama.cpp probe in %s: %s", path, exc)
