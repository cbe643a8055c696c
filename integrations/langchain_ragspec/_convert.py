"""LangChain values to ragspec ones (messages, documents, options) and results to metadata."""

from __future__ import annotations

from collections.abc import Sequence

from langchain_core.documents import Document
from langchain_core.messages import AIMessage, BaseMessage, ChatMessage, HumanMessage, SystemMessage

from ragspec import Generation, Piece

_ROLES = {HumanMessage: "user", AIMessage: "assistant", SystemMessage: "system"}
# per-call options that map onto GenerationRequest fields of the same name
REQUEST_OPTIONS = ("temperature", "top_k", "top_p", "seed", "speculative", "index", "k", "rag_template")


def to_chat_messages(messages: Sequence[BaseMessage]) -> list[dict]:
    """Chat messages for the model's chat template (a HumanMessage's `name` is not sent)."""
    converted = []
    for message in messages:
        role = next((r for cls, r in _ROLES.items() if isinstance(message, cls)), None)
        if isinstance(message, ChatMessage):
            role = message.role
        if role is None:
            raise ValueError(
                f"ragspec's chat models take system, human and AI messages (no tool calling): got {message.type}"
            )
        converted.append({"role": role, "content": message_text(message)})
    return converted


def message_text(message: BaseMessage) -> str:
    """A message's text; content blocks other than text (images, audio, files) are refused."""
    if isinstance(message.content, str):
        return message.content
    parts = []
    for block in message.content:
        if isinstance(block, str):
            parts.append(block)
        elif isinstance(block, dict) and block.get("type") == "text":
            parts.append(block.get("text", ""))
        else:
            kind = block.get("type") if isinstance(block, dict) else type(block).__name__
            raise ValueError(f"ragspec's chat models take text only: got a {kind!r} content block")
    return "".join(parts)


def document_texts(documents) -> list[str]:
    """Texts of LangChain Documents (or plain strings) retrieved by any retriever or vector store."""
    if isinstance(documents, (str, Document)):
        documents = [documents]
    texts = []
    for document in documents:
        if isinstance(document, Document):
            texts.append(document.page_content)
        elif isinstance(document, str):
            texts.append(document)
        else:
            raise ValueError(f"documents must be LangChain Documents or strings, got {type(document).__name__}")
    return texts


def request_options(defaults: dict, stop: list[str] | None, kwargs: dict) -> dict:
    """GenerationRequest fields from the object's settings, overridden by a call's arguments."""
    known = {*REQUEST_OPTIONS, "max_tokens", "documents", "stop", "stream", "model"}
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise TypeError(f"unknown arguments for ragspec: {', '.join(unknown)}")
    options = {name: kwargs.get(name, defaults[name]) for name in REQUEST_OPTIONS}
    max_tokens = kwargs.get("max_tokens", defaults["max_tokens"])
    options["max_new_tokens"] = 256 if max_tokens is None else max_tokens
    options["stop"] = list(stop if stop is not None else kwargs.get("stop") or defaults["stop"] or [])
    documents = kwargs.get("documents")
    if documents is not None:
        options["documents"] = document_texts(documents)
        options["index"] = None  # documents given with the call replace the object's index
    return options


def speculation(result: Generation) -> dict:
    """The request's speculation metrics (tokens per target forward, draft acceptance, sources)."""
    stats = result.stats
    return {
        "mean_acceptance_length": stats.mean_acceptance_length,
        "draft_acceptance_rate": stats.draft_acceptance_rate,
        "accepted_per_source": dict(stats.accepted_per_source),
        "drafted_per_source": dict(stats.drafted_per_source),
        "num_steps": stats.num_steps,
        "num_draft_tokens": stats.num_draft_tokens,
        "num_accepted_tokens": stats.num_accepted_tokens,
        "cached_prompt_tokens": stats.cached_prompt_tokens,
        "time_to_first_token_s": stats.time_to_first_token_s,
        "tokens_per_s": stats.tokens_per_s,
    }


def final_metadata(model_name: str, result: Generation) -> dict:
    """What a response carries once its request has ended."""
    metadata = {
        "model_name": model_name,
        "finish_reason": result.finish_reason,
        "speculation": speculation(result),
    }
    if result.sources:  # chunks a ragspec index retrieved for the request
        metadata["retrieved"] = [
            {"source": c.source, "chunk_id": c.chunk_id, "score": c.score} for c in result.sources
        ]
    return metadata


def piece_metadata(piece: Piece) -> dict:
    """A streamed piece's token ids and the source that drafted each (lists merge by joining)."""
    return {"token_ids": list(piece.token_ids), "token_sources": list(piece.sources)}


def usage(result: Generation) -> dict:
    output = len(result.token_ids)
    return {"input_tokens": result.prompt_tokens, "output_tokens": output,
            "total_tokens": result.prompt_tokens + output}
