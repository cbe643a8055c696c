"""Engine: the user-facing generate/stream API over the decoding loop."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ragspec.config import SamplingConfig, SpecConfig
from ragspec.drafting.base import Drafter
from ragspec.drafting.registry import DraftRequest, build_drafters
from ragspec.engine.budget import LatencyCurve, NodeBudget, load_or_measure_curve
from ragspec.engine.loop import decode_steps
from ragspec.engine.rag import RagPrompt, build_documents_prompt, build_rag_prompt
from ragspec.engine.request import GenerationRequest, Piece, Prompt
from ragspec.engine.text import TextAssembler
from ragspec.errors import ConfigError, PromptTooLong
from ragspec.backends import TargetBackend, load_target
from ragspec.types import SpecStats
from ragspec.verify import KVPrefix
from ragspec.verify.prefix_pool import DEFAULT_ENTRIES, PrefixPool

DrafterFactory = Callable[["Engine"], list[Drafter]]  # called once per request


@dataclass
class Generation:
    """`finish_reason`: "eos", "stop" (a stop string matched: `text` ends before it, `token_ids`
    end with the token that completed it), "length" (max_new_tokens or the context window),
    "cancelled" (the stream was closed or dropped before its end: `text` and `token_ids` are what
    was generated until then) or "error" (an exception ended it and went on to the caller)."""

    text: str
    token_ids: list[int]  # generated tokens, EOS excluded
    finish_reason: str
    stats: SpecStats
    prompt_tokens: int = 0
    sources: list = field(default_factory=list)  # RetrievedChunks of a RAG request, best first


@dataclass
class _Outcome:
    """Where a request's generator leaves its Generation (the stream reads it from here, so the
    generator holds no reference to its stream and dropping the stream closes the generator)."""

    result: Generation | None = None


@dataclass
class _Request:
    prompt_ids: list[int]
    sampling: SamplingConfig
    max_new_tokens: int
    stop: list[str]
    drafters: list[Drafter]
    rag: RagPrompt | None


class TextStream:
    """Iterate for text pieces, or call `pieces()` for Pieces (text, token ids, the drafter of
    each token); `result` holds the whole Generation once the request ends.

    Every piece is a continuation of the pieces before it, and together they are `result.text`.
    Ending early is safe: `close()`, leaving a `with` block, or dropping the stream ends the
    request at once (its cached prefix goes back to the engine's pool, drafters learn what was
    generated) with finish_reason "cancelled".
    """

    def __init__(self, run: Callable[[_Outcome], Iterator[Piece]], prompt_tokens: int = 0):
        self._outcome = _Outcome()
        self._pieces = run(self._outcome)
        self._prompt_tokens = prompt_tokens

    @property
    def result(self) -> Generation | None:
        return self._outcome.result

    def pieces(self) -> Iterator[Piece]:
        """The request's Pieces, one per decoding step that committed tokens (plus one for text
        held back to the end). Shares its position with iterating the stream for text."""
        return self._pieces

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        while True:
            piece = next(self._pieces)
            if piece.text:
                return piece.text

    def close(self) -> None:
        """End the request now (nothing happens to a finished one)."""
        self._pieces.close()
        if self._outcome.result is None:  # closed before it started: it took nothing
            self._outcome.result = Generation("", [], "cancelled", SpecStats(), self._prompt_tokens)

    def __enter__(self) -> "TextStream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Engine:
    """Lossless speculative generation with one target model.

    >>> engine = Engine()                      # the embedded SmolLM2-135M-Instruct
    >>> out = engine.generate([{"role": "user", "content": "Hi"}], max_new_tokens=32)
    >>> out.text, out.stats.mean_acceptance_length
    >>> engine.generate("Who wrote it?", index="books", k=5).sources

    Threads: one Engine serves several threads, and several streams advanced in turn, safely. A
    per-engine lock is held while a request is set up, during each of its decoding steps (drafting
    plus one target forward) and while it ends, never while a piece is with the consumer: requests
    in flight take turns step by step (in the order the lock grants, not strictly first come,
    first served), and a stream left unfinished never blocks the others.
    """

    def __init__(
        self,
        model: str | TargetBackend | None = None,
        *,
        device: str | None = None,
        dtype: str | None = None,
        backend: str = "transformers",
        backend_options=None,
        spec: SpecConfig | None = None,
        drafter_factories: Sequence[DrafterFactory] | None = None,
        latency_curve: LatencyCurve | None = None,
        index_home: str | Path | None = None,
        persist_state: bool = True,
        prefix_cache: bool = True,
        prefix_cache_entries: int = DEFAULT_ENTRIES,
        prefix_pool: PrefixPool | None = None,
    ):
        """`drafter_factories` replaces the built-in drafters chosen by `spec.drafters`;
        `persist_state=False` keeps learned drafter state off disk (the recycling matrix in the
        cache dir, past responses in each index directory); `prefix_cache` keeps the KV caches of
        the last `prefix_cache_entries` requests (least recently used dropped first) so that a
        prompt starting with the same tokens as one of them (the earlier turns of a chat) prefills
        only the rest; `prefix_pool` shares another Engine's pool (engines over one loaded model,
        e.g. with different drafters, then prefill a shared document once; the pool has no lock of
        its own, so engines sharing it are used from one thread). `backend`: which engine runs the
        target ("transformers", or "llamacpp" for a .gguf file, with a LlamaCppOptions as
        `backend_options`; see ragspec.backends)."""
        if model is None or isinstance(model, (str, Path)):
            self.target = load_target(model, backend, device=device, dtype=dtype, options=backend_options)
        else:
            self.target = model
        self.spec = spec or SpecConfig()
        self.drafter_factories = list(drafter_factories or [])
        self.index_home = Path(index_home) if index_home else None
        self.persist_state = persist_state
        self._latency_curve = latency_curve
        self._budget: NodeBudget | None = None
        self._shared: dict[str, object] = {}  # drafters and estimates that outlive a request
        self._indexes: dict[str, object] = {}
        self.prefix_cache = prefix_cache
        self.prefix_pool = prefix_pool if prefix_pool is not None else PrefixPool(max_entries=prefix_cache_entries)
        self._lock = threading.RLock()  # see the class docstring

    @property
    def tokenizer(self):
        return self.target.tokenizer

    def budget(self) -> NodeBudget:
        """The node budget, built on first use (profiles the latency curve once if not cached)."""
        if self._budget is None:
            curve = self._latency_curve or load_or_measure_curve(self.target)
            self._budget = NodeBudget(curve, self.spec.max_nodes, self.spec.min_nodes)
        return self._budget

    def encode(self, prompt: Prompt, add_generation_prompt: bool = True) -> list[int]:
        if isinstance(prompt, str):
            return list(self.tokenizer(prompt).input_ids)
        if not self.tokenizer.chat_template:
            raise ConfigError(f"model {self.target.name} has no chat template: pass a plain string prompt")
        encoded = self.tokenizer.apply_chat_template(
            list(prompt), add_generation_prompt=add_generation_prompt, tokenize=True
        )
        return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)

    def open_index(self, index):
        """An Index object, or a name/path opened once and checked against this model's tokenizer."""
        with self._lock:
            if isinstance(index, (str, Path)):
                if str(index) not in self._indexes:
                    from ragspec.index import open_index

                    self._indexes[str(index)] = open_index(str(index), home=self.index_home)
                index = self._indexes[str(index)]
            index.check_tokenizer(self.target.tokenizer_fingerprint)
            return index

    def cache_prefix(self, prompt: Prompt) -> int:
        """Prefill `prompt` (a system prompt, or a conversation so far) into the prefix cache, so
        that the next request starting with it skips that work. Returns the tokens cached."""
        if not self.prefix_cache:
            raise ConfigError("this engine was made with prefix_cache=False")
        with self._lock:
            prompt_ids = self.encode(prompt, add_generation_prompt=False)
            self._check_fits(prompt_ids)
            verifier = self.target.new_verifier(self._take_prefix(prompt_ids))
            verifier.prefill(prompt_ids)  # every token but the last, which the next request feeds
            prefix = verifier.export_prefix()
            self.prefix_pool.put(prefix)
            return len(prefix.token_ids)

    def forget_prefix(self) -> None:
        """Empty the prefix cache: the next request prefills its whole prompt."""
        with self._lock:
            self.prefix_pool.clear()

    def _take_prefix(self, prompt_ids: list[int]) -> KVPrefix | None:
        """The cached prefix that shares the most leading tokens with `prompt_ids`, handed to one
        request only (a concurrent one needing it starts cold)."""
        return self.prefix_pool.take(prompt_ids) if self.prefix_cache else None

    def generate(self, request: GenerationRequest | Prompt, **options) -> Generation:
        """Options: those of `stream`."""
        stream = self.stream(request, **options)
        for _ in stream:
            pass
        assert stream.result is not None
        return stream.result

    def stream(self, request: GenerationRequest | Prompt, **options) -> TextStream:
        """`request`: a GenerationRequest (options replace its fields), or a prompt and the
        GenerationRequest fields as options (max_new_tokens, temperature, top_k, top_p, seed,
        stop, speculative, index, k, rag_template, documents, draft_prompt).

        With `index` (a name, path or Index), the k best chunks for the question go into the
        prompt through `rag_template` ({context}, {question}) and feed the datastore drafter;
        `documents` (texts retrieved elsewhere) do the same through a datastore of their own.
        `stop`: one stop string, or several; generation ends where the first one appears."""
        asked = GenerationRequest.of(request, **options)
        with self._lock:
            index = self.open_index(asked.index) if asked.index is not None else None
            rag = self._rag_prompt(asked, index)
            prompt_ids = self.encode(rag.messages if rag else asked.prompt)
            self._check_fits(prompt_ids)
            use_spec = self.spec.enabled if asked.speculative is None else asked.speculative
            drafters = self._request_drafters(asked, prompt_ids, index, rag) if use_spec else []
        run = _Request(prompt_ids, asked.sampling, asked.max_new_tokens, list(asked.stop), drafters, rag)
        return TextStream(lambda outcome: self._run(run, outcome), prompt_tokens=len(prompt_ids))

    def _rag_prompt(self, asked: GenerationRequest, index) -> RagPrompt | None:
        if index is not None:
            return build_rag_prompt(index, asked.prompt, asked.k, asked.rag_template)
        if asked.documents is not None:
            return build_documents_prompt(self.tokenizer, asked.documents, asked.prompt, asked.rag_template)
        return None

    def _check_fits(self, prompt_ids: list[int]) -> None:
        limit = self.target.context_length
        if not prompt_ids:
            raise ConfigError("empty prompt")
        if len(prompt_ids) >= limit:
            raise PromptTooLong(
                f"prompt has {len(prompt_ids)} tokens but {self.target.name} holds {limit} in its "
                f"context: shorten the prompt (or retrieve fewer chunks) to under {limit} tokens"
            )

    def _request_drafters(self, asked: GenerationRequest, prompt_ids: list[int], index,
                          rag: RagPrompt | None) -> list[Drafter]:
        """`index`: the request's opened Index, or None."""
        if self.drafter_factories:
            return [d for factory in self.drafter_factories for d in factory(self)]
        draft_prompt_ids = self.encode(asked.draft_prompt) if asked.draft_prompt is not None else None
        request = DraftRequest(self, prompt_ids, asked.sampling, index, rag, draft_prompt_ids=draft_prompt_ids)
        return build_drafters(self.spec.drafters, request, self.spec.options)

    def shared_state(self, key: str, make: Callable[[], object]):
        """The object stored under `key` for this engine's lifetime, made by `make` on first use
        (drafters and estimates that outlive a request)."""
        if key not in self._shared:
            self._shared[key] = make()
        return self._shared[key]

    def _run(self, request: _Request, outcome: _Outcome) -> Iterator[Piece]:
        """The request's pieces. However it ends (finished, closed, dropped, an exception), the
        `finally` ends the request and leaves its Generation in `outcome`."""
        stats, text = SpecStats(), TextAssembler(self.tokenizer, request.stop)
        start = time.perf_counter()
        verifier, steps, reason = None, None, None
        try:
            with self._lock:
                verifier = self.target.new_verifier(self._take_prefix(request.prompt_ids))
                budget = self.budget() if request.drafters else None
                steps = decode_steps(verifier, request.prompt_ids, drafters=request.drafters, budget=budget,
                                     sampling=request.sampling, stats=stats, min_draft_prob=self.spec.min_draft_prob)
            while reason is None:
                with self._lock:
                    piece, reason = self._step(steps, request, text, stats, start)
                if piece.text or piece.token_ids:
                    yield piece
            tail = text.finish()
            reason = "stop" if text.stopped else reason
            if tail:
                yield Piece(tail, [], [])
        except GeneratorExit:  # closed or dropped by the consumer
            reason = reason or "cancelled"
            raise
        except BaseException:
            reason = "error"
            raise
        finally:
            if steps is not None:
                steps.close()
            with self._lock:
                outcome.result = self._end_request(request, verifier, text, stats, reason or "error", start)

    def _step(self, steps, request: _Request, text: TextAssembler, stats: SpecStats, start: float):
        """Run one decoding step; its Piece (tokens taken, their sources, newly shown text), and
        the finish reason once there is one.
        Tokens are taken one at a time, as plain decoding takes them: up to max_new_tokens, up to
        EOS (excluded), up to the token that completes a stop string (included)."""
        step = next(steps, None)
        if step is None:  # the context window is full
            return Piece("", [], []), "length"
        if not stats.time_to_first_token_s:
            stats.time_to_first_token_s = time.perf_counter() - start
        new_tokens, sources = step
        keep = new_tokens[: request.max_new_tokens - len(text.token_ids)]
        hit_eos = next((i for i, t in enumerate(keep) if t in self.target.eos_token_ids), None)
        before = len(text.token_ids)
        shown = text.push(keep if hit_eos is None else keep[:hit_eos])
        taken = text.token_ids[before:]
        piece = Piece(shown, list(taken), list(sources[: len(taken)]))
        if text.stopped:
            return piece, "stop"
        if hit_eos is not None:
            return piece, "eos"
        return piece, "length" if len(text.token_ids) >= request.max_new_tokens else None

    def _end_request(self, request: _Request, verifier, text: TextAssembler, stats: SpecStats, reason: str,
                     start: float) -> Generation:
        """Hand the KV cache back to the prefix pool and let drafters learn the answer, unless an
        exception ended the request (the cache may be half-written then: it is dropped)."""
        stats.total_s = time.perf_counter() - start
        stats.num_generated_tokens = len(text.token_ids)
        if reason != "error":
            if verifier is not None and self.prefix_cache:
                self.prefix_pool.put(verifier.export_prefix())
            for drafter in request.drafters:
                finish = getattr(drafter, "finish_request", None)
                if finish is not None:
                    finish(request.prompt_ids, list(text.token_ids))
        return Generation(
            text=text.text,
            token_ids=list(text.token_ids),
            finish_reason=reason,
            stats=stats,
            prompt_tokens=len(request.prompt_ids),
            sources=list(request.rag.chunks) if request.rag else [],
        )
