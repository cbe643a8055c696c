"""Long documents: a document split into chunks searchable in memory (`DocumentChunks`), the
short prompt the RAPID drafter reads instead of the whole document (`rapid_prompt`), documents
read from files (`read_document`: txt, md, html, pdf) and questions asked over them one after
another with the document's KV cache kept (`DocumentSession`, imported on first use: it needs
the engine)."""

from __future__ import annotations

from ragspec.longdoc.chunks import DocumentChunks, document_checksum
from ragspec.longdoc.prompt import RAPID_TOP_K, rapid_prompt
from ragspec.longdoc.read import Document, read_document

__all__ = ["Document", "DocumentChunks", "DocumentSession", "document_checksum", "rapid_prompt", "read_document",
           "RAPID_TOP_K"]


def __getattr__(name: str):
    if name == "DocumentSession":
        from ragspec.longdoc.session import DocumentSession

        return DocumentSession
    raise AttributeError(f"module 'ragspec.longdoc' has no attribute {name!r}")
