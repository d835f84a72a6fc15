"""The LoRA side of a CUDA-graph decode step: static descriptor buffers and the layers' hook.

A captured graph bakes in every pointer and grid it launched with, so its LoRA kernels must
read their descriptors from buffers that live as long as the graph, shaped by the bucket, not
by the step (vLLM's LoRA graphs do the same: a grid fixed over slots, per-step metadata copied
into static buffers). `StaticLoraDescriptors` owns, for the largest bucket B of a graph set,
one int32 buffer holding every group's

    a_rows / b_rows [B, S_g, R] (R: the pool's max rank, -1 past a row's rank)  and  ranks [B, S_g],

plus ones for the scales. A step's `LoraBatch` builds its descriptors on the host
(`LoraBatch.host_rows`); `load` writes them, padded to [B, S, R] (rows past the step's: rank 0),
into one page-locked staging buffer and moves it with one non-blocking copy. Nothing is read
back from the device.

`GraphLora` is what the layers see as `infer_state.lora` inside a graph: per group one
`kernels.DecodeStep` prepared over views of the static buffers (the first `bucket` rows), so a
layer group is exactly the two launches of that op (shrink, expand into the projection's
output), with no Python work per layer beyond them. The kernels read each row's live rank on
the device, so the padded rows and slices only cost an early exit.

On the CPU the same objects run through the torch reference kernels (`backend="reference"`,
which read the descriptors at call time); the CPU's fast path builds index plans from the
descriptor values at prepare time, which a graph cannot.
"""
from __future__ import annotations

from typing import Optional

import torch

import kernels
from caraserve_router.lora.shapes import GROUPS
from caraserve_router.lora.step_context import LoraStepContext

I32 = torch.int32


class StaticLoraDescriptors:
    """Static [B, S, R] descriptors of every group for a graph set (see the module docstring)."""

    def __init__(self, ctx: LoraStepContext, max_rows: int, backend: Optional[str] = None):
        self.ctx, self.max_rows, self.rank = ctx, max_rows, ctx.max_rank
        self.backend = backend or ctx.kernel_backend or ("reference" if ctx.device.type == "cpu" else None)
        self._offsets: dict[str, tuple[int, int, int]] = {}  # group -> where a_rows / b_rows / ranks start
        size = 0
        for g in GROUPS:
            table = max_rows * ctx.num_slices(g) * self.rank
            self._offsets[g] = (size, size + table, size + 2 * table)
            size += 2 * table + max_rows * ctx.num_slices(g)
        pin = ctx.device.type == "cuda"
        self.host = torch.empty(size, dtype=I32, pin_memory=pin)  # staging: [size], page-locked on CUDA
        self.device_buffer = torch.empty(size, dtype=I32, device=ctx.device)  # what the graphs read
        self._reset_host()
        self.device_buffer.copy_(self.host)
        self.scales = {g: torch.ones((max_rows, ctx.num_slices(g)), dtype=torch.float32, device=ctx.device)
                       for g in GROUPS}  # [B, S]: the store folds alpha / r into B
        self.loads = 0
        self._copied = None  # CUDA event of the last copy out of the staging buffer

    def _views(self, flat: torch.Tensor) -> tuple[dict, dict, dict]:
        a, b, r = {}, {}, {}
        for g in GROUPS:
            s, (oa, ob, orank) = self.ctx.num_slices(g), self._offsets[g]
            table = self.max_rows * s * self.rank
            a[g] = flat[oa: oa + table].view(self.max_rows, s, self.rank)
            b[g] = flat[ob: ob + table].view(self.max_rows, s, self.rank)
            r[g] = flat[orank: orank + self.max_rows * s].view(self.max_rows, s)
        return a, b, r

    def _reset_host(self) -> None:
        a, b, r = self._views(self.host)
        for g in GROUPS:
            a[g].fill_(-1)
            b[g].fill_(-1)
            r[g].zero_()

    def load(self, batch, rows: int) -> None:
        """Write the step's descriptors (rows 0..rows-1 of `batch`, a LoraBatch) into the static
        buffers; every other row gets rank 0. One host-side fill and one non-blocking copy.

        The staging buffer is rewritten only once the previous copy out of it is done (its
        event; in serving the step's sampled ids were copied to the host since, so it is)."""
        if self._copied is not None:
            self._copied.synchronize()
        self._reset_host()
        a, b, r = self._views(self.host)
        for g in GROUPS:
            a_rows, b_rows, ranks = batch.host_rows[g]  # [N, S, R_batch] on the host
            if a_rows.shape[2] == 0:
                continue
            if self.ctx.decode_kernel.pads_to_max_rank:  # Punica bgmv: every rank row up to the batch's max
                a_rows, b_rows, ranks = kernels.pad_to_max_rank(a_rows, b_rows, ranks, zero_unit=0)
            width = a_rows.shape[2]
            a[g][:rows, :, :width] = a_rows
            b[g][:rows, :, :width] = b_rows
            r[g][:rows] = ranks
        self.device_buffer.copy_(self.host, non_blocking=True)
        if self.device_buffer.is_cuda:
            self._copied = torch.cuda.Event()
            self._copied.record(torch.cuda.current_stream(self.device_buffer.device))
        self.loads += 1

    def graph_lora(self, bucket: int, groups: tuple) -> "GraphLora":
        return GraphLora(self, bucket, groups)


class GraphLora:
    """`infer_state.lora` of a graph step: `groups` (those with a rank in the step's batch) run
    their two launches per layer over the first `bucket` rows of the static descriptors."""

    def __init__(self, static: StaticLoraDescriptors, bucket: int, groups: tuple):
        ctx = static.ctx
        self.pool, self.groups = ctx.pool, frozenset(groups)
        a, b, r = static._views(static.device_buffer)
        w = ctx.pool.layer_pool(0)  # any layer: all share one shape
        self.steps = {
            g: kernels.prepare_decode(a[g][:bucket], b[g][:bucket], r[g][:bucket], static.scales[g][:bucket],
                                      ctx.slice_offsets[g], w, ctx.shapes.group(g).in_features,
                                      backend=static.backend, out_features=ctx.out_features(g))
            for g in groups
        }

    def begin(self, layer: int, group: str, x: torch.Tensor) -> None:
        """Nothing to post: a graph step has no adapter loading, so no sidecar rows."""

    def add_delta(self, layer: int, group: str, x: torch.Tensor, out: torch.Tensor,
                  out_hi: Optional[torch.Tensor] = None) -> bool:
        """Same contract as LoraBatch.add_delta (x [B, IN], out [B, OUT] or out | out_hi)."""
        step = self.steps.get(group)
        if step is None:
            return False
        w = self.pool.layer_pool(layer)  # [U, UNIT]
        if out_hi is None:
            step(x, w, out)
        else:
            step.split(x, w, out, out_hi)
        return True
