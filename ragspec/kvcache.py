"""KV-cache operations shared by the verifier and every drafter that runs a model.

Caches are transformers `DynamicCache`s whose layers keep every row ([batch, heads, rows, dim]
keys and values), so that rows can be cut off and moved. A layer a model never writes (a layer
skipped by a self-drafter) stays empty and is left alone by every operation here.
`new_cache` gives them GrowingLayers (`ragspec.growing_kv`), which append in place.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def new_cache(config=None):
    """A DynamicCache for `config` whose attention layers are GrowingLayers, sliding-window ones
    included: they keep all rows like the others (the attention masks apply the window), so that
    rejected tree rows can be cropped away. Without `config`, layers appear as they are written."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

    from ragspec.growing_kv import GrowingLayer

    if config is None:
        cache = DynamicCache()
        cache.layer_class_to_replicate = GrowingLayer
        return cache
    cache = DynamicCache(config=config)
    cache.layers = [GrowingLayer() if type(layer) in (DynamicLayer, DynamicSlidingWindowLayer) else layer
                    for layer in cache.layers]
    return cache


def croppable(cache) -> bool:
    """Attention layers that keep every row can be cut back to a shorter prefix (not, e.g., a
    linear-attention or SSM state)."""
    from transformers.cache_utils import DynamicLayer

    from ragspec.growing_kv import GrowingLayer

    return all(type(layer) in (DynamicLayer, GrowingLayer) for layer in cache.layers)


def cache_length(cache) -> int:
    """Rows held (the longest layer: a self-drafter's cache leaves skipped layers empty)."""
    return max((layer.get_seq_length() for layer in cache.layers), default=0)


def crop(cache, length: int) -> None:
    """Drop every row from `length` on."""
    for layer in cache.layers:
        surplus = layer.get_seq_length() - length
        if surplus > 0:
            layer.crop(-surplus)


def keep_rows(cache, start: int, rows: Sequence[int] | np.ndarray) -> None:
    """Keep rows [0, start) and then the given `rows` (absolute, increasing, all >= start) in
    order, moved down to start, start + 1, ...; drop everything else. E.g. after verifying a tree
    whose rows begin at `start`, keep the accepted path's rows."""
    rows = np.asarray(rows, dtype=np.int64)
    kept = len(rows)
    if kept and not np.array_equal(rows, np.arange(start, start + kept)):
        for layer in cache.layers:
            if layer.get_seq_length() == 0:
                continue
            index = torch.as_tensor(rows, device=layer.keys.device)
            layer.keys[:, :, start : start + kept] = layer.keys.index_select(2, index)
            layer.values[:, :, start : start + kept] = layer.values.index_select(2, index)
    crop(cache, start + kept)


def copy_prefix(cache, length: int):
    """A new cache holding copies of the first `length` rows of `cache` (which stays as it is)."""
    copy = new_cache()
    for index, layer in enumerate(cache.layers):
        if layer.get_seq_length():  # empty layers below `index` are created empty by `update`
            copy.update(layer.keys[:, :, :length], layer.values[:, :, :length], index)  # update copies
    return copy


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    if n == 0:
        return 0
    differs = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(differs[0]) if len(differs) else n
