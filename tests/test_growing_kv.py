"""GrowingLayer appends in place and holds exactly what transformers' DynamicLayer holds, through
updates, crops, moved rows (`kvcache.keep_rows`), copies and keys replaced from outside."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from ragspec import growing_kv, kvcache
from ragspec.growing_kv import GrowingLayer

OPERATIONS = st.lists(st.one_of(
    st.tuples(st.just("update"), st.integers(1, 9)),
    st.tuples(st.just("crop"), st.integers(0, 6)),
    st.tuples(st.just("keep"), st.integers(0, 8)),
    st.tuples(st.just("replace"), st.just(0)),
), min_size=1, max_size=25)


def pair_of_caches() -> tuple[DynamicCache, DynamicCache]:
    reference = DynamicCache()
    reference.layers = [DynamicLayer(), DynamicLayer()]
    growing = kvcache.new_cache()
    return reference, growing


def rows(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(1, 2, n, 4, generator=generator), torch.randn(1, 2, n, 3, generator=generator)


@given(operations=OPERATIONS, data=st.data())
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_growing_layers_hold_what_dynamic_layers_hold(monkeypatch, operations, data):
    monkeypatch.setattr(growing_kv, "SPARE_ROWS", 3)  # grow often
    reference, growing = pair_of_caches()
    generator = torch.Generator().manual_seed(0)
    for kind, amount in operations:
        length = kvcache.cache_length(reference)
        if kind == "update":
            for index in range(2):
                keys, values = rows(amount, generator)
                expected = reference.update(keys, values, index)
                got = growing.update(keys, values, index)
                for want, have in zip(expected, got):
                    torch.testing.assert_close(have, want, rtol=0, atol=0)
        elif kind == "crop":
            kvcache.crop(reference, max(length - amount, 0))
            kvcache.crop(growing, max(length - amount, 0))
        elif kind == "keep" and length:
            start = data.draw(st.integers(0, length - 1), label="start")
            kept = sorted(data.draw(st.sets(st.integers(start, length - 1), max_size=amount), label="rows"))
            kvcache.keep_rows(reference, start, np.asarray(kept))
            kvcache.keep_rows(growing, start, np.asarray(kept))
        elif kind == "replace" and length:  # as the latency profile does: keys set from outside
            for layer in growing.layers:
                layer.keys, layer.values = layer.keys.clone(), layer.values.clone()
        assert kvcache.cache_length(growing) == kvcache.cache_length(reference)
        for want, have in zip(reference.layers, growing.layers):
            if want.get_seq_length():
                torch.testing.assert_close(have.keys, want.keys, rtol=0, atol=0)
                torch.testing.assert_close(have.values, want.values, rtol=0, atol=0)
    copy = kvcache.copy_prefix(growing, kvcache.cache_length(growing) // 2)
    assert all(type(layer) is GrowingLayer for layer in copy.layers)
    assert kvcache.croppable(growing) and kvcache.croppable(copy)


def test_a_decode_step_writes_in_place_until_the_room_is_used_up():
    cache = kvcache.new_cache()
    generator = torch.Generator().manual_seed(0)
    cache.update(*rows(10, generator), 0)
    layer = cache.layers[0]
    store = layer.stores[0]
    assert store.shape[-2] == 10 + growing_kv.SPARE_ROWS
    for _ in range(growing_kv.SPARE_ROWS):
        cache.update(*rows(1, generator), 0)
    assert layer.stores[0] is store and layer.keys.data_ptr() == store.data_ptr()  # no copy so far
    cache.update(*rows(1, generator), 0)
    assert layer.stores[0] is not store and layer.get_seq_length() == 11 + growing_kv.SPARE_ROWS


def test_the_verifier_caches_grow_in_place(tiny_llama):
    verifier = tiny_llama.new_verifier(None)
    verifier.prefill(list(range(5, 40)))
    assert all(type(layer) is GrowingLayer for layer in verifier.cache.layers)
