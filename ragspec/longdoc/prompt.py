"""The short prompt the RAPID drafter reads: the retrieved chunks and the question.

It is worded like the long-document prompt the target reads (`ragspec.bench.workloads.
longdoc_prompt`: the same instruction, a "Document:" block, "Question:", "Answer:"), so that the
drafter, seeing the passages that matter in the same frame, continues the answer as the target
does. Excerpts that are not adjacent in the document are separated by an ellipsis line.
"""

from __future__ import annotations

from collections.abc import Sequence

from ragspec.drafting.rapid import RAPID_TOP_K as RAPID_TOP_K  # re-exported: chunks the drafter reads (RapidConfig.chunks' default)

EXCERPT_SEPARATOR = "\n...\n"


def rapid_prompt(chunks: Sequence[str], question: str) -> list[dict]:
    """Chat messages: one user turn with the chunks (document order) and the question."""
    document = EXCERPT_SEPARATOR.join(chunk.strip() for chunk in chunks)
    content = (
        "Read the document below and answer the question after it.\n\n"
        f"Document:\n{document}\n\nQuestion: {question}\nAnswer:"
    )
    return [{"role": "user", "content": content}]
