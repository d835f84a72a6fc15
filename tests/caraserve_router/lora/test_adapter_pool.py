"""AdapterPool: rank-row pages, reference counts, LRU eviction, pinning, slot layout."""
from __future__ import annotations

import types

import pytest
import torch

from caraserve_router.lora.adapter_pool import AdapterPool
from caraserve_router.lora.residency import EmulatedResidency
from caraserve_router.lora.shapes import ModelShapes

SHAPES = ModelShapes(num_layers=2, hidden=8, num_heads=2, num_kv_heads=1, head_dim=4, intermediate=16)


def host(name, rank):
    return types.SimpleNamespace(spec=types.SimpleNamespace(name=name, rank=rank))


def ready():
    r = EmulatedResidency(SHAPES.num_layers)
    r.mark_all_now()
    return r


def pool(pages, layout="paged", max_rank=8):
    mb = pages * SHAPES.floats_per_rank_per_layer() * SHAPES.num_layers * 4 / 2**20
    return AdapterPool(SHAPES, torch.float32, torch.device("cpu"), mb, max_rank, layout)


def test_memory_is_the_sum_of_ranks():
    p = pool(16)
    assert p.num_pages == 16
    a = p.place(host("a", 3), ready())
    b = p.place(host("b", 5), ready())
    assert p.pages_used == 8 and a.contiguous and b.contiguous
    assert set(a.pages_list).isdisjoint(b.pages_list)


def test_lru_eviction_spares_used_and_pinned():
    p = pool(16)
    for name in "abc":
        p.place(host(name, 5), ready())
    p.acquire("a")          # in use
    p.set_pinned("b", True)  # pinned
    d = p.place(host("d", 5), ready())  # needs 5 of 1 free: evicts c, the only idle one
    assert d is not None and "c" not in p and {"a", "b", "d"} <= set(p.entries)
    p.acquire("d")
    assert p.place(host("e", 5), ready()) is None  # nothing left to evict: wait, not drop
    p.release("a")
    assert p.place(host("e", 5), ready()) is not None and "a" not in p and {"b", "d"} <= set(p.entries)


def test_lru_order():
    p = pool(12)
    for name in "abc":
        p.place(host(name, 4), ready())
    p.touch("a")  # b is now the least recently used
    p.place(host("d", 4), ready())
    assert "b" not in p and {"a", "c", "d"} <= set(p.entries)


def test_fragmented_pages_still_place():
    p = pool(8)
    for name in "abcd":
        p.place(host(name, 2), ready())
    p.remove("a")
    p.remove("c")
    e = p.place(host("e", 4), ready())
    assert e is not None and not e.contiguous and sorted(e.pages_list) == [0, 1, 4, 5]


def test_loading_adapter_is_not_evicted():
    p = pool(8)
    loading = EmulatedResidency(SHAPES.num_layers)  # never marked: still loading
    p.place(host("a", 8), loading)
    assert p.place(host("b", 2), ready()) is None


def test_slot_layout_is_punica_aligned():
    p = pool(16, layout="slot", max_rank=4)
    a = p.place(host("a", 2), ready())
    b = p.place(host("b", 3), ready())
    assert (a.slot, b.slot) == (0, 1) and b.pages_list == [4, 5, 6]
    assert p.slot_rows_to_clear(b) == slice(7, 8)
    assert p.pages_used == 8  # slots cost max_rank pages whatever the rank


def test_pool_too_small_is_a_clear_error():
    with pytest.raises(ValueError, match="raise the pool size"):
        pool(3, max_rank=8)


def test_adapters_admitted_for_the_forming_batch_are_not_evicted():
    """Placing b must not evict a, admitted a moment earlier for the same batch (its request
    has not attached yet): b waits instead."""
    p = pool(12)
    p.place(host("a", 8), ready())
    p.protected.add("a")
    assert p.place(host("b", 8), ready()) is None and "a" in p
    p.protected.clear()  # next admission round
    assert p.place(host("b", 8), ready()) is not None and "a" not in p
