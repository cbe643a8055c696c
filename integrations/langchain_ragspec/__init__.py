"""LangChain integration of ragspec: a chat model, an LLM, a retriever over a ragspec index and
embeddings for any vector store. `pip install 'ragspec[langchain]'`."""

from langchain_ragspec.chat_models import ChatRagSpec
from langchain_ragspec.embeddings import RagSpecEmbeddings
from langchain_ragspec.llms import RagSpecLLM
from langchain_ragspec.retrievers import RagSpecRetriever

__all__ = ["ChatRagSpec", "RagSpecEmbeddings", "RagSpecLLM", "RagSpecRetriever"]
