"""Tree verification and KV compaction equal recomputation from scratch."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from test_tree import brute_paths, draft_trees
from ragspec.types import ROOT, AcceptResult, DraftTree
from ragspec.verify import KVPrefix, TreeVerifier

ATOL = 1e-4


def token_map(tree: DraftTree) -> DraftTree:
    """Spread the strategy's small alphabet over real token ids."""
    return DraftTree(tree.token_ids * 977 + 300, tree.parents, tree.scores, tree.sources)


@torch.inference_mode()
def last_logits(model, ids: list[int]) -> torch.Tensor:
    """Plain causal forward over the whole sequence, no cache: logits after its last token."""
    return model(input_ids=torch.tensor([ids], device=model.device)).logits[0, -1].float()


def path_nodes(tree: DraftTree, node: int) -> list[int]:
    nodes = []
    while node != ROOT:
        nodes.append(node)
        node = int(tree.parents[node])
    return nodes[::-1]


@given(
    first=draft_trees(max_nodes=10).map(token_map),
    second=draft_trees(max_nodes=6).map(token_map),
    data=st.data(),
)
@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_verify_and_commit_reproduce_recomputation(tiny_model, first, second, data):
    model = tiny_model.model
    prompt = data.draw(st.lists(st.integers(5, 40000), min_size=1, max_size=12), label="prompt")
    verifier = TreeVerifier(tiny_model)
    verifier.prefill(prompt)
    assert verifier.past_length == len(prompt) - 1
    committed = list(prompt)  # committed tokens, pending last
    for tree in (first, second):
        out = verifier.verify(committed[-1], tree)
        assert out.logits.shape == (1 + tree.num_nodes, model.config.vocab_size)
        # every row sees exactly its own path, as token-by-token decoding would
        torch.testing.assert_close(out.logits[0], last_logits(model, committed), atol=ATOL, rtol=0)
        for i, path in enumerate(brute_paths(tree)):
            torch.testing.assert_close(out.logits[1 + i], last_logits(model, committed + list(path)), atol=ATOL, rtol=0)
        # commit an arbitrary root-to-node path, not necessarily stored contiguously
        end = data.draw(st.integers(ROOT, tree.num_nodes - 1), label="accepted node")
        nodes = path_nodes(tree, end)
        tokens = [int(tree.token_ids[n]) for n in nodes]
        bonus = data.draw(st.integers(5, 40000), label="bonus")
        verifier.commit(AcceptResult(accepted_nodes=nodes, accepted_tokens=tokens, bonus_token=bonus))
        committed += tokens + [bonus]
        assert verifier.past_length == len(committed) - 1
        assert verifier.cache.get_seq_length() == verifier.past_length
        assert verifier.cached_ids == committed[:-1]
    final = verifier.verify(committed[-1], DraftTree.empty())
    torch.testing.assert_close(final.logits[0], last_logits(model, committed), atol=ATOL, rtol=0)


def test_discard_drops_an_unused_verify(tiny_llama):
    model = tiny_llama.model
    prompt = [11, 22, 33, 44, 55, 66]
    tree = DraftTree(
        token_ids=np.array([70, 71, 72], dtype=np.int64),
        parents=np.array([ROOT, 0, ROOT], dtype=np.int64),
        scores=np.array([0.9, 0.8, 0.5]),
        sources=("t",) * 3,
    )
    verifier = TreeVerifier(tiny_llama)
    verifier.prefill(prompt)
    first = verifier.verify(prompt[-1], tree)
    assert verifier.cache.get_seq_length() == len(prompt) + tree.num_nodes
    verifier.discard()
    assert verifier.cache.get_seq_length() == verifier.past_length == len(prompt) - 1
    again = verifier.verify(prompt[-1], tree)
    torch.testing.assert_close(again.logits, first.logits, atol=ATOL, rtol=0)
    verifier.discard()
    plain = verifier.verify(prompt[-1], DraftTree.empty())
    torch.testing.assert_close(plain.logits[0], last_logits(model, prompt), atol=ATOL, rtol=0)
    verifier.discard()  # nothing beyond the committed tokens: a no-op
    verifier.discard()
    assert verifier.cache.get_seq_length() == len(prompt) - 1


def test_single_token_prompt(tiny_llama):
    verifier = TreeVerifier(tiny_llama)
    verifier.prefill([42])
    assert verifier.past_length == 0
    out = verifier.verify(42, DraftTree.empty())
    torch.testing.assert_close(out.logits[0], last_logits(tiny_llama.model, [42]), atol=ATOL, rtol=0)


def _served(model, prompt: list[int], bonus: int) -> KVPrefix:
    """The prefix a request leaves behind: prompt prefilled, one plain step committed."""
    verifier = TreeVerifier(model)
    verifier.prefill(prompt)
    verifier.verify(prompt[-1], DraftTree.empty())
    verifier.commit(AcceptResult(accepted_nodes=[], accepted_tokens=[], bonus_token=bonus))
    return verifier.export_prefix()


@given(
    shared=st.integers(0, 6),
    tail=st.lists(st.integers(5, 40000), min_size=1, max_size=5),
)
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_prefix_cache_prefill_equals_recomputation(tiny_model, shared, tail):
    first_prompt = [11, 22, 33, 44, 55, 66]
    prefix = _served(tiny_model, first_prompt, bonus=77)
    assert prefix.token_ids == first_prompt  # the bonus token is pending, not cached
    assert prefix.cache.get_seq_length() == len(first_prompt)
    prompt = first_prompt[:shared] + [t for t in tail if t not in first_prompt]
    if len(prompt) < 2:
        prompt = first_prompt[:shared] + [99, 98]
    verifier = TreeVerifier(tiny_model, prefix)
    out, reused = verifier.prefill_and_verify(prompt)
    assert reused == min(shared, len(prompt) - 1)
    assert verifier.past_length == len(prompt) - 1
    assert verifier.cache.get_seq_length() == len(prompt)  # the pending token's row, until commit
    torch.testing.assert_close(out.logits[0], last_logits(tiny_model.model, prompt), atol=ATOL, rtol=0)
    verifier.commit(AcceptResult(accepted_nodes=[], accepted_tokens=[], bonus_token=7))
    assert verifier.export_prefix().token_ids == prompt


def test_prefix_cache_reuse_of_a_whole_prompt(tiny_llama):
    """A prompt that is a prefix of the cached tokens still feeds its last token itself."""
    prefix = _served(tiny_llama, [11, 22, 33, 44, 55, 66], bonus=77)
    verifier = TreeVerifier(tiny_llama, prefix)
    out, reused = verifier.prefill_and_verify([11, 22, 33])
    assert reused == 2
    torch.testing.assert_close(out.logits[0], last_logits(tiny_llama.model, [11, 22, 33]), atol=ATOL, rtol=0)


def _kv_entry(token_ids: list[int]):
    """A KVPrefix with a real two-layer cache whose rows hold their token ids."""
    from transformers import DynamicCache

    from ragspec.verify import KVPrefix

    cache = DynamicCache()
    rows = torch.tensor(token_ids, dtype=torch.float32).view(1, 1, -1, 1)
    for layer in range(2):
        cache.update(rows.clone(), -rows, layer)
    return KVPrefix(list(token_ids), cache)


def test_prefix_pool_hands_out_the_longest_shared_prefix_and_evicts_the_oldest():
    from ragspec.verify import PrefixPool

    pool = PrefixPool(max_entries=3, max_tokens=10)
    a, b = _kv_entry([1, 2, 3]), _kv_entry([1, 2, 9, 9])
    pool.put(a)
    pool.put(b)
    assert pool.take([7, 8]) is None and len(pool) == 2  # nothing shared: entries stay
    assert pool.take([1, 2, 9, 9, 5]) is b and len(pool) == 1  # continues all of b: b itself, taken out
    assert pool.take([1, 2, 3, 4]) is a and len(pool) == 0
    pool.put(a)
    pool.put(b)
    pool.put(_kv_entry([4, 4, 4, 4]))  # 11 tokens in all: the oldest goes
    assert len(pool) == 2 and pool.num_tokens == 8
    for n in range(5):
        pool.put(_kv_entry([n]))
    assert len(pool) == 3
    big = _kv_entry(list(range(50)))
    pool.put(big)
    assert len(pool) == 1 and pool.take(list(range(60))) is big  # one entry is kept whatever its size


def test_prefix_pool_copies_a_partly_shared_entry_and_keeps_it():
    """Two chats under one system prompt: the second gets a copy of the shared rows only."""
    from ragspec.verify import PrefixPool

    pool = PrefixPool()
    first_chat = _kv_entry([1, 2, 3, 10, 11, 12, 13])
    pool.put(first_chat)
    copy = pool.take([1, 2, 3, 20, 21])
    assert copy is not first_chat and copy.token_ids == [1, 2, 3] and len(pool) == 1
    for layer, original in zip(copy.cache.layers, first_chat.cache.layers):
        assert layer.keys.flatten().tolist() == [1.0, 2.0, 3.0]
        assert original.keys.shape[2] == 7  # untouched
    copy.cache.layers[0].keys.zero_()  # the copy owns its rows: writing it leaves the entry as it was
    copy.cache.crop(-1)
    assert first_chat.cache.get_seq_length() == 7
    assert first_chat.cache.layers[0].keys.flatten().tolist()[:3] == [1.0, 2.0, 3.0]
    # the next turn of the first chat shares most of it (its answer re-encoded differently at the
    # end): it gets the entry itself, no copy
    assert pool.take([1, 2, 3, 10, 11, 12, 99]) is first_chat and len(pool) == 0
