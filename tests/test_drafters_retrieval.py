"""Retrieval drafters: the n-gram index against a brute-force oracle, token recycling, past
responses and the corpus datastore on their own, then lossless greedy decoding with each drafter
alone and all of them fused, on tiny models of two architectures and on the real embedded model.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import FLAT_CURVE, book_paragraphs, spec_bench_questions
from test_tree import assert_is_trie, assert_monotone, assert_valid_tree
from ragspec import Engine
from ragspec.config import SpecConfig
from ragspec.drafting.registry import default_drafters
from ragspec.drafting.base import DraftContext
from ragspec.drafting.continuations import draft_depth
from ragspec.drafting.datastore import DatastoreDrafter
from ragspec.drafting.past_responses import PROMPT_TAIL, PastResponsesDrafter
from ragspec.drafting.recycling import TOP_K, UNKNOWN, TokenRecyclingDrafter, rank_template
from ragspec.drafting.suffix_index import NGRAM_SIZES, SEPARATOR, NgramIndex
from ragspec.drafting.tree import node_paths
from ragspec.types import ROOT, AcceptResult, DraftTree, StepResult



def context(tokens, max_nodes: int = 64) -> DraftContext:
    return DraftContext(tokens=np.asarray(tokens, dtype=np.int64), max_nodes=max_nodes)


# -- NgramIndex ------------------------------------------------------------------------------


def true_match(tokens: list[int], query: list[int], position: int) -> int:
    """How many tokens right before `position` equal the last tokens of `query` (uncapped)."""
    length = 0
    while length < position and length < len(query) and tokens[position - 1 - length] == query[-1 - length]:
        length += 1
    return length


def oracle_matches(tokens, query, sizes, max_results, max_match) -> list[tuple[int, int]]:
    """(position, match length) by brute force: every indexed position p (1 <= p < len) whose
    preceding n tokens equal the query's last n for some n in sizes; ordered by the longest such
    n, then latest first; the first max_results; lengths are the true ones, capped at max_match."""
    ranked = []
    for p in range(1, len(tokens)):
        match = true_match(tokens, query, p)
        level = max((n for n in sizes if n <= match), default=0)
        if level:
            ranked.append((-level, -p, min(match, max_match)))
    ranked.sort()
    return [(-neg_p, length) for _, neg_p, length in ranked[:max_results]]


small_tokens = st.integers(0, 2) | st.just(SEPARATOR)
index_tokens = st.lists(small_tokens, min_size=0, max_size=80)
queries = st.lists(st.integers(0, 2), min_size=1, max_size=24)
size_sets = st.just(NGRAM_SIZES) | st.sets(st.integers(1, 6), min_size=1, max_size=4).map(tuple)


@settings(max_examples=150)
@given(
    tokens=index_tokens,
    query=queries,
    sizes=size_sets,
    max_results=st.integers(1, 8),
    max_match=st.integers(1, 20),
    cuts=st.lists(st.integers(0, 80), max_size=4),
)
def test_ngram_index_matches_brute_force(tokens, query, sizes, max_results, max_match, cuts):
    index = NgramIndex(sizes)
    bounds = sorted({0, len(tokens), *(c for c in cuts if c < len(tokens))})
    for start, end in zip(bounds, bounds[1:]):  # appended in pieces: incremental == at once
        index.extend(np.asarray(tokens[start:end], dtype=np.int64))
    assert len(index) == len(tokens) and index.tokens.tolist() == tokens
    positions, lengths = index.matches(np.asarray(query, dtype=np.int64), max_results, max_match)
    got = list(zip(positions.tolist(), lengths.tolist()))
    assert got == oracle_matches(tokens, query, sorted(sizes), max_results, max_match)
    for position, length in got:  # separators never take part in a match
        assert SEPARATOR not in tokens[position - length : position]


@settings(max_examples=100)
@given(tokens=index_tokens, start=st.integers(0, 90), depth=st.integers(0, 30))
def test_ngram_index_following_cuts_at_separator(tokens, start, depth):
    index = NgramIndex()
    index.extend(np.asarray(tokens, dtype=np.int64))
    expected = []
    for token in tokens[start : start + depth]:
        if token == SEPARATOR:
            break
        expected.append(token)
    assert index.following(start, depth).tolist() == expected


def test_ngram_index_never_matches_across_a_separator():
    index = NgramIndex()
    index.extend(np.array([5, 6, SEPARATOR, 7, 8, 9, SEPARATOR, 6, 7, 3], dtype=np.int64))
    positions, lengths = index.matches(np.array([1, 6, 7]), 8, 16)
    # "6 7" whole at 7-8; the "7" after a separator matches as one token (the "6" before it is cut off)
    assert list(zip(positions.tolist(), lengths.tolist())) == [(9, 2), (4, 1)]
    positions, lengths = index.matches(np.array([5, 6]), 8, 16)
    assert list(zip(positions.tolist(), lengths.tolist())) == [(2, 2), (8, 1)]
    assert index.following(2, 5).tolist() == []  # what follows "5 6" is a separator: nothing to draft
    assert index.following(8, 5).tolist() == [7, 3]


# -- Token recycling ------------------------------------------------------------------------


@pytest.mark.parametrize("num_nodes,max_depth,k", [(80, 6, TOP_K), (1, 6, TOP_K), (30, 3, 4), (200, 8, TOP_K)])
def test_rank_template_is_parent_closed_with_the_requested_size(num_nodes, max_depth, k):
    template = rank_template(num_nodes, max_depth, k)
    assert len(template) == num_nodes and len(set(template)) == num_nodes
    seen = set()
    for path in template:
        assert 1 <= len(path) <= max_depth and all(0 <= r < k for r in path)
        assert all(path[:d] in seen for d in range(1, len(path))), f"{path} comes before its parent"
        seen.add(path)
    assert (0,) in seen and (0, 0) in seen or num_nodes == 1


def test_rank_template_default_is_the_papers_size():
    template = rank_template()
    assert len(template) == 80 and max(map(len, template)) <= 6
    assert template[0] == (0,)


def _distinct_rows(vocab: int, seed: int = 0) -> np.ndarray:
    """A successor matrix whose rows hold TOP_K distinct tokens each. [vocab, TOP_K] int32"""
    rng = np.random.default_rng(seed)
    return np.stack([rng.permutation(vocab)[:TOP_K] for _ in range(vocab)]).astype(np.int32)


def _step(tree: DraftTree, logits: torch.Tensor, pending: int, accepted: list[int] = (), bonus: int = 0):
    return StepResult(
        tree=tree,
        accept=AcceptResult(accepted_nodes=[], accepted_tokens=list(accepted), bonus_token=bonus),
        logits=logits,
        draft_s=0.0,
        verify_s=0.0,
        pending_token=pending,
    )


def test_recycling_observe_overwrites_rows_of_pending_token_and_every_node():
    vocab = 40
    drafter = TokenRecyclingDrafter(vocab)
    assert (drafter.successors == UNKNOWN).all() and drafter.successors.shape == (vocab, TOP_K)
    tree = DraftTree(
        token_ids=np.array([5, 7, 9, 11], dtype=np.int64),
        parents=np.array([ROOT, 0, ROOT, 2], dtype=np.int64),
        scores=np.array([0.5, 0.4, 0.3, 0.2]),
        sources=("x",) * 4,
    )
    generator = torch.Generator().manual_seed(0)
    logits = torch.stack([torch.randperm(vocab, generator=generator).float() for _ in range(5)])  # [1 + 4, vocab]
    drafter.successors[20] = np.arange(TOP_K)  # a row the step does not touch
    drafter.observe(_step(tree, logits, pending=3))
    for row, token in enumerate([3, 5, 7, 9, 11]):
        expected = np.argsort(-logits[row].numpy(), kind="stable")[:TOP_K]
        assert drafter.successors[token].tolist() == expected.tolist(), f"row of token {token}"
    assert drafter.successors[20].tolist() == list(range(TOP_K))
    untouched = [t for t in range(vocab) if t not in (3, 5, 7, 9, 11, 20)]
    assert (drafter.successors[untouched] == UNKNOWN).all()
    # a later step overwrites (most recent wins), it does not merge
    fresh = torch.stack([torch.randperm(vocab, generator=generator).float()])
    drafter.observe(_step(DraftTree.empty(), fresh, pending=5))
    assert drafter.successors[5].tolist() == np.argsort(-fresh[0].numpy())[:TOP_K].tolist()


def test_recycling_propose_fills_the_template_from_the_matrix():
    vocab = 64
    drafter = TokenRecyclingDrafter(vocab, template_nodes=40)
    assert drafter.propose(context([1, 2, 3])).num_nodes == 0  # nothing known yet: no draft
    drafter.successors[:] = _distinct_rows(vocab)
    root = 17
    tree = drafter.propose(context([4, 4, root]))
    assert_valid_tree(tree)
    assert_monotone(tree)
    assert_is_trie(tree)
    assert set(tree.sources) == {"recycling"}
    s = drafter.successors
    expected = set()
    for path in drafter.template:
        token, tokens = root, []
        for rank in path:
            token = int(s[token, rank])
            tokens.append(token)
        expected.add(tuple(tokens))
    assert tree.num_nodes == len(drafter.template)
    assert set(node_paths(tree)) == expected
    for r1 in range(3):
        for r2 in range(2):
            assert (int(s[root, r1]), int(s[s[root, r1], r2])) in expected


def test_recycling_skips_unknown_rows_and_their_subtrees():
    vocab = 32
    drafter = TokenRecyclingDrafter(vocab, template_nodes=80)
    drafter.successors[7] = np.arange(10, 10 + TOP_K)  # only the root's row is known
    tree = drafter.propose(context([7]))
    assert sorted(tree.token_ids.tolist()) == sorted({int(drafter.successors[7, p[0]]) for p in drafter.template if len(p) == 1})
    assert (tree.parents == ROOT).all()


def test_recycling_state_persists_across_drafters(tmp_path):
    path = tmp_path / "state" / "recycling.npy"
    vocab = 48
    first = TokenRecyclingDrafter(vocab, state_path=path)
    logits = torch.randn(1, vocab, generator=torch.Generator().manual_seed(1))
    first.observe(_step(DraftTree.empty(), logits, pending=9))
    first.finish_request([1, 2, 3], [4, 5])
    assert path.is_file()
    second = TokenRecyclingDrafter(vocab, state_path=path)
    assert np.array_equal(second.successors, first.successors)
    assert second.successors[9].tolist() == torch.topk(logits[0], TOP_K).indices.tolist()
    assert second.propose(context([9])).num_nodes > 0  # starts warm


@pytest.mark.parametrize("content", ["wrong_shape", "garbage"])
def test_recycling_ignores_a_bad_state_file_with_a_warning(tmp_path, caplog, content):
    path = tmp_path / "recycling.npy"
    if content == "wrong_shape":
        np.save(path, np.zeros((10, TOP_K), dtype=np.int32))
    else:
        path.write_bytes(b"this is not a numpy file")
    with caplog.at_level(logging.WARNING, logger="ragspec.drafting.recycling"):
        drafter = TokenRecyclingDrafter(32, state_path=path)
    assert drafter.successors.shape == (32, TOP_K) and (drafter.successors == UNKNOWN).all()
    assert any(str(path) in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    drafter.finish_request([1], [2])  # and the next save replaces the bad file
    assert np.load(path).shape == (32, TOP_K)


# -- Past responses -------------------------------------------------------------------------


def test_past_responses_drafts_the_answer_to_a_repeated_prompt():
    drafter = PastResponsesDrafter()
    prompt = list(range(100, 140))  # longer than the stored prompt tail
    answer = [7, 8, 9, 7, 8, 10, 11, 12, 13, 14]
    drafter.finish_request(prompt, answer)
    drafter.finish_request([200, 201, 202], [300, 301, 302, 303])  # another request after it
    assert drafter.num_responses == 2
    # a different conversation that ends with the same prompt tail
    tree = drafter.propose(context([1, 2, 3, *prompt[-PROMPT_TAIL:]]))
    assert tuple(answer) in set(node_paths(tree)), "the whole answer is drafted from its first token"
    assert tree.token_ids[tree.parents == ROOT].tolist() == [answer[0]]
    assert_monotone(tree)
    # mid-answer: the rest of the answer, not the next stored response
    tree = drafter.propose(context([*prompt[-10:], *answer[:6]]))
    paths = set(node_paths(tree))
    assert tuple(answer[6:]) in paths
    assert all(300 not in path for path in paths)


def test_past_responses_needs_material():
    drafter = PastResponsesDrafter()
    assert drafter.propose(context([1, 2, 3])).num_nodes == 0
    drafter.finish_request([1, 2], [3])  # a one-token exchange of 3 tokens is kept
    assert drafter.propose(context([5, 1, 2])).num_nodes > 0
    assert drafter.propose(context([1, 2], max_nodes=0)).num_nodes == 0


@settings(max_examples=60)
@given(
    lengths=st.lists(st.integers(2, 60), min_size=1, max_size=30),
    max_tokens=st.integers(20, 200),
)
def test_past_responses_eviction_bounds_memory_and_keeps_the_newest(lengths, max_tokens):
    drafter = PastResponsesDrafter(max_tokens=max_tokens)
    stored: list[list[int]] = []
    next_token = 0
    for length in lengths:
        response = list(range(next_token, next_token + length))  # every token unique
        next_token += length
        drafter.remember(response)
        stored.append(response)
        assert len(drafter.index) <= max_tokens
        assert 1 <= drafter.num_responses <= len(stored)
        # the newest response is always there: its tail drafts its own continuation
        kept = response[-(max_tokens // 2):]
        if len(kept) >= 3:
            tree = drafter.propose(context([-5, kept[0], kept[1]]))
            assert (kept[2],) in set(node_paths(tree))
    # what survives is a run of the newest responses, nothing older than what was dropped
    survivors = [r for r in stored if r[-1] in set(drafter.index.tokens.tolist())]
    assert survivors == stored[len(stored) - len(survivors):]
    assert len(survivors) == drafter.num_responses


def test_past_responses_eviction_drops_the_oldest():
    drafter = PastResponsesDrafter(max_tokens=100)
    for i in range(20):
        drafter.remember([1000 + i] * 1 + list(range(i * 20, i * 20 + 19)))
    assert len(drafter.index) <= 100
    tokens = set(drafter.index.tokens.tolist())
    assert 1019 in tokens and 1000 not in tokens


# -- Corpus datastore (REST) over a real index ---------------------------------------------


@pytest.fixture(scope="module")
def book_index(tmp_path_factory, tokenizer):
    from ragspec.index import build_index_from_texts

    texts = [(f"paragraph-{i}", p) for i, p in enumerate(book_paragraphs(40))]
    index, _ = build_index_from_texts(
        texts, "austen", home=tmp_path_factory.mktemp("indexes"), tokenizer=tokenizer,
        chunk_tokens=64, overlap_tokens=8,
    )
    return index


def test_datastore_drafts_the_true_continuation_of_a_corpus_phrase(book_index, tokenizer):
    drafter = DatastoreDrafter(book_index.datastore)
    phrase = "It is a truth universally acknowledged, that a single man"
    ids = tokenizer("I read this:\n").input_ids + tokenizer(phrase).input_ids
    tree = drafter.propose(context(ids))
    assert tree.num_nodes > 0 and set(tree.sources) == {"datastore"}
    assert_monotone(tree)
    longest = max(node_paths(tree), key=len)
    drafted = " ".join(tokenizer.decode(list(longest)).split())  # the book wraps its lines
    assert drafted.startswith("in possession of a good fortune, must be in want of a wife")


def test_datastore_drafts_what_follows_in_the_token_array(book_index):
    datastore = book_index.datastore
    tokens = np.asarray(datastore.tokens, dtype=np.int64)
    chunks = book_index.chunks(list(range(book_index.num_chunks))).values()
    chunk = max(chunks, key=lambda c: c["token_end"] - c["token_start"])
    start = chunk["token_start"] + 20  # inside the chunk, away from the overlaps with its neighbours
    phrase = tokens[start : start + 12]
    drafter = DatastoreDrafter(datastore)
    tree = drafter.propose(context([int(tokens.max()) + 1, *phrase.tolist()]))
    depth = draft_depth(12, SpecConfig().max_depth)
    truth = tokens[start + 12 : min(start + 12 + depth, chunk["token_end"])]
    assert len(truth) >= 5
    assert tuple(truth.tolist()) in set(node_paths(tree))


def _common_bigram(tokens: np.ndarray) -> tuple[int, int]:
    """A token pair that occurs in many places with different continuations."""
    pairs = {}
    for p in range(2, len(tokens) - 1):
        pair = (int(tokens[p - 2]), int(tokens[p - 1]))
        if SEPARATOR in pair or tokens[p] == SEPARATOR:
            continue
        pairs.setdefault(pair, set()).add(int(tokens[p]))
    return max(pairs, key=lambda pair: len(pairs[pair]))


def test_datastore_allowed_ranges_restrict_the_continuations(book_index):
    datastore = book_index.datastore
    tokens = np.asarray(datastore.tokens, dtype=np.int64)
    bigram = _common_bigram(tokens)
    ends = [p for p in range(2, len(tokens)) if tuple(tokens[p - 2 : p].tolist()) == bigram and tokens[p] != SEPARATOR]
    chunks = book_index.chunks(list(range(book_index.num_chunks)))
    ranges = sorted((c["token_start"], c["token_end"]) for c in chunks.values())
    chosen = next(r for r in ranges if any(r[0] <= p < r[1] for p in ends))
    stranger = next(t for t in range(100, 50_000) if t not in set(tokens.tolist()))
    query = context([stranger, *bigram])

    def continues_inside(path: tuple[int, ...], allowed: list[tuple[int, int]]) -> bool:
        for p in ends:
            if any(s <= p < e for s, e in allowed) and tokens[p : p + len(path)].tolist() == list(path):
                return True
        return False

    scoped = DatastoreDrafter(datastore, allowed_ranges=[chosen]).propose(query)
    assert scoped.num_nodes > 0
    assert all(continues_inside(path, [chosen]) for path in node_paths(scoped))
    whole = DatastoreDrafter(datastore).propose(query)
    roots = {int(t) for t in whole.token_ids[whole.parents == ROOT]}
    assert roots - {int(t) for t in scoped.token_ids[scoped.parents == ROOT]}, "the scope made no difference"
    # a scope where the suffix never occurs drafts nothing
    lonely = [r for r in ranges if not any(r[0] <= p < r[1] for p in ends)]
    if lonely:
        assert DatastoreDrafter(datastore, allowed_ranges=[lonely[0]]).propose(query).num_nodes == 0
    assert DatastoreDrafter(datastore, allowed_ranges=[]).propose(query).num_nodes == 0


# -- Lossless greedy decoding with each drafter, on tiny models -----------------------------

TINY_MAX_NEW = 32
TINY_INDEX = "tiny-outputs"


def tiny_prompts() -> list[list[dict]]:
    questions = [
        "Hi there",
        "Summarise: the rain in Spain stays mainly in the plain.",
        "Say abc abc abc",
        "List three colours.",
        "one two three one two three one two",
        "Translate to French: good morning, good night.",
        "What is the capital of France?",
        "Write a haiku about the sea.",
        "Count from one to ten.",
        "Explain photosynthesis in one sentence.",
    ]
    return [[{"role": "user", "content": q}] for q in questions]


@pytest.fixture(scope="module")
def tiny_reference(tiny_model, tmp_path_factory):
    """Plain greedy outputs per prompt, and an index of those outputs (datastore material)."""
    from ragspec.index import build_index_from_texts

    plain_engine = Engine(tiny_model, latency_curve=FLAT_CURVE, persist_state=False)
    plain = [plain_engine.generate(p, max_new_tokens=TINY_MAX_NEW, speculative=False).token_ids for p in tiny_prompts()]
    home = tmp_path_factory.mktemp(f"home-{tiny_model.name}")
    texts = [(f"answer-{i}", tiny_model.tokenizer.decode(ids)) for i, ids in enumerate(plain)]
    build_index_from_texts(texts, TINY_INDEX, home=home, tokenizer=tiny_model.tokenizer, chunk_tokens=256,
                           overlap_tokens=0)
    return plain, home


@pytest.mark.parametrize("drafters", [("context",), ("past",), ("recycling",), ("datastore",), default_drafters()],
                         ids=["context", "past", "recycling", "datastore", "fused"])
def test_tiny_greedy_lossless_with_each_drafter(tiny_model, tiny_reference, drafters):
    plain, home = tiny_reference
    spec = SpecConfig(drafters=drafters, datastore_scope="index")
    engine = Engine(tiny_model, latency_curve=FLAT_CURVE, spec=spec, index_home=home, persist_state=False)
    # the datastore needs an index; "{question}" alone keeps the prompt what the plain run saw
    rag = dict(index=TINY_INDEX, k=1, rag_template="{question}") if "datastore" in drafters else {}
    accepted: dict[str, int] = {}
    rounds = 2 if "past" in drafters else 1  # past responses need an earlier answer
    for _ in range(rounds):
        for prompt, reference in zip(tiny_prompts(), plain):
            fast = engine.generate(prompt, max_new_tokens=TINY_MAX_NEW, **rag)
            assert fast.token_ids == reference, f"{drafters} changed the output for {prompt!r}"
            assert set(fast.stats.drafted_per_source) <= set(drafters)
            for source, count in fast.stats.accepted_per_source.items():
                accepted[source] = accepted.get(source, 0) + count
    if len(drafters) == 1:
        assert accepted.get(drafters[0], 0) > 0, f"{drafters[0]} never got a token accepted: the test proves nothing"
    else:
        assert sum(accepted.values()) > 0 and len(accepted) >= 2, accepted


# -- Real embedded model --------------------------------------------------------------------

REAL_MAX_NEW = 32


def real_questions(count: int = 5) -> list[list[dict]]:
    questions = spec_bench_questions()
    if not questions:
        pytest.skip("spec_bench data not found under ../shared/data")
    chosen, categories = [], set()
    for q in sorted(questions, key=lambda q: len(q["turns"][0])):
        if q["category"] not in categories:
            categories.add(q["category"])
            chosen.append([{"role": "user", "content": q["turns"][0]}])
        if len(chosen) == count:
            break
    return chosen


@pytest.mark.slow
def test_real_model_all_drafters_lossless_and_faster_the_second_time(real_engine):
    assert real_engine.target.dtype == torch.float32
    # a fresh engine: no past responses or recycling state from other tests
    engine = Engine(real_engine.target, latency_curve=real_engine.budget().curve, persist_state=False)
    assert engine.spec.drafters == default_drafters()
    questions = real_questions()
    plain = [engine.generate(q, max_new_tokens=REAL_MAX_NEW, speculative=False).token_ids for q in questions]
    rounds = []
    for _ in range(2):
        steps = tokens = 0
        for question, reference in zip(questions, plain):
            fast = engine.generate(question, max_new_tokens=REAL_MAX_NEW)
            assert fast.token_ids == reference, f"speculation changed the output for {question}"
            steps += fast.stats.num_steps
            tokens += fast.stats.num_steps + fast.stats.num_accepted_tokens
        rounds.append(tokens / steps)
    first, second = rounds
    assert second > first, f"asking again did not draft better: {first:.2f} then {second:.2f}"
    assert second > 3.0, f"repeated questions should be drafted nearly whole, got {second:.2f}"


def test_past_responses_persist_and_reload(tmp_path):
    path = tmp_path / "past_responses.npy"
    prompt, answer = list(range(100, 140)), [7, 8, 9, 7, 8, 10, 11, 12]
    first = PastResponsesDrafter(state_path=path, vocab_size=1000)
    first.finish_request(prompt, answer)
    first.finish_request([200, 201, 202], [300, 301, 302, 303])
    saved = np.load(path)
    assert saved.dtype == np.int32 and saved.tolist().count(SEPARATOR) == 2
    again = PastResponsesDrafter(state_path=path, vocab_size=1000)  # a new process
    assert again.num_responses == 2
    query = context([1, 2, *prompt[-PROMPT_TAIL:]])
    assert node_paths(again.propose(query)) == node_paths(first.propose(query))
    assert tuple(answer) in set(node_paths(again.propose(query)))


@pytest.mark.parametrize("bad", [np.array([1.5, 2.5]), np.array([[1, 2]]), np.array([5, 2000, -1]), b"junk"])
def test_unusable_past_responses_file_is_ignored(tmp_path, bad):
    path = tmp_path / "past_responses.npy"
    if isinstance(bad, bytes):
        path.write_bytes(bad)
    else:
        np.save(path, bad)
    drafter = PastResponsesDrafter(state_path=path, vocab_size=1000)
    assert drafter.num_responses == 0
    drafter.finish_request([1, 2, 3], [4, 5, 6])  # and it starts over, replacing the bad file
    assert PastResponsesDrafter(state_path=path, vocab_size=1000).num_responses == 1
