"""RagSpecRetriever: a ragspec index as a LangChain retriever."""

from __future__ import annotations

import threading
from typing import Any

from langchain_core.callbacks import CallbackManagerForRetrieverRun
from langchain_core.documents import Document
from langchain_core.retrievers import BaseRetriever

_INDEXES: dict[tuple, object] = {}
_INDEXES_LOCK = threading.Lock()


def _opened(index: str, home: str | None):
    """A ragspec Index opened once per process (name or directory, index home)."""
    from ragspec.index import open_index

    key = (index, home)
    with _INDEXES_LOCK:
        if key not in _INDEXES:
            _INDEXES[key] = open_index(index, home=home)
        return _INDEXES[key]


class RagSpecRetriever(BaseRetriever):
    """The `k` chunks of a ragspec index closest to the query (dense search with the index's
    embedder), best first. Each Document's metadata has the chunk's `source` file, `chunk_id`,
    `doc_id`, cosine `score` and its `token_start`/`token_end` in the index's datastore.

    >>> retriever = RagSpecRetriever(index="books", k=4)
    >>> retriever.invoke("Who is Mr Darcy?", k=2)   # k per call too
    """

    index: str
    """A ragspec index name (under `index_home`) or directory."""
    k: int = 4
    index_home: str | None = None

    def _get_relevant_documents(self, query: str, *, run_manager: CallbackManagerForRetrieverRun,
                                **kwargs: Any) -> list[Document]:
        k = kwargs.get("k", self.k)
        chunks = _opened(self.index, self.index_home).search(query, k=k)
        return [
            Document(page_content=chunk.text, id=f"{self.index}:{chunk.chunk_id}", metadata={
                "index": self.index, "source": chunk.source, "chunk_id": chunk.chunk_id, "doc_id": chunk.doc_id,
                "score": chunk.score, "token_start": chunk.token_start, "token_end": chunk.token_end,
            })
            for chunk in chunks
        ]
