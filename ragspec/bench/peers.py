"""The decoding methods a benchmark compares, all on the same loaded model, greedy unless the run
samples (then every method samples at the run's temperature, and outputs are not compared).

  ragspec-ar       ragspec's own loop with speculation off (the reference output)
  ragspec          ragspec with speculation on: every default drafter, plus the draft model
                   when the run has one (the fused engine)
  ragspec-model    ragspec with the draft-model drafter only (needs a draft model)
  ragspec-retrieval  ragspec with the default (retrieval) drafters only
  ragspec-pruned   the fused engine with RASD's pruning (SpecConfig.min_draft_prob=0.02)
  ragspec-self     ragspec with the layer-skipping self-drafter only
  ragspec-eagle    ragspec with the EAGLE head drafter only (--eagle-head; auto: trained here if missing)
  ragspec-plus-eagle  every default drafter fused with the EAGLE head
  ragspec-plus-rapid  ragspec with the RAPID drafter added (not a default drafter: on long documents
                   it cost more than it added here; this row shows what it adds to `ragspec`)
  ragspec-rapid    ragspec with the RAPID drafter only
  ragspec-rapid-model  `ragspec-plus-rapid` with RAPID drafting by the run's draft model (--draft-model) instead of
                   the target itself
  hf-greedy        transformers `model.generate(do_sample=False)`
  hf-pld           transformers prompt lookup decoding (`prompt_lookup_num_tokens=10`)
  hf-assisted      transformers assisted generation with the run's draft model
  hf-early-exit    transformers' early-exit self-speculation (`assistant_early_exit`: the first
                   half of the target's layers draft)
                   (the hf-* methods run with transformers' stock SDPA attention and nn.Linear, as
                   a user's HF setup runs them; the ragspec methods use the kernels ragspec loads
                   models with, so ragspec-ar vs hf-greedy shows what those kernels and the loop are worth)
  llamacpp-greedy  llama.cpp on the GGUF file, only when `llama_cpp` is importable
                   (its quantised kernels differ numerically, so identical output is not expected)
  ragspec-llamacpp-ar  ragspec's plain loop on the llama.cpp backend, same GGUF file (its overhead
                   against llama.cpp's own loop); its outputs are compared with llamacpp-greedy's
  ragspec-llamacpp ragspec with speculation on, trees verified by llama.cpp (ragspec.backends.llamacpp)

The ragspec methods keep a prefix cache (see Engine): for a multi-turn prompt they start with the
earlier turns cached, as a chat server does; the HF methods prefill the whole conversation, as
`generate` does. `cached_prompt_tokens` in the report says how much that was.

On a RAG workload every method gets the same retrieved prompt: the two ragspec methods retrieve it
themselves (index=, so their wall time includes one search), the others get its token ids.

On a long-document workload (longdoc:<set>) every method reads the whole document; the methods
that run the RAPID drafter (`ragspec-plus-rapid`, `ragspec-rapid`, `ragspec-rapid-model`) also give the RAPID drafter the document's chunks retrieved for the question
(`LongDocContext`: the document is chunked and embedded untimed, as an index is built; the search
for the question is timed, inside the method's call).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from ragspec.config import SpecConfig
from ragspec.drafting.registry import default_drafters
from ragspec.engine import Engine, Generation
from ragspec.errors import ConfigError
from ragspec.kernels.linear import unpacked
from ragspec.models import EMBEDDED_MODEL, LoadedModel, embedded_model_path
from ragspec.types import SpecStats

REFERENCE_METHOD = "ragspec-ar"
SPECULATIVE_METHOD = "ragspec"
DEFAULT_METHODS = ("ragspec-ar", "ragspec", "hf-greedy", "hf-pld")
MODEL_DRAFT_METHODS = ("ragspec-model", "ragspec-pruned", "hf-assisted")  # need a draft model
ALL_METHODS = (*DEFAULT_METHODS, "ragspec-plus-rapid", "ragspec-rapid", "ragspec-model", "ragspec-retrieval",
               "ragspec-pruned", "ragspec-self", "ragspec-eagle", "ragspec-plus-eagle",
               "hf-assisted", "hf-early-exit", "llamacpp-greedy", "ragspec-llamacpp-ar", "ragspec-llamacpp")
LLAMACPP_ENGINE_METHODS = ("ragspec-llamacpp-ar", "ragspec-llamacpp")  # the llama.cpp backend's engine
PLD_NUM_TOKENS = 10
RASD_MIN_PROB = 0.02  # ragspec-pruned's SpecConfig.min_draft_prob
STOCK_ATTENTION = "sdpa"


@dataclass(frozen=True)
class MethodOutput:
    token_ids: list[int]  # generated tokens, prompt and EOS excluded
    wall_s: float  # the whole call, prefill included
    stats: SpecStats | None  # ragspec methods only


@dataclass(frozen=True)
class RagContext:
    """A RAG request: engine methods ask `question` with `index=` (so the datastore drafter runs);
    the others get the prompt ids of `build_rag_prompt(index, question, k)`, which retrieved `chunk_ids`."""

    question: str
    index: object  # ragspec.index.Index
    k: int
    chunk_ids: tuple[int, ...]


@dataclass(frozen=True)
class LongDocContext:
    """A long-document request: its document's chunks (ragspec.longdoc.DocumentChunks) and the
    question the RAPID drafter retrieves chunks for."""

    chunks: object  # DocumentChunks of the document as the prompt holds it
    question: str

    def draft_prompt(self, k: int) -> list[dict]:
        """RAPID's short prompt: the `k` chunks closest to the question, and the question."""
        from ragspec.longdoc import rapid_prompt

        return rapid_prompt(self.chunks.top_chunks(self.question, k), self.question)


@dataclass(frozen=True)
class PreparedRequest:
    """What every method is given for one measured prompt."""

    request_id: str
    messages: list[dict]
    prompt_ids: list[int]
    rag: RagContext | None = None
    longdoc: LongDocContext | None = None  # methods with `reads_longdoc` get it (the RAPID drafter's source)


class Method(Protocol):
    name: str

    def run(self, messages: Sequence[dict], prompt_ids: list[int], max_new_tokens: int,
            rag: RagContext | None = None) -> MethodOutput: ...


@dataclass(frozen=True)
class Sampling:
    """How every method of a run picks tokens: greedy (temperature 0), or sampling with a seed."""

    temperature: float = 0.0
    seed: int = 0


@dataclass
class EngineMethod:
    name: str
    engine: Engine
    speculative: bool
    sampling: Sampling = Sampling()
    reads_longdoc: bool = False  # a long-document request's chunks go to the RAPID drafter

    def run(self, messages: Sequence[dict], prompt_ids: list[int], max_new_tokens: int,
            rag: RagContext | None = None, longdoc: LongDocContext | None = None) -> MethodOutput:
        options = {"max_new_tokens": max_new_tokens, "speculative": self.speculative,
                   "temperature": self.sampling.temperature, "seed": self.sampling.seed}
        self._set_prefix_cache(messages, rag)
        start = time.perf_counter()
        if longdoc is not None and self.reads_longdoc:  # the question's search is timed, as a user's request has it
            options["draft_prompt"] = longdoc.draft_prompt(rapid_chunks(self.engine))
        if rag is None:
            out = self.engine.generate(messages, **options)
        else:  # retrieval runs inside the call, as a user's RAG request does
            out = self.engine.generate(rag.question, index=rag.index, k=rag.k, **options)
        wall_s = time.perf_counter() - start
        if rag is not None:
            check_same_rag_prompt(out, prompt_ids, rag)
        return MethodOutput(token_ids=list(out.token_ids), wall_s=wall_s, stats=out.stats)

    def _set_prefix_cache(self, messages: Sequence[dict], rag: RagContext | None) -> None:
        """Untimed: leave the KV cache as a chat server holds it when this turn arrives, the earlier
        turns cached (from the same engine's last request), and nothing of an earlier method's run."""
        self.engine.forget_prefix()
        if rag is None and len(messages) > 1 and self.engine.prefix_cache:
            self.engine.cache_prefix(list(messages[:-1]))


def check_same_rag_prompt(out: Generation, prompt_ids: list[int], rag: RagContext) -> None:
    """The engine's own RAG prompt must be the one every other method was given: the same chunks in
    the same order through the same template, hence the same ids (checked by their count too)."""
    chunk_ids = tuple(chunk.chunk_id for chunk in out.sources)
    if chunk_ids != rag.chunk_ids or out.prompt_tokens != len(prompt_ids):
        raise AssertionError(
            f"RAG prompt mismatch for {rag.question[:60]!r}: the engine retrieved {chunk_ids} "
            f"({out.prompt_tokens} prompt tokens), the other methods got {rag.chunk_ids} ({len(prompt_ids)})"
        )


@dataclass
class HFGenerateMethod:
    """`generate` on the engine's own HF model, fed the same prompt token ids."""

    name: str
    engine: Engine
    sampling: Sampling = Sampling()
    extra: dict = field(default_factory=dict)  # generate() options: prompt lookup, early exit
    assistant: torch.nn.Module | None = None  # assisted generation's draft model

    @torch.inference_mode()
    def run(self, messages: Sequence[dict], prompt_ids: list[int], max_new_tokens: int,
            rag: RagContext | None = None) -> MethodOutput:
        target = self.engine.target
        input_ids = torch.tensor([prompt_ids], dtype=torch.long, device=target.device)
        extra = dict(self.extra)
        if self.assistant is not None:
            extra["assistant_model"] = self.assistant
        if self.sampling.temperature > 0:
            torch.manual_seed(self.sampling.seed)
            extra.update(do_sample=True, temperature=self.sampling.temperature, top_k=0, top_p=1.0)
        else:
            extra["do_sample"] = False
        eos = sorted(target.eos_token_ids)
        with contextlib.ExitStack() as stack:
            for model in (target.model, self.assistant):
                if model is not None:
                    stack.enter_context(stock_kernels(model))
            start = time.perf_counter()
            output = target.model.generate(
                input_ids,
                attention_mask=torch.ones_like(input_ids),
                max_new_tokens=max_new_tokens,
                pad_token_id=eos[0] if eos else None,
                **extra,
            )
            wall_s = time.perf_counter() - start
        generated = output[0, len(prompt_ids):].tolist()
        return MethodOutput(token_ids=cut_at_eos(generated, target.eos_token_ids), wall_s=wall_s, stats=None)


@contextlib.contextmanager
def stock_kernels(model: torch.nn.Module) -> Iterator[None]:
    """Run `model` inside the block as a plain transformers setup would: SDPA attention and
    nn.Linear layers (not ragspec's CPU attention and prepacked linears)."""
    loaded_with = model.config._attn_implementation
    model.set_attn_implementation(STOCK_ATTENTION)
    try:
        with unpacked(model):
            yield
    finally:
        model.set_attn_implementation(loaded_with)


@dataclass
class LlamaCppMethod:
    """llama.cpp greedy decoding of the same prompt token ids (the GGUF file's own weights)."""

    name: str
    llama: object  # llama_cpp.Llama
    eos_token_ids: set[int]

    def run(self, messages: Sequence[dict], prompt_ids: list[int], max_new_tokens: int,
            rag: RagContext | None = None) -> MethodOutput:
        self.llama.reset()
        tokens: list[int] = []
        start = time.perf_counter()
        for token in self.llama.generate(prompt_ids, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0):
            if token in self.eos_token_ids or len(tokens) >= max_new_tokens:
                break
            tokens.append(int(token))
        return MethodOutput(token_ids=tokens, wall_s=time.perf_counter() - start, stats=None)


def cut_at_eos(token_ids: list[int], eos_token_ids: set[int]) -> list[int]:
    """Tokens before the first EOS, as the engine returns them."""
    for index, token in enumerate(token_ids):
        if token in eos_token_ids:
            return token_ids[:index]
    return token_ids


def llamacpp_available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


@dataclass(frozen=True)
class MethodSetup:
    """What building the methods needs besides their names and the engine."""

    model_path: str | None  # the target's path (llama.cpp reads the GGUF file)
    draft: LoadedModel | None = None  # the run's draft model, if any
    sampling: Sampling = Sampling()
    eagle_head: str = "auto"  # the EAGLE head of ragspec-eagle / ragspec-plus-eagle


def build_methods(names: Sequence[str], engine: Engine, setup: MethodSetup) -> list[Method]:
    """Methods by name, the reference `ragspec-ar` always first."""
    ordered = [REFERENCE_METHOD, *(n for n in dict.fromkeys(names) if n != REFERENCE_METHOD)]
    return [_build_method(name, engine, setup) for name in ordered]


def _build_method(name: str, engine: Engine, setup: MethodSetup) -> Method:
    sampling = setup.sampling
    if name in MODEL_DRAFT_METHODS and setup.draft is None:
        raise ConfigError(f"method {name} needs a draft model: pass --draft-model PATH (or auto)")
    if name in (REFERENCE_METHOD, SPECULATIVE_METHOD):
        speculative = name == SPECULATIVE_METHOD
        return EngineMethod(name, engine, speculative, sampling,
                            reads_longdoc=speculative and "rapid" in engine.spec.drafters)
    if name == "ragspec-plus-rapid":
        drafters = tuple(dict.fromkeys((*engine.spec.drafters, "rapid")))
        spec = dataclasses.replace(engine.spec, drafters=drafters)
        return EngineMethod(name, fresh_engine(engine, spec), True, sampling, reads_longdoc=True)
    if name == "ragspec-rapid":
        spec = dataclasses.replace(engine.spec, drafters=("rapid",))
        return EngineMethod(name, fresh_engine(engine, spec), True, sampling, reads_longdoc=True)
    if name == "ragspec-rapid-model":
        from ragspec.drafting.rapid import RapidConfig

        if setup.draft is None:
            raise ConfigError(f"method {name} needs a draft model: pass --draft-model PATH (or auto)")
        spec = SpecConfig(drafters=(*default_drafters(), "rapid"), options=(RapidConfig(model=setup.draft),))
        return EngineMethod(name, fresh_engine(engine, spec), True, sampling, reads_longdoc=True)
    if name == "ragspec-model":
        return EngineMethod(name, fresh_engine(engine, model_draft_spec(setup.draft, ())), True, sampling)
    if name == "ragspec-retrieval":
        return EngineMethod(name, fresh_engine(engine, SpecConfig()), True, sampling)
    if name == "ragspec-pruned":
        spec = dataclasses.replace(model_draft_spec(setup.draft, default_drafters()), min_draft_prob=RASD_MIN_PROB)
        return EngineMethod(name, fresh_engine(engine, spec), True, sampling)
    if name == "ragspec-self":
        return EngineMethod(name, fresh_engine(engine, SpecConfig(drafters=("self",))), True, sampling)
    if name in ("ragspec-eagle", "ragspec-plus-eagle"):
        from ragspec.drafting.eagle import EagleDraftConfig

        drafters = ("eagle",) if name == "ragspec-eagle" else (*default_drafters(), "eagle")
        spec = SpecConfig(drafters=drafters, options=(EagleDraftConfig(model=setup.eagle_head),))
        return EngineMethod(name, fresh_engine(engine, spec), True, sampling)
    if name == "hf-greedy":
        return HFGenerateMethod(name, engine, sampling)
    if name == "hf-pld":
        return HFGenerateMethod(name, engine, sampling, {"prompt_lookup_num_tokens": PLD_NUM_TOKENS})
    if name == "hf-assisted":
        return HFGenerateMethod(name, engine, sampling, assistant=setup.draft.model)
    if name == "hf-early-exit":
        layers = int(engine.target.model.config.num_hidden_layers)
        return HFGenerateMethod(name, engine, sampling, {"assistant_early_exit": max(1, layers // 2)})
    if name == "llamacpp-greedy":
        return _llamacpp_method(engine, setup.model_path, engine.target.context_length)
    if name in LLAMACPP_ENGINE_METHODS:
        return EngineMethod(name, llamacpp_engine(engine, setup.model_path), name == "ragspec-llamacpp", sampling)
    raise ConfigError(f"unknown method {name!r}: use {', '.join(ALL_METHODS)}")


def model_draft_spec(draft: LoadedModel, retrieval_drafters: Sequence[str]) -> SpecConfig:
    """A SpecConfig running the draft model `draft`, fused with `retrieval_drafters`."""
    from ragspec.drafting.model import ModelDraftConfig

    return SpecConfig(drafters=(*retrieval_drafters, "model"), options=(ModelDraftConfig(model=draft),))


def _llamacpp_method(engine: Engine, model_path: str | None, n_ctx: int) -> Method:
    if not llamacpp_available():
        raise ConfigError("method llamacpp-greedy needs llama-cpp-python: pip install llama-cpp-python")
    gguf = _gguf_file(model_path)
    from llama_cpp import Llama

    # flash attention, as the llama.cpp backend runs (its default there): the same kernels, so the
    # outputs are comparable token for token
    llama = Llama(model_path=str(gguf), n_ctx=n_ctx, flash_attn=True, verbose=False)
    return LlamaCppMethod("llamacpp-greedy", llama, engine.target.eos_token_ids)


def llamacpp_engine(engine: Engine, model_path: str | None) -> Engine:
    """An Engine on the llama.cpp backend over the run's GGUF file (loaded once per run, shared by
    ragspec-llamacpp-ar and ragspec-llamacpp), with the run's spec and its own latency curve,
    profiled fresh like the torch one (llama.cpp's cost per row is its own)."""
    def make() -> Engine:
        if not llamacpp_available():
            raise ConfigError("the ragspec-llamacpp methods need llama-cpp-python: pip install 'ragspec[llamacpp]'")
        from ragspec.backends.llamacpp import load_llamacpp
        from ragspec.engine.budget import measure_latency_curve

        target = load_llamacpp(_gguf_file(model_path))
        return Engine(target, spec=engine.spec, latency_curve=measure_latency_curve(target),
                      index_home=engine.index_home, persist_state=False)

    return engine.shared_state("bench:llamacpp-engine", make)


def _gguf_file(model_path: str | None) -> Path:
    if model_path is None or model_path == EMBEDDED_MODEL:
        return embedded_model_path()
    if str(model_path).endswith(".gguf"):
        return Path(model_path).expanduser()
    raise ConfigError("the llama.cpp methods need a .gguf model (or the embedded default)")


def rapid_chunks(engine: Engine) -> int:
    """How many chunks `engine`'s RAPID drafter reads (its RapidConfig.chunks)."""
    from ragspec.drafting.registry import REGISTRY, config_for

    return config_for(REGISTRY["rapid"], engine.spec.options).chunks


def fresh_engine(engine: Engine, spec: SpecConfig) -> Engine:
    """A new Engine on the same loaded model and latency curve, with `spec`: its drafters start cold
    and keep their learned state off disk."""
    return Engine(engine.target, spec=spec, latency_curve=engine.budget().curve, index_home=engine.index_home,
                  persist_state=False)
