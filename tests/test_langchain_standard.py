"""LangChain's standard integration suites against the real embedded model: ChatModelIntegrationTests
for ChatRagSpec (one Engine shared by every test through the lazy engine cache) and
RetrieversIntegrationTests for RagSpecRetriever over a small Pride and Prejudice index.

Feature flags are the suite's defaults, which match ChatRagSpec: no tool calling, no structured
output, no JSON mode, text only (no images, audio, PDF), usage metadata returned."""

from __future__ import annotations

import functools

import pytest
from conftest import SESSION_CACHE_DIR, book_paragraphs

pytest.importorskip("langchain_tests")

from langchain_tests.integration_tests import ChatModelIntegrationTests, RetrieversIntegrationTests  # noqa: E402

from langchain_ragspec import ChatRagSpec, RagSpecRetriever  # noqa: E402

pytestmark = pytest.mark.slow
SHARED: dict = {}


@pytest.fixture(scope="module", autouse=True)
def real_chat_engine(real_model):
    """The session's real model (loaded once for every slow test) behind one Engine for the suite;
    lazy loading by name is tested on a saved tiny model in test_langchain.py."""
    from ragspec import Engine

    SHARED["engine"] = Engine(real_model)
    yield SHARED["engine"]
    SHARED.clear()


class TestChatRagSpecIntegration(ChatModelIntegrationTests):
    @property
    def chat_model_class(self) -> type[ChatRagSpec]:
        return ChatRagSpec

    @property
    def chat_model_params(self) -> dict:
        # short answers keep the suite fast; every test needs only some text
        return {"max_tokens": 12, "engine": SHARED["engine"]}

    @property
    def model_override_value(self) -> str:
        return saved_tiny_model()  # a call's model= loads (once) and uses another model


@functools.lru_cache(maxsize=1)
def saved_tiny_model() -> str:
    """A tiny random-weight llama with the embedded tokenizer, saved as an HF model directory."""
    from conftest import build_tiny_model
    from transformers import AutoTokenizer

    from ragspec.models import _dequantised_dir, embedded_model_path

    directory = SESSION_CACHE_DIR / "langchain-override-model"
    tokenizer = AutoTokenizer.from_pretrained(_dequantised_dir(embedded_model_path()))
    build_tiny_model("llama", len(tokenizer)).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


@functools.lru_cache(maxsize=1)
def book_index() -> str:
    """A ragspec index of the first paragraphs of Pride and Prejudice, built once per session."""
    from ragspec.index.build import build_index_from_texts

    paragraphs = book_paragraphs(40)
    home = SESSION_CACHE_DIR / "langchain-indexes"
    index, _ = build_index_from_texts([(f"p{i}", text) for i, text in enumerate(paragraphs)], "austen", home,
                                      chunk_tokens=64, overlap_tokens=8)
    return str(index.path)


class TestRagSpecRetrieverIntegration(RetrieversIntegrationTests):
    @property
    def retriever_constructor(self) -> type[RagSpecRetriever]:
        return RagSpecRetriever

    @property
    def retriever_constructor_params(self) -> dict:
        return {"index": book_index(), "k": 2}

    @property
    def retriever_query_example(self) -> str:
        return "Who is Mr. Bingley?"


def test_retrieved_documents_point_at_their_chunks():
    """RagSpecRetriever's Documents are the index's best chunks, with their place in the datastore."""
    from ragspec.index import open_index

    index = open_index(book_index())
    documents = RagSpecRetriever(index=book_index(), k=3).invoke("Who is Mr. Bingley?")
    chunks = index.search("Who is Mr. Bingley?", k=3)
    assert [d.page_content for d in documents] == [c.text for c in chunks]
    assert [d.metadata["chunk_id"] for d in documents] == [c.chunk_id for c in chunks]
    assert "Bingley" in documents[0].page_content
