"""DocumentSession: answers equal plain decoding of the same full prompt, later questions reuse the
document's KV cache (measured by the engine's cached prompt tokens), the RAPID draft prompt, the
document chunks' disk cache, and clear errors for documents that do not fit."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from conftest import FLAT_CURVE, book_paragraphs, tiny_loaded
from ragspec import Engine, SpecConfig
from ragspec.drafting.registry import default_drafters
from ragspec.errors import ConfigError, DocumentUnreadable, PromptTooLong
from ragspec.longdoc import chunks as chunks_module
from ragspec.longdoc.read import Document
from ragspec.longdoc.session import DocumentSession, as_documents
from ragspec.longdoc.store import cached_chunks, documents_dir

QUESTIONS = ("Who has taken Netherfield Park?", "What does Mrs. Bennet want her husband to do?")


def plain_answer(model, prompt: str, max_new_tokens: int) -> list[int]:
    """Plain decoding of the whole prompt from scratch: no drafts, no prefix cache."""
    engine = Engine(model, prefix_cache=False, latency_curve=FLAT_CURVE)
    return engine.generate(prompt, max_new_tokens=max_new_tokens, speculative=False).token_ids


def check_session(model, document: str, max_new_tokens: int) -> list:
    """Ask QUESTIONS in one session; each answer equals plain decoding, the first prefills the
    whole prompt and every later one finds the document part in the prefix cache."""
    spec = SpecConfig(drafters=(*default_drafters(), "rapid"))  # every drafter a session can run
    session = DocumentSession(Engine(model, spec=spec, latency_curve=FLAT_CURVE), document)
    answers = []
    for number, question in enumerate(QUESTIONS):
        out = session.ask(question, max_new_tokens=max_new_tokens)
        assert out.token_ids == plain_answer(model, session.prompt(question), max_new_tokens), question
        if number == 0:
            assert out.stats.cached_prompt_tokens == 0
        else:  # all of the document part but its last token (the question's prefill feeds that one)
            assert out.stats.cached_prompt_tokens >= session.document_tokens - 1
            assert out.prompt_tokens - out.stats.cached_prompt_tokens < 40  # the question, not the document
        answers.append(out)
    return answers


@pytest.mark.slow
def test_real_model_answers_equal_plain_decoding_and_reuse_the_document(real_model):
    document = "\n\n".join(book_paragraphs(8))
    answers = check_session(real_model, document, max_new_tokens=10)
    assert any(answer.stats.num_draft_tokens for answer in answers), "nothing was drafted: speculation untested"


def test_tiny_model_answers_equal_plain_decoding(tokenizer):
    model = tiny_loaded("llama", tokenizer)
    check_session(model, "\n\n".join(book_paragraphs(6)), max_new_tokens=16)


def test_the_document_survives_other_requests(tokenizer):
    """The prefix cache keeps one entry here and another prompt takes it between the questions:
    the session puts the document back before the next question (one prefill of the document,
    outside the question's own prefill), so the question still prefills only itself."""
    model = tiny_loaded("llama", tokenizer)
    engine = Engine(model, latency_curve=FLAT_CURVE, prefix_cache_entries=1)
    session = DocumentSession(engine, "\n\n".join(book_paragraphs(4)))
    first = session.ask(QUESTIONS[0], max_new_tokens=4, speculative=False)
    engine.generate("Something else entirely.", max_new_tokens=4, speculative=False)
    second = session.ask(QUESTIONS[1], max_new_tokens=4, speculative=False)
    assert first.stats.cached_prompt_tokens == 0
    assert second.stats.cached_prompt_tokens >= session.document_tokens - 1
    assert second.token_ids == plain_answer(model, session.prompt(QUESTIONS[1]), 4)


def test_prompt_holds_the_whole_document_then_the_question(tokenizer):
    model = tiny_loaded("llama", tokenizer)
    docs = [Document("a.txt", "Alpha text."), Document("b.md", "Beta text.")]
    session = DocumentSession(Engine(model, latency_curve=FLAT_CURVE), docs)
    prompt = session.prompt("  What is beta?  ")
    assert prompt.index("[Document 1: a.txt]\nAlpha text.") < prompt.index("[Document 2: b.md]\nBeta text.")
    assert prompt.index("Beta text.") < prompt.index("Question: What is beta?\nAnswer:")
    assert prompt.startswith(session.parts.head) and session.prompt("Other?").startswith(session.parts.head)
    assert session.document_tokens == len(Engine.encode(session.engine, session.parts.head))


def test_rapid_draft_prompt_holds_the_question_and_the_closest_chunks(tokenizer):
    model = tiny_loaded("llama", tokenizer, max_positions=4096)
    document = "\n\n".join(book_paragraphs(50))  # ~3k tokens, ~16 chunks
    spec = SpecConfig(drafters=(*default_drafters(), "rapid"))  # RAPID is not a default drafter
    session = DocumentSession(Engine(model, spec=spec, latency_curve=FLAT_CURVE), document, chunks=2)
    assert DocumentSession(Engine(model, latency_curve=FLAT_CURVE), document).request("Who?").draft_prompt is None
    request = session.request("What is the name of the man who took Netherfield?", max_new_tokens=4)
    (message,) = request.draft_prompt
    assert "Netherfield" in message["content"] and message["content"].endswith(
        "Question: What is the name of the man who took Netherfield?\nAnswer:")
    assert len(message["content"]) < len(session.text) / 4  # a few chunks, not the document
    assert session.request("Who?", speculative=False).draft_prompt is None  # plain decoding: no retrieval
    with pytest.raises(ConfigError, match="sets draft_prompt itself"):
        session.request("Who?", draft_prompt="x")


def test_document_chunks_are_cached_on_disk_by_checksum(tokenizer):
    text = "\n\n".join(book_paragraphs(10))
    made = cached_chunks(text, tokenizer)
    (path,) = [p for p in documents_dir().glob(f"{made.checksum}-*.npz")]
    chunks_module._MEMORY.clear()  # the next read must come from the file
    again = cached_chunks(text, tokenizer)
    assert again is not made
    assert [c.text for c in again.chunks] == [c.text for c in made.chunks]
    assert [c.token_ids for c in again.chunks] == [c.token_ids for c in made.chunks]
    np.testing.assert_array_equal(again.vectors, made.vectors)
    path.write_bytes(b"damaged")  # ignored and rewritten
    chunks_module._MEMORY.clear()
    rebuilt = cached_chunks(text, tokenizer)
    np.testing.assert_array_equal(rebuilt.vectors, made.vectors)
    assert path.read_bytes()[:2] == b"PK"  # an npz (zip) again


def test_documents_from_texts_paths_and_bad_input(tmp_path):
    (tmp_path / "n.md").write_text("# Notes\nSome notes.", encoding="utf-8")
    docs = as_documents(["A plain text.", tmp_path / "n.md", Document("x", "y")])
    assert [(d.name, d.text) for d in docs] == [("text 1", "A plain text."), ("n.md", "# Notes\nSome notes."), ("x", "y")]
    assert as_documents("Only one.")[0].text == "Only one."
    with pytest.raises(ConfigError, match="at least one document"):
        as_documents([])
    with pytest.raises(ConfigError, match="document 2 is an empty text"):
        as_documents(["ok", "  "])
    with pytest.raises(DocumentUnreadable, match="document not found"):
        as_documents([Path(tmp_path / "missing.pdf")])


def test_a_document_longer_than_the_context_is_refused_with_its_size(tokenizer):
    model = tiny_loaded("llama", tokenizer, max_positions=256)
    engine = Engine(model, latency_curve=FLAT_CURVE)
    with pytest.raises(PromptTooLong) as caught:
        DocumentSession(engine, Document("long.txt", "word " * 400))
    message = str(caught.value)
    assert "long.txt" in message and "holds 256 tokens of context" in message
    tokens = int(message.split(" takes ")[1].split()[0])
    assert tokens > 256
    session = DocumentSession(engine, Document("short.txt", "word " * 150))
    with pytest.raises(PromptTooLong, match=r"and the question \d+ more, but tiny-llama holds 256"):
        session.ask("why " * 120, max_new_tokens=2)
