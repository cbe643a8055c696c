"""Run the target over [pending token + draft tree] and keep only the accepted path's KV."""

from __future__ import annotations

import time

import numpy as np
import torch

from ragspec.models import LoadedModel
from ragspec.types import AcceptResult, DraftTree, VerifyOutput
from ragspec.verify.tree_attention import tree_attention_mask, tree_position_ids


class TreeVerifier:
    """Owns the target's KV cache for one request.

    Invariant between steps: the cache holds every committed token except the pending one.
    """

    def __init__(self, target: LoadedModel):
        from transformers import DynamicCache

        self.target = target
        self.cache = DynamicCache(config=target.model.config)
        self.past_length = 0  # committed tokens whose KV is in the cache

    @torch.inference_mode()
    def prefill(self, token_ids: list[int]) -> None:
        """Feed every prompt token but the last, which becomes the first pending token."""
        if len(token_ids) > 1:
            ids = torch.tensor([token_ids[:-1]], device=self.target.device)
            self.target.model(input_ids=ids, cache=self.cache, use_cache=True, logits_to_keep=1)
        self.past_length = len(token_ids) - 1

    @torch.inference_mode()
    def prefill_and_verify(self, token_ids: list[int]) -> VerifyOutput:
        """`prefill(token_ids)` then `verify(token_ids[-1], empty tree)`, in one forward."""
        start = time.perf_counter()
        ids = torch.tensor([token_ids], device=self.target.device)
        out = self.target.model(input_ids=ids, cache=self.cache, use_cache=True, logits_to_keep=1)
        self.past_length = len(token_ids) - 1
        return VerifyOutput(logits=out.logits[0].float(), verify_s=time.perf_counter() - start)

    @torch.inference_mode()
    def verify(self, pending_token: int, tree: DraftTree) -> VerifyOutput:
        start = time.perf_counter()
        device = self.target.device
        ids = torch.tensor([[pending_token, *tree.token_ids.tolist()]], device=device)
        if tree.num_nodes == 0:
            mask, positions = None, None  # plain decoding: causal attention over the cache
        else:
            mask = tree_attention_mask(tree.parents, self.past_length, self.target.dtype, device)
            positions = tree_position_ids(tree.parents, self.past_length, device)
        out = self.target.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            cache=self.cache,
            use_cache=True,
        )
        logits = out.logits[0].float()  # [1 + num_nodes, vocab]
        if device.type == "cuda":
            torch.cuda.synchronize()
        return VerifyOutput(logits=logits, verify_s=time.perf_counter() - start)

    @torch.inference_mode()
    def commit(self, accept: AcceptResult) -> None:
        """Keep the pending token's KV and the accepted nodes' KV; drop the other branches."""
        base = self.past_length + 1  # cache rows: committed, pending, then tree nodes
        kept = len(accept.accepted_nodes)
        source_rows = base + np.asarray(accept.accepted_nodes, dtype=np.int64)
        if kept and not np.array_equal(source_rows, np.arange(base, base + kept)):
            index = torch.as_tensor(source_rows, device=self.target.device)
            for layer in self.cache.layers:
                layer.keys[:, :, base : base + kept] = layer.keys.index_select(2, index)
                layer.values[:, :, base : base + kept] = layer.values.index_select(2, index)
        self.past_length = base + kept
        self.discard()

    def discard(self) -> None:
        """Drop cache rows past the committed tokens (an unused verify, or a rejected tree)."""
        surplus = self.cache.get_seq_length() - self.past_length
        if surplus > 0:
            self.cache.crop(-surplus)
