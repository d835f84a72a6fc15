"""Triton decode kernels (mbgmv): one token per row, every row its own adapter.

Row i's rank row j of slice s reads the lora_A row starting at unit a_rows[i, s, j] of the
pool W [U, UNIT] (IN elements) and the lora_B^T row starting at unit b_rows[i, s, j] (OUT_s
elements); live for j < ranks[i, s]. Work is proportional to the sum of ranks (no padding);
Punica's bgmv is the same kernels over padded descriptors (kernels.pad_to_max_rank).

shrink: grid (N, S, cdiv(R, BLOCK_R)); a program computes BLOCK_R rank rows of one (row, slice)
        as gathered-row x vector dot products (a GEMV: tl.dot needs >= 16 rows of x) and writes
        zeros for rows that are not live, so every element of y is written.
expand: grid (N, cdiv(OUT_TOTAL, BLOCK_N)); a program owns BLOCK_N output columns of one row,
        which may straddle slices (GQA widths are not block multiples), and stores only columns
        of slices with live rank rows: rank-0 slices and rows without adapter stay bit-identical.
        The output may be two buffers (columns < SPLIT in `out`, the rest in `out_hi`, each with
        its own row stride): the engine's qkv delta lands in q and in the KV staging rows
        directly (mbgmv_expand_split), with no scratch and no separate add.

Graph-safe: grids depend only on N, S, R and OUT (fixed for a captured bucket); the live rank of
each (row, slice) is read on the device, so padded rows (rank 0) only cost an early exit.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _shrink_kernel(x_ptr, w_ptr, rows_ptr, ranks_ptr, y_ptr, IN, R, UNIT,
                   S: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    row = tl.program_id(0)
    s = tl.program_id(1)
    j = tl.program_id(2) * BLOCK_R + tl.arange(0, BLOCK_R)                    # rank rows
    n_live = tl.load(ranks_ptr + row * S + s)
    live = j < n_live
    acc = tl.zeros([BLOCK_R], dtype=tl.float32)
    if tl.program_id(2) * BLOCK_R < n_live:
        units = tl.load(rows_ptr + (row * S + s) * R + j, mask=live, other=0).to(tl.int64)
        x_row = x_ptr + row.to(tl.int64) * IN
        a_rows = w_ptr + tl.where(live, units, 0) * UNIT                      # [BLOCK_R] row starts
        for k0 in range(0, IN, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            k_in = k < IN
            xv = tl.load(x_row + k, mask=k_in, other=0.0).to(tl.float32)    # [BLOCK_K]
            a = tl.load(a_rows[:, None] + k[None, :], mask=live[:, None] & k_in[None, :],
                        other=0.0).to(tl.float32)                             # [BLOCK_R, BLOCK_K]
            acc += tl.sum(a * xv[None, :], axis=1)
    tl.store(y_ptr + (row * S + s) * R + j, acc, mask=j < R)


@triton.jit
def _expand_kernel(y_ptr, w_ptr, rows_ptr, ranks_ptr, scales_ptr, offsets_ptr, out_ptr, out_hi_ptr, R, OUT, UNIT,
                   SPLIT, STRIDE_LO, STRIDE_HI,
                   S: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
    row = tl.program_id(0)
    first_col = tl.program_id(1) * BLOCK_N
    c = first_col + tl.arange(0, BLOCK_N)                                     # output columns
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    touched = c < 0                                                           # all False
    for s in tl.static_range(S):
        lo = tl.load(offsets_ptr + s)
        hi = tl.load(offsets_ptr + s + 1)
        cols = (c >= lo) & (c < hi)
        n_live = tl.load(ranks_ptr + row * S + s)
        if (n_live > 0) & (lo < first_col + BLOCK_N) & (hi > first_col):
            part = tl.zeros([BLOCK_N], dtype=tl.float32)
            for r0 in range(0, n_live, BLOCK_R):
                j = r0 + tl.arange(0, BLOCK_R)
                live = j < n_live
                units = tl.load(rows_ptr + (row * S + s) * R + j, mask=live, other=0).to(tl.int64)
                yv = tl.load(y_ptr + (row * S + s) * R + j, mask=live, other=0.0)            # [BLOCK_R]
                b = tl.load(w_ptr + tl.where(live, units, 0)[:, None] * UNIT + (c - lo)[None, :],
                            mask=live[:, None] & cols[None, :], other=0.0).to(tl.float32)    # [BLOCK_R, BLOCK_N]
                part += tl.sum(yv[:, None] * b, axis=0)
            scale = tl.load(scales_ptr + row * S + s)
            acc += tl.where(cols, part * scale, 0.0)
            touched = touched | cols
    lo = touched & (c < SPLIT)
    hi = touched & (c >= SPLIT)
    lo_cols = out_ptr + row.to(tl.int64) * STRIDE_LO + c
    hi_cols = out_hi_ptr + row.to(tl.int64) * STRIDE_HI + (c - SPLIT)
    old = tl.load(lo_cols, mask=lo, other=0.0).to(tl.float32) + tl.load(hi_cols, mask=hi, other=0.0).to(tl.float32)
    new = (old + acc).to(out_ptr.dtype.element_ty)
    tl.store(lo_cols, new, mask=lo)
    tl.store(hi_cols, new, mask=hi)


def _block(n: int, cap: int) -> int:
    return max(1, min(triton.next_power_of_2(max(n, 1)), cap))


def mbgmv_shrink(x, W, a_rows, ranks, y, plan=None):
    rows, slices, rank = y.shape
    if y.numel() == 0:
        return
    block_r = _block(rank, 32)
    _shrink_kernel[(rows, slices, triton.cdiv(rank, block_r))](
        x, W, a_rows, ranks, y, x.shape[1], rank, W.shape[1],
        S=slices, BLOCK_R=block_r, BLOCK_K=_block(x.shape[1], 256))


def mbgmv_expand(y, W, b_rows, ranks, scales, slice_offsets, out, plan=None):
    _expand(y, W, b_rows, ranks, scales, slice_offsets, out, out, out.shape[1])


def mbgmv_expand_split(y, W, b_rows, ranks, scales, slice_offsets, out_lo, out_hi, plan=None):
    _expand(y, W, b_rows, ranks, scales, slice_offsets, out_lo, out_hi, out_lo.shape[1])


def _expand(y, W, b_rows, ranks, scales, slice_offsets, out, out_hi, split):
    rows, slices, rank = y.shape
    out_total = split + (out_hi.shape[1] if out_hi is not out else 0)
    if y.numel() == 0 or out_total == 0:
        return
    block_n = _block(out_total, 128)
    _expand_kernel[(rows, triton.cdiv(out_total, block_n))](
        y, W, b_rows, ranks, scales, slice_offsets, out, out_hi, rank, out_total, W.shape[1],
        split, out.stride(0), out_hi.stride(0),
        S=slices, BLOCK_R=_block(rank, 32), BLOCK_N=block_n)
