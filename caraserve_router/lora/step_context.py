"""LoraStepContext: what a step's `LoraBatch` needs from the instance, frozen once at start.

`LoraBatch` used to keep a back-reference to the `LoraRuntime` and read four of its attributes
on every step (the pool, the model shapes, the device slice offsets, the decode kernel). The
runtime now builds this small immutable record once (vLLM's `PunicaWrapper.update_metadata`
pattern: per-step metadata is computed from a fixed context, never from the live engine), so
the batch cannot reach the runtime's mutable state, and a graph runner can hold the same
context for the whole life of its captured graphs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from caraserve_router.contracts.names import DecodeKernel
from caraserve_router.lora.shapes import GROUPS, ModelShapes


@dataclass(frozen=True)
class LoraStepContext:
    pool: object                               # AdapterPool: W [layers, U, UNIT], fixed for the instance's life
    shapes: ModelShapes
    decode_kernel: DecodeKernel
    slice_offsets: dict                        # group -> int32 [S + 1] on the pool's device
    host_slice_offsets: dict                   # group -> tuple of S + 1 ints (no device read to learn them)
    max_rank: int                              # the pool's max rank: the static R of graph descriptors
    kernel_backend: Optional[str] = None       # None: the device's (kernels._registry); tests run the
                                               # GPU path's Triton kernels on the CPU with "triton"

    @classmethod
    def build(cls, pool, shapes: ModelShapes, decode_kernel: DecodeKernel,
              kernel_backend: Optional[str] = None) -> "LoraStepContext":
        host = {g: tuple(shapes.group(g).slice_offsets) for g in GROUPS}
        device = {g: torch.tensor(host[g], dtype=torch.int32, device=pool.device) for g in GROUPS}
        return cls(pool, shapes, DecodeKernel(decode_kernel), device, host, pool.max_rank, kernel_backend)

    @property
    def device(self) -> torch.device:
        return self.pool.device

    def num_slices(self, group: str) -> int:
        return len(self.host_slice_offsets[group]) - 1

    def out_features(self, group: str) -> int:
        return self.host_slice_offsets[group][-1]
