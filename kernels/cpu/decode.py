"""Fast CPU path for decode (mbgmv, bgmv): a few whole-batch torch ops driven by a RowPlan.

shrink: y.zero_(); one sampled matmul (torch.sparse.sampled_addmm) for the rows whose adapter
        few rows use, one matmul per adapter used by many rows (dense group); one index_copy_.
expand: one embedding_bag over B viewed as [pages * chunks, width] with y * scale as the
        per-sample weights (only live rank rows are indexed), one add_ / index_add_ into out.
bgmv is mbgmv over the stacked pool with a page table derived from the slots (plan_slots).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .._checks import fail
from ..plan import RowPlan, ShrinkIndex, plan_rows, plan_slots

# dtype -> gather the batch's pages and compute in float32 ("compact"): sampled_addmm has no
# half kernels on the CPU and half matmuls are 4-10x slower than float32 there.
COMPACT: dict[torch.dtype, bool] = {
    torch.float16: True,
    torch.bfloat16: True,
    torch.float32: False,
    torch.float64: False,
}


def mbgmv_shrink(x, A, page_table, ranks, y, plan: RowPlan | None = None):
    plan = _checked("mbgmv_shrink", plan or plan_rows(page_table, ranks), y, A.shape[0])
    shrink(x, A, plan, y)


def mbgmv_expand(y, B, page_table, ranks, scales, slice_offsets, out, plan: RowPlan | None = None):
    plan = _checked("mbgmv_expand", plan or plan_rows(page_table, ranks), y, B.shape[0])
    expand(y, B, plan, scales, slice_offsets, out)


def bgmv_shrink(x, A_stacked, slots, y, plan: RowPlan | None = None):
    slot_count, slot_rank, s_count, in_features = A_stacked.shape
    plan = _checked("bgmv_shrink", plan or plan_slots(slots, y.shape[2], slot_rank, s_count), y,
                    slot_count * slot_rank)
    shrink(x, A_stacked.view(-1, s_count, in_features), plan, y)


def bgmv_expand(y, B_stacked, slots, scales, slice_offsets, out, plan: RowPlan | None = None):
    slot_count, slot_rank, out_total = B_stacked.shape
    plan = _checked("bgmv_expand", plan or plan_slots(slots, y.shape[2], slot_rank, y.shape[1]), y,
                    slot_count * slot_rank)
    expand(y, B_stacked.view(-1, out_total), plan, scales, slice_offsets, out)


def _checked(op: str, plan: RowPlan, y: torch.Tensor, pool_pages: int) -> RowPlan:
    rows, slices, rank = y.shape
    plan.check(op, rows, rank, slices, pool_pages)
    return plan


def shrink(x: torch.Tensor, A: torch.Tensor, plan: RowPlan, y: torch.Tensor) -> None:
    """y[i, s, j] = x[i] . A[page_table[i, j], s] for live (i, j, s), 0 elsewhere."""
    index = plan.shrink_index(COMPACT[x.dtype])
    y.zero_()
    parts = []
    if index.col.numel():
        parts.append(_sampled(x, A, index))
    for g in index.groups:
        a = A.narrow(0, g.first_page, g.rank) if g.pages is None else A.index_select(0, g.pages)
        product = x.index_select(0, g.rows) @ a.view(-1, a.shape[-1]).t()        # [n, rank * S]
        parts.append(product.view(-1).index_select(0, g.src))
    if parts:
        values = parts[0] if len(parts) == 1 else torch.cat(parts)
        y.view(-1).index_copy_(0, index.dest, values.to(y.dtype))


def _sampled(x: torch.Tensor, A: torch.Tensor, index: ShrinkIndex) -> torch.Tensor:
    """Values of the sampled matmul x @ A.view(P * S, IN)^T at the plan's (row, page*S+s)."""
    if index.pages is not None:  # compact: only the batch's pages, upcast
        A = A.index_select(0, index.pages).float()
        x = x.float()
    a = A.view(-1, A.shape[-1])                                                  # [pages * S, IN]
    return torch.sparse.sampled_addmm(index.pattern(a.shape[0], x.dtype), x, a.t(), beta=0.0).values()


def expand(y: torch.Tensor, B: torch.Tensor, plan: RowPlan, scales: torch.Tensor,
           slice_offsets: torch.Tensor, out: torch.Tensor) -> None:
    """out[i, off_s + c] += scales[i, s] * sum_{live j} y[i, s, j] * B[page_table[i, j], off_s + c]."""
    offsets = tuple(slice_offsets.tolist())
    if offsets[0] != 0 or offsets[-1] != B.shape[1] or list(offsets) != sorted(offsets):
        fail("expand", f"slice_offsets {list(offsets)} must rise from 0 to OUT_TOTAL={B.shape[1]}")
    index = plan.expand_index(offsets)
    if not index.idx.numel():
        return
    weights = (y * scales.unsqueeze(2)).view(-1).index_select(0, index.wpos).to(B.dtype)
    delta = F.embedding_bag(index.idx, B.view(-1, index.width), index.bag_offsets,
                            mode="sum", per_sample_weights=weights)              # [bags, width]
    chunks = out.view(-1, index.width)
    if index.bags is None:
        chunks.add_(delta)
    else:
        chunks.index_add_(0, index.bags, delta)
