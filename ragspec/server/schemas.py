"""OpenAI request bodies, validated, and turned into ragspec GenerationRequests.

Fields that OpenAI defines and ragspec cannot honour (n > 1, logprobs, tools, penalties, logit
bias, JSON mode, echo, suffix) are refused with a 400 that names them, never silently ignored.
Unknown fields are ignored, as OpenAI's own clients send new ones over time. Extra fields:
`index`, `k`, `documents` (retrieval), `top_k`, `speculative`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ragspec.server.config import ServerConfig
from ragspec.server.errors import APIError

MAX_STOPS = 4  # as OpenAI


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)  # OpenAI's default
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1)
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    # ragspec's own
    index: str | None = None
    k: int | None = Field(None, ge=0, le=64)
    documents: list[str] | None = Field(None, max_length=256)
    speculative: bool | None = None

    def refuse_unsupported(self) -> None:
        checks = [
            ("n", self.n != 1, "n must be 1: one choice per request"),
            ("frequency_penalty", self.frequency_penalty != 0, "frequency_penalty is not supported (lossless decoding)"),
            ("presence_penalty", self.presence_penalty != 0, "presence_penalty is not supported (lossless decoding)"),
            ("logit_bias", bool(self.logit_bias), "logit_bias is not supported (lossless decoding)"),
            ("stop", isinstance(self.stop, list) and len(self.stop) > MAX_STOPS, f"at most {MAX_STOPS} stop sequences"),
            ("stop", _has_empty_stop(self.stop), "stop sequences must not be empty strings"),
            ("documents", self.documents is not None and "index" in self.model_fields_set and self.index is not None,
             "pass index or documents, not both"),
        ]
        for param, bad, message in checks:
            if bad:
                raise APIError(400, message, param=param)

    def limits(self, config: ServerConfig) -> int:
        """max_tokens for this request, checked against the server's limit."""
        asked = self._asked_max_tokens()
        if asked is not None and asked > config.max_tokens_limit:
            raise APIError(400, f"max_tokens is {asked}, over this server's limit of {config.max_tokens_limit}",
                           param="max_tokens")
        return asked or config.max_tokens_default

    def _asked_max_tokens(self) -> int | None:
        return self.max_tokens

    def engine_options(self, config: ServerConfig) -> dict[str, Any]:
        """GenerationRequest fields, prompt excluded."""
        self.refuse_unsupported()
        options: dict[str, Any] = dict(
            max_new_tokens=self.limits(config), temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
            seed=self.seed, stop=() if self.stop is None else self.stop, speculative=self.speculative,
        )
        if self.documents is not None:
            options["documents"] = tuple(self.documents)
        else:
            index = self.index if "index" in self.model_fields_set else config.index
            if index:
                options.update(index=index, k=config.k if self.k is None else self.k)
        return options


def _has_empty_stop(stop) -> bool:
    stops = [stop] if isinstance(stop, str) else (stop or [])
    return any(s == "" for s in stops)


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None

    def as_dict(self, position: int) -> dict:
        role = "system" if self.role == "developer" else self.role
        if isinstance(self.content, list):
            wrong = [part.type for part in self.content if part.type != "text" or part.text is None]
            if wrong:
                raise APIError(400, f"content part of type {wrong[0]!r} is not supported: text parts only",
                               param=f"messages.{position}.content")
            return {"role": role, "content": "".join(part.text or "" for part in self.content)}
        return {"role": role, "content": self.content or ""}


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    tools: list[dict] | None = None
    response_format: dict | None = None

    def _asked_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.logprobs:
            raise APIError(400, "logprobs are not supported", param="logprobs")
        if self.tools:
            raise APIError(400, "tool calling is not supported by this server", param="tools")
        if self.response_format and self.response_format.get("type", "text") != "text":
            raise APIError(400, "only response_format type 'text' is supported", param="response_format")

    def prompt(self) -> list[dict]:
        return [message.as_dict(i) for i, message in enumerate(self.messages)]


class CompletionRequest(_Sampling):
    prompt: str | list[str]
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        checks = [
            ("logprobs", self.logprobs is not None, "logprobs are not supported"),
            ("echo", self.echo, "echo is not supported"),
            ("suffix", bool(self.suffix), "suffix (insertion) is not supported"),
            ("best_of", self.best_of not in (None, 1), "best_of must be 1"),
            ("prompt", isinstance(self.prompt, list) and len(self.prompt) != 1, "one prompt per request"),
            ("prompt", self.prompt in ("", [""]), "the prompt is empty"),
        ]
        for param, bad, message in checks:
            if bad:
                raise APIError(400, message, param=param)

    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]
