"""RAG requests: retrieve chunks, put them in the prompt, and scope the datastore drafter."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

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
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else [dict(m) for m in prompt]
    last_user = max(i for i, m in enumerate(messages) if m["role"] == "user")
    question = messages[last_user]["content"]
    chunks = index.search(question, k=k)
    context = "\n\n".join(f"[{i + 1}] {chunk.text}" for i, chunk in enumerate(chunks))
    messages[last_user]["content"] = (template or DEFAULT_RAG_TEMPLATE).format(context=context, question=question)
    return RagPrompt(messages, chunks, [(c.token_start, c.token_end) for c in chunks])
