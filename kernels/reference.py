"""Plain torch reference of every op: loops over rows / segments and slices, float64 inside.

Written to be read, not to be fast. Every product is computed in float64 from the inputs as
given and rounded once when written to `y` / `out`, so with float64 `y` / `out` it is the
exact answer the other paths are compared against. Same signatures as the launchers
(`plan` is accepted and ignored). Tokens outside every segment get y = 0.
"""
from __future__ import annotations

import torch

ACC = torch.float64


def _pages(page_table: torch.Tensor, i: int, rank: int) -> torch.Tensor:
    """Pool pages of rank rows 0..rank-1 of row / segment i."""
    pages = page_table[i, :rank].long()
    assert bool((pages >= 0).all()), f"row {i}: page_table has -1 below its rank {rank}"
    return pages


def _segments(seg_starts: torch.Tensor):
    starts = seg_starts.tolist()
    for i in range(len(starts) - 1):
        assert starts[i] <= starts[i + 1], f"seg_starts must be non-decreasing, got {starts}"
        yield i, slice(starts[i], starts[i + 1])


def sgmv_shrink(x, A, seg_starts, page_table, ranks, y, plan=None):
    y.zero_()
    for i, tokens in _segments(seg_starts):
        for s in range(y.shape[1]):
            r = int(ranks[i, s])
            a = A[_pages(page_table, i, r), s].to(ACC)          # a: [r, IN]
            y[tokens, s, :r] = (x[tokens].to(ACC) @ a.T).to(y.dtype)


def sgmv_expand(y, B, seg_starts, page_table, ranks, scales, slice_offsets, out, plan=None):
    offsets = slice_offsets.tolist()
    for i, tokens in _segments(seg_starts):
        for s in range(y.shape[1]):
            r = int(ranks[i, s])
            if r == 0:
                continue  # untouched, not "+= 0" (that would turn -0.0 into +0.0)
            cols = slice(offsets[s], offsets[s + 1])
            b = B[_pages(page_table, i, r), cols].to(ACC)        # b: [r, n_s]
            delta = float(scales[i, s]) * (y[tokens, s, :r].to(ACC) @ b)
            out[tokens, cols] = (out[tokens, cols].to(ACC) + delta).to(out.dtype)


def _one_token_segments(n: int, device) -> torch.Tensor:
    return torch.arange(n + 1, dtype=torch.int32, device=device)


def mbgmv_shrink(x, A, page_table, ranks, y, plan=None):
    """Decode is prefill with segments of one token."""
    sgmv_shrink(x, A, _one_token_segments(x.shape[0], x.device), page_table, ranks, y)


def mbgmv_expand(y, B, page_table, ranks, scales, slice_offsets, out, plan=None):
    sgmv_expand(y, B, _one_token_segments(y.shape[0], y.device), page_table, ranks, scales,
                slice_offsets, out)


def bgmv_shrink(x, A_stacked, slots, y, plan=None):
    rank = y.shape[2]
    y.zero_()
    for i, slot in enumerate(slots.tolist()):
        if slot < 0:
            continue
        for s in range(y.shape[1]):
            a = A_stacked[slot, :rank, s].to(ACC)                # a: [R, IN] (zero past the rank)
            y[i, s] = (a @ x[i].to(ACC)).to(y.dtype)


def bgmv_expand(y, B_stacked, slots, scales, slice_offsets, out, plan=None):
    rank = y.shape[2]
    offsets = slice_offsets.tolist()
    for i, slot in enumerate(slots.tolist()):
        if slot < 0:
            continue
        for s in range(y.shape[1]):
            cols = slice(offsets[s], offsets[s + 1])
            b = B_stacked[slot, :rank, cols].to(ACC)             # b: [R, n_s]
            delta = float(scales[i, s]) * (y[i, s].to(ACC) @ b)
            out[i, cols] = (out[i, cols].to(ACC) + delta).to(out.dtype)
