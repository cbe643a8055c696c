"""RAG requests through the Engine: retrieval into the prompt, sources, datastore drafting in
both scopes (lossless), and the errors for a missing index or one built with another tokenizer."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import FLAT_CURVE, book_paragraphs, build_tiny_model
from ragspec import Engine, LoadedModel
from ragspec.config import SpecConfig
from ragspec.engine.rag import DEFAULT_RAG_TEMPLATE, build_rag_prompt
from ragspec.errors import ConfigError, IndexNotFound, TokenizerMismatch
from ragspec.index import SEPARATOR, RetrievedChunk, build_index_from_texts, open_index

INDEX = "austen"
QUESTIONS = [
    "Who rents Netherfield Park?",
    "What does Mrs. Bennet want for her daughters?",
    "How many daughters do the Bennets have?",
    "Why does Mr. Bennet tease his wife?",
]
MAX_NEW = 24


@pytest.fixture(scope="module")
def home(tmp_path_factory, tokenizer):
    home = tmp_path_factory.mktemp("indexes")
    texts = [(f"chapter1-{i}", p) for i, p in enumerate(book_paragraphs(40))]
    build_index_from_texts(texts, INDEX, home=home, tokenizer=tokenizer, chunk_tokens=64, overlap_tokens=8)
    return home


def tiny_engine_for(model: LoadedModel, home, **spec) -> Engine:
    return Engine(model, latency_curve=FLAT_CURVE, index_home=home, spec=SpecConfig(**spec), persist_state=False)


def cold_engine_for(model: LoadedModel, home) -> Engine:
    """The plain-decoding reference: no prefix cache, so it never reuses a speculative run's KV."""
    return Engine(model, latency_curve=FLAT_CURVE, index_home=home, persist_state=False, prefix_cache=False)


def brute_force_top_k(index, question: str, k: int) -> tuple[list[int], np.ndarray]:
    """The k chunks of highest cosine with the question, by numpy over every chunk (the embedder
    called directly, vectors normalised here): an oracle for the FAISS search and the chunk table."""
    rows = index.chunks(list(range(index.num_chunks)))
    assert len(rows) == index.num_chunks
    ids = sorted(rows)
    vectors = index.embedder().encode([rows[i]["text"] for i in ids] + [question], convert_to_numpy=True)
    vectors = vectors.astype(np.float64) / np.linalg.norm(vectors, axis=1, keepdims=True)
    cosine = vectors[:-1] @ vectors[-1]
    order = np.argsort(-cosine, kind="stable")[:k]
    return [ids[i] for i in order], cosine[order]


def test_rag_request_puts_the_k_retrieved_chunks_in_the_prompt(tiny_llama, home):
    engine = tiny_engine_for(tiny_llama, home)
    question = QUESTIONS[0]
    out = engine.generate(question, index=INDEX, k=3, max_new_tokens=MAX_NEW)
    assert len(out.sources) == 3 and all(isinstance(c, RetrievedChunk) for c in out.sources)
    assert [c.score for c in out.sources] == sorted((c.score for c in out.sources), reverse=True)
    assert "Netherfield" in " ".join(c.text for c in out.sources)

    oracle_ids, oracle_scores = brute_force_top_k(engine.open_index(INDEX), question, 3)
    assert [c.chunk_id for c in out.sources] == oracle_ids
    np.testing.assert_allclose([c.score for c in out.sources], oracle_scores, atol=1e-4)
    rag = build_rag_prompt(engine.open_index(INDEX), question, 3)
    assert [c.chunk_id for c in rag.chunks] == oracle_ids
    content = rag.messages[-1]["content"]
    assert rag.messages[-1]["role"] == "user" and question in content
    assert all(chunk.text in content for chunk in rag.chunks)
    prompt_ids = engine.encode(rag.messages)
    assert out.prompt_tokens == len(prompt_ids)
    assert len(prompt_ids) > len(engine.encode([{"role": "user", "content": question}])) + 50
    # the request saw exactly that prompt: plain decoding of it gives the same tokens
    plain = cold_engine_for(tiny_llama, home).generate(rag.messages, max_new_tokens=MAX_NEW, speculative=False)
    assert out.token_ids == plain.token_ids


def test_chunk_token_ranges_point_at_the_chunks_in_the_datastore(home, tokenizer):
    index = open_index(INDEX, home)
    rag = build_rag_prompt(index, QUESTIONS[1], 4)
    tokens = np.asarray(index.datastore.tokens)
    for chunk, (start, end) in zip(rag.chunks, rag.token_ranges):
        assert (start, end) == (chunk.token_start, chunk.token_end)
        assert tokens[start:end].tolist() == tokenizer(chunk.text).input_ids
        assert tokens[end] == SEPARATOR
        assert SEPARATOR not in tokens[start:end]


def test_rag_keeps_the_conversation_and_fills_the_last_user_turn(tiny_llama, home):
    engine = tiny_engine_for(tiny_llama, home)
    messages = [
        {"role": "system", "content": "You answer from the context."},
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Hi! Ask me about the book."},
        {"role": "user", "content": QUESTIONS[2]},
    ]
    template = "Passages:\n{context}\n---\nQ: {question}"
    rag = build_rag_prompt(engine.open_index(INDEX), messages, 2, template)
    assert [m["content"] for m in rag.messages[:3]] == [m["content"] for m in messages[:3]]
    assert rag.messages[3]["content"].startswith("Passages:\n[1] ") and rag.messages[3]["content"].endswith(
        f"Q: {QUESTIONS[2]}")
    assert messages[3]["content"] == QUESTIONS[2], "the caller's messages are not modified"
    out = engine.generate(messages, index=INDEX, k=2, rag_template=template, max_new_tokens=MAX_NEW)
    assert out.prompt_tokens == len(engine.encode(rag.messages))
    cold = cold_engine_for(tiny_llama, home)
    assert out.token_ids == cold.generate(rag.messages, max_new_tokens=MAX_NEW, speculative=False).token_ids
    assert "{context}" in DEFAULT_RAG_TEMPLATE and "{question}" in DEFAULT_RAG_TEMPLATE


@pytest.mark.parametrize("scope", ["retrieved", "index"])
def test_tiny_rag_lossless_in_both_datastore_scopes(tiny_model, home, scope):
    engine = tiny_engine_for(tiny_model, home, datastore_scope=scope)
    cold = cold_engine_for(tiny_model, home)
    index = engine.open_index(INDEX)
    accepted = 0
    for question in QUESTIONS:
        fast = engine.generate(question, index=INDEX, k=3, max_new_tokens=MAX_NEW)
        plain = cold.generate(question, index=index, k=3, max_new_tokens=MAX_NEW, speculative=False)
        assert fast.token_ids == plain.token_ids, f"scope {scope} changed the output for {question!r}"
        assert [c.chunk_id for c in fast.sources] == [c.chunk_id for c in plain.sources]
        assert plain.stats.num_draft_tokens == 0
        accepted += fast.stats.num_accepted_tokens
    assert accepted > 0, "no draft accepted: the test proves nothing"


@pytest.mark.slow
@pytest.mark.parametrize("scope", ["retrieved", "index"])
def test_real_model_rag_lossless_with_datastore_drafts(real_engine, home, scope):
    """The embedded model quotes the retrieved passage, so corpus drafts get accepted."""
    assert real_engine.target.dtype == torch.float32
    spec = SpecConfig(drafters=("datastore",), datastore_scope=scope)
    engine = Engine(real_engine.target, latency_curve=real_engine.budget().curve, spec=spec, index_home=home,
                    persist_state=False)
    question = "Repeat the first passage word for word."
    fast = engine.generate(question, index=INDEX, k=3, max_new_tokens=MAX_NEW)
    plain = cold_engine_for(real_engine.target, home).generate(question, index=INDEX, k=3, max_new_tokens=MAX_NEW,
                                                               speculative=False)
    assert fast.token_ids == plain.token_ids
    assert set(fast.stats.drafted_per_source) == {"datastore"}
    assert fast.stats.accepted_per_source.get("datastore", 0) > 0, "no corpus draft accepted: the test proves nothing"


def test_missing_index_raises_index_not_found(tiny_llama, home, tmp_path):
    engine = tiny_engine_for(tiny_llama, home)
    with pytest.raises(IndexNotFound, match="no-such-index") as error:
        engine.generate("question", index="no-such-index", max_new_tokens=4)
    assert INDEX in str(error.value), "the message lists the indexes that do exist"
    with pytest.raises(IndexNotFound):
        engine.generate("question", index=str(tmp_path / "nowhere"), max_new_tokens=4)
    with pytest.raises(IndexNotFound):
        Engine(tiny_llama, latency_curve=FLAT_CURVE, index_home=tmp_path / "empty-home").generate(
            "question", index=INDEX, max_new_tokens=4)


def test_index_built_with_another_tokenizer_is_refused(home):
    from transformers import AutoTokenizer

    from ragspec.models import _dequantised_dir, embedded_model_path

    other = AutoTokenizer.from_pretrained(_dequantised_dir(embedded_model_path()))  # a private copy
    other.add_tokens(["<ragspec-test-extra-token>"])  # same model family, different vocabulary
    model = LoadedModel(model=build_tiny_model("llama", len(other)), tokenizer=other, name="tiny-other-vocab")
    engine = Engine(model, latency_curve=FLAT_CURVE, index_home=home, persist_state=False)
    built = open_index(INDEX, home).manifest["tokenizer_fingerprint"]
    assert model.tokenizer_fingerprint != built
    with pytest.raises(TokenizerMismatch) as error:
        engine.generate(QUESTIONS[0], index=INDEX, k=3, max_new_tokens=4)
    assert INDEX in str(error.value) and built in str(error.value) and model.tokenizer_fingerprint in str(error.value)
    with pytest.raises(TokenizerMismatch):
        engine.generate(QUESTIONS[0], index=INDEX, max_new_tokens=4, speculative=False)
    assert engine.generate(QUESTIONS[0], max_new_tokens=4).token_ids  # without the index it still works


# -- Bad RAG input gets a clear RagspecError (DESIGN 7-8), not a bare Python exception ------


def test_rag_request_without_a_user_message_is_a_config_error(tiny_llama, home):
    engine = tiny_engine_for(tiny_llama, home)
    for messages in ([{"role": "system", "content": "Answer from the context."}], []):
        with pytest.raises(ConfigError, match="user"):  # today: ValueError "max() arg is an empty sequence"
            engine.generate(messages, index=INDEX, max_new_tokens=4)


def test_rag_template_with_an_unknown_field_is_a_config_error(tiny_llama, home):
    engine = tiny_engine_for(tiny_llama, home)
    with pytest.raises(ConfigError, match="json"):  # today: KeyError 'json'
        engine.generate("q", index=INDEX, rag_template='{context} {json} {question}', max_new_tokens=4)


def test_rag_negative_k_is_a_config_error(tiny_llama, home):
    engine = tiny_engine_for(tiny_llama, home)
    with pytest.raises(ConfigError, match="k"):  # today: silently retrieves nothing
        engine.generate("q", index=INDEX, k=-1, max_new_tokens=4)


def test_past_responses_persist_with_the_index(tiny_llama, tmp_path, tokenizer, monkeypatch):
    from ragspec.index import add_to_index, verify_index
    from ragspec.index.store import PAST_RESPONSES_FILE

    monkeypatch.setenv("RAGSPEC_CACHE_DIR", str(tmp_path / "cache"))  # the recycling matrix persists too

    texts = [(f"chapter1-{i}", p) for i, p in enumerate(book_paragraphs(12))]
    build_index_from_texts(texts, "kept", home=tmp_path, tokenizer=tokenizer, chunk_tokens=64, overlap_tokens=8)
    state = tmp_path / "kept" / PAST_RESPONSES_FILE
    Engine(tiny_llama, latency_curve=FLAT_CURVE, index_home=tmp_path, persist_state=False).generate(
        QUESTIONS[0], index="kept", max_new_tokens=MAX_NEW)
    assert not state.exists(), "persist_state=False keeps the index directory as built"
    first = Engine(tiny_llama, latency_curve=FLAT_CURVE, index_home=tmp_path)
    answer = first.generate(QUESTIONS[0], index="kept", max_new_tokens=MAX_NEW)
    assert state.is_file()
    verify_index("kept", tmp_path)  # learned state is not part of the checksummed build
    (tmp_path / "more.txt").write_text(book_paragraphs(14)[-1])
    add_to_index("kept", [tmp_path / "more.txt"], home=tmp_path, tokenizer=tokenizer, progress=False)
    assert state.is_file(), "add keeps the stored answers"
    # a new engine (a new process) drafts the repeated question's answer from the stored one
    second = Engine(tiny_llama, latency_curve=FLAT_CURVE, index_home=tmp_path, spec=SpecConfig(drafters=("past",)))
    again = second.generate(QUESTIONS[0], index="kept", max_new_tokens=MAX_NEW)
    assert again.token_ids == answer.token_ids
    assert again.stats.accepted_per_source.get("past", 0) >= len(answer.token_ids) // 2
