"""A request to an Engine, and the pieces its stream yields."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from ragspec.config import SamplingConfig
from ragspec.engine.text import stop_strings
from ragspec.errors import ConfigError

Prompt = str | Sequence[Mapping]  # raw text, or chat messages [{"role": ..., "content": ...}]
TARGET_SOURCE = "target"  # the source of a token the target chose itself (the bonus token)


@dataclass(frozen=True)
class GenerationRequest:
    """Everything one generation needs: `Engine.generate(request)` or `Engine.stream(request)`.

    `prompt`: raw text, or chat messages. `stop`: one stop string or several. `speculative`: None
    follows the engine's SpecConfig. Retrieval: `index` (a name, path or Index) with `k` chunks, or
    `documents`, texts retrieved elsewhere (any LangChain retriever, a vector store); either way
    the texts fill `rag_template`'s {context} and become the drafting scope of the request (the
    documents' tokens go into a datastore of their own, built for this request).
    `draft_prompt`: a short prompt the RAPID drafter reads instead of the request's prompt (the
    retrieved chunks and the question, `ragspec.longdoc.rapid_prompt`); the target reads the full
    prompt. Without one the "rapid" drafter does not run.
    """

    prompt: Prompt
    max_new_tokens: int = 256
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    speculative: bool | None = None
    index: object = None
    k: int = 5
    rag_template: str | None = None
    documents: tuple[str, ...] | None = None
    draft_prompt: Prompt | None = None
    sampling: SamplingConfig = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "prompt", _checked_prompt(self.prompt))
        object.__setattr__(self, "stop", tuple(stop_strings(self.stop)))
        object.__setattr__(self, "documents", _checked_documents(self.documents))
        if self.draft_prompt is not None:
            object.__setattr__(self, "draft_prompt", _checked_prompt(self.draft_prompt))
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 0:
            raise ConfigError(f"k (chunks to retrieve) must be >= 0, got {self.k}")
        if self.speculative not in (None, True, False):
            raise ConfigError(f"speculative must be True, False or None, got {self.speculative!r}")
        if self.index is not None and self.documents is not None:
            raise ConfigError("pass index (ragspec retrieves) or documents (already retrieved), not both")
        sampling = SamplingConfig(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, seed=self.seed)
        object.__setattr__(self, "sampling", sampling)

    @classmethod
    def of(cls, request: GenerationRequest | Prompt, **options) -> GenerationRequest:
        """`request` with `options` replaced, or a new request for a prompt and its options."""
        if isinstance(request, GenerationRequest):
            return dataclasses.replace(request, **options) if options else request
        return cls(request, **options)


@dataclass
class Piece:
    """What a stream step brings: `token_ids` committed since the previous piece, the drafter
    that drafted each (`sources`: "context", "past", "recycling", "datastore", ..., or "target"
    for the target's own token), and `text`, the newly safe text. Text can lag the tokens (a
    possible stop string's start or half a character is held back) and come in a piece of its
    own at the end: the pieces' texts join to `Generation.text`, their token ids to
    `Generation.token_ids`."""

    text: str
    token_ids: list[int]
    sources: list[str]


def _checked_prompt(prompt) -> Prompt:
    if isinstance(prompt, str):
        return prompt
    if not isinstance(prompt, Sequence) or isinstance(prompt, (bytes, bytearray)):
        raise ConfigError(f"prompt must be a string or a list of chat messages, got {type(prompt).__name__}")
    messages = []
    for message in prompt:
        if not isinstance(message, Mapping) or not isinstance(message.get("role"), str):
            raise ConfigError(f"a chat message must be a dict with a 'role' and a 'content', got {message!r}")
        if not isinstance(message.get("content"), str):
            raise ConfigError(f"a chat message's content must be a string, got {message.get('content')!r}")
        messages.append(dict(message))
    return tuple(messages)


def _checked_documents(documents) -> tuple[str, ...] | None:
    if documents is None:
        return None
    if isinstance(documents, str) or not isinstance(documents, Sequence):
        raise ConfigError("documents must be a list of strings (one per retrieved text), not one string")
    wrong = [d for d in documents if not isinstance(d, str)]
    if wrong:
        raise ConfigError(f"documents must be strings, got {type(wrong[0]).__name__}")
    return tuple(documents)
