"""Long documents: a document split into chunks searchable in memory (`DocumentChunks`), and the
short prompt the RAPID drafter reads instead of the whole document (`rapid_prompt`)."""

from ragspec.longdoc.chunks import DocumentChunks, document_checksum
from ragspec.longdoc.prompt import RAPID_TOP_K, rapid_prompt

__all__ = ["DocumentChunks", "document_checksum", "rapid_prompt", "RAPID_TOP_K"]
