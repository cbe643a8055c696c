"""langchain_ragspec on tiny models: LangChain's ChatModelUnitTests, and what ChatRagSpec and
RagSpecLLM promise (output equal to the Engine's, chunks per decoding step with token ids and
sources, stop strings, documents as context and drafting scope, async streaming that never
blocks the event loop, cancellation, timeouts, lazy shared engines)."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from conftest import FLAT_CURVE, build_tiny_model

pytest.importorskip("langchain_core")

from langchain_core.callbacks import BaseCallbackHandler  # noqa: E402
from langchain_core.documents import Document  # noqa: E402
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage  # noqa: E402
from langchain_tests.unit_tests import ChatModelUnitTests  # noqa: E402

from langchain_ragspec import ChatRagSpec, RagSpecLLM  # noqa: E402
from langchain_ragspec import _engines  # noqa: E402
from ragspec import Engine, SpecConfig  # noqa: E402
from ragspec.types import DraftTree  # noqa: E402

MAX = 24
QUESTION = "What does the report say about rivers?"
DOCUMENTS = ["The report says rivers flow to the sea.", "Rivers carry water and sand."]


class TestChatRagSpecUnit(ChatModelUnitTests):
    """Construction only: nothing is loaded (test_init_time times ten constructions)."""

    @property
    def chat_model_class(self) -> type[ChatRagSpec]:
        return ChatRagSpec

    @property
    def chat_model_params(self) -> dict:
        return {"model": "smollm2-135m-instruct", "top_p": 0.9}


def test_constructing_loads_nothing():
    before = dict(_engines._ENGINES)
    chats = [ChatRagSpec(model=f"/nowhere/model-{i}", max_tokens=8) for i in range(3)]
    assert _engines._ENGINES == before and all(c.engine is None for c in chats)


@pytest.fixture(scope="module")
def tiny_chat_engine(tiny_llama) -> Engine:
    return Engine(tiny_llama, latency_curve=FLAT_CURVE, persist_state=False)


@pytest.fixture(scope="module")
def cold(tiny_llama) -> Engine:
    return Engine(tiny_llama, latency_curve=FLAT_CURVE, persist_state=False, prefix_cache=False)


class Tokens(BaseCallbackHandler):
    def __init__(self):
        self.tokens: list[str] = []

    def on_llm_new_token(self, token, **kwargs) -> None:
        self.tokens.append(token)


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def gather(chunks):
    full = None
    for chunk in chunks:
        full = chunk if full is None else full + chunk
    return full


def test_invoke_equals_the_engine(tiny_chat_engine, cold):
    chat = ChatRagSpec(engine=tiny_chat_engine, max_tokens=MAX)
    messages = [SystemMessage("Be brief."), HumanMessage("Name a b c a b c"), AIMessage("a b c"), HumanMessage("Again")]
    reply = chat.invoke(messages)
    as_dicts = [{"role": r, "content": m.content} for r, m in zip(("system", "user", "assistant", "user"), messages)]
    plain = cold.generate(as_dicts, max_new_tokens=MAX, speculative=False)
    assert reply.content == plain.text and reply.response_metadata["token_ids"] == plain.token_ids
    assert reply.usage_metadata == {"input_tokens": plain.prompt_tokens, "output_tokens": len(plain.token_ids),
                                    "total_tokens": plain.prompt_tokens + len(plain.token_ids)}
    meta = reply.response_metadata
    assert meta["model_name"] == "tiny-llama" and meta["finish_reason"] == plain.finish_reason
    spec = meta["speculation"]
    assert spec["mean_acceptance_length"] >= 1.0 and 0.0 <= spec["draft_acceptance_rate"] <= 1.0
    assert len(meta["token_sources"]) == len(plain.token_ids)
    assert sum(spec["accepted_per_source"].values()) == spec["num_accepted_tokens"]


def test_stream_gives_one_chunk_per_step_with_tokens_and_sources(tiny_chat_engine):
    chat = ChatRagSpec(engine=tiny_chat_engine, max_tokens=MAX)
    prompt = "a b c a b c a b c a b"
    chat.invoke(prompt)  # the second answer is drafted from the first (past responses)
    reference = chat.invoke(prompt)
    handler = Tokens()
    chunks = list(chat.stream(prompt, config={"callbacks": [handler]}))
    full = gather(chunks)
    assert full.content == reference.content
    assert full.response_metadata["token_ids"] == reference.response_metadata["token_ids"]
    assert handler.tokens == [c.content for c in chunks]  # on_llm_new_token once per chunk
    steps = [c for c in chunks if c.response_metadata.get("token_ids")]
    assert len(steps) == full.response_metadata["speculation"]["num_steps"]
    assert any(len(c.response_metadata["token_ids"]) > 1 for c in steps)  # multi-token steps came whole
    assert chunks[-1].chunk_position == "last" and chunks[-1].usage_metadata["output_tokens"] == len(
        full.response_metadata["token_ids"])
    sources = full.response_metadata["token_sources"]
    accepted = full.response_metadata["speculation"]["accepted_per_source"]
    for source, count in accepted.items():
        assert sources.count(source) <= count


def test_stop_sequences_match_text(tiny_chat_engine, cold):
    plain = cold.generate("a b c a b c", max_new_tokens=MAX, speculative=False)
    stop = plain.text[len(plain.text) // 2:][:3]
    want = plain.text[: plain.text.find(stop)]
    chat = ChatRagSpec(engine=tiny_chat_engine, max_tokens=MAX)
    llm = RagSpecLLM(engine=tiny_chat_engine, max_tokens=MAX)
    assert llm.invoke("a b c a b c", stop=[stop]) == want
    assert RagSpecLLM(engine=tiny_chat_engine, max_tokens=MAX, stop=[stop]).invoke("a b c a b c") == want
    assert gather(llm.stream("a b c a b c", stop=[stop])) == want
    reply = chat.invoke("a b c a b c", stop=[stop])
    assert stop not in reply.content and reply.response_metadata["finish_reason"] in ("stop", "eos", "length")


def test_llm_completes_raw_text_like_the_engine(tiny_chat_engine, cold):
    llm = RagSpecLLM(engine=tiny_chat_engine, max_tokens=MAX)
    plain = cold.generate("Once upon a time", max_new_tokens=MAX, speculative=False)
    handler = Tokens()
    assert llm.invoke("Once upon a time") == plain.text
    chunks = list(llm.stream("Once upon a time", config={"callbacks": [handler]}))
    assert "".join(chunks) == plain.text
    assert [t for t in handler.tokens if t] == [c for c in chunks if c]  # on_llm_new_token per piece
    result = llm.generate(["Once upon a time"])
    info = result.generations[0][0].generation_info
    assert info["token_ids"] == plain.token_ids and info["usage"]["output_tokens"] == len(plain.token_ids)
    assert result.llm_output["model_name"] == "tiny-llama"


def test_documents_from_any_retriever_are_context_and_drafting_scope(tiny_llama, cold):
    """Documents given per call or bound (LangChain Documents or strings) fill the RAG prompt and
    draft through their own datastore: an answer that repeats a document is drafted from it."""
    plain = cold.generate(QUESTION, documents=DOCUMENTS, max_new_tokens=MAX, speculative=False)
    documents = [Document(page_content=text) for text in [*DOCUMENTS, plain.text]]
    reference = cold.generate(QUESTION, documents=[d.page_content for d in documents], max_new_tokens=MAX,
                              speculative=False)
    only_datastore = Engine(tiny_llama, latency_curve=FLAT_CURVE, persist_state=False,
                            spec=SpecConfig(drafters=("datastore",)))
    chat = ChatRagSpec(engine=only_datastore, max_tokens=MAX)
    for reply in (chat.invoke(QUESTION, documents=documents), chat.bind(documents=documents).invoke(QUESTION)):
        assert reply.response_metadata["token_ids"] == reference.token_ids
        assert reply.response_metadata["speculation"]["accepted_per_source"].get("datastore", 0) > 0
        assert "datastore" in reply.response_metadata["token_sources"]
    bare = chat.invoke(QUESTION)
    assert bare.response_metadata["speculation"]["num_draft_tokens"] == 0


def test_with_retriever_retrieves_then_answers_with_the_documents(tiny_llama, cold):
    from langchain_core.retrievers import BaseRetriever

    class Keyword(BaseRetriever):
        """Documents holding any word of the query (a real retriever, not a stub of ours)."""

        texts: list[str]

        def _get_relevant_documents(self, query, *, run_manager):
            def words(text: str) -> set[str]:
                return {w.strip("?.,!") for w in text.lower().split()}

            return [Document(page_content=t) for t in self.texts if words(query) & words(t)]

    retriever = Keyword(texts=[*DOCUMENTS, "Mountains are tall."])
    chat = ChatRagSpec(engine=Engine(tiny_llama, latency_curve=FLAT_CURVE, persist_state=False), max_tokens=MAX)
    chain = chat.with_retriever(retriever)
    expected = cold.generate("rivers?", documents=DOCUMENTS, max_new_tokens=MAX, speculative=False)
    assert chain.invoke("rivers?").content == expected.text
    assert gather(chain.stream("rivers?")).content == expected.text
    assert asyncio.run(chain.ainvoke([HumanMessage("rivers?")])).content == expected.text


class SlowDrafter:
    """Drafts nothing, slowly: each proposal takes `delay` s (a slow step of the loop)."""

    name = "slow"

    def __init__(self, delay: float):
        self.delay, self.calls, self.finished = delay, 0, 0

    def propose(self, context) -> DraftTree:
        self.calls += 1
        time.sleep(self.delay)
        return DraftTree.empty()

    def observe(self, step) -> None:
        pass

    def finish_request(self, prompt_ids, generated_ids) -> None:
        self.finished += 1


def slow_chat(loaded, delay: float, **options) -> tuple[ChatRagSpec, SlowDrafter]:
    slow = SlowDrafter(delay)
    engine = Engine(loaded, latency_curve=FLAT_CURVE, persist_state=False, drafter_factories=[lambda _: [slow]])
    return ChatRagSpec(engine=engine, **options), slow


def test_astream_never_blocks_the_event_loop(tiny_llama, cold):
    chat, slow = slow_chat(tiny_llama, 0.2, max_tokens=6)

    async def main():
        gaps, last, done = [], time.monotonic(), asyncio.Event()

        async def tick():
            nonlocal last
            while not done.is_set():
                await asyncio.sleep(0.01)
                gaps.append(time.monotonic() - last)
                last = time.monotonic()

        ticker = asyncio.create_task(tick())
        chunks = [c async for c in chat.astream("a b c a b c")]
        done.set()
        await ticker
        return chunks, max(gaps)

    chunks, worst_gap = asyncio.run(main())
    assert slow.calls >= 5  # five slow steps (>= 1 s) ran while the loop ticked
    assert worst_gap < 0.15, worst_gap  # a step run on the loop would stall it >= 0.2 s
    assert gather(chunks).content == cold.generate(user("a b c a b c"), max_new_tokens=6, speculative=False).text


async def wait_until(condition, seconds: float = 5.0) -> None:
    """Poll with the event loop running (so nothing waits for asyncio.run's shutdown)."""
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        await asyncio.sleep(0.02)


async def close_after_first_chunk(chat) -> None:
    stream = chat.astream("a b c a b c")
    await stream.__anext__()
    await stream.aclose()


async def cancel_after_first_chunk(chat) -> None:
    first = asyncio.Event()

    async def consume():
        async for _ in chat.astream("a b c a b c"):
            first.set()

    task = asyncio.create_task(consume())
    await first.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


@pytest.mark.parametrize("abandon", [close_after_first_chunk, cancel_after_first_chunk])
def test_abandoned_astream_ends_its_request_and_frees_the_target(tiny_llama, cold, abandon):
    chat, slow = slow_chat(tiny_llama, 0.05, max_tokens=200)

    async def main():
        await abandon(chat)
        await wait_until(lambda: slow.finished == 1)  # the request ended (drafters saw finish_request)
        calls = slow.calls
        await asyncio.sleep(0.3)
        return calls

    calls = asyncio.run(main())
    assert slow.finished == 1
    assert slow.calls == calls and calls < 50  # no step ran after it ended, far short of 200 tokens
    assert chat.invoke("a b c", max_tokens=8).content == cold.generate(user("a b c"), max_new_tokens=8,
                                                                      speculative=False).text


def test_timeout_ends_the_request(tiny_llama):
    chat, slow = slow_chat(tiny_llama, 0.05, max_tokens=200, timeout=0.2)
    with pytest.raises(TimeoutError, match="timeout"):
        chat.invoke("a b c")
    assert slow.finished == 1 and slow.calls < 50


def test_bad_calls_are_refused_clearly(tiny_chat_engine):
    chat = ChatRagSpec(engine=tiny_chat_engine, max_tokens=4)
    with pytest.raises(TypeError, match="unknown arguments for ragspec: frequency_penalty"):
        chat.invoke("hi", frequency_penalty=1.0)
    with pytest.raises(ValueError, match="no tool calling"):
        chat.invoke([HumanMessage("hi"), ToolMessage("3", tool_call_id="x")])
    with pytest.raises(ValueError, match="text only"):
        chat.invoke([HumanMessage(content=[{"type": "image", "url": "https://example.com/a.png"}])])
    from ragspec.errors import ConfigError

    with pytest.raises(ConfigError, match="max_new_tokens"):
        chat.invoke("hi", max_tokens=0)


def test_engines_load_on_first_call_and_are_shared(tokenizer, tmp_path):
    """Two objects with the same model/dtype/device share one Engine, loaded by the first call."""
    directory = tmp_path / "tiny-saved"
    build_tiny_model("llama", len(tokenizer)).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    first = ChatRagSpec(model=str(directory), dtype="float32", device="cpu", max_tokens=4)
    second = RagSpecLLM(model=str(directory), dtype="float32", device="cpu", max_tokens=4)
    before = len(_engines._ENGINES)
    assert len(_engines._ENGINES) == before  # constructing loaded nothing
    reply = first.invoke("hi")
    assert len(_engines._ENGINES) == before + 1 and reply.response_metadata["model_name"] == str(directory)
    second.invoke("hi")
    assert len(_engines._ENGINES) == before + 1 and first.get_engine() is second.get_engine()
    threads = [threading.Thread(target=first.invoke, args=("hi",)) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert len(_engines._ENGINES) == before + 1

    # every forward, from invoke, stream and astream, runs on the one thread that loaded the engine
    ran_on: set[str] = set()
    model = first.get_engine().target.model
    hook = model.register_forward_pre_hook(lambda *_: ran_on.add(threading.current_thread().name))
    try:
        first.invoke("hi")
        list(first.stream("hi"))

        async def consume():
            return [chunk async for chunk in first.astream("hi")]

        asyncio.run(consume())
    finally:
        hook.remove()
    assert len(ran_on) == 1 and next(iter(ran_on)).startswith("ragspec-engine"), ran_on


def test_embeddings_feed_any_vector_store():
    """RagSpecEmbeddings are ragspec's index embeddings (normalised), usable by LangChain stores."""
    import numpy as np
    from langchain_core.vectorstores import InMemoryVectorStore

    from langchain_ragspec import RagSpecEmbeddings
    from ragspec.index.encoders import embed, load_embedder

    embeddings = RagSpecEmbeddings()
    texts = [*DOCUMENTS, "Mountains are tall and cold."]
    vectors = np.array(embeddings.embed_documents(texts))
    assert np.allclose(vectors, embed(load_embedder(), texts), atol=1e-6)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert embeddings.embed_documents([]) == []
    store = InMemoryVectorStore(embedding=embeddings)
    store.add_texts(texts)
    found = [d.page_content for d in store.similarity_search("Where do rivers go?", k=2)]
    assert set(found) == set(DOCUMENTS)
