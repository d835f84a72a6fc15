"""Fast CPU path for prefill (sgmv): one matmul per segment and slice, pool views when possible.

Prefill segments are long (many tokens share an adapter), so BLAS does the work and the loop
over segments costs little. Half inputs are computed in float32: CPU half matmuls are slow.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .._checks import fail

COMPUTE: dict[torch.dtype, torch.dtype] = {
    torch.float16: torch.float32,
    torch.bfloat16: torch.float32,
    torch.float32: torch.float32,
    torch.float64: torch.float64,
}


@dataclass(frozen=True)
class Segment:
    index: int                    # row of page_table / ranks / scales
    tokens: slice
    slice_ranks: tuple[int, ...]
    rank: int                     # pages read: the largest slice rank
    pages: torch.Tensor | None    # int64 [rank]; None when contiguous from first_page
    first_page: int

    def rows(self, pool: torch.Tensor) -> torch.Tensor:
        """The segment's pages of `pool` ([P, ...]): a view when contiguous."""
        if self.pages is None:
            return pool.narrow(0, self.first_page, self.rank)
        return pool.index_select(0, self.pages)


def segments(seg_starts: torch.Tensor, page_table: torch.Tensor, ranks: torch.Tensor, pool_pages: int):
    """The non-empty segments that have an adapter."""
    starts = seg_starts.tolist()
    if starts != sorted(starts):
        fail("sgmv", f"seg_starts must be non-decreasing, got {starts}")
    pt = page_table.long()                                              # [N, R]
    slice_ranks = ranks.tolist()
    for i, (start, end) in enumerate(zip(starts, starts[1:])):
        rank = max(slice_ranks[i], default=0)
        if rank == 0 or start == end:
            continue
        pages = pt[i, :rank]
        lo, hi = int(pages.min()), int(pages.max())
        if lo < 0 or hi >= pool_pages:
            fail("sgmv", f"segment {i}: page ids {lo}..{hi} outside the pool of {pool_pages} pages")
        contiguous = hi - lo + 1 == rank and int(pages[0]) == lo and bool((pages.diff() == 1).all())
        yield Segment(i, slice(start, end), tuple(slice_ranks[i]), rank, None if contiguous else pages, lo)


def sgmv_shrink(x, A, seg_starts, page_table, ranks, y, plan=None):
    compute = COMPUTE[x.dtype]
    in_features = A.shape[2]
    y.zero_()
    for seg in segments(seg_starts, page_table, ranks, A.shape[0]):
        a = seg.rows(A).to(compute).view(-1, in_features)                      # [rank * S, IN]
        product = x[seg.tokens].to(compute) @ a.t()                            # [L, rank * S]
        y_seg = y[seg.tokens]                                                  # [L, S, R]
        y_seg[:, :, :seg.rank] = product.view(-1, seg.rank, len(seg.slice_ranks)).transpose(1, 2)
        for s, r in enumerate(seg.slice_ranks):
            y_seg[:, s, r:seg.rank] = 0  # rows past this slice's rank are never valid


def sgmv_expand(y, B, seg_starts, page_table, ranks, scales, slice_offsets, out, plan=None):
    offsets = slice_offsets.tolist()
    if offsets[0] != 0 or offsets[-1] != B.shape[1] or offsets != sorted(offsets):
        fail("sgmv_expand", f"slice_offsets {offsets} must rise from 0 to OUT_TOTAL={B.shape[1]}")
    scale_rows = scales.tolist()
    for seg in segments(seg_starts, page_table, ranks, B.shape[0]):
        b = seg.rows(B)                                                        # [rank, OUT_TOTAL]
        for s, r in enumerate(seg.slice_ranks):
            if r == 0:
                continue  # untouched
            cols = slice(offsets[s], offsets[s + 1])
            delta = y[seg.tokens, s, :r] @ b[:r, cols].to(y.dtype)             # [L, n_s]
            out[seg.tokens, cols].add_(delta, alpha=scale_rows[seg.index][s])

