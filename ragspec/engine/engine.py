"""Engine: the user-facing generate/stream API over the decoding loop."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from ragspec.config import SamplingConfig, SpecConfig
from ragspec.drafting.base import Drafter
from ragspec.drafting.budget import LatencyCurve, NodeBudget, load_or_measure_curve
from ragspec.drafting.context_suffix import ContextSuffixDrafter
from ragspec.drafting.continuations import new_match_estimate
from ragspec.engine.loop import decode_steps
from ragspec.engine.text import TextAssembler
from ragspec.errors import ConfigError, PromptTooLong
from ragspec.models import LoadedModel, load_model
from ragspec.types import SpecStats

Prompt = str | Sequence[dict]  # raw text, or chat messages [{"role": ..., "content": ...}]
DrafterFactory = Callable[["Engine"], list[Drafter]]  # called once per request


@dataclass
class Generation:
    text: str
    token_ids: list[int]  # generated tokens, EOS excluded
    finish_reason: str  # "eos", "stop" (a stop string matched), or "length"
    stats: SpecStats
    prompt_tokens: int = 0


@dataclass
class TextStream:
    """Iterate for text pieces; `result` holds the whole Generation once iteration ends."""

    _pieces: Iterator[str]
    result: Generation | None = field(default=None)

    def __iter__(self) -> Iterator[str]:
        return self._pieces


class ContextDrafterFactory:
    """A fresh context suffix drafter per request, sharing one learned acceptance estimate."""

    def __init__(self) -> None:
        self.estimate = new_match_estimate()

    def __call__(self, engine: "Engine") -> list[Drafter]:
        return [ContextSuffixDrafter(engine.spec, self.estimate)]


class Engine:
    """Lossless speculative generation with one target model.

    >>> engine = Engine()                      # the embedded SmolLM2-135M-Instruct
    >>> out = engine.generate([{"role": "user", "content": "Hi"}], max_new_tokens=32)
    >>> out.text, out.stats.mean_acceptance_length
    """

    def __init__(
        self,
        model: str | LoadedModel | None = None,
        *,
        device: str | None = None,
        dtype: str | None = None,
        spec: SpecConfig | None = None,
        drafter_factories: Sequence[DrafterFactory] | None = None,
        latency_curve: LatencyCurve | None = None,
    ):
        self.target = model if isinstance(model, LoadedModel) else load_model(model, device=device, dtype=dtype)
        self.spec = spec or SpecConfig()
        self.drafter_factories = list(drafter_factories or [ContextDrafterFactory()])
        self._latency_curve = latency_curve
        self._budget: NodeBudget | None = None

    @property
    def tokenizer(self):
        return self.target.tokenizer

    def budget(self) -> NodeBudget:
        """The node budget, built on first use (profiles the latency curve once if not cached)."""
        if self._budget is None:
            curve = self._latency_curve or load_or_measure_curve(self.target)
            self._budget = NodeBudget(curve, self.spec.max_nodes, self.spec.min_nodes)
        return self._budget

    def encode(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            return list(self.tokenizer(prompt).input_ids)
        if not self.tokenizer.chat_template:
            raise ConfigError(f"model {self.target.name} has no chat template: pass a plain string prompt")
        encoded = self.tokenizer.apply_chat_template(list(prompt), add_generation_prompt=True, tokenize=True)
        return list(encoded["input_ids"] if isinstance(encoded, dict) or hasattr(encoded, "keys") else encoded)

    def generate(self, prompt: Prompt, **options) -> Generation:
        """Options: max_new_tokens, temperature, top_k, top_p, seed, stop, speculative."""
        stream = self.stream(prompt, **options)
        for _ in stream:
            pass
        assert stream.result is not None
        return stream.result

    def stream(
        self,
        prompt: Prompt,
        *,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: Sequence[str] = (),
        speculative: bool | None = None,
    ) -> TextStream:
        sampling = SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
        prompt_ids = self.encode(prompt)
        self._check_fits(prompt_ids)
        if max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        use_spec = self.spec.enabled if speculative is None else speculative
        stream = TextStream(iter(()))
        stream._pieces = self._run(prompt_ids, sampling, max_new_tokens, list(stop), use_spec, stream)
        return stream

    def _check_fits(self, prompt_ids: list[int]) -> None:
        limit = self.target.context_length
        if not prompt_ids:
            raise ConfigError("empty prompt")
        if len(prompt_ids) >= limit:
            raise PromptTooLong(
                f"prompt has {len(prompt_ids)} tokens but {self.target.name} holds {limit} in its "
                f"context: shorten the prompt (or retrieve fewer chunks) to under {limit} tokens"
            )

    def _run(self, prompt_ids, sampling, max_new_tokens, stop, use_spec, stream: TextStream) -> Iterator[str]:
        stats = SpecStats()
        drafters = [d for factory in self.drafter_factories for d in factory(self)] if use_spec else []
        budget = self.budget() if use_spec else None
        text = TextAssembler(self.tokenizer, stop)
        eos = self.target.eos_token_ids
        start = time.perf_counter()
        finish_reason = "length"
        for new_tokens in decode_steps(
            self.target, prompt_ids, drafters=drafters, budget=budget, sampling=sampling, stats=stats
        ):
            if not stats.time_to_first_token_s:
                stats.time_to_first_token_s = time.perf_counter() - start
            keep = new_tokens[: max_new_tokens - len(text.token_ids)]
            hit_eos = next((i for i, t in enumerate(keep) if t in eos), None)
            if hit_eos is not None:
                keep, finish_reason = keep[:hit_eos], "eos"
            piece = text.push(keep)
            if piece:
                yield piece
            if text.stopped:
                finish_reason = "stop"
            if finish_reason != "length" or len(text.token_ids) >= max_new_tokens:
                break
        tail = text.finish()
        if tail:
            yield tail
        stats.total_s = time.perf_counter() - start
        stats.num_generated_tokens = len(text.token_ids)
        stream.result = Generation(
            text=text.text,
            token_ids=list(text.token_ids),
            finish_reason=finish_reason,
            stats=stats,
            prompt_tokens=len(prompt_ids),
        )
