"""Run the target over [pending token + draft tree] and keep only the accepted path's KV.

A finished request can hand its cache on (`KVPrefix`): the next request skips the prefill of the
tokens both share at the start, e.g. every earlier turn of a chat (prefix caching).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from ragspec import kvcache
from ragspec.models import LoadedModel
from ragspec.types import AcceptResult, DraftTree, TargetHidden, VerifyOutput
from ragspec.verify.tree_attention import layer_windows, tree_attention_masks, tree_position_ids


@dataclass
class KVPrefix:
    """A finished request's KV cache and the tokens it holds, for the next request to reuse."""

    token_ids: list[int]  # [cached], the cache's rows in order
    cache: object  # transformers DynamicCache with len(token_ids) rows

    def head(self, length: int) -> "KVPrefix | None":
        """A copy of the first `length` rows (this prefix stays as it is); None for caches that
        cannot be cut (layers other than attention, e.g. a linear-attention or SSM state)."""
        if not kvcache.croppable(self.cache):
            return None
        return KVPrefix(token_ids=self.token_ids[:length], cache=kvcache.copy_prefix(self.cache, length))


class TreeVerifier:
    """Owns the target's KV cache for one request.

    Invariant between steps: the cache holds every committed token except the pending one, and
    `cached_ids` lists them.
    """

    def __init__(self, target: LoadedModel, prefix: KVPrefix | None = None):
        self.target = target
        self.windows = layer_windows(target.model.config)
        if prefix is not None and kvcache.croppable(prefix.cache):  # handed over: the caller keeps no copy
            self.cache, self.cached_ids = prefix.cache, prefix.token_ids
        else:
            self.cache, self.cached_ids = kvcache.new_cache(target.model.config), []
        self._pending_token: int | None = None  # the last verify's first row

    @property
    def past_length(self) -> int:
        """Committed tokens whose KV is in the cache."""
        return len(self.cached_ids)

    def prefill(self, token_ids: list[int]) -> None:
        """Feed every prompt token but the last, which becomes the first pending token."""
        self._prefill(token_ids, feed_last=False)

    def prefill_and_verify(self, token_ids: list[int]) -> tuple[VerifyOutput, int]:
        """`prefill(token_ids)` then `verify(token_ids[-1], empty tree)`, in one forward.
        Also returns how many leading tokens' KV came from the prefix cache."""
        start = time.perf_counter()
        logits, reused = self._prefill(token_ids, feed_last=True)
        hidden = self._take_hidden(reused) if reused < len(token_ids) else None  # None: nothing was fed
        return VerifyOutput(logits=logits, verify_s=time.perf_counter() - start, hidden=hidden), reused

    @torch.inference_mode()
    def _prefill(self, token_ids: list[int], feed_last: bool) -> tuple[torch.Tensor | None, int]:
        """Keep the cached rows the prompt starts with, feed the rest (the last token too if
        `feed_last`); return the last fed row's logits and the number of reused tokens."""
        reused = self._reuse_prefix(token_ids[:-1])
        feed = token_ids[reused:] if feed_last else token_ids[reused:-1]
        logits = None
        if feed:
            ids = torch.tensor([feed], device=self.target.device)
            out = self.target.model(input_ids=ids, cache=self.cache, use_cache=True, logits_to_keep=1)
            logits = out.logits[0].float()
        self.cached_ids = list(token_ids[:-1])
        self._pending_token = token_ids[-1]
        return logits, reused

    def _reuse_prefix(self, token_ids: list[int]) -> int:
        """Keep the cached rows `token_ids` starts with, drop the rest; return how many were kept."""
        shared = kvcache.common_prefix_length(self.cached_ids, token_ids)
        kvcache.crop(self.cache, shared)
        return shared

    def export_prefix(self) -> KVPrefix:
        """This verifier's committed tokens and their KV, handed to the next request's verifier
        (this verifier is done with them)."""
        self.discard()
        return KVPrefix(token_ids=self.cached_ids, cache=self.cache)

    @torch.inference_mode()
    def verify(self, pending_token: int, tree: DraftTree) -> VerifyOutput:
        start = time.perf_counter()
        device = self.target.device
        self._pending_token = pending_token
        ids = torch.tensor([[pending_token, *tree.token_ids.tolist()]], device=device)
        if tree.num_nodes == 0:
            mask, positions = None, None  # plain decoding: causal attention over the cache
        else:
            positions = tree_position_ids(tree.parents, self.past_length, device)
            mask = tree_attention_masks(self.windows, tree.parents, self.past_length, self.target.dtype, device, positions)
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
        return VerifyOutput(logits=logits, verify_s=time.perf_counter() - start, hidden=self._take_hidden(self.past_length))

    def _take_hidden(self, start: int) -> TargetHidden | None:
        """The hidden states of the forward just run, when the target is tapped (see verify.hidden)."""
        tap = self.target.hidden_tap
        values = tap.take() if tap is not None else None
        return None if values is None else TargetHidden(start=start, values=values[0])

    @torch.inference_mode()
    def commit(self, accept: AcceptResult) -> None:
        """Keep the pending token's KV and the accepted nodes' KV; drop the other branches."""
        base = self.past_length + 1  # cache rows: committed, pending, then tree nodes
        kvcache.keep_rows(self.cache, base, base + np.asarray(accept.accepted_nodes, dtype=np.int64))
        self.cached_ids += [self._pending_token, *accept.accepted_tokens]  # past_length = base + kept

    def discard(self) -> None:
        """Drop cache rows past the committed tokens (an unused verify, or a rejected tree)."""
        kvcache.crop(self.cache, self.past_length)


