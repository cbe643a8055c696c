"""GenerationRequest (the request type), streamed Pieces (token ids and the drafter of each
token) and documents given with a request (prompt context and drafting scope)."""

from __future__ import annotations

from collections import Counter

import pytest
from conftest import FLAT_CURVE

from ragspec import Engine, GenerationRequest, Piece, SpecConfig
from ragspec.engine.rag import DEFAULT_RAG_TEMPLATE
from ragspec.errors import ConfigError

MAX_NEW = 40
PROMPTS = ["a b c a b c a b", [{"role": "user", "content": "Say abc abc abc"}]]
QUESTION = "What does the report say about rivers?"
DOCUMENTS = ["The report says rivers flow to the sea.", "Rivers carry water and sand."]


@pytest.fixture(scope="module")
def cold(tiny_llama) -> Engine:
    return Engine(tiny_llama, latency_curve=FLAT_CURVE, prefix_cache=False, persist_state=False)


def fresh(loaded, **options) -> Engine:
    """A speculative engine with nothing learned (so two of them run identical steps)."""
    return Engine(loaded, latency_curve=FLAT_CURVE, persist_state=False, prefix_cache=False, **options)


def test_request_equals_the_keyword_form(tiny_llama, cold):
    for prompt in PROMPTS:
        kwargs = dict(max_new_tokens=MAX_NEW, stop=["c a"], temperature=0.7, seed=3, top_k=20)
        by_kwargs = cold.generate(prompt, **kwargs)
        by_request = cold.generate(GenerationRequest(prompt, **kwargs))
        assert (by_request.token_ids, by_request.text, by_request.finish_reason) == (
            by_kwargs.token_ids, by_kwargs.text, by_kwargs.finish_reason)
        # options given with a request replace its fields
        shorter = cold.generate(GenerationRequest(prompt, **kwargs), max_new_tokens=5, stop=())
        assert shorter.token_ids == cold.generate(prompt, **{**kwargs, "max_new_tokens": 5, "stop": ()}).token_ids
        assert len(shorter.token_ids) == 5


@pytest.mark.parametrize("fields, message", [
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(max_new_tokens=2.5), "max_new_tokens"),
    (dict(k=-1), "k "),
    (dict(temperature=-1.0), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(stop=["x", 3]), "stop"),
    (dict(documents="one text"), "documents"),
    (dict(documents=["fine", 7]), "documents"),
    (dict(documents=["a"], index="books"), "not both"),
    (dict(speculative="yes"), "speculative"),
])
def test_bad_request_fields_are_config_errors(fields, message):
    with pytest.raises(ConfigError, match=message):
        GenerationRequest("hello", **fields)


@pytest.mark.parametrize("prompt", [42, [{"role": "user"}], ["hello"], [{"role": "user", "content": None}]])
def test_bad_prompts_are_config_errors(prompt):
    with pytest.raises(ConfigError, match="prompt|message"):
        GenerationRequest(prompt)


def test_request_is_frozen_and_normalised():
    request = GenerationRequest([{"role": "user", "content": "hi"}], stop="END", documents=["a"])
    assert request.stop == ("END",) and request.documents == ("a",)
    with pytest.raises(AttributeError):
        request.max_new_tokens = 3  # type: ignore[misc]


def read_pieces(stream) -> list[Piece]:
    return list(stream.pieces())


def test_pieces_carry_the_tokens_and_text_of_the_result(tiny_llama, cold):
    for prompt in PROMPTS:
        stream = fresh(tiny_llama).stream(prompt, max_new_tokens=MAX_NEW, stop=["c a"])
        pieces = read_pieces(stream)
        result = stream.result
        assert [t for p in pieces for t in p.token_ids] == result.token_ids
        assert "".join(p.text for p in pieces) == result.text
        assert all(len(p.sources) == len(p.token_ids) for p in pieces)
        assert result.token_ids == cold.generate(prompt, max_new_tokens=MAX_NEW, stop=["c a"],
                                                 speculative=False).token_ids


def test_sources_count_what_each_drafter_got_accepted(tiny_llama):
    """Cut where a step ends (so no step's tokens are dropped), the pieces' sources hold each
    step's accepted drafts and one "target" bonus token, as the request's stats count them."""
    accepted = 0
    for prompt in PROMPTS:
        first = read_pieces(warmed(tiny_llama, prompt).stream(prompt, max_new_tokens=MAX_NEW))
        steps = [p for p in first if p.token_ids]
        cut = sum(len(p.token_ids) for p in steps[:-1])
        stream = warmed(tiny_llama, prompt).stream(prompt, max_new_tokens=cut)
        pieces = [p for p in read_pieces(stream) if p.token_ids]
        stats = stream.result.stats
        assert [p.token_ids for p in pieces] == [p.token_ids for p in steps[:-1]]
        assert all(p.sources[-1] == "target" and "target" not in p.sources[:-1] for p in pieces)
        counts = Counter(s for p in pieces for s in p.sources)
        assert counts.pop("target") == stats.num_steps
        assert dict(counts) == stats.accepted_per_source
        accepted += sum(counts.values())
    assert accepted > 0  # drafts really were accepted


def warmed(loaded, prompt) -> Engine:
    """A fresh engine that has answered `prompt` once (its drafters learned that answer)."""
    engine = fresh(loaded)
    engine.generate(prompt, max_new_tokens=MAX_NEW // 2)
    return engine


def test_iterating_text_and_pieces_share_one_position(tiny_llama):
    stream = fresh(tiny_llama).stream(PROMPTS[0], max_new_tokens=MAX_NEW)
    first = next(iter(stream))
    rest = read_pieces(stream)
    assert first + "".join(p.text for p in rest) == stream.result.text


def test_documents_are_the_context_and_drafting_scope(tiny_llama, cold):
    """The documents' tokens make a datastore of the request: with the datastore drafter alone,
    an answer that repeats a document is drafted from it, and greedy output equals plain."""
    plain = cold.generate(QUESTION, documents=DOCUMENTS, max_new_tokens=MAX_NEW, speculative=False)
    context = DEFAULT_RAG_TEMPLATE.format(context="[1] " + DOCUMENTS[0] + "\n\n[2] " + DOCUMENTS[1], question=QUESTION)
    assert plain.token_ids == cold.generate([{"role": "user", "content": context}], max_new_tokens=MAX_NEW).token_ids
    only_datastore = SpecConfig(drafters=("datastore",))
    documents = [*DOCUMENTS, plain.text]  # an answer here starts as `plain` does
    reference = cold.generate(QUESTION, documents=documents, max_new_tokens=MAX_NEW, speculative=False)
    fast = fresh(tiny_llama, spec=only_datastore).generate(QUESTION, documents=documents, max_new_tokens=MAX_NEW)
    assert fast.token_ids == reference.token_ids
    assert fast.stats.accepted_per_source.get("datastore", 0) > 0
    without = fresh(tiny_llama, spec=only_datastore).generate(QUESTION, max_new_tokens=MAX_NEW)
    assert without.stats.num_draft_tokens == 0  # no documents, no datastore to draft from


def test_empty_documents_give_an_empty_context(tiny_llama, cold):
    out = cold.generate(QUESTION, documents=[], max_new_tokens=8, speculative=False)
    context = DEFAULT_RAG_TEMPLATE.format(context="", question=QUESTION)
    assert out.token_ids == cold.generate([{"role": "user", "content": context}], max_new_tokens=8).token_ids
