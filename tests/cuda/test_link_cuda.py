"""CudaLink + CudaResidency on the real host->device link, against the EmulatedLink.

- Both links serve the same queued loads in the same order (priority first, then layer group
  by layer group) and leave the same bytes in the pool.
- Residency is a stream wait, not a host sync: with the link's stream held up by a GPU sleep,
  `wait(layer)` returns at once, the layer is not ready yet, and a kernel queued after the
  wait still reads the adapter, not the zero-initialised pool.
- Pages reused after an eviction are not overwritten before kernels already queued on the
  compute stream have read the evicted adapter (the reuse fence).
"""
from __future__ import annotations

import time
import uuid

import pytest
import torch

from caraserve_router.lora.adapter_pool import AdapterPool
from caraserve_router.lora.adapter_store import AdapterStore
from caraserve_router.lora.device_link import CudaLink, EmulatedLink
from caraserve_router.lora.shapes import ModelShapes
from tests.cuda.adapters import write_adapter
from tests.cuda.common import CUDA_TESTS, cuda_device

pytestmark = CUDA_TESTS

SHAPES = ModelShapes(num_layers=6, hidden=256, num_heads=4, num_kv_heads=2, head_dim=64, intermediate=512)
DTYPE = torch.float16
MAX_RANK = 32
# name -> (rank, targets)
ADAPTERS = {"a8": (8, None), "b16": (16, ["q_proj", "v_proj", "down_proj"]), "c4": (4, None),
            "d32": (32, ["k_proj", "o_proj", "gate_proj", "up_proj"])}
SLEEP_CYCLES = 200_000_000  # about 0.1 s of GPU time at H100 clocks


@pytest.fixture(scope="module")
def adapter_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("link-adapters")
    for i, (name, (rank, targets)) in enumerate(ADAPTERS.items()):
        write_adapter(root / name, SHAPES, rank, targets or ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                              "up_proj", "down_proj"], seed=i)
    return root


@pytest.fixture
def store(adapter_root):
    """Host adapters, page-locked as the runtime does on CUDA."""
    s = AdapterStore(SHAPES, DTYPE, "cl" + uuid.uuid4().hex[:10], MAX_RANK, pin=True)
    try:
        for name in ADAPTERS:
            s.add(name, str(adapter_root / name))
            s.acquire(name)  # mapped (read from the file) and page-locked, as a load holds it
        yield s
    finally:
        s.close()


def _recorded(link, order: list, name: str):
    """A residency of the link's kind that logs (adapter, layers) when a group is marked."""
    residency = link.new_residency()
    mark = residency.mark

    def logging_mark(layers, when):
        order.append((name, tuple(layers)))
        mark(layers, when)

    residency.mark = logging_mark
    return residency


def _a_index(pool, entry, group: str = "qkv", s: int = 0) -> torch.Tensor:
    """Element index [r, IN] of slice s's lora_A rows of `entry` in a layer's flat pool, on the
    pool's device. (Made before any GPU sleep: a pageable host->device copy syncs the stream.)"""
    starts = entry.a_rows[group][s]
    starts = starts[starts >= 0].long()
    width = SHAPES.group(group).in_features
    return (starts[:, None] * pool.unit + torch.arange(width)[None, :]).to(pool.device)


def _a_rows(pool, entry, host, layer: int, index=None, group: str = "qkv", s: int = 0):
    """(pool rows gathered by a kernel on the current stream, host rows) of slice s's lora_A
    rows of `entry` at `layer`: [r, IN] each."""
    index = _a_index(pool, entry, group, s) if index is None else index
    first = sum(host.layout.slice_ranks(group)[:s])
    return pool.W[layer].view(-1)[index], host.block(layer, group, "A")[first : first + index.shape[0]]


def _covered(blocks) -> set:
    """Units the rows of `blocks` occupy."""
    return {u for b in blocks for start in b.starts for u in range(start, start + b.width)}


def _load_queued(kind: str, store, priorities: dict):
    device = cuda_device() if kind == "cuda" else torch.device("cpu")
    pool = AdapterPool(SHAPES, DTYPE, device, capacity_mb=8, max_rank=MAX_RANK)
    link = CudaLink(pool, group_size=2) if kind == "cuda" else EmulatedLink(pool, 2, bandwidth_mbps=500.0,
                                                                              latency_us=50.0)
    order, entries = [], {}
    try:
        with link._cv:  # the link thread waits until every load is queued, then serves by priority
            for name in ADAPTERS:
                host = store.get(name)
                entries[name] = pool.place(host, _recorded(link, order, name))
                link.submit(entries[name], host, priorities[name])
        for entry in entries.values():
            entry.residency.wait_all()
        if kind == "cuda":
            torch.cuda.current_stream().synchronize()
        assert all(e.residency.all_ready() for e in entries.values())
        return pool, entries, order, link.bytes_moved
    finally:
        link.stop()


def test_cuda_link_matches_emulated_link(store):
    priorities = {"a8": 3.0, "b16": 1.0, "c4": 4.0, "d32": 2.0}
    cuda_pool, cuda_entries, cuda_order, cuda_bytes = _load_queued("cuda", store, priorities)
    emu_pool, emu_entries, emu_order, emu_bytes = _load_queued("emulated", store, priorities)
    groups = [(0, 1), (2, 3), (4, 5)]
    expected = [(name, g) for name in sorted(priorities, key=priorities.get) for g in groups]
    assert cuda_order == expected and emu_order == expected
    assert cuda_bytes == emu_bytes > 0
    for name in ADAPTERS:
        assert [b.starts for b in cuda_entries[name].blocks] == [b.starts for b in emu_entries[name].blocks]
    assert torch.equal(cuda_pool.W.cpu(), emu_pool.W), "the two links left different bytes in the pool"
    # and what landed is the host adapter
    for layer in (0, 5):
        got, want = _a_rows(cuda_pool, cuda_entries["a8"], store.get("a8"), layer)
        assert torch.equal(got.cpu(), want)


def test_residency_is_a_stream_wait_not_a_host_sync(store):
    pool = AdapterPool(SHAPES, DTYPE, cuda_device(), capacity_mb=8, max_rank=MAX_RANK)
    link = CudaLink(pool, group_size=1)
    try:
        host = store.get("b16")
        entry = pool.place(host, link.new_residency())
        index = _a_index(pool, entry)
        torch.cuda.synchronize()
        with torch.cuda.stream(link.stream):
            torch.cuda._sleep(SLEEP_CYCLES)  # the copies queue behind this
        start = time.perf_counter()
        link.submit(entry, host, 0.0)
        entry.residency.wait(0)  # marked once layer 0's copy is queued; then a stream wait
        waited = time.perf_counter() - start
        assert not entry.residency.is_ready(0), "the copy sits behind the sleep: not resident yet"
        seen, want = _a_rows(pool, entry, host, 0, index)  # the gather is a kernel queued after the wait
        assert torch.equal(seen.cpu(), want), "a kernel after wait() read the pool before the copy landed"
        assert waited < 0.05, f"wait() blocked the host for {waited * 1e3:.1f} ms"
        entry.residency.wait_all()
    finally:
        torch.cuda.synchronize()
        link.stop()


def test_reused_pages_wait_for_queued_readers(store):
    """Evict an adapter while a queued kernel still reads it, load another onto its pages: the
    reader sees the evicted adapter (the link's stream waits for the reuse fence)."""
    pool = AdapterPool(SHAPES, DTYPE, cuda_device(), capacity_mb=8, max_rank=MAX_RANK)
    link = CudaLink(pool, group_size=1)
    try:
        old, new = store.get("b16"), store.get("a8")
        entry = pool.place(old, link.new_residency())
        link.load_now(entry, old)
        index = _a_index(pool, entry)
        torch.cuda._sleep(SLEEP_CYCLES)  # the compute stream is busy ...
        seen, want_old = _a_rows(pool, entry, old, 3, index)  # ... then a gather reads the old adapter
        pool.remove("b16")
        reused = pool.place(new, link.new_residency())
        read = _covered([b for b in entry.blocks if b.group == "qkv" and b.which == "A" and b.slice == 0])
        assert read <= _covered(reused.blocks), "the test needs the rows being read overwritten by the new load"
        link.submit(reused, new, 0.0)
        reused.residency.wait_all()
        assert torch.equal(seen.cpu(), want_old), "the new adapter overwrote rows still being read"
        got, want_new = _a_rows(pool, reused, new, 3)
        assert torch.equal(got.cpu(), want_new)
    finally:
        torch.cuda.synchronize()
        link.stop()
