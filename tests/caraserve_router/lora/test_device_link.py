"""copy_layers: a layer group of an adapter's host segment lands in exactly its pool units.

The reference is the layout itself: every (layer, group, slice) row of the host segment
(HostLayout.block) against the pool row the entry's block says it occupies (Block.starts),
in a fragmented pool, for a rank-pattern adapter, with every unit the entry does not own
poisoned (NaN) and checked unchanged.
"""
from __future__ import annotations

import math
import time
import types

import pytest
import torch

from caraserve_router.lora.adapter_pool import AdapterPool, pool_unit
from caraserve_router.lora.adapter_store import HostLayout
from caraserve_router.lora.device_link import copy_layers
from caraserve_router.lora.residency import EmulatedResidency
from caraserve_router.lora.shapes import ModelShapes

from .test_adapter_pool import host

SHAPES = ModelShapes(num_layers=3, hidden=8, num_heads=2, num_kv_heads=1, head_dim=4, intermediate=16)
UNIT = pool_unit(SHAPES)


def ready():
    r = EmulatedResidency(SHAPES.num_layers)
    r.mark_all_now()
    return r


def with_bytes(h, seed: int):
    """`h` (test_adapter_pool.host) with a real layout and a random host segment."""
    h.layout = HostLayout(SHAPES, h.spec.slice_ranks)
    h.dtype = torch.float32
    h.flat = torch.randn(h.layout.total_floats(), generator=torch.Generator().manual_seed(seed))
    h.nbytes = h.flat.numel() * h.flat.element_size()  # HostAdapter.nbytes
    return h


def fragmented_pool():
    """A pool poisoned with NaN whose free units come in runs of four between runs of four taken
    ones, so a new adapter's blocks are split over many runs."""
    units = 40 * SHAPES.floats_per_rank_per_layer() // UNIT + SHAPES.intermediate // UNIT
    p = AdapterPool(SHAPES, torch.float32, torch.device("cpu"), units * UNIT * SHAPES.num_layers * 4 / 2**20, 8)
    p.W.fill_(math.nan)
    free = p._alloc.free
    free[p.zero_units:] &= (torch.arange(len(free) - p.zero_units) // 4 % 2 == 0).numpy()
    return p


@pytest.mark.parametrize("groups", [[range(0, 3)], [range(0, 1), range(1, 2), range(2, 3)], [range(0, 2), range(2, 3)]],
                         ids=["all-layers", "layer-by-layer", "two-groups"])
def test_copy_layers_puts_every_row_at_its_units(groups):
    p = fragmented_pool()
    h = with_bytes(host("e", q=3, v=2, up=4, down=1), seed=1)
    entry = p.place(h, ready())
    assert any(len(b.runs) > 1 for b in entry.blocks), "the test wants a block split over holes"
    before = p.W.clone()
    moved = sum(copy_layers(p, entry, h, layers) for layers in groups)
    assert moved == h.layout.total_floats() * 4
    owned = torch.zeros(p.W.shape[1], dtype=torch.bool)
    for layer in range(SHAPES.num_layers):
        for block in entry.blocks:
            which = "A" if block.which == "A" else block.slice
            offset, (_, row_len) = h.layout.block(layer, block.group, which)
            first = sum(h.layout.slice_ranks(block.group)[: block.slice]) if block.which == "A" else 0
            for j, start in enumerate(block.starts):
                row = h.flat[offset + (first + j) * row_len : offset + (first + j + 1) * row_len]
                assert torch.equal(p.W[layer, start : start + block.width].reshape(-1)[:row_len], row), \
                    (layer, block.group, block.which, block.slice, j)
                owned[start : start + block.width] = True
    assert torch.equal(p.W[:, ~owned].isnan(), before[:, ~owned].isnan()), "units of no row were written"
    assert p.W[:, ~owned].isnan().all()


def test_a_second_adapter_reuses_nothing_of_the_first_index():
    p = fragmented_pool()
    one = with_bytes(host("e", q=3, v=2), seed=2)
    two = with_bytes(host("f", rank=1), seed=3)
    e1, e2 = p.place(one, ready()), p.place(two, ready())
    copy_layers(p, e1, one, range(0, 3))
    copy_layers(p, e2, two, range(0, 3))
    assert e1.unit_index is not e2.unit_index and len(e1.unit_index) != len(e2.unit_index)
    assert not set(e1.unit_index.tolist()) & set(e2.unit_index.tolist())


def test_ms_ahead_is_the_link_time_of_the_loads_queued_before():
    """The link serves one load at a time in priority order: a load queued behind another waits
    for every group of it (reference: the host bytes of the load ahead over the emulated rate)."""
    from caraserve_router.lora.device_link import EmulatedLink

    p = fragmented_pool()
    first, second = with_bytes(host("a", q=3, v=2), seed=3), with_bytes(host("b", q=2), seed=4)
    entries = [p.place(h, EmulatedResidency(SHAPES.num_layers)) for h in (first, second)]
    bandwidth = first.nbytes / 0.4 / 1e6  # MB/s: the first load takes 0.4 s
    link = EmulatedLink(p, 1, bandwidth, 0.0)
    try:
        bytes_per_ms = bandwidth * 1e3
        assert link.ms_ahead(entries[1], bytes_per_ms) == 0.0  # nothing queued
        link.submit(entries[1], second, priority=2.0)
        link.submit(entries[0], first, priority=1.0)  # overtakes the second
        t0 = time.monotonic()
        ahead = link.ms_ahead(entries[1], bytes_per_ms)
        elapsed = (time.monotonic() - t0 + 0.05) * 1e3
        # the first load's 400 ms less whatever of it already went (its first group may be under way)
        assert 400.0 - elapsed - 400.0 / SHAPES.num_layers <= ahead <= 400.0 + 1.0, ahead
        assert link.ms_ahead(entries[0], bytes_per_ms) == 0.0  # first in line
        entries[1].residency._done.wait(5)
        assert link.ms_ahead(entries[1], bytes_per_ms) == 0.0  # done: nothing ahead
        # it started after the first load: its last layer landed ~0.4 s + its own time after t0
        assert max(entries[1].residency.ready_at) - t0 >= 0.4 - 0.05
    finally:
        link.stop()
