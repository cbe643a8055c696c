"""The llama.cpp backend: ragspec's draft trees verified by llama.cpp on a GGUF file's own weights.

One `llama_decode` per step runs the pending token and every tree node. The tree is expressed the
way llama.cpp expresses it: sequence 0 holds the committed tokens; each leaf of the tree gets a
sequence id of its own (its branch), the committed prefix is copied to every branch sequence
(`llama_memory_seq_cp`: with a unified KV cache that only tags the cells), and each node is tagged
with the ids of the branches that contain it, at position committed length + depth. A node then
attends to the committed tokens, the pending token and its own ancestors, as if its path had been
decoded token by token. After acceptance the KV keeps the accepted path only (sequence keep /
remove / copy), back in sequence 0.

Tokenization and the chat template come from the GGUF file through the transformers tokenizer
transformers builds from it (the same one the transformers backend loads for that file, so both
backends encode alike; tests/test_llamacpp_backend.py checks it against llama.cpp's own
tokenizer); EOS from the GGUF's eos_token_id, as the transformers backend reads it.

Each request's verifier holds one llama.cpp context (they share the loaded weights); a finished
request hands its context back with the committed tokens still in it, so the next request that
starts with them (the next turn of a chat) prefills only the rest.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import threading
import time
import weakref
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from ragspec.errors import ConfigError, ModelNotFound, UnsupportedModel
from ragspec.models import EMBEDDED_MODEL, cache_dir, embedded_model_path, vocab_fingerprint
from ragspec.types import ROOT, AcceptResult, DraftTree, VerifyOutput
from ragspec.verify.verifier import KVPrefix

MAX_SEQUENCES = 256  # llama.cpp's LLAMA_MAX_SEQ
# Rows a verify may hold: the pending token + SpecConfig's default max_nodes. How many of them give
# logits equal to one-token decoding depends on the build and CPU (llama.cpp switches matmul kernels
# by batch size): probed at load (ragspec.backends.llamacpp_probe), cached per GGUF, build, CPU, threads.
PROBE_LIMIT = 65
DEAD_SEQUENCE = MAX_SEQUENCES - 1  # holds verified tree rows until compaction (see LlamaCppVerifier.commit)
MAX_BRANCHES = DEAD_SEQUENCE - 1  # branch sequences 1..MAX_BRANCHES: leaves a tree may have


@dataclass(frozen=True)
class LlamaCppOptions:
    """llama.cpp's own knobs. The thread defaults are llama-cpp-python's `Llama` defaults, so that
    ragspec on this backend and the `llamacpp-greedy` benchmark method run alike."""

    n_threads: int | None = None  # one-row decodes; None: max(cpu_count // 2, 1), as `Llama`
    n_threads_batch: int | None = None  # multi-row decodes (tree verifies, prefill); None: cpu_count
    n_ctx: int | None = None  # context window; None: the model's training context
    n_batch: int = 512  # rows one llama_decode takes at most (prefill is fed in chunks of this)
    # a next request (a chat's next turn) reuses only the cached rows a cold prefill computes the
    # same way: whole n_batch chunks from position 0. llama.cpp's kernels depend on the batch size,
    # so rows decoded one at a time or in a shorter last chunk hold other KV bits, and the output
    # may leave plain llama.cpp's at a near-tie (measured on MT-Redundant: 3 of 3 prompts, top-2
    # gaps 0.03-0.13). False: reuse every cached row (faster next turns, not bit-exact)
    exact_prefix: bool = True

    def threads(self) -> tuple[int, int]:
        cpus = os.cpu_count() or 1
        return self.n_threads or max(cpus // 2, 1), self.n_threads_batch or cpus


def _llama():
    try:
        import llama_cpp
    except ImportError:
        raise ConfigError(
            "the llamacpp backend needs llama-cpp-python: pip install 'ragspec[llamacpp]' (builds llama.cpp, ~8 min)"
        ) from None
    from llama_cpp._logger import set_verbose

    set_verbose(False)  # llama.cpp's errors only, through llama-cpp-python's log callback (as Llama(verbose=False))
    return llama_cpp


def gguf_path(model) -> Path:
    """The .gguf file for `model` (None or the embedded model's name: the embedded file)."""
    if model is None or str(model) == EMBEDDED_MODEL:
        return embedded_model_path()
    path = Path(model).expanduser()
    if not (path.is_file() and path.suffix == ".gguf"):
        raise ModelNotFound(f"the llamacpp backend runs a .gguf file; no such file: {model}")
    return path


def load_llamacpp(model=None, options: LlamaCppOptions | None = None) -> "LlamaCppTarget":
    path = gguf_path(model)
    name = EMBEDDED_MODEL if model is None or str(model) == EMBEDDED_MODEL else path.stem
    return LlamaCppTarget(path, name, options or LlamaCppOptions())


def gguf_tokenizer(path: Path):
    """The transformers tokenizer of a GGUF file, converted once and cached under the cache dir."""
    from transformers import AutoTokenizer

    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    cached = cache_dir() / "tokenizers" / f"{path.stem}-{key}"
    if (cached / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(cached)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    cached.parent.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(cached)
    return tokenizer


class LlamaCppTarget:
    """A GGUF model loaded by llama.cpp: the TargetBackend protocol (ragspec.backends.base)."""

    backend = "llamacpp"
    device = torch.device("cpu")

    def __init__(self, path: Path, name: str, options: LlamaCppOptions):
        llama = _llama()
        llama.llama_backend_init()
        self.path, self.name, self.options = path, name, options
        params = llama.llama_model_default_params()
        self._model = llama.llama_model_load_from_file(str(path).encode(), params)
        if not self._model:
            raise UnsupportedModel(f"llama.cpp cannot load {path}")
        self._vocab = llama.llama_model_get_vocab(self._model)
        self.n_vocab = int(llama.llama_vocab_n_tokens(self._vocab))
        self.n_ctx = int(options.n_ctx or llama.llama_model_n_ctx_train(self._model))
        self.tokenizer = gguf_tokenizer(path)
        self._free: list[_Context] = []  # contexts no verifier holds, most recently released last
        self._lock = threading.Lock()
        self._llama = llama
        from ragspec.backends.llamacpp_probe import exact_rows

        self.exact_rows = exact_rows(self, min(PROBE_LIMIT, options.n_batch))
        self.max_tree_nodes = self.exact_rows.rows - 1  # nodes a verify takes with exact logits

    def __del__(self):
        for context in getattr(self, "_free", []):
            context.close()
        if getattr(self, "_model", None):
            self._llama.llama_model_free(self._model)
            self._model = None

    @property
    def context_length(self) -> int:
        return self.n_ctx

    @property
    def vocab_size(self) -> int:
        return self.n_vocab

    @property
    def dtype(self) -> str:
        """The weights' type as the GGUF file names it (e.g. "gguf-q4_1"), for reports."""
        buffer = ctypes.create_string_buffer(128)
        self._llama.llama_model_desc(self._model, buffer, len(buffer))
        return "gguf-" + buffer.value.decode(errors="replace").split()[-1].lower()

    kernels = None  # ragspec's torch kernels do not apply

    @property
    def eos_token_ids(self) -> set[int]:
        """The GGUF file's EOS token (tokenizer.ggml.eos_token_id), the one the transformers backend
        stops at on the same file. (llama.cpp's own end-of-generation set may be wider: on the
        embedded model it adds <|endoftext|> and the FIM token <reponame>.)"""
        return {int(self._llama.llama_vocab_eos(self._vocab))}

    @cached_property
    def tokenizer_fingerprint(self) -> str:
        return vocab_fingerprint(self.tokenizer)

    @cached_property
    def identity(self) -> str:
        stat = self.path.stat()
        return hashlib.sha256(json.dumps([str(self.path.resolve()), stat.st_size, stat.st_mtime_ns]).encode()).hexdigest()[:16]

    @property
    def fingerprint(self) -> str:
        """Model + backend + threads: keys the latency curve (llama.cpp's cost per row is its own)."""
        threads, batch_threads = self.options.threads()
        version = getattr(self._llama, "__version__", "?")
        return f"{self.name}-{self.identity}-llamacpp{version}-t{threads}x{batch_threads}-b{self.options.n_batch}"

    def llama_tokenize(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
        """llama.cpp's own tokenization of `text` (to check the transformers tokenizer against)."""
        data = text.encode()
        room = len(data) + 8
        buffer = (self._llama.llama_token * room)()
        count = self._llama.llama_tokenize(self._vocab, data, len(data), buffer, room, add_special, parse_special)
        if count < 0:
            raise ValueError(f"llama_tokenize needs {-count} tokens")
        return list(buffer[:count])

    def chat_template(self) -> str | None:
        """The chat template stored in the GGUF file (tokenizer.chat_template)."""
        raw = self._llama.llama_model_chat_template(self._model, None)
        return raw.decode() if raw else None

    def new_verifier(self, prefix: KVPrefix | None = None) -> "LlamaCppVerifier":
        return LlamaCppVerifier(self, prefix)

    def _acquire(self, prefix: KVPrefix | None) -> tuple["_Context", list[int]]:
        """A free context, with the tokens of seq 0 it may reuse: the one `prefix` was exported from
        if no other request changed it since; else any free one (emptied), else a new one."""
        with self._lock:
            for context in self._free:
                if isinstance(prefix, LlamaPrefix) and prefix.cache is context and context.epoch == prefix.epoch:
                    self._free.remove(context)
                    context.epoch += 1
                    return context, list(prefix.token_ids)
            if self._free:
                context = self._free.pop()
                context.epoch += 1
                context.clear()
                return context, []
        return _Context(self), []

    def _release(self, context: "_Context") -> None:
        with self._lock:
            self._free.append(context)


@dataclass
class LlamaPrefix(KVPrefix):
    """A finished request's committed tokens, still in the llama.cpp context `cache`. Valid while no
    other request took that context (`epoch` unchanged); else the taker starts cold."""

    epoch: int = 0

    def head(self, length: int) -> "LlamaPrefix":
        return LlamaPrefix(token_ids=self.token_ids[:length], cache=self.cache, epoch=self.epoch)


class _Context:
    """One llama.cpp context (unified KV, up to MAX_SEQUENCES sequences) and its decode batch."""

    def __init__(self, target: LlamaCppTarget):
        llama = target._llama
        self.llama, self.n_vocab = llama, target.n_vocab
        params = llama.llama_context_default_params()
        params.n_ctx = target.n_ctx
        params.n_batch = params.n_ubatch = target.options.n_batch
        params.n_seq_max = MAX_SEQUENCES
        params.n_threads, params.n_threads_batch = target.options.threads()
        params.kv_unified = True  # sequences share cells: seq_cp tags cells instead of copying them
        # Flash attention: a query skips masked cells and sums the others in cell order, so a node of
        # a tree and the same token decoded alone give identical logits (the plain path masks whole rows
        # of the KV, whose padding changes the summation).
        params.flash_attn_type = llama.LLAMA_FLASH_ATTN_TYPE_ENABLED
        params.no_perf = True
        self.ctx = llama.llama_init_from_model(target._model, params)
        if not self.ctx:
            raise UnsupportedModel(f"llama.cpp cannot create a context of {target.n_ctx} tokens for {target.path}")
        self.memory = llama.llama_get_memory(self.ctx)
        self.capacity = target.options.n_batch
        self.batch = llama.llama_batch_init(self.capacity, 0, MAX_SEQUENCES)
        self.epoch = 0
        self.dead_rows = 0  # cells held by DEAD_SEQUENCE
        self.cold_rows = 0  # leading rows of sequence 0 prefilled in whole chunks from position 0

    def used_cells(self, committed: int) -> int:
        return committed + self.dead_rows

    def close(self) -> None:
        if self.ctx:
            self.llama.llama_batch_free(self.batch)
            self.llama.llama_free(self.ctx)
            self.ctx = None

    def __del__(self):
        self.close()

    def clear(self) -> None:
        # metadata only: every cell is marked free (and masked) until rewritten; zeroing the KV
        # buffers (data=True) would memset n_ctx cells per request for nothing
        self.llama.llama_memory_clear(self.memory, False)
        self.dead_rows = self.cold_rows = 0

    def compact(self) -> None:
        """Rewrite sequence 0 into cells 0, 1, ... in position order and free every other cell
        (dead tree rows): a copy of its KV out and back (llama_state_seq_get/set_data)."""
        llama = self.llama
        size = llama.llama_state_seq_get_size(self.ctx, 0)
        buffer = (ctypes.c_uint8 * size)()
        written = llama.llama_state_seq_get_data(self.ctx, buffer, size, 0)
        cold_rows = self.cold_rows
        self.clear()
        if written and not llama.llama_state_seq_set_data(self.ctx, buffer, written, 0):
            raise RuntimeError("llama.cpp could not restore the KV of sequence 0 while compacting")
        self.cold_rows = cold_rows  # the same KV bits, in new cells

    def decode(self, tokens: list[int], positions: list[int], seq_ids: list[tuple[int, ...]],
               outputs: list[bool]) -> torch.Tensor | None:
        """One llama_decode of these rows; the logits of the rows with `outputs` set, in row order
        ([outputs, vocab] float32), None when no row asked for them."""
        batch = self.batch
        for row, (token, position, seqs, output) in enumerate(zip(tokens, positions, seq_ids, outputs)):
            batch.token[row] = token
            batch.pos[row] = position
            batch.n_seq_id[row] = len(seqs)
            row_seqs = batch.seq_id[row]
            for slot, seq in enumerate(seqs):
                row_seqs[slot] = seq
            batch.logits[row] = output
        batch.n_tokens = len(tokens)
        status = self.llama.llama_decode(self.ctx, batch)
        if status != 0:
            raise RuntimeError(f"llama_decode failed with status {status} ({len(tokens)} rows)")
        kept = sum(outputs)
        if not kept:
            return None
        pointer = self.llama.llama_get_logits(self.ctx)
        logits = np.ctypeslib.as_array(pointer, shape=(kept * self.n_vocab,))
        return torch.from_numpy(logits.copy()).view(kept, self.n_vocab)  # the buffer is reused next decode

    def remove(self, seq: int, start: int, end: int = -1) -> bool:
        return bool(self.llama.llama_memory_seq_rm(self.memory, seq, start, end))

    def copy(self, source: int, destination: int, start: int = -1, end: int = -1) -> None:
        self.llama.llama_memory_seq_cp(self.memory, source, destination, start, end)


def branch_sequences(parents: np.ndarray) -> list[tuple[int, ...]]:
    """For each node, the sequence ids of the branches containing it: leaf k (in node order) is
    branch k + 1; a node belongs to the branch of every leaf below it. [num_nodes] tuples."""
    n = len(parents)
    has_child = np.zeros(n, dtype=bool)
    has_child[parents[parents != ROOT]] = True
    members: list[list[int]] = [[] for _ in range(n)]
    for branch, leaf in enumerate(np.flatnonzero(~has_child), start=1):
        node = int(leaf)
        while node != ROOT:
            members[node].append(branch)
            node = int(parents[node])
    return [tuple(m) for m in members]


class LlamaCppVerifier:
    """The TargetVerifier of the llama.cpp backend. Between steps sequence 0 holds every committed
    token but the pending one, and nothing else is in the context."""

    def __init__(self, target: LlamaCppTarget, prefix: KVPrefix | None = None):
        self.target = target
        self.context, self.cached_ids = target._acquire(prefix)
        self._release = weakref.finalize(self, target._release, self.context)  # dropped: back to the pool
        self._pending_token: int | None = None
        self._branches: list[tuple[int, ...]] = []  # the last verify's per-node sequences
        self._num_branches = 0  # the last verify's branch sequences 1..num_branches (0: none left)
        self._depths = np.zeros(0, dtype=np.int64)

    @property
    def past_length(self) -> int:
        return len(self.cached_ids)

    def prefill(self, token_ids: list[int]) -> None:
        self._prefill(token_ids, feed_last=False)

    def prefill_and_verify(self, token_ids: list[int]) -> tuple[VerifyOutput, int]:
        start = time.perf_counter()
        logits, reused = self._prefill(token_ids, feed_last=True)
        return VerifyOutput(logits=logits, verify_s=time.perf_counter() - start), reused

    def _prefill(self, token_ids: list[int], feed_last: bool) -> tuple[torch.Tensor | None, int]:
        """Keep the committed tokens `token_ids` starts with, feed the rest in chunks of n_batch."""
        from ragspec.kvcache import common_prefix_length

        reused = common_prefix_length(self.cached_ids, token_ids[:-1])
        if self.target.options.exact_prefix:
            reused = min(reused, self.context.cold_rows) // self.context.capacity * self.context.capacity
        if reused and self.context.dead_rows:
            self.context.compact()  # freeing rows among dead ones would break the cells' order
        if not reused or not self.context.remove(-1, reused):  # nothing to keep, or cannot cut there
            self.context.clear()
            reused = 0
        self._branches, self._num_branches, self._depths = [], 0, np.zeros(0, dtype=np.int64)
        feed = token_ids[reused:] if feed_last else token_ids[reused:-1]
        logits = None
        for start in range(0, len(feed), self.context.capacity):
            chunk = feed[start : start + self.context.capacity]
            last = feed_last and start + len(chunk) == len(feed)
            positions = list(range(reused + start, reused + start + len(chunk)))
            outputs = [False] * len(chunk)
            outputs[-1] = last
            logits = self.context.decode(chunk, positions, [(0,)] * len(chunk), outputs)
        self.context.cold_rows = reused + len(feed) // self.context.capacity * self.context.capacity
        self.cached_ids = list(token_ids[:-1])
        self._pending_token = token_ids[-1]
        return logits, reused

    def verify(self, pending_token: int, tree: DraftTree) -> VerifyOutput:
        start = time.perf_counter()
        self._pending_token = pending_token
        past = self.past_length
        if tree.num_nodes + 1 > self.context.capacity:
            raise ConfigError(f"a tree of {tree.num_nodes} nodes exceeds llama.cpp's batch of {self.context.capacity} rows")
        self._branches = branch_sequences(tree.parents) if tree.num_nodes else []
        num_branches = self._num_branches = max((max(seqs) for seqs in self._branches), default=0)
        if num_branches > MAX_BRANCHES:
            raise ConfigError(f"a tree with {num_branches} leaves exceeds the {MAX_BRANCHES} branch sequences")
        if self.context.used_cells(past) + 1 + tree.num_nodes > self.target.n_ctx:
            self.context.compact()  # free the dead rows of earlier trees
        for branch in range(1, num_branches + 1):
            self.context.copy(0, branch)  # the committed prefix, seen by every branch
        from ragspec.verify.tree_attention import node_depths

        self._depths = node_depths(tree.parents)
        tokens = [pending_token, *tree.token_ids.tolist()]
        positions = [past, *(past + self._depths).tolist()]
        seqs = [tuple(range(num_branches + 1)), *self._branches]
        logits = self.context.decode(tokens, positions, seqs, [True] * len(tokens))
        return VerifyOutput(logits=logits, verify_s=time.perf_counter() - start)

    def commit(self, accept: AcceptResult) -> None:
        """Sequence 0 takes the pending token and the accepted path; the tree's other rows stay in
        their cells under DEAD_SEQUENCE, which no query sees, instead of being freed. Freed cells
        between kept ones would take the next tokens, and a query's keys would no longer be summed
        in position order: logits change (up to 0.7 measured on the embedded GGUF, its activations
        quantised to 8 bits amplify the rounding). `compact` frees the dead rows when the context
        fills up, keeping the order."""
        past = self.past_length
        if accept.accepted_nodes:
            last = accept.accepted_nodes[-1]
            branch = self._branches[last][0]  # a branch containing the whole accepted path
            self.context.copy(branch, 0, past + 1, past + 1 + int(self._depths[last]))  # [past + 1, past + depth]
        for branch in range(1, self._num_branches + 1):
            self.context.copy(branch, DEAD_SEQUENCE, past + 1)
            self.context.remove(branch, -1)
        self.context.dead_rows += len(self._branches) - len(accept.accepted_nodes)
        self._branches, self._num_branches = [], 0
        self.cached_ids += [self._pending_token, *accept.accepted_tokens]

    def discard(self) -> None:
        """Drop the rows of an unused verify: its pending row and tree rows, the last cells taken
        (the cells keep their position order)."""
        self.context.remove(0, self.past_length)
        for branch in range(1, self._num_branches + 1):
            self.context.remove(branch, -1)
        self._branches, self._num_branches = [], 0

    def export_prefix(self) -> KVPrefix:
        """The committed tokens, left in this verifier's context, which goes back to the target's pool."""
        self.discard()
        if self.context.dead_rows:
            self.context.compact()
        prefix = LlamaPrefix(token_ids=self.cached_ids, cache=self.context, epoch=self.context.epoch)
        self._release()  # once: the finalizer is spent
        return prefix
