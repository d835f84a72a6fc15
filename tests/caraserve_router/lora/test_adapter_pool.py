"""AdapterPool: every adapter at its own size, reference counts, LRU eviction, pinning, pressure."""
from __future__ import annotations

import types

import pytest
import torch

from caraserve_router.lora.adapter_pool import AdapterPool, pool_unit
from caraserve_router.lora.residency import EmulatedResidency
from caraserve_router.lora.shapes import GROUPS, ModelShapes

SHAPES = ModelShapes(num_layers=2, hidden=8, num_heads=2, num_kv_heads=1, head_dim=4, intermediate=16)
UNIT = pool_unit(SHAPES)                      # gcd of 8, 4, 16: 4 elements
RANK_ROW_UNITS = SHAPES.floats_per_rank_per_layer() // UNIT   # one rank row on all seven projections


def slice_ranks(rank=0, **per_module):
    """{group: per-slice ranks}: every projection at `rank`, or only the modules named."""
    modules = {"qkv": ("q", "k", "v"), "o": ("o",), "gate_up": ("gate", "up"), "down": ("down",)}
    return {g: tuple(per_module.get(m, rank) for m in modules[g]) for g in GROUPS}


def host(name, rank=0, **per_module):
    ranks = slice_ranks(rank, **per_module)
    return types.SimpleNamespace(spec=types.SimpleNamespace(name=name, rank=max(max(r) for r in ranks.values()),
                                                            slice_ranks=ranks))


def tensor_bytes(ranks: dict) -> int:
    """Bytes of an adapter's PEFT tensors (fp32) over all layers."""
    total = 0
    for g in GROUPS:
        gs = SHAPES.group(g)
        total += sum(r * (gs.in_features + out) for r, out in zip(ranks[g], gs.out_features))
    return total * SHAPES.num_layers * 4


def ready():
    r = EmulatedResidency(SHAPES.num_layers)
    r.mark_all_now()
    return r


def pool(rank_rows, max_rank=8):
    """A pool with room for `rank_rows` rank rows on every projection (plus the zero row)."""
    widest = max(SHAPES.intermediate, SHAPES.hidden)
    units = rank_rows * RANK_ROW_UNITS + widest // UNIT
    return AdapterPool(SHAPES, torch.float32, torch.device("cpu"), units * UNIT * SHAPES.num_layers * 4 / 2**20,
                       max_rank)


@pytest.mark.parametrize("ranks", [dict(rank=3), dict(q=4, v=4), dict(q=7, k=2, down=3, up=5), dict(o=1)],
                         ids=["all-r3", "qv-r4", "rank-pattern", "o-r1"])
def test_footprint_is_the_adapters_own_bytes(ranks):
    p = pool(16)
    h = host("a", **ranks)
    entry = p.place(h, ready())
    assert p.entry_bytes(entry) == tensor_bytes(h.spec.slice_ranks)
    assert p.bytes_used == tensor_bytes(h.spec.slice_ranks)
    for g in GROUPS:  # descriptors: exactly the slice's rank rows, -1 past them
        a, b = entry.a_rows[g], entry.b_rows[g]
        for s, r in enumerate(h.spec.slice_ranks[g]):
            assert (a[s, :r] >= 0).all() and (a[s, r:] == -1).all() and (b[s, r:] == -1).all()


def test_rows_do_not_overlap_and_are_aligned():
    p = pool(16)
    entries = [p.place(host(n, **r), ready()) for n, r in (("a", dict(rank=3)), ("b", dict(q=4, v=2)),
                                                          ("c", dict(gate=5, down=1)))]
    seen = set()
    for e in entries:
        for block in e.blocks:
            for start in block.starts:
                assert start % block.width == 0, "rows start at a multiple of their width"
                units = set(range(start, start + block.width))
                assert not units & seen and min(units) >= p.zero_units
                seen |= units
    assert len(seen) * UNIT * SHAPES.num_layers * 4 == p.bytes_used


def test_more_small_adapters_fit_than_full_ones():
    """Memory is the adapters' bytes: a pool for 8 rank rows on every projection holds 8 rank-1
    full adapters, and many more q,v-only ones."""
    p = pool(8)
    for i in range(9):
        assert p.place(host(f"f{i}", rank=1), ready()) is not None
    assert len(p.entries) == 8 and p.evictions == 1 and "f0" not in p
    q = pool(8)  # 8 x 32 units; a rank-1 q,v adapter takes 7 (q: 2 + 2, v: 2 + 1): 36 fit
    count = 0
    while q.evictions == 0:
        assert q.place(host(f"qv{count}", q=1, v=1), ready()) is not None
        count += 1
    assert count - 1 >= 35, f"only {count - 1} q,v-only adapters fit"


def test_lru_eviction_spares_used_and_pinned():
    p = pool(15)
    for name in "abc":
        p.place(host(name, rank=5), ready())
    p.acquire("a")          # in use
    p.set_pinned("b", True)  # pinned
    d = p.place(host("d", rank=5), ready())  # evicts c, the only idle one
    assert d is not None and "c" not in p and {"a", "b", "d"} <= set(p.entries)
    p.acquire("d")
    assert p.place(host("e", rank=5), ready()) is None  # nothing left to evict: wait, not drop
    p.release("a")
    assert p.place(host("e", rank=5), ready()) is not None and "a" not in p and {"b", "d"} <= set(p.entries)


def test_lru_order():
    p = pool(12)
    for name in "abc":
        p.place(host(name, rank=4), ready())
    p.touch("a")  # b is now the least recently used
    p.place(host("d", rank=4), ready())
    assert "b" not in p and {"a", "c", "d"} <= set(p.entries)


def test_fragmented_pool_still_places():
    p = pool(8)
    entries = {name: p.place(host(name, rank=2), ready()) for name in "abcd"}
    p.remove("a")
    p.remove("c")
    e = p.place(host("e", rank=4), ready())
    assert e is not None and p.evictions == 0

    def units(entry):
        return {u for b in entry.blocks for s in b.starts for u in range(s, s + b.width)}
    assert units(e) == units(entries["a"]) | units(entries["c"]), "e fills the two holes exactly"


def test_loading_adapter_is_not_evicted():
    p = pool(8)
    loading = EmulatedResidency(SHAPES.num_layers)  # never marked: still loading
    p.place(host("a", rank=8), loading)
    assert p.place(host("b", rank=2), ready()) is None


def test_pool_too_small_is_a_clear_error():
    with pytest.raises(ValueError, match="raise the pool size"):
        pool(3, max_rank=8)


def test_adapters_admitted_for_the_forming_batch_are_not_evicted():
    """Placing b must not evict a, admitted a moment earlier for the same batch (its request
    has not attached yet): b waits instead."""
    p = pool(12)
    p.place(host("a", rank=8), ready())
    p.protected.add("a")
    assert p.place(host("b", rank=8), ready()) is None and "a" in p
    p.protected.clear()  # next admission round
    assert p.place(host("b", rank=8), ready()) is not None and "a" not in p


def test_churn_under_pressure_never_overlaps_or_leaks():
    """Thousands of placements of mixed shapes in a small pool: every live adapter's rows are
    disjoint, and after removing everything the pool is empty again."""
    gen = torch.Generator().manual_seed(0)
    p = pool(10)
    modules = ("q", "k", "v", "o", "gate", "up", "down")
    for i in range(2000):
        picks = torch.randint(0, 2, (7,), generator=gen).tolist()
        ranks = {m: int(torch.randint(1, 5, (1,), generator=gen)) for m, keep in zip(modules, picks) if keep}
        if not ranks:
            continue
        e = p.place(host(f"x{i}", **ranks), ready())
        assert e is not None, "idle adapters can always be evicted"
        if i % 3 == 0:
            p.acquire(e.name)  # some in use for a while
        if i % 3 == 2:
            for name in [n for n, en in p.entries.items() if en.refs]:
                p.release(name)
    owned = [u for e in p.entries.values() for b in e.blocks for s in b.starts for u in range(s, s + b.width)]
    assert len(owned) == len(set(owned)) == p.units_used - p.zero_units
    for name in list(p.entries):
        p.remove(name)
    assert p.units_used == p.zero_units and p.bytes_used == 0
