"""Fast CPU path for prefill (sgmv): per segment one matmul for all its slices' lora_A rows and
one per slice for the expand, over rows gathered from the pool (views when aligned).

Prefill segments are long (many tokens share an adapter), so BLAS does the work and the loop
over segments costs little. Half inputs are computed in float32: CPU half matmuls are slow.
"""
from __future__ import annotations

import torch

from .._checks import fail
from ..plan import PoolRows, gather_rows

COMPUTE: dict[torch.dtype, torch.dtype] = {
    torch.float16: torch.float32,
    torch.bfloat16: torch.float32,
    torch.float32: torch.float32,
    torch.float64: torch.float64,
}


def _segments(seg_starts: torch.Tensor, ranks: torch.Tensor):
    """(index, token slice, slice ranks) of the non-empty segments that have an adapter."""
    starts = seg_starts.tolist()
    if starts != sorted(starts):
        fail("sgmv", f"seg_starts must be non-decreasing, got {starts}")
    slice_ranks = ranks.tolist()
    for i, (start, end) in enumerate(zip(starts, starts[1:])):
        if start < end and max(slice_ranks[i], default=0) > 0:
            yield i, slice(start, end), slice_ranks[i]


def _units(table: torch.Tensor, W: torch.Tensor, width: int) -> torch.Tensor:
    """int64 first units of live rows, checked against the pool (-1 or past the end: refused)."""
    units = table.long()
    if units.numel() and (int(units.min()) < 0 or int(units.max()) * W.shape[1] + width > W.numel()):
        fail("sgmv", f"row units {units.tolist()} outside the pool of {W.shape[0]} units (or -1 below a rank)")
    return units


def sgmv_shrink(x, W, seg_starts, a_rows, ranks, y, plan=None):
    compute = COMPUTE[x.dtype]
    in_features = x.shape[1]
    y.zero_()
    for i, tokens, slice_ranks in _segments(seg_starts, ranks):
        live = [(s, r) for s, r in enumerate(slice_ranks) if r > 0]
        units = torch.cat([_units(a_rows[i, s, :r], W, in_features) for s, r in live])
        a = gather_rows(W, units, in_features).to(compute)                       # [sum r, IN]
        product = x[tokens].to(compute) @ a.t()                                  # [L, sum r]
        pos = 0
        for s, r in live:
            y[tokens, s, :r] = product[:, pos : pos + r]
            pos += r


def sgmv_expand(y, W, seg_starts, b_rows, ranks, scales, slice_offsets, out, plan=None):
    offsets = slice_offsets.tolist()
    if offsets[0] != 0 or offsets[-1] != out.shape[1] or offsets != sorted(offsets):
        fail("sgmv_expand", f"slice_offsets {offsets} must rise from 0 to OUT_TOTAL={out.shape[1]}")
    scale_rows = scales.tolist()
    for i, tokens, slice_ranks in _segments(seg_starts, ranks):
        for s, r in enumerate(slice_ranks):
            if r == 0:
                continue  # untouched
            width = offsets[s + 1] - offsets[s]
            b = gather_rows(W, _units(b_rows[i, s, :r], W, width), width)       # [r, n_s]
            target = out[tokens, offsets[s] : offsets[s + 1]]                     # [L, n_s], row stride OUT_TOTAL
            if target.dtype == y.dtype:
                # one GEMM accumulating in place: the strided view is BLAS-addressable (no delta
                # tensor, no second pass over out)
                target.addmm_(y[tokens, s, :r], b.to(y.dtype), alpha=scale_rows[i][s])
            else:
                target.add_(y[tokens, s, :r] @ b.to(y.dtype), alpha=scale_rows[i][s])


class PreparedPrefill:
    """CPU backend of kernels.PrefillStep: what sgmv works out per segment (live slices, row
    units, whether they are one run of the pool) is worked out once per step; a call is, per
    segment with an adapter, one matmul for its lora_A rows (a view of the pool when they are
    one run) and one in-place GEMM per slice into `out` (no `y`)."""

    def __init__(self, seg_starts, a_rows, b_rows, ranks, scales, slice_offsets, W, in_features: int):
        offsets = slice_offsets.tolist()
        if offsets[0] != 0 or offsets != sorted(offsets):
            fail("prepare_prefill", f"slice_offsets {offsets} must rise from 0")
        self.in_features, self.compute = in_features, COMPUTE[W.dtype]
        scale_rows = scales.tolist()
        self.segments = []  # (tokens, A rows, [(slice columns, product columns, B rows, scale)])
        for i, tokens, slice_ranks in _segments(seg_starts, ranks):
            live = [(s, r) for s, r in enumerate(slice_ranks) if r > 0]
            a_units = torch.cat([_units(a_rows[i, s, :r], W, in_features) for s, r in live])
            expand, pos = [], 0
            for s, r in live:
                width = offsets[s + 1] - offsets[s]
                expand.append((slice(offsets[s], offsets[s + 1]), slice(pos, pos + r),
                               PoolRows(W, _units(b_rows[i, s, :r], W, width), width), scale_rows[i][s]))
                pos += r
            self.segments.append((tokens, PoolRows(W, a_units, in_features), expand))

    def __call__(self, x: torch.Tensor, W: torch.Tensor, out: torch.Tensor) -> None:
        for tokens, a_rows, expand in self.segments:
            xs = x[tokens].to(self.compute)                                      # [L, IN]
            product = xs @ a_rows.read(W).to(self.compute).t()                  # [L, sum r]
            for cols, part, b_rows, scale in expand:
                b = b_rows.read(W).to(self.compute)                             # [r, n_s]
                target = out[tokens, cols]                                      # strided view of out
                if target.dtype == self.compute:
                    target.addmm_(product[:, part], b, alpha=scale)
                else:
                    target.add_((product[:, part] @ b).to(target.dtype), alpha=scale)
