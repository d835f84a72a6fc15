"""AdapterPool: device memory for adapter weights, every adapter at its own size.

The pool of one layer is one buffer `W[layer]: [U, UNIT]` of units of UNIT elements (UNIT: the
gcd of every row width of the model's projections). An adapter owns, for every slice it targets,
r_s lora_A rows (IN elements each) and r_s lora_B^T rows (OUT_s elements), at the same units in
every layer (docs/DESIGN.md, "Adapter pool layout"): its footprint is its tensors' bytes. Each
row starts at a multiple of its own width (so the CPU kernels read the pool in place as
[*, width] rows); an adapter's rows of one slice are one run when the pool can (one copy each).
Units 0.. hold a zero row as wide as the widest row: Punica's padded bgmv rows read it.

The pool keeps reference counts (requests using an adapter), user pins, and LRU order of idle
adapters; `place` evicts idle ones as needed and returns None when even that cannot make room
(the request then waits in the queue; it is never dropped).
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from caraserve_router.lora.adapter_store import AdapterError, HostAdapter
from caraserve_router.lora.shapes import GROUPS, ModelShapes


def pool_unit(shapes: ModelShapes) -> int:
    """Elements per unit: the gcd of every lora_A and lora_B^T row width."""
    widths = []
    for g in GROUPS:
        gs = shapes.group(g)
        widths += [gs.in_features, *gs.out_features]
    return math.gcd(*widths)


@dataclass
class Block:
    """r rows of one width (in units) of one (group, slice, A|B); runs of consecutive rows."""
    group: str
    slice: int
    which: str                    # "A" or "B"
    width: int                    # units per row
    starts: list                  # first unit of each row, len r
    runs: list                    # [(first unit, rows)] covering `starts` in order


@dataclass
class PoolEntry:
    name: str
    rank: int
    slice_ranks: dict             # group -> per-slice ranks
    blocks: list                  # [Block]
    units: int                    # units owned (in every layer)
    residency: object             # EmulatedResidency | CudaResidency, set by the link
    a_rows: dict = field(default_factory=dict)  # group -> int32 [S, R_g] first units (-1 past rank), CPU
    b_rows: dict = field(default_factory=dict)
    refs: int = 0
    pinned: bool = False
    last_used: int = 0
    loads: int = 1
    unit_index: Optional[torch.Tensor] = None  # host unit -> pool unit (device_link.unit_index)


class UnitAllocator:
    """Free units of the pool (a bitmap); rows aligned to their own width."""

    def __init__(self, units: int, reserved: int):
        self.free = np.ones(units, dtype=bool)
        self.free[:reserved] = False

    @property
    def free_units(self) -> int:
        return int(self.free.sum())

    def allocate(self, rows: int, width: int) -> Optional[list]:
        """[(first unit, rows)] runs for `rows` rows of `width` units: one run if any fits, else
        rows wherever aligned cells are free; None (nothing taken) when they do not fit."""
        cells = self.free[: len(self.free) // width * width].reshape(-1, width).all(1)   # [cells]
        if cells.sum() < rows:
            return None
        sums = np.concatenate([[0], np.cumsum(cells)])
        fits = np.flatnonzero(sums[rows:] - sums[:-rows] == rows)
        if len(fits):
            first = int(fits[0])
            self.free[first * width : (first + rows) * width] = False
            return [(first * width, rows)]
        runs = []
        for cell in np.flatnonzero(cells)[:rows].tolist():
            if runs and runs[-1][0] + runs[-1][1] * width == cell * width:
                runs[-1] = (runs[-1][0], runs[-1][1] + 1)
            else:
                runs.append((cell * width, 1))
            self.free[cell * width : (cell + 1) * width] = False
        return runs

    def release(self, runs: list, width: int) -> None:
        for first, rows in runs:
            self.free[first : first + rows * width] = True


class AdapterPool:
    def __init__(self, shapes: ModelShapes, dtype: torch.dtype, device: torch.device, capacity_mb: float,
                 max_rank: int):
        self.shapes, self.dtype, self.device = shapes, dtype, device
        self.max_rank = max_rank
        self.unit = pool_unit(shapes)
        elem = dtype.itemsize
        self.unit_bytes = self.unit * shapes.num_layers * elem  # one unit in every layer
        widest = max(max(shapes.group(g).in_features, *shapes.group(g).out_features) for g in GROUPS)
        self.zero_units = widest // self.unit
        units = int(capacity_mb * 2**20 // self.unit_bytes)
        need = self.zero_units + shapes.floats_per_rank_per_layer() // self.unit * max_rank
        if units < need:
            raise ValueError(
                f"adapter pool of {capacity_mb} MiB holds {units} units of {self.unit_bytes} bytes; one adapter "
                f"of rank {max_rank} on every projection needs {need - self.zero_units} "
                f"({need * self.unit_bytes / 2**20:.1f} MiB with the zero row): raise the pool size")
        self.num_units = units
        # Zero-initialised: units 0..zero_units-1 are the zero row padded bgmv rows read.
        self.W = torch.zeros((shapes.num_layers, units, self.unit), dtype=dtype, device=device)
        self.entries: dict[str, PoolEntry] = {}
        self._alloc = UnitAllocator(units, self.zero_units)
        self._clock = itertools.count(1)
        # Adapters admitted for the batch being formed: not evictable until its requests attach.
        self.protected: set = set()
        self.evictions = 0

    # ---- queries ------------------------------------------------------------------------

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def get(self, name: str) -> Optional[PoolEntry]:
        return self.entries.get(name)

    @property
    def units_used(self) -> int:
        return self.num_units - self._alloc.free_units

    @property
    def bytes_total(self) -> int:
        return self.num_units * self.unit_bytes

    @property
    def bytes_used(self) -> int:
        return (self.units_used - self.zero_units) * self.unit_bytes

    def layer_pool(self, layer: int) -> torch.Tensor:
        """W [U, UNIT] of one layer: what the kernels read."""
        return self.W[layer]

    def entry_bytes(self, entry: PoolEntry) -> int:
        return entry.units * self.unit_bytes

    # ---- placement ----------------------------------------------------------------------

    def place(self, host: HostAdapter, residency) -> Optional[PoolEntry]:
        """Reserve rows for `host`, evicting idle adapters (LRU) if needed; None if impossible."""
        spec = host.spec
        if spec.name in self.entries:
            raise AdapterError(f"adapter {spec.name!r} is already in the pool", 409)
        if spec.rank > self.max_rank:
            raise AdapterError(f"adapter {spec.name!r} has rank {spec.rank} > pool max rank {self.max_rank}")
        blocks = self._allocate(spec.slice_ranks)
        while blocks is None and self._evict_one():
            blocks = self._allocate(spec.slice_ranks)
        if blocks is None:
            return None
        entry = PoolEntry(name=spec.name, rank=spec.rank, slice_ranks=dict(spec.slice_ranks), blocks=blocks,
                          units=sum(len(b.starts) * b.width for b in blocks), residency=residency,
                          last_used=next(self._clock))
        for g in GROUPS:
            ranks = spec.slice_ranks[g]
            width = max(ranks) if ranks else 0
            entry.a_rows[g] = torch.full((len(ranks), width), -1, dtype=torch.int32)   # [S, R_g]
            entry.b_rows[g] = torch.full((len(ranks), width), -1, dtype=torch.int32)
        for b in blocks:
            (entry.a_rows if b.which == "A" else entry.b_rows)[b.group][b.slice, : len(b.starts)] = \
                torch.tensor(b.starts, dtype=torch.int32)
        self.entries[spec.name] = entry
        return entry

    def _allocate(self, slice_ranks: dict) -> Optional[list]:
        """Blocks of every targeted slice (A and B rows), or None with nothing taken."""
        wanted = []
        for g in GROUPS:
            gs = self.shapes.group(g)
            for s, r in enumerate(slice_ranks[g]):
                if r > 0:
                    wanted += [(g, s, "A", r, gs.in_features // self.unit), (g, s, "B", r, gs.out_features[s] // self.unit)]
        # widest rows first: aligned first-fit then leaves no gaps in front of narrower rows
        wanted.sort(key=lambda w: -w[4])
        blocks = []
        for g, s, which, r, width in wanted:
            runs = self._alloc.allocate(r, width)
            if runs is None:
                for b in blocks:
                    self._alloc.release(b.runs, b.width)
                return None
            starts = [first + k * width for first, rows in runs for k in range(rows)]
            blocks.append(Block(g, s, which, width, starts, runs))
        return blocks

    def _evict_one(self) -> bool:
        idle = [e for e in self.entries.values()
                if e.refs == 0 and not e.pinned and e.name not in self.protected and e.residency.all_ready()]
        if not idle:
            return False
        self.remove(min(idle, key=lambda e: e.last_used).name)
        self.evictions += 1
        return True

    def remove(self, name: str) -> None:
        entry = self.entries.pop(name)
        for b in entry.blocks:
            self._alloc.release(b.runs, b.width)

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
