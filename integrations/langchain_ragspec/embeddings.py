"""RagSpecEmbeddings: the sentence embedder ragspec indexes use, as LangChain Embeddings."""

from __future__ import annotations

from langchain_core.embeddings import Embeddings


class RagSpecEmbeddings(Embeddings):
    """L2-normalised embeddings from ragspec's embedder (None: the embedded all-MiniLM-L6-v2,
    loaded on first use), for any LangChain vector store (InMemoryVectorStore, Chroma, FAISS)."""

    def __init__(self, embedder: str | None = None, device: str | None = None):
        self.embedder, self.device = embedder, device

    def _model(self):
        from ragspec.index.encoders import load_embedder

        return load_embedder(self.embedder, self.device)

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        from ragspec.index.encoders import embed

        return embed(self._model(), list(texts)).tolist() if texts else []

    def embed_query(self, text: str) -> list[float]:
        return self.embed_documents([text])[0]
