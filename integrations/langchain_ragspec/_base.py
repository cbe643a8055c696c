"""Settings and request plumbing shared by ChatRagSpec and RagSpecLLM."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

from langchain_core.language_models.base import LangSmithParams
from pydantic import BaseModel, ConfigDict, Field

from langchain_ragspec._convert import REQUEST_OPTIONS, request_options
from langchain_ragspec._engines import Outcome, async_pieces, shared_engine, timed_pieces
from ragspec import Engine, GenerationRequest, Piece
from ragspec.models import EMBEDDED_MODEL


class RagSpecParams(BaseModel):
    """The standard LangChain arguments plus ragspec's own. Nothing is loaded until the first
    call: the Engine is then loaded once and shared by every object with the same model, dtype,
    device and index home (or pass `engine=` to use one you made)."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    model: str = EMBEDDED_MODEL
    """The embedded model's name, an HF model directory or a .gguf file."""
    temperature: float = 0.0
    """0 is greedy: the output equals plain decoding's, token for token."""
    max_tokens: int | None = None
    """New tokens at most (None: 256)."""
    timeout: float | None = None
    """Seconds a call may take: checked after each decoding step; past it, TimeoutError."""
    stop: list[str] | None = None
    """Stop strings, matched as text (also per call)."""
    max_retries: int = 0
    """Accepted for compatibility: a local model has no transient failures to retry."""
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    speculative: bool | None = None
    """None follows the engine's SpecConfig (on by default); False decodes token by token."""
    index: str | None = None
    """A ragspec index (name or directory): retrieve `k` chunks for the question, as context and
    drafting scope. A call's `documents=` replaces it."""
    k: int = 5
    rag_template: str | None = None
    """With an index or documents: the prompt around them ({context}, {question})."""
    dtype: str | None = None
    device: str | None = None
    index_home: str | None = None
    streaming: bool = False
    """Use the streaming path for `invoke` too."""
    engine: Engine | None = Field(default=None, exclude=True)
    """An Engine to use instead of loading `model` (its model's name is then reported)."""

    def get_engine(self, model: str | None = None) -> Engine:
        """The Engine for `model` (default: this object's), loaded on first use."""
        if self.engine is not None and model in (None, self.model):
            return self.engine
        return shared_engine(model or self.model, self.dtype, self.device, self.index_home)

    def model_name_for(self, model: str | None = None) -> str:
        return self.engine.target.name if self.engine is not None and model in (None, self.model) else (model or self.model)

    def ragspec_request(self, prompt, stop: list[str] | None, kwargs: dict) -> GenerationRequest:
        defaults = {name: getattr(self, name) for name in (*REQUEST_OPTIONS, "max_tokens", "stop")}
        return GenerationRequest(prompt, **request_options(defaults, stop, kwargs))

    def run_pieces(self, prompt, stop, kwargs: dict, outcome: Outcome) -> Iterator[Piece]:
        request = self.ragspec_request(prompt, stop, kwargs)
        return timed_pieces(self.get_engine(kwargs.get("model")), request, self.timeout, outcome)

    def run_pieces_async(self, prompt, stop, kwargs: dict, outcome: Outcome) -> AsyncIterator[Piece]:
        request = self.ragspec_request(prompt, stop, kwargs)  # bad arguments raise here, at once
        model = kwargs.get("model")
        return async_pieces(lambda: self.get_engine(model), request, self.timeout, outcome)

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return self.ragspec_params()

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        params = super()._get_ls_params(stop=stop, **kwargs)  # the LangChain base class's
        params["ls_provider"] = "ragspec"
        if "ls_stop" not in params and self.stop:
            params["ls_stop"] = list(self.stop)
        return params

    def ragspec_params(self) -> dict:
        return {"model": self.model, "temperature": self.temperature, "max_tokens": self.max_tokens,
                "top_k": self.top_k, "top_p": self.top_p, "seed": self.seed, "speculative": self.speculative,
                "index": self.index, "k": self.k}
