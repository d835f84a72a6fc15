"""Triton decode kernels: one token per row, every row its own adapter.

One kernel pair serves both layouts (constexpr PAGED):
- mbgmv (PAGED): row i's rank row j of slice s is pool page page_table[i, j], live for
  j < ranks[i, s]; work is proportional to the sum of ranks (no padding).
- bgmv (slot mode, Punica): rank row j of row i is page slots[i] * slot_rank + j of the
  stacked pool, live for j < R (padded to the batch's max rank) when slots[i] >= 0.

shrink: grid (N, S, cdiv(R, BLOCK_R)); a program computes BLOCK_R rank rows of one (row, slice)
        as gathered-row x vector dot products (a GEMV: tl.dot needs >= 16 rows of x) and writes
        zeros for rows that are not live, so every element of y is written.
expand: grid (N, cdiv(OUT_TOTAL, BLOCK_N)); a program owns BLOCK_N output columns of one row,
        which may straddle slices (GQA widths are not block multiples), and stores only columns
        of slices with live rank rows: rank-0 slices and rows without adapter stay bit-identical.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _num_live(ranks_ptr, slots_ptr, row, s, R, S: tl.constexpr, PAGED: tl.constexpr):
    """How many rank rows of (row, slice s) are read."""
    if PAGED:
        n_live = tl.load(ranks_ptr + row * S + s)
    else:
        n_live = tl.where(tl.load(slots_ptr + row) >= 0, R, 0)
    return n_live


@triton.jit
def _pages(pt_ptr, slots_ptr, row, j, live, R, slot_rank, PAGED: tl.constexpr):
    """int64 page ids of rank rows j of `row` (0 where not live; masked out by the caller)."""
    if PAGED:
        pages = tl.load(pt_ptr + row * R + j, mask=live, other=0).to(tl.int64)
    else:
        pages = tl.load(slots_ptr + row).to(tl.int64) * slot_rank + j
    return tl.where(live, pages, 0)


@triton.jit
def _shrink_kernel(x_ptr, a_ptr, pt_ptr, ranks_ptr, slots_ptr, y_ptr,
                   IN, R, slot_rank,
                   S: tl.constexpr, PAGED: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    row = tl.program_id(0)
    s = tl.program_id(1)
    j = tl.program_id(2) * BLOCK_R + tl.arange(0, BLOCK_R)                    # rank rows
    n_live = _num_live(ranks_ptr, slots_ptr, row, s, R, S, PAGED)
    live = j < n_live
    acc = tl.zeros([BLOCK_R], dtype=tl.float32)
    if tl.program_id(2) * BLOCK_R < n_live:
        pages = _pages(pt_ptr, slots_ptr, row, j, live, R, slot_rank, PAGED)
        x_row = x_ptr + row.to(tl.int64) * IN
        a_rows = a_ptr + (pages * S + s) * IN                                 # [BLOCK_R] row starts
        for k0 in range(0, IN, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            k_in = k < IN
            xv = tl.load(x_row + k, mask=k_in, other=0.0).to(tl.float32)    # [BLOCK_K]
            a = tl.load(a_rows[:, None] + k[None, :], mask=live[:, None] & k_in[None, :],
                        other=0.0).to(tl.float32)                             # [BLOCK_R, BLOCK_K]
            acc += tl.sum(a * xv[None, :], axis=1)
    tl.store(y_ptr + (row * S + s) * R + j, acc, mask=j < R)


@triton.jit
def _expand_kernel(y_ptr, b_ptr, pt_ptr, ranks_ptr, slots_ptr, scales_ptr, offsets_ptr, out_ptr,
                   R, OUT, slot_rank,
                   S: tl.constexpr, PAGED: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
    row = tl.program_id(0)
    first_col = tl.program_id(1) * BLOCK_N
    c = first_col + tl.arange(0, BLOCK_N)                                     # output columns
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    touched = c < 0                                                           # all False
    for s in tl.static_range(S):
        lo = tl.load(offsets_ptr + s)
        hi = tl.load(offsets_ptr + s + 1)
        cols = (c >= lo) & (c < hi)
        n_live = _num_live(ranks_ptr, slots_ptr, row, s, R, S, PAGED)
        if (n_live > 0) & (lo < first_col + BLOCK_N) & (hi > first_col):
            part = tl.zeros([BLOCK_N], dtype=tl.float32)
            for r0 in range(0, n_live, BLOCK_R):
                j = r0 + tl.arange(0, BLOCK_R)
                live = j < n_live
                pages = _pages(pt_ptr, slots_ptr, row, j, live, R, slot_rank, PAGED)
                yv = tl.load(y_ptr + (row * S + s) * R + j, mask=live, other=0.0)            # [BLOCK_R]
                b = tl.load(b_ptr + pages[:, None] * OUT + c[None, :],
                            mask=live[:, None] & cols[None, :], other=0.0).to(tl.float32)    # [BLOCK_R, BLOCK_N]
                part += tl.sum(yv[:, None] * b, axis=0)
            scale = tl.load(scales_ptr + row * S + s)
            acc += tl.where(cols, part * scale, 0.0)
            touched = touched | cols
    out_cols = out_ptr + row.to(tl.int64) * OUT + c
    old = tl.load(out_cols, mask=touched, other=0.0)
    tl.store(out_cols, (old.to(tl.float32) + acc).to(out_ptr.dtype.element_ty), mask=touched)


def _block(n: int, cap: int) -> int:
    return max(1, min(triton.next_power_of_2(max(n, 1)), cap))


def _shrink(x, A, pt, ranks, slots, y, slot_rank, paged):
    rows, slices, rank = y.shape
    if y.numel() == 0:
        return
    block_r = _block(rank, 32)
    _shrink_kernel[(rows, slices, triton.cdiv(rank, block_r))](
        x, A, pt, ranks, slots, y, x.shape[1], rank, slot_rank,
        S=slices, PAGED=paged, BLOCK_R=block_r, BLOCK_K=_block(x.shape[1], 256))


def _expand(y, B, pt, ranks, slots, scales, slice_offsets, out, slot_rank, paged):
    rows, slices, rank = y.shape
    out_total = out.shape[1]
    if y.numel() == 0 or out_total == 0:
        return
    block_n = _block(out_total, 128)
    _expand_kernel[(rows, triton.cdiv(out_total, block_n))](
        y, B, pt, ranks, slots, scales, slice_offsets, out, rank, out_total, slot_rank,
        S=slices, PAGED=paged, BLOCK_R=_block(rank, 32), BLOCK_N=block_n)


def mbgmv_shrink(x, A, page_table, ranks, y, plan=None):
    _shrink(x, A, page_table, ranks, ranks, y, 0, True)


def mbgmv_expand(y, B, page_table, ranks, scales, slice_offsets, out, plan=None):
    _expand(y, B, page_table, ranks, ranks, scales, slice_offsets, out, 0, True)


def bgmv_shrink(x, A_stacked, slots, y, plan=None):
    # pt / ranks are not read in slot mode; slots is passed in their place
    _shrink(x, A_stacked, slots, slots, slots, y, A_stacked.shape[1], False)


def bgmv_expand(y, B_stacked, slots, scales, slice_offsets, out, plan=None):
    _expand(y, B_stacked, slots, slots, slots, scales, slice_offsets, out, B_stacked.shape[1], False)
