"""Plain torch reference of every op: loops over rows / segments and slices, float64 inside.

Written to be read, not to be fast. Every product is computed in float64 from the inputs as
given and rounded once when written to `y` / `out`, so with float64 `y` / `out` it is the
exact answer the other paths are compared against. Same signatures as the launchers
(`plan` is accepted and ignored). Tokens outside every segment get y = 0.
"""
from __future__ import annotations

import torch

ACC = torch.float64


def pool_rows(W: torch.Tensor, units: torch.Tensor, width: int) -> torch.Tensor:
    """Rows of `width` elements of the pool W [U, UNIT] starting at `units` ([r] int) -> [r, width]."""
    flat = W.reshape(-1)
    rows = []
    for u in units.tolist():
        assert u >= 0, f"a row table has -1 below its rank (units {units.tolist()})"
        start = u * W.shape[1]
        assert start + width <= flat.numel(), f"row at unit {u} of width {width} runs past the pool"
        rows.append(flat[start : start + width])
    return torch.stack(rows) if rows else flat.new_zeros((0, width))


def _segments(seg_starts: torch.Tensor):
    starts = seg_starts.tolist()
    for i in range(len(starts) - 1):
        assert starts[i] <= starts[i + 1], f"seg_starts must be non-decreasing, got {starts}"
        yield i, slice(starts[i], starts[i + 1])


def sgmv_shrink(x, W, seg_starts, a_rows, ranks, y, plan=None):
    y.zero_()
    in_features = x.shape[1]
    for i, tokens in _segments(seg_starts):
        for s in range(y.shape[1]):
            r = int(ranks[i, s])
            a = pool_rows(W, a_rows[i, s, :r], in_features).to(ACC)      # a: [r, IN]
            y[tokens, s, :r] = (x[tokens].to(ACC) @ a.T).to(y.dtype)


def sgmv_expand(y, W, seg_starts, b_rows, ranks, scales, slice_offsets, out, plan=None):
    offsets = slice_offsets.tolist()
    assert offsets[0] == 0 and offsets[-1] == out.shape[1], f"slice_offsets {offsets} vs out {list(out.shape)}"
    for i, tokens in _segments(seg_starts):
        for s in range(y.shape[1]):
            r = int(ranks[i, s])
            if r == 0:
                continue  # untouched, not "+= 0" (that would turn -0.0 into +0.0)
            cols = slice(offsets[s], offsets[s + 1])
            b = pool_rows(W, b_rows[i, s, :r], offsets[s + 1] - offsets[s]).to(ACC)   # b: [r, n_s]
            delta = float(scales[i, s]) * (y[tokens, s, :r].to(ACC) @ b)
            out[tokens, cols] = (out[tokens, cols].to(ACC) + delta).to(out.dtype)


def _one_token_segments(n: int, device) -> torch.Tensor:
    return torch.arange(n + 1, dtype=torch.int32, device=device)


def mbgmv_shrink(x, W, a_rows, ranks, y, plan=None):
    """Decode is prefill with segments of one token."""
    sgmv_shrink(x, W, _one_token_segments(x.shape[0], x.device), a_rows, ranks, y)


def mbgmv_expand(y, W, b_rows, ranks, scales, slice_offsets, out, plan=None):
    sgmv_expand(y, W, _one_token_segments(y.shape[0], y.device), b_rows, ranks, scales, slice_offsets, out)


def mbgmv_expand_split(y, W, b_rows, ranks, scales, slice_offsets, out_lo, out_hi, plan=None):
    """mbgmv_expand into a scratch [N, OUT_TOTAL], added to out_lo (leading columns) and out_hi."""
    delta = torch.zeros((y.shape[0], out_lo.shape[1] + out_hi.shape[1]), dtype=out_lo.dtype, device=y.device)
    mbgmv_expand(y, W, b_rows, ranks, scales, slice_offsets, delta)
    out_lo.add_(delta[:, : out_lo.shape[1]])
    out_hi.add_(delta[:, out_lo.shape[1]:])
