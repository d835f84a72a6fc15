"""Kernel descriptors of one step's rows (docs/DESIGN.md, "Adapter pool layout"), per group.

Row i uses pool entry `entries[i]` (or none). For a group of S slices:
    a_rows / b_rows: int32 [N, S, R] first pool unit of lora_A row / lora_B^T row j of slice s
                     (-1 past the slice's rank); R: the largest slice rank of the group in the batch
    ranks:           int32 [N, S]
Built on the CPU once per step from the entries' own tables, then moved to the device once.
"""
from __future__ import annotations

from typing import Optional

import torch


def group_rows(entries: list, group: str, num_slices: int, device: torch.device
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(a_rows [N, S, R], b_rows [N, S, R], ranks [N, S]) of `group` for the rows' entries."""
    tables = [e.a_rows[group] if e is not None else None for e in entries]
    width = max([t.shape[1] for t in tables if t is not None] or [0])
    n = len(entries)
    a_rows = torch.full((n, num_slices, width), -1, dtype=torch.int32)
    b_rows = torch.full((n, num_slices, width), -1, dtype=torch.int32)
    ranks = torch.zeros((n, num_slices), dtype=torch.int32)
    for i, e in enumerate(entries):
        if e is None:
            continue
        w = e.a_rows[group].shape[1]
        a_rows[i, :, :w] = e.a_rows[group]
        b_rows[i, :, :w] = e.b_rows[group]
        ranks[i] = torch.tensor(e.slice_ranks[group], dtype=torch.int32)
    return a_rows.to(device), b_rows.to(device), ranks.to(device)


def mask_rows(ranks: torch.Tensor, skip_rows: Optional[torch.Tensor]) -> torch.Tensor:
    """ranks with the rows of `skip_rows` (bool [N]) zeroed: their delta is added elsewhere."""
    return ranks if skip_rows is None else ranks.masked_fill(skip_rows[:, None], 0)
