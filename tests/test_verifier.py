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
