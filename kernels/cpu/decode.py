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
    for g in index.groups:
        a = gather_rows(W, g.units, in_features)                                  # [m, IN]
        parts.append((x.index_select(0, g.rows) @ a.t()).view(-1))               # [n * m]
    if parts:
        values = parts[0] if len(parts) == 1 else torch.cat(parts)
        y.view(-1).index_copy_(0, index.dest, values.to(y.dtype))


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
