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
    chunks: list  # [k] RetrievedChunk, best first
    token_ranges: list[tuple[int, int]]  # [k] datastore token ranges of the chunks, [start, end)


def build_rag_prompt(index, prompt: str | Sequence[dict], k: int, template: str | None = None) -> RagPrompt:
    """Retrieve k chunks for the question (the prompt, or the last user message) and fill the
    template's {context} and {question}."""
    template = template or DEFAULT_RAG_TEMPLATE
    _check_request(template, k)
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else [dict(m) for m in prompt]
    users = [i for i, m in enumerate(messages) if m.get("role") == "user"]
    if not users:
        raise ConfigError("a RAG request needs a user message to retrieve for: pass a string or add a user turn")
    question = messages[users[-1]]["content"]
    chunks = index.search(question, k=k)
    context = "\n\n".join(f"[{i + 1}] {chunk.text}" for i, chunk in enumerate(chunks))
    messages[users[-1]]["content"] = template.format(context=context, question=question)
    return RagPrompt(messages, chunks, [(c.token_start, c.token_end) for c in chunks])


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
