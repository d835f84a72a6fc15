"""Triton prefill kernels (sgmv): segments of tokens that share an adapter, tiles on tl.dot.

Pool addressing as in decode.py: lora_A row j of slice s of segment i starts at unit
a_rows[i, s, j] of W [U, UNIT], its lora_B^T row at unit b_rows[i, s, j].

The grid's first axis is an upper bound on the token blocks of any segment, cdiv(T, BLOCK_M),
so no device->host read of the segment lengths is needed; programs past their segment's end
do nothing. Every token of a segment is covered because a segment has at most T tokens.
Precondition (as Punica's): segments tile the tokens, seg_starts[0] = 0, seg_starts[N] = T.

shrink: grid (cdiv(T, BLOCK_M), N, S * cdiv(R, BLOCK_R)); tile y[tokens, s, ranks] = x @ A^T.
expand: grid (cdiv(T, BLOCK_M), N, cdiv(OUT_TOTAL, BLOCK_N)); tile out[tokens, cols] += y @ B,
        column blocks may straddle slices; only columns of slices with rank > 0 are stored.
Half inputs go to tl.dot as they are (fp32 accumulation); fp32 uses IEEE precision (no TF32)
and y (fp32) is rounded to B's dtype for the expand product, as Punica does.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# fp32 tiles must not be rounded to TF32 on the tensor cores.
DOT_PRECISION: dict[torch.dtype, str] = {
    torch.float32: "ieee",
    torch.float16: "tf32",  # ignored for half inputs
    torch.bfloat16: "tf32",
}
BLOCK_M = 32
BLOCK_K = 64
BLOCK_N = 64


@triton.jit
def _sgmv_shrink_kernel(x_ptr, w_ptr, seg_ptr, rows_ptr, ranks_ptr, y_ptr, IN, R, UNIT,
                        S: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr,
                        BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    seg = tl.program_id(1)
    s = tl.program_id(2) % S
    j = (tl.program_id(2) // S) * BLOCK_R + tl.arange(0, BLOCK_R)            # rank rows
    first = tl.load(seg_ptr + seg) + tl.program_id(0) * BLOCK_M
    end = tl.load(seg_ptr + seg + 1)
    if first < end:
        t = first + tl.arange(0, BLOCK_M)                                     # tokens
        t_in = t < end
        n_live = tl.load(ranks_ptr + seg * S + s)
        live = j < n_live
        acc = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
        if (tl.program_id(2) // S) * BLOCK_R < n_live:
            units = tl.load(rows_ptr + (seg * S + s) * R + j, mask=live, other=0).to(tl.int64)
            a_rows = w_ptr + tl.where(live, units, 0) * UNIT                  # [BLOCK_R]
            x_rows = x_ptr + t.to(tl.int64) * IN                              # [BLOCK_M]
            for k0 in range(0, IN, BLOCK_K):
                k = k0 + tl.arange(0, BLOCK_K)
                k_in = k < IN
                xt = tl.load(x_rows[:, None] + k[None, :], mask=t_in[:, None] & k_in[None, :], other=0.0)
                at = tl.load(a_rows[None, :] + k[:, None], mask=k_in[:, None] & live[None, :], other=0.0)
                acc = tl.dot(xt, at, acc, input_precision=PRECISION)          # [BLOCK_M, BLOCK_R]
        y_tile = y_ptr + (t[:, None].to(tl.int64) * S + s) * R + j[None, :]
        tl.store(y_tile, acc, mask=t_in[:, None] & (j[None, :] < R))


@triton.jit
def _sgmv_expand_kernel(y_ptr, w_ptr, seg_ptr, rows_ptr, ranks_ptr, scales_ptr, offsets_ptr, out_ptr,
                        R, OUT, UNIT,
                        S: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr,
                        BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    seg = tl.program_id(1)
    first_col = tl.program_id(2) * BLOCK_N
    first = tl.load(seg_ptr + seg) + tl.program_id(0) * BLOCK_M
    end = tl.load(seg_ptr + seg + 1)
    if first < end:
        t = first + tl.arange(0, BLOCK_M)
        t_in = t < end
        c = first_col + tl.arange(0, BLOCK_N)
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        touched = c < 0                                                       # all False
        for s in tl.static_range(S):
            lo = tl.load(offsets_ptr + s)
            hi = tl.load(offsets_ptr + s + 1)
            cols = (c >= lo) & (c < hi)
            n_live = tl.load(ranks_ptr + seg * S + s)
            if (n_live > 0) & (lo < first_col + BLOCK_N) & (hi > first_col):
                part = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
                for r0 in range(0, n_live, BLOCK_R):
                    j = r0 + tl.arange(0, BLOCK_R)
                    live = j < n_live
                    units = tl.load(rows_ptr + (seg * S + s) * R + j, mask=live, other=0).to(tl.int64)
                    yt = tl.load(y_ptr + (t[:, None].to(tl.int64) * S + s) * R + j[None, :],
                                 mask=t_in[:, None] & live[None, :], other=0.0)       # [BLOCK_M, BLOCK_R]
                    bt = tl.load(w_ptr + tl.where(live, units, 0)[:, None] * UNIT + (c - lo)[None, :],
                                 mask=live[:, None] & cols[None, :], other=0.0)       # [BLOCK_R, BLOCK_N]
                    part = tl.dot(yt.to(bt.dtype), bt, part, input_precision=PRECISION)
                scale = tl.load(scales_ptr + seg * S + s)
                acc += tl.where(cols[None, :], part * scale, 0.0)
                touched = touched | cols
        out_tile = out_ptr + t[:, None].to(tl.int64) * OUT + c[None, :]
        mask = t_in[:, None] & touched[None, :]
        old = tl.load(out_tile, mask=mask, other=0.0)
        tl.store(out_tile, (old.to(tl.float32) + acc).to(out_ptr.dtype.element_ty), mask=mask)


def _block_r(rank: int) -> int:
    return min(max(triton.next_power_of_2(rank), 16), 32)  # tl.dot needs >= 16


def sgmv_shrink(x, W, seg_starts, a_rows, ranks, y, plan=None):
    tokens, slices, rank = y.shape
    segs = seg_starts.shape[0] - 1
    if y.numel() == 0 or segs == 0:
        return
    block_r = _block_r(rank)
    grid = (triton.cdiv(tokens, BLOCK_M), segs, slices * triton.cdiv(rank, block_r))
    _sgmv_shrink_kernel[grid](x, W, seg_starts, a_rows, ranks, y, x.shape[1], rank, W.shape[1],
                              S=slices, BLOCK_M=BLOCK_M, BLOCK_R=block_r, BLOCK_K=BLOCK_K,
                              PRECISION=DOT_PRECISION[x.dtype])


def sgmv_expand(y, W, seg_starts, b_rows, ranks, scales, slice_offsets, out, plan=None):
    tokens, slices, rank = y.shape
    segs = seg_starts.shape[0] - 1
    out_total = out.shape[1]
    if y.numel() == 0 or segs == 0 or out_total == 0:
        return
    grid = (triton.cdiv(tokens, BLOCK_M), segs, triton.cdiv(out_total, BLOCK_N))
    _sgmv_expand_kernel[grid](y, W, seg_starts, b_rows, ranks, scales, slice_offsets, out,
                              rank, out_total, W.shape[1], S=slices, BLOCK_M=BLOCK_M, BLOCK_R=_block_r(rank),
                              BLOCK_N=BLOCK_N, PRECISION=DOT_PRECISION[W.dtype])
