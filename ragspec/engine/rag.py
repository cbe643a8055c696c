"""RAG requests: retrieve chunks, put them in the prompt, and scope the datastore drafter."""

from __future__ import annotations

import string
from collections.abc import Sequence
from dataclasses import dataclass

from ragspec.errors import ConfigError

DEFAULT_RAG_TEMPLATE = (
    "Answer the question using the context below.\n\n"
    "Context:\n{context}\n\n"
    "Question: {question}"
)


@dataclass(frozen=True)
class RagPrompt:
    messages: list[dict]  # chat messages with the context filled in
    chunks: list  # [k] RetrievedChunk, best first (none for documents given with the request)
    token_ranges: list[tuple[int, int]] | None  # [k] datastore token ranges of the chunks, [start, end)
    datastore: object = None  # the request's own TokenDatastore (documents given with the request)


def build_rag_prompt(index, prompt: str | Sequence[dict], k: int, template: str | None = None) -> RagPrompt:
    """Retrieve k chunks for the question (the prompt, or the last user message) and fill the
    template's {context} and {question}."""
    template = template or DEFAULT_RAG_TEMPLATE
    _check_request(template, k)
    messages, question = _question(prompt)
    chunks = index.search(question, k=k)
    _fill(messages, [chunk.text for chunk in chunks], question, template)
    return RagPrompt(messages, chunks, [(c.token_start, c.token_end) for c in chunks])


def build_documents_prompt(tokenizer, documents: Sequence[str], prompt: str | Sequence[dict],
                           template: str | None = None) -> RagPrompt:
    """The documents (retrieved elsewhere) fill the template as an index's chunks would, and
    their tokens make a datastore of their own, the drafting scope of this request."""
    template = template or DEFAULT_RAG_TEMPLATE
    _check_request(template, 0)
    messages, question = _question(prompt)
    _fill(messages, list(documents), question, template)
    return RagPrompt(messages, [], None, documents_datastore(tokenizer, documents))


def documents_datastore(tokenizer, documents: Sequence[str]):
    """An in-memory TokenDatastore over the documents' tokens, SEPARATOR between documents."""
    import numpy as np

    from ragspec.index.datastore import SEPARATOR, TokenDatastore, build_suffix_array

    pieces: list[int] = []
    for text in documents:
        ids = list(tokenizer(text, add_special_tokens=False).input_ids)
        if ids:
            pieces.extend([*ids, SEPARATOR])
    tokens = np.asarray(pieces, dtype=np.int32)
    return TokenDatastore(tokens, build_suffix_array(tokens))


def _question(prompt: str | Sequence[dict]) -> tuple[list[dict], str]:
    """The request's messages (copied) and its question: the prompt, or the last user message."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else [dict(m) for m in prompt]
    users = [i for i, m in enumerate(messages) if m.get("role") == "user"]
    if not users:
        raise ConfigError("a RAG request needs a user message to retrieve for: pass a string or add a user turn")
    return messages, messages[users[-1]]["content"]


def _fill(messages: list[dict], texts: list[str], question: str, template: str) -> None:
    """Put the numbered texts and the question into the last user message."""
    last_user = max(i for i, m in enumerate(messages) if m.get("role") == "user")
    context = "\n\n".join(f"[{i + 1}] {text}" for i, text in enumerate(texts))
    messages[last_user]["content"] = template.format(context=context, question=question)


def _check_request(template: str, k: int) -> None:
    if k < 0:
        raise ConfigError(f"k (chunks to retrieve) must be >= 0, got {k}")
    fields = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    unknown = fields - {"context", "question"}
    if unknown:
        raise ConfigError(
            f"rag_template has unknown fields {sorted(unknown)}: use {{context}} and {{question}}, "
            "and double literal braces ({{ }})"
        )
