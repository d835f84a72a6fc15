"""Punica-style LoRA kernels for batches of heterogeneous ranks: sgmv, mbgmv, bgmv.

Every op has three implementations behind one launcher: a Triton kernel (CUDA), a fast CPU
path (vectorised torch) and a plain torch reference. The launcher checks dtypes, shapes,
contiguity and device, then dispatches by the tensors' device (cuda -> "triton",
cpu -> "cpu") or by an explicit `backend=` ("triton", "cpu", "reference").

Layout (docs/DESIGN.md): a module group (qkv, o, gate_up, down) has S slices sharing one
input. The pool holds per layer and group `A [P, S, IN]` and `B [P, OUT_TOTAL]`; page p is
one rank row of an adapter (A: row j of each slice's lora_A; B: row j of lora_B^T, slice s
in columns slice_offsets[s]:slice_offsets[s+1]). Descriptors of row / segment i:
page_table[i, j] (page of rank row j, -1 past the adapter's rank), ranks[i, s] (0: no
adapter or slice not targeted), scales[i, s] (a per-slice multiplier; CaraServe folds
PEFT's lora_alpha / r into B when it loads an adapter and passes ones). Rank rows j >= ranks[i, s] of a slice are
never read (bgmv excepted: slot mode reads the padded rows, which the pool keeps zero).

Dtypes: x / A / B / out share float16, bfloat16 (meant for the GPU path; the CPU path accepts
it) or float32; y and scales are float32; page_table, ranks, seg_starts, slots, slice_offsets
are int32. All contiguous, all on one device.

Decode on the CPU: build `plan = plan_rows(page_table, ranks)` (bgmv: `plan_slots(...)`) once
per forward step and module group and pass `plan=` to every mbgmv / bgmv call of that group;
see kernels/plan.py. Other paths ignore it.
"""
from __future__ import annotations

import torch

from . import _checks as check
from ._checks import DATA_DTYPES, KernelArgumentError
from ._registry import lookup
from .plan import RowPlan, plan_rows, plan_slots

I32 = torch.int32
F32 = torch.float32

__all__ = [
    "sgmv_shrink", "sgmv_expand", "mbgmv_shrink", "mbgmv_expand", "bgmv_shrink", "bgmv_expand",
    "plan_rows", "plan_slots", "RowPlan", "KernelArgumentError",
]


def sgmv_shrink(x, A, seg_starts, page_table, ranks, y, *, backend: str | None = None) -> None:
    """Prefill shrink: project every token of a segment into its adapter's rank space.

    Semantics:
        for i in range(N):
            for t in range(seg_starts[i], seg_starts[i + 1]):
                for s in range(S):
                    for j in range(R):
                        y[t, s, j] = x[t] @ A[page_table[i, j], s] if j < ranks[i, s] else 0
        (segments tile the tokens: seg_starts[0] = 0, seg_starts[N] = T; every y is written)

    Shape:
        x:          [T, IN]        input tokens
        A:          [P, S, IN]     pool, page p slice s = one row of that slice's lora_A
        seg_starts: [N + 1] int32  token ranges of the segments
        page_table: [N, R] int32   page of rank row j of segment i's adapter
        ranks:      [N, S] int32   rank per slice (0: none)
        y:          [T, S, R] f32  output (fully overwritten)
    """
    op = "sgmv_shrink"
    tokens, in_features = _data(op, "x", x, DATA_DTYPES, x.device, (None, None))
    _, slices, _ = _data(op, "A", A, x.dtype, x.device, (None, None, in_features))
    segs, rank = _descriptors(op, page_table, ranks, slices, x.device)
    check.tensor(op, "seg_starts", seg_starts, (segs + 1,), I32, x.device)
    check.tensor(op, "y", y, (tokens, slices, rank), F32, x.device)
    lookup(op, backend, x.device)(x, A, seg_starts, page_table, ranks, y)


def sgmv_expand(y, B, seg_starts, page_table, ranks, scales, slice_offsets, out, *,
                backend: str | None = None) -> None:
    """Prefill expand: add every token's scaled LoRA delta to its slice columns of `out`.

    Semantics:
        for i in range(N):
            for t in range(seg_starts[i], seg_starts[i + 1]):
                for s in range(S):
                    if ranks[i, s] == 0: continue            # columns left bit-identical
                    cols = slice(slice_offsets[s], slice_offsets[s + 1])
                    out[t, cols] += scales[i, s] * sum(y[t, s, j] * B[page_table[i, j], cols]
                                                       for j in range(ranks[i, s]))

    Shape:
        y:             [T, S, R] f32   shrink output (y[t, s, j >= ranks] is not read)
        B:             [P, OUT_TOTAL]  pool, page p = one row of every slice's lora_B^T
        seg_starts:    [N + 1] int32
        page_table:    [N, R] int32
        ranks:         [N, S] int32
        scales:        [N, S] f32      per-slice multiplier (CaraServe: ones, lora_alpha / r is in B)
        slice_offsets: [S + 1] int32   column range of slice s in B / out; 0 .. OUT_TOTAL
        out:           [T, OUT_TOTAL]  accumulated in place
    """
    op = "sgmv_expand"
    out_total = _expand_common(op, y, B, slice_offsets)
    tokens, slices, rank = y.shape
    segs, _ = _descriptors(op, page_table, ranks, slices, y.device, rank)
    check.tensor(op, "seg_starts", seg_starts, (segs + 1,), I32, y.device)
    check.tensor(op, "scales", scales, (segs, slices), F32, y.device)
    check.tensor(op, "out", out, (tokens, out_total), B.dtype, y.device)
    lookup(op, backend, y.device)(y, B, seg_starts, page_table, ranks, scales, slice_offsets, out)


def mbgmv_shrink(x, A, page_table, ranks, y, *, plan: RowPlan | None = None,
                 backend: str | None = None) -> None:
    """Decode shrink (S-LoRA MBGMV): one token per row, heterogeneous ranks, no padding.

    Semantics:
        for i in range(N):
            for s in range(S):
                for j in range(R):
                    y[i, s, j] = x[i] @ A[page_table[i, j], s] if j < ranks[i, s] else 0

    Shape:
        x:          [N, IN]
        A:          [P, S, IN]
        page_table: [N, R] int32
        ranks:      [N, S] int32
        y:          [N, S, R] f32     fully overwritten
        plan:       RowPlan from plan_rows(page_table, ranks), CPU path only (optional)
    """
    op = "mbgmv_shrink"
    rows, in_features = _data(op, "x", x, DATA_DTYPES, x.device, (None, None))
    _, slices, _ = _data(op, "A", A, x.dtype, x.device, (None, None, in_features))
    _, rank = _descriptors(op, page_table, ranks, slices, x.device, rows=rows)
    check.tensor(op, "y", y, (rows, slices, rank), F32, x.device)
    lookup(op, backend, x.device)(x, A, page_table, ranks, y, plan=plan)


def mbgmv_expand(y, B, page_table, ranks, scales, slice_offsets, out, *, plan: RowPlan | None = None,
                 backend: str | None = None) -> None:
    """Decode expand (S-LoRA MBGMV): out[i] += scale * y[i, s, :rank] @ B[pages of row i, slice s].

    Semantics:
        for i in range(N):
            for s in range(S):
                if ranks[i, s] == 0: continue                # columns left bit-identical
                cols = slice(slice_offsets[s], slice_offsets[s + 1])
                out[i, cols] += scales[i, s] * sum(y[i, s, j] * B[page_table[i, j], cols]
                                                   for j in range(ranks[i, s]))

    Shape:
        y:             [N, S, R] f32
        B:             [P, OUT_TOTAL]
        page_table:    [N, R] int32
        ranks:         [N, S] int32
        scales:        [N, S] f32
        slice_offsets: [S + 1] int32
        out:           [N, OUT_TOTAL]    accumulated in place
        plan:          RowPlan from plan_rows(page_table, ranks), CPU path only (optional)
    """
    op = "mbgmv_expand"
    out_total = _expand_common(op, y, B, slice_offsets)
    rows, slices, rank = y.shape
    _descriptors(op, page_table, ranks, slices, y.device, rank, rows)
    check.tensor(op, "scales", scales, (rows, slices), F32, y.device)
    check.tensor(op, "out", out, (rows, out_total), B.dtype, y.device)
    lookup(op, backend, y.device)(y, B, page_table, ranks, scales, slice_offsets, out, plan=plan)


def bgmv_shrink(x, A_stacked, slots, y, *, plan: RowPlan | None = None, backend: str | None = None) -> None:
    """Decode shrink (Punica BGMV): every row computes all R rank rows of its slot (padded).

    Semantics:
        for i in range(N):
            for s in range(S):
                y[i, s, :] = A_stacked[slots[i], :R, s] @ x[i] if slots[i] >= 0 else 0

    Shape:
        x:         [N, IN]
        A_stacked: [NS, RS, S, IN]   the pool in slot mode, A.view(NS, RS, S, IN)
        slots:     [N] int32         slot of row i's adapter, -1: none
        y:         [N, S, R] f32     R <= RS: the batch's max rank; fully overwritten
        plan:      RowPlan from plan_slots(slots, R, RS, S), CPU path only (optional)
    """
    op = "bgmv_shrink"
    rows, in_features = _data(op, "x", x, DATA_DTYPES, x.device, (None, None))
    _, slot_rank, slices, _ = _data(op, "A_stacked", A_stacked, x.dtype, x.device,
                                    (None, None, None, in_features))
    check.tensor(op, "slots", slots, (rows,), I32, x.device)
    check.tensor(op, "y", y, (rows, slices, None), F32, x.device)
    check.rank_room(op, y.shape[2], slot_rank)
    lookup(op, backend, x.device)(x, A_stacked, slots, y, plan=plan)


def bgmv_expand(y, B_stacked, slots, scales, slice_offsets, out, *, plan: RowPlan | None = None,
                backend: str | None = None) -> None:
    """Decode expand (Punica BGMV): out[i] += scale * y[i, s, :R] @ B_stacked[slot, :R, slice s].

    Semantics:
        for i in range(N):
            if slots[i] < 0: continue                        # row left bit-identical
            for s in range(S):
                cols = slice(slice_offsets[s], slice_offsets[s + 1])
                out[i, cols] += scales[i, s] * y[i, s, :R] @ B_stacked[slots[i], :R, cols]

    Shape:
        y:             [N, S, R] f32    R <= RS
        B_stacked:     [NS, RS, OUT_TOTAL]   B.view(NS, RS, OUT_TOTAL)
        slots:         [N] int32
        scales:        [N, S] f32
        slice_offsets: [S + 1] int32
        out:           [N, OUT_TOTAL]   accumulated in place
        plan:          RowPlan from plan_slots(slots, R, RS, S), CPU path only (optional)
    """
    op = "bgmv_expand"
    rows, slices, rank = _data(op, "y", y, F32, y.device, (None, None, None))
    _, slot_rank, out_total = _data(op, "B_stacked", B_stacked, DATA_DTYPES, y.device, (None, None, None))
    check.rank_room(op, rank, slot_rank)
    check.tensor(op, "slots", slots, (rows,), I32, y.device)
    check.tensor(op, "scales", scales, (rows, slices), F32, y.device)
    check.tensor(op, "slice_offsets", slice_offsets, (slices + 1,), I32, y.device)
    check.tensor(op, "out", out, (rows, out_total), B_stacked.dtype, y.device)
    lookup(op, backend, y.device)(y, B_stacked, slots, scales, slice_offsets, out, plan=plan)


# -- shared checks ---------------------------------------------------------------------------

def _data(op, name, t, dtype, device, shape) -> torch.Size:
    """A contiguous data tensor (x / A / B / y / out); returns its shape."""
    check.tensor(op, name, t, shape, dtype, device)
    return t.shape


def _descriptors(op, page_table, ranks, slices, device, rank=None, rows=None) -> tuple[int, int]:
    """page_table [N, R] and ranks [N, S] int32; returns (N, R)."""
    check.tensor(op, "page_table", page_table, (rows, rank), I32, device)
    rows, rank = page_table.shape
    check.tensor(op, "ranks", ranks, (rows, slices), I32, device)
    return rows, rank


def _expand_common(op, y, B, slice_offsets) -> int:
    """y [*, S, R] f32, B [P, OUT_TOTAL], slice_offsets [S + 1] int32; returns OUT_TOTAL."""
    _, slices, _ = _data(op, "y", y, F32, y.device, (None, None, None))
    _, out_total = _data(op, "B", B, DATA_DTYPES, y.device, (None, None))
    check.tensor(op, "slice_offsets", slice_offsets, (slices + 1,), I32, y.device)
    return out_total
