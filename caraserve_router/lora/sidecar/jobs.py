"""One sidecar call: the packed rows (`Job`), the posted call (`Ticket`), and the host copies."""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch


class Job:
    """One packed call: the rows of the segments, back to back in the shared buffers."""

    __slots__ = ("layer", "group", "pieces", "rows")

    def __init__(self, layer: int, group: str, pieces: list, rows: int):
        self.layer, self.group = layer, group
        self.pieces = pieces  # [(row start in x/out, row end, slot, packed row start)]
        self.rows = rows

    def descriptor_segments(self) -> list:
        return [(pos, pos + end - start, slot) for start, end, slot, pos in self.pieces]


class Ticket:
    """A submitted job, between `submit` and `collect`."""

    __slots__ = ("job", "x", "posted", "participants", "seq", "on_cuda", "start")

    def __init__(self, job: Job, x: Optional[torch.Tensor]):
        self.job, self.x = job, x
        self.posted = False
        self.participants, self.seq, self.on_cuda, self.start = [], 0, False, 0.0



# Host copies and adds of the CPU path go through numpy where it has the dtype: they are short,
# memory-bound, and torch would split them over an OpenMP team whose barrier then waits for a
# thread sharing a core with a polling worker (measured: 20 ms instead of 1 ms per call on 2 cores).
_NUMPY_DTYPES = (torch.float32, torch.float64)


def copy_rows(dst: torch.Tensor, src: torch.Tensor) -> None:
    if dst.dtype == src.dtype and dst.dtype in _NUMPY_DTYPES:
        np.copyto(dst.numpy(), src.detach().numpy())
    else:
        dst.copy_(src)


def add_rows(dst: torch.Tensor, src: torch.Tensor) -> None:
    if dst.dtype == src.dtype and dst.dtype in _NUMPY_DTYPES and not dst.requires_grad:
        view = dst.numpy()
        np.add(view, src.numpy(), out=view)
    else:
        dst += src


def runs(indices: list) -> list:
    """Sorted indices as [start, end) runs of consecutive values."""
    runs = []
    for i in indices:
        if runs and runs[-1][1] == i:
            runs[-1][1] = i + 1
        else:
            runs.append([i, i + 1])
    return [tuple(r) for r in runs]

