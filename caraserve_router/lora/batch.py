"""LoraBatch: the LoRA side of one forward step (built once per step, used by every layer).

Rows are the step's requests, in batch order (prefill: one segment of tokens per request;
decode: one token per request). The kernel descriptors of docs/DESIGN.md (page table, per-slice
ranks, segment starts; padded to the max rank for Punica bgmv) are built here once; `add_delta` is what the layer
calls for each projection group.
"""
from __future__ import annotations

from typing import Optional

import torch

import kernels

from caraserve_router.lora.descriptors import group_rows, mask_rows
from caraserve_router.lora.shapes import GROUPS


class LoraBatch:
    def __init__(self, runtime, entries: list, is_prefill: bool, seg_lens: Optional[list]):
        self.runtime = runtime
        self.pool = runtime.pool
        self.entries = entries  # PoolEntry or None per row
        self.is_prefill = is_prefill
        self.device = self.pool.device
        self.names = [e.name if e is not None else None for e in entries]
        self._build_descriptors(seg_lens)
        self._loading = [e for e in {e.name: e for e in entries if e is not None}.values()
                         if not e.residency.all_ready()]
        self._pending_by_layer: dict[int, list] = {}
        self._skip_cache: dict[tuple, tuple] = {}
        self.tickets: dict[tuple, object] = {}  # (layer, group) -> work the mode started in begin()
        self.armed = False

    # ---- descriptors ---------------------------------------------------------------------

    def _build_descriptors(self, seg_lens) -> None:
        n = len(self.entries)
        self.a_rows, self.b_rows, self.ranks, self.any_rank = {}, {}, {}, {}
        for g in GROUPS:
            # a_rows / b_rows [N, S, R_g] pool units, ranks [N, S] (descriptors.py)
            self.a_rows[g], self.b_rows[g], self.ranks[g] = group_rows(
                self.entries, g, self.runtime.shapes.group(g).num_slices, self.device)
            self.any_rank[g] = any(any(e.slice_ranks[g]) for e in self.entries if e is not None)
        self.scales = {g: torch.ones(self.ranks[g].shape, dtype=torch.float32, device=self.device) for g in GROUPS}
        self.seg_lens = seg_lens
        if self.is_prefill:
            starts = [0]
            for length in seg_lens:
                starts.append(starts[-1] + length)
            self.seg_starts = torch.tensor(starts, dtype=torch.int32, device=self.device)  # [N + 1]
            self.row_starts = starts
        else:
            self.row_starts = list(range(n + 1))
        # Punica's bgmv: decode descriptors padded to the batch's max rank (kernels.pad_to_max_rank)
        self.use_bgmv = not self.is_prefill and self.runtime.config.lora.decode_kernel == "bgmv"
        self._plans: dict[tuple, object] = {}

    # ---- residency ----------------------------------------------------------------------

    def loading_entries(self) -> list:
        """Adapters of this batch whose load is not complete."""
        return self._loading

    def pending(self, layer: int) -> list:
        """Adapters not resident at `layer` (decided once per layer, for all its groups)."""
        if not self._loading:
            return []
        if layer not in self._pending_by_layer:
            self._pending_by_layer[layer] = [e for e in self._loading if not e.residency.is_ready(layer)]
        return self._pending_by_layer[layer]

    def forget_pending(self, layer: int) -> None:
        self._pending_by_layer[layer] = []

    def forget_all_pending(self) -> None:
        self._loading = []

    def row_segments(self, names: list) -> list:
        """(row_start, row_end, adapter) of every row/segment using one of `names`."""
        wanted = set(names)
        return [(self.row_starts[i], self.row_starts[i + 1], name)
                for i, name in enumerate(self.names) if name in wanted]

    # ---- compute ------------------------------------------------------------------------

    def begin(self, layer: int, group: str, x: torch.Tensor) -> None:
        """Called before the base projection: lets the mode start work for rows whose adapter
        is not resident at `layer` (cpu-assist posts them to the sidecar, so the CPU computes
        while the device runs the base matmul)."""
        if self.any_rank[group] and self.pending(layer):
            self.runtime.mode.begin(self, layer, group, x, self.pending(layer))

    def add_delta(self, layer: int, group: str, x: torch.Tensor, out: torch.Tensor) -> bool:
        """out += LoRA delta of `group` at `layer` for every row. Shape: x [T, IN], out [T, OUT].

        Returns False when no row has an adapter targeting this group (out untouched).
        """
        if not self.any_rank[group]:
            return False
        skip = []
        pending = self.pending(layer)
        if pending:
            skip = self.runtime.mode.resolve(self, layer, group, x, out, pending)
        skip = tuple(skip)
        a_rows, b_rows, ranks = self._masked(group, skip)
        w = self.pool.layer_pool(layer)  # [U, UNIT]
        gs = self.runtime.shapes.group(group)
        offsets = self.runtime.slice_offsets[group]
        y = torch.empty((x.shape[0], gs.num_slices, a_rows.shape[2]), dtype=torch.float32,
                        device=x.device)  # y: [T, S, R]
        scales = self.scales[group]
        if self.is_prefill:
            kernels.sgmv_shrink(x, w, self.seg_starts, a_rows, ranks, y)
            kernels.sgmv_expand(y, w, self.seg_starts, b_rows, ranks, scales, offsets, out)
        else:
            plan = self._plan(group, skip, lambda: kernels.plan_rows(a_rows, b_rows, ranks))
            kernels.mbgmv_shrink(x, w, a_rows, ranks, y, plan=plan)
            kernels.mbgmv_expand(y, w, b_rows, ranks, scales, offsets, out, plan=plan)
        return True

    def _plan(self, group: str, skip: tuple, build):
        """The CPU fast path's per-step index plan of a group (built once, reused by every layer)."""
        if self.device.type != "cpu":
            return None
        key = (group, skip)
        if key not in self._plans:
            self._plans[key] = build()
        return self._plans[key]

    def _masked(self, group: str, skip: tuple):
        """(a_rows, b_rows, ranks) of `group` with the rows of `skip` adapters zeroed (already
        handled), padded to the batch's max rank for bgmv."""
        key = (group, skip)
        if key not in self._skip_cache:
            rows = torch.tensor([name in skip for name in self.names], device=self.device) if skip else None
            descriptors = (self.a_rows[group], self.b_rows[group], mask_rows(self.ranks[group], rows))
            if self.use_bgmv:
                descriptors = kernels.pad_to_max_rank(*descriptors, zero_unit=0)
            self._skip_cache[key] = descriptors
        return self._skip_cache[key]
