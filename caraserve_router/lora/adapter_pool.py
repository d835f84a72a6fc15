"""AdapterPool: device memory for adapter weights in rank-row pages (S-LoRA's unified paging).

A *page* is one rank row of an adapter for every layer and group (docs/DESIGN.md):
`A[group]: [L, P, S, IN]`, `B[group]: [L, P, OUT_TOTAL]`. An adapter of rank r owns r pages,
the same ids in every layer, so memory is the sum of ranks (paged layout, mbgmv) — or, in the
slot layout that Punica's bgmv reads, `max_rank` aligned pages per adapter.

The pool keeps reference counts (requests using an adapter), user pins, and LRU order of idle
adapters; `place` evicts idle ones as needed and returns None when even that cannot make room
(the request then waits in the queue; it is never dropped).
"""
from __future__ import annotations

import bisect
import itertools
from dataclasses import dataclass, field
from typing import Optional

import torch

from caraserve_router.lora.adapter_store import AdapterError, HostAdapter
from caraserve_router.lora.shapes import GROUPS, ModelShapes

LAYOUTS = ("paged", "slot")


@dataclass
class PoolEntry:
    name: str
    rank: int
    pages: torch.Tensor  # int32 [rank] page ids, on the pool's device
    pages_list: list
    residency: object  # EmulatedResidency | CudaResidency, set by the link
    refs: int = 0
    pinned: bool = False
    last_used: int = 0
    slot: int = -1  # slot layout only
    loads: int = field(default=1)

    @property
    def contiguous(self) -> bool:
        return self.pages_list == list(range(self.pages_list[0], self.pages_list[0] + self.rank))


class AdapterPool:
    def __init__(self, shapes: ModelShapes, dtype: torch.dtype, device: torch.device, capacity_mb: float,
                 max_rank: int, layout: str = "paged"):
        if layout not in LAYOUTS:
            raise ValueError(f"pool layout must be one of {LAYOUTS}")
        self.shapes, self.dtype, self.device = shapes, dtype, device
        self.max_rank, self.layout = max_rank, layout
        elem = torch.tensor([], dtype=dtype).element_size()
        self.page_bytes = shapes.floats_per_rank_per_layer() * shapes.num_layers * elem
        pages = int(capacity_mb * 2**20 // self.page_bytes)
        if layout == "slot":
            pages -= pages % max_rank
        if pages < max_rank:
            raise ValueError(
                f"adapter pool of {capacity_mb} MiB holds {pages} rank rows; one adapter of rank {max_rank} "
                f"needs {max_rank} ({max_rank * self.page_bytes / 2**20:.1f} MiB): raise the pool size"
            )
        self.num_pages = pages
        L = shapes.num_layers
        self.A = {}
        self.B = {}
        for g in GROUPS:
            gs = shapes.group(g)
            # Zero-initialised: in the slot layout rows past an adapter's rank must read as zero.
            self.A[g] = torch.zeros((L, pages, gs.num_slices, gs.in_features), dtype=dtype, device=device)
            self.B[g] = torch.zeros((L, pages, gs.out_total), dtype=dtype, device=device)
        self.entries: dict[str, PoolEntry] = {}
        self._free: list[int] = list(range(pages))  # sorted
        self._free_slots: list[int] = list(range(pages // max_rank)) if layout == "slot" else []
        self._clock = itertools.count(1)
        # Adapters admitted for the batch being formed: not evictable until its requests attach.
        self.protected: set = set()

    # ---- queries ------------------------------------------------------------------------

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def get(self, name: str) -> Optional[PoolEntry]:
        return self.entries.get(name)

    @property
    def pages_used(self) -> int:
        return self.num_pages - len(self._free)

    def layer_view(self, group: str, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(A [P, S, IN], B [P, OUT_TOTAL]) of one layer."""
        return self.A[group][layer], self.B[group][layer]

    # ---- placement ----------------------------------------------------------------------

    def place(self, host: HostAdapter, residency) -> Optional[PoolEntry]:
        """Reserve pages for `host`, evicting idle adapters (LRU) if needed; None if impossible."""
        name, rank = host.spec.name, host.spec.rank
        if name in self.entries:
            raise AdapterError(f"adapter {name!r} is already in the pool", 409)
        if rank > self.max_rank:
            raise AdapterError(f"adapter {name!r} has rank {rank} > pool max rank {self.max_rank}")
        pages, slot = self._allocate(rank)
        while pages is None and self._evict_one():
            pages, slot = self._allocate(rank)
        if pages is None:
            return None
        entry = PoolEntry(
            name=name, rank=rank, pages=torch.tensor(pages, dtype=torch.int32, device=self.device),
            pages_list=pages, residency=residency, last_used=next(self._clock), slot=slot,
        )
        self.entries[name] = entry
        return entry

    def _allocate(self, rank: int):
        if self.layout == "slot":
            if not self._free_slots:
                return None, -1
            slot = self._free_slots.pop(0)
            start = slot * self.max_rank
            for p in range(start, start + self.max_rank):
                self._free.remove(p)
            return list(range(start, start + rank)), slot
        if len(self._free) < rank:
            return None, -1
        run = self._find_run(rank)
        pages = list(range(run, run + rank)) if run is not None else self._free[:rank]
        for p in pages:
            del self._free[bisect.bisect_left(self._free, p)]
        return pages, -1

    def _find_run(self, rank: int) -> Optional[int]:
        """Start of the first run of `rank` consecutive free pages (best for CPU views)."""
        free = self._free
        start = 0
        for i in range(1, len(free) + 1):
            if i == len(free) or free[i] != free[i - 1] + 1:
                if i - start >= rank:
                    return free[start]
                start = i
        return None

    def _evict_one(self) -> bool:
        idle = [e for e in self.entries.values()
                if e.refs == 0 and not e.pinned and e.name not in self.protected and e.residency.all_ready()]
        if not idle:
            return False
        self.remove(min(idle, key=lambda e: e.last_used).name)
        return True

    def remove(self, name: str) -> None:
        entry = self.entries.pop(name)
        if self.layout == "slot":
            start = entry.slot * self.max_rank
            freed = range(start, start + self.max_rank)
            bisect.insort(self._free_slots, entry.slot)
        else:
            freed = entry.pages_list
        for p in freed:
            bisect.insort(self._free, p)

    # ---- use ----------------------------------------------------------------------------

    def acquire(self, name: str) -> PoolEntry:
        entry = self.entries[name]
        entry.refs += 1
        entry.last_used = next(self._clock)
        return entry

    def release(self, name: str) -> None:
        entry = self.entries.get(name)
        if entry is not None:
            entry.refs -= 1
            entry.last_used = next(self._clock)

    def touch(self, name: str) -> None:
        self.entries[name].last_used = next(self._clock)

    def set_pinned(self, name: str, pinned: bool) -> None:
        self.entries[name].pinned = pinned

    def slot_rows_to_clear(self, entry: PoolEntry) -> Optional[slice]:
        """Slot layout: the page rows past the adapter's rank, which must read as zero."""
        if self.layout != "slot" or entry.rank == self.max_rank:
            return None
        start = entry.slot * self.max_rank
        return slice(start + entry.rank, start + self.max_rank)
