"""Fast CPU path for decode (mbgmv): a few whole-batch torch ops driven by a RowPlan.

shrink: y.zero_(); one sampled matmul (torch.sparse.sampled_addmm) for the rows whose adapter
        few rows use, one matmul per adapter used by many rows (dense group); one index_copy_.
expand: one embedding_bag over the pool viewed as [*, width] with y * scale as the
        per-sample weights (only live rank rows are indexed), one add_ / index_add_ into out.
Punica's bgmv is the same code over padded descriptors (kernels.pad_to_max_rank).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .._checks import fail
from ..plan import RowPlan, ShrinkIndex, _row_view, gather_rows, plan_rows

# dtype -> gather the batch's rows and compute in float32 ("compact"): sampled_addmm has no
# half kernels on the CPU and half matmuls are 4-10x slower than float32 there.
COMPACT: dict[torch.dtype, bool] = {
    torch.float16: True,
    torch.bfloat16: True,
    torch.float32: False,
    torch.float64: False,
}


def mbgmv_shrink(x, W, a_rows, ranks, y, plan: RowPlan | None = None):
    plan = plan or plan_rows(a_rows, a_rows, ranks)
    plan.check("mbgmv_shrink", *y.shape)
    plan.check_rows("mbgmv_shrink", W, plan.max_a_unit, x.shape[1])
    shrink(x, W, plan, y)


def mbgmv_expand(y, W, b_rows, ranks, scales, slice_offsets, out, plan: RowPlan | None = None):
    plan = plan or plan_rows(b_rows, b_rows, ranks)
    plan.check("mbgmv_expand", *y.shape)
    offsets = tuple(slice_offsets.tolist())
    if offsets[0] != 0 or offsets[-1] != out.shape[1] or list(offsets) != sorted(offsets):
        fail("mbgmv_expand", f"slice_offsets {list(offsets)} must rise from 0 to OUT_TOTAL={out.shape[1]}")
    for s, max_unit in enumerate(plan.max_b_units):
        plan.check_rows("mbgmv_expand", W, max_unit, offsets[s + 1] - offsets[s])
    expand(y, W, plan, scales, offsets, out)


def shrink(x: torch.Tensor, W: torch.Tensor, plan: RowPlan, y: torch.Tensor) -> None:
    """y[i, s, j] = x[i] . A_row(a_rows[i, s, j]) for live (i, s, j), 0 elsewhere."""
    in_features = x.shape[1]
    index = plan.shrink_index(W.shape[1], in_features, COMPACT[x.dtype])
    y.zero_()
    parts = []
    if index.col.numel():
        values = _sampled(x, W, index, in_features)
        parts.append(values if index.repeat is None else values.index_select(0, index.repeat))
    parts += _dense(x, W, index, in_features)
    if parts:
        values = parts[0] if len(parts) == 1 else torch.cat(parts)
        y.view(-1).index_copy_(0, index.dest, values.to(y.dtype))


def _dense(x: torch.Tensor, W: torch.Tensor, index: ShrinkIndex, in_features: int) -> list:
    """x[rows] @ A^T of every dense group, flattened ([n * m] each)."""
    parts = []
    for g in index.groups:
        if g.first >= 0:                                                          # one run: a view
            a = _row_view(W, in_features).narrow(0, g.first, len(g.units))         # [m, IN]
        else:
            a = gather_rows(W, g.units, in_features)                              # [m, IN]
        xs = x if len(g.rows) == x.shape[0] else x.index_select(0, g.rows)      # [n, IN]
        parts.append((xs @ a.t()).view(-1))                                      # [n * m]
    return parts


def _sampled(x: torch.Tensor, W: torch.Tensor, index: ShrinkIndex, in_features: int) -> torch.Tensor:
    """Values of the sampled matmul x @ A^T at the plan's (row, lora_A row) pairs."""
    if index.gathered is not None:  # compact: only the batch's rows, upcast
        a = gather_rows(W, index.gathered, in_features).float()                   # [m, IN]
        x = x.float()
    else:
        a = _row_view(W, in_features)                                             # [U * UNIT / IN, IN]
    return torch.sparse.sampled_addmm(index.pattern(a.shape[0], x.dtype), x, a.t(), beta=0.0).values()


def expand(y: torch.Tensor, W: torch.Tensor, plan: RowPlan, scales: torch.Tensor,
           offsets: tuple[int, ...], out: torch.Tensor) -> None:
    """out[i, off_s + c] += scales[i, s] * sum_{live j} y[i, s, j] * B_row(b_rows[i, s, j], s)[c]."""
    index = plan.expand_index(W.shape[1], offsets)
    if not index.idx.numel():
        return
    weights = (y * scales.unsqueeze(2)).view(-1).index_select(0, index.wpos).to(W.dtype)
    delta = F.embedding_bag(index.idx, W.view(-1, index.width), index.bag_offsets,
                            mode="sum", per_sample_weights=weights)              # [bags, width]
    chunks = out.view(-1, index.width)
    if index.bags is None:
        chunks.add_(delta)
    else:
        chunks.index_add_(0, index.bags, delta)


class PreparedDecode:
    """CPU backend of kernels.DecodeStep: the shrink's values feed the expand's weights directly.

    Built once per step and group: the RowPlan's shrink and expand indexes for this pool shape,
    the CSR pattern, and `src`, the position among the shrink's values of each expand term's
    weight; so a call is the sampled matmul (+ one matmul per dense group), one index_select,
    one embedding_bag and one add into `out`. No `y`: the two-op path's zeroing, index_copy_
    and scale multiply (scales are 1 when the loader folds alpha / r into B) are gone.
    """

    def __init__(self, a_rows, b_rows, ranks, scales, slice_offsets, W, in_features: int):
        plan = plan_rows(a_rows, b_rows, ranks)
        n, s_count, r = plan.num_rows, plan.num_slices, plan.max_rank
        offsets = tuple(slice_offsets.tolist())
        if offsets[0] != 0 or list(offsets) != sorted(offsets):
            fail("prepare_decode", f"slice_offsets {list(offsets)} must rise from 0")
        plan.check_rows("prepare_decode", W, plan.max_a_unit, in_features)
        for s, max_unit in enumerate(plan.max_b_units):
            plan.check_rows("prepare_decode", W, max_unit, offsets[s + 1] - offsets[s])
        self.in_features = in_features
        self.shrink = plan.shrink_index(W.shape[1], in_features, COMPACT[W.dtype])
        self.expand = plan.expand_index(W.shape[1], offsets)
        self.empty = self.expand.idx.numel() == 0
        # position of every y element among the shrink's values (sampled part first, as `dest`)
        position = torch.full((n * s_count * r,), -1, dtype=torch.int64)
        position[self.shrink.dest] = torch.arange(len(self.shrink.dest))
        src = position[self.expand.wpos]
        self.repeat = self.shrink.repeat
        if self.repeat is not None and not self.shrink.groups:
            src, self.repeat = self.repeat[src], None                         # fold the repeat in
        self.src = src
        term_scales = scales.to("cpu", torch.float32).reshape(-1)[self.expand.wpos // r]
        self.term_scales = None if bool((term_scales == 1).all()) else term_scales
        if self.shrink.col.numel():
            num_cols = (len(self.shrink.gathered) if self.shrink.gathered is not None
                        else _row_view(W, in_features).shape[0])
            dtype = torch.float32 if self.shrink.gathered is not None else W.dtype
            self.pattern = self.shrink.pattern(num_cols, dtype)

    def __call__(self, x: torch.Tensor, W: torch.Tensor, out: torch.Tensor) -> None:
        if self.empty:
            return
        index = self.shrink
        parts = []
        if index.col.numel():
            if index.gathered is not None:  # compact: only the batch's rows, upcast
                a, xs = gather_rows(W, index.gathered, self.in_features).float(), x.float()
            else:
                a, xs = _row_view(W, self.in_features), x
            values = torch.sparse.sampled_addmm(self.pattern, xs, a.t(), beta=0.0).values()
            parts.append(values if self.repeat is None else values.index_select(0, self.repeat))
        parts += _dense(x, W, index, self.in_features)
        values = parts[0] if len(parts) == 1 else torch.cat(parts)
        weights = values.index_select(0, self.src)
        if self.term_scales is not None:
            weights = weights.float() * self.term_scales
        expand = self.expand
        delta = F.embedding_bag(expand.idx, W.view(-1, expand.width), expand.bag_offsets, mode="sum",
                                per_sample_weights=weights.to(W.dtype))   # [bags, width]
        chunks = out.view(-1, expand.width)
        if expand.bags is None:
            chunks.add_(delta)
        else:
            chunks.index_add_(0, expand.bags, delta)
