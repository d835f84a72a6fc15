"""Punica-style LoRA kernels for batches of heterogeneous ranks: sgmv (prefill), mbgmv (decode).

Every op has three implementations behind one launcher: a Triton kernel (CUDA), a fast CPU
path (vectorised torch) and a plain torch reference. The launcher checks dtypes, shapes,
contiguity and device, then dispatches by the tensors' device (cuda -> "triton",
cpu -> "cpu") or by an explicit `backend=` ("triton", "cpu", "reference").

Layout (docs/DESIGN.md, "Adapter pool layout"): the pool of one layer is one buffer
`W [U, UNIT]` of units of UNIT elements. A module group (qkv, o, gate_up, down) has S slices
sharing one input of IN features; slice s has OUT_s output columns. Rank row j of slice s of
an adapter is two rows in W, each starting at a unit boundary: its lora_A row (IN elements
from unit `a_rows[i, s, j]`) and its lora_B column (= a row of lora_B^T, OUT_s elements from
unit `b_rows[i, s, j]`). An adapter stores only the slices it targets, each at its own rank,
so memory is its own bytes. Descriptors of row / segment i: a_rows / b_rows [N, S, R] (-1
past the slice's rank), ranks[i, s] (0: no adapter or slice not targeted), scales[i, s] (a
per-slice multiplier; CaraServe folds PEFT's lora_alpha / r into B when it loads an adapter
and passes ones).
Rank rows j >= ranks[i, s] are never read.

Punica's bgmv (padding to the batch's max rank) is mbgmv over descriptors padded by
`pad_to_max_rank`: every row with an adapter computes R rank rows of every slice, the padded
ones reading a zero row of the pool. Same kernels, the padded work of Punica.

Dtypes: x / W / out share float16, bfloat16 (meant for the GPU path; the CPU path accepts
it) or float32; y and scales are float32; a_rows, b_rows, ranks, seg_starts, slice_offsets
are int32. All contiguous, all on one device.

A decode step's LoRA over all layers: `step = prepare_decode(...)` once per forward step and
module group, then `step(x, W[layer], out)` per layer (kernels/decode_step.py): the arguments
are checked and the CPU's index plan built once, and the CPU path fuses shrink and expand.
Prefill likewise: `prepare_prefill(seg_starts, ...)` (kernels/prefill_step.py). The single
ops also take a CPU `plan = plan_rows(a_rows, b_rows, ranks)` (kernels/plan.py).
"""
from __future__ import annotations

import torch

from . import _checks as check
from ._checks import DATA_DTYPES, KernelArgumentError
from ._registry import lookup
from .decode_step import DecodeStep, prepare_decode
from .prefill_step import PrefillStep, prepare_prefill
from .plan import RowPlan, pad_to_max_rank, plan_rows

I32 = torch.int32
F32 = torch.float32

__all__ = [
    "sgmv_shrink", "sgmv_expand", "mbgmv_shrink", "mbgmv_expand", "mbgmv_expand_split", "plan_rows", "pad_to_max_rank", "RowPlan",
    "KernelArgumentError", "prepare_decode", "DecodeStep", "prepare_prefill", "PrefillStep",
]


def sgmv_shrink(x, W, seg_starts, a_rows, ranks, y, *, backend: str | None = None) -> None:
    """Prefill shrink: project every token of a segment into its adapter's rank space.

    Semantics (A_row(u) = W.view(-1)[u * UNIT : u * UNIT + IN]):
        for i in range(N):
            for t in range(seg_starts[i], seg_starts[i + 1]):
                for s in range(S):
                    for j in range(R):
                        y[t, s, j] = x[t] @ A_row(a_rows[i, s, j]) if j < ranks[i, s] else 0
        (segments tile the tokens: seg_starts[0] = 0, seg_starts[N] = T; every y is written)

    Shape:
        x:          [T, IN]          input tokens
        W:          [U, UNIT]        pool of one layer
        seg_starts: [N + 1] int32    token ranges of the segments
        a_rows:     [N, S, R] int32  first unit of lora_A row j of slice s of segment i
        ranks:      [N, S] int32     rank per slice (0: none)
        y:          [T, S, R] f32    output (fully overwritten)
    """
    op = "sgmv_shrink"
    tokens, _ = _data(op, "x", x, DATA_DTYPES, x.device, (None, None))
    _data(op, "W", W, x.dtype, x.device, (None, None))
    segs, slices, rank = _descriptors(op, "a_rows", a_rows, ranks, x.device)
    check.tensor(op, "seg_starts", seg_starts, (segs + 1,), I32, x.device)
    check.tensor(op, "y", y, (tokens, slices, rank), F32, x.device)
    lookup(op, backend, x.device)(x, W, seg_starts, a_rows, ranks, y)


def sgmv_expand(y, W, seg_starts, b_rows, ranks, scales, slice_offsets, out, *,
                backend: str | None = None) -> None:
    """Prefill expand: add every token's scaled LoRA delta to its slice columns of `out`.

    Semantics (B_row(u, s) = W.view(-1)[u * UNIT : u * UNIT + OUT_s]):
        for i in range(N):
            for t in range(seg_starts[i], seg_starts[i + 1]):
                for s in range(S):
                    if ranks[i, s] == 0: continue            # columns left bit-identical
                    cols = slice(slice_offsets[s], slice_offsets[s + 1])
                    out[t, cols] += scales[i, s] * sum(y[t, s, j] * B_row(b_rows[i, s, j], s)
                                                       for j in range(ranks[i, s]))

    Shape:
        y:             [T, S, R] f32   shrink output (y[t, s, j >= ranks] is not read)
        W:             [U, UNIT]       pool of one layer
        seg_starts:    [N + 1] int32
        b_rows:        [N, S, R] int32 first unit of lora_B^T row j of slice s of segment i
        ranks:         [N, S] int32
        scales:        [N, S] f32      per-slice multiplier (CaraServe: ones, lora_alpha / r is in B)
        slice_offsets: [S + 1] int32   column range of slice s in out; 0 .. OUT_TOTAL
        out:           [T, OUT_TOTAL]  accumulated in place
    """
    op = "sgmv_expand"
    tokens, slices, rank = _data(op, "y", y, F32, y.device, (None, None, None))
    _data(op, "W", W, DATA_DTYPES, y.device, (None, None))
    segs, _, _ = _descriptors(op, "b_rows", b_rows, ranks, y.device, slices, rank)
    check.tensor(op, "seg_starts", seg_starts, (segs + 1,), I32, y.device)
    _expand_common(op, W, scales, slice_offsets, out, segs, slices, tokens)
    lookup(op, backend, y.device)(y, W, seg_starts, b_rows, ranks, scales, slice_offsets, out)


def mbgmv_shrink(x, W, a_rows, ranks, y, *, plan: RowPlan | None = None, backend: str | None = None) -> None:
    """Decode shrink (S-LoRA MBGMV): one token per row, heterogeneous ranks, no padding.

    Semantics:
        for i in range(N):
            for s in range(S):
                for j in range(R):
                    y[i, s, j] = x[i] @ A_row(a_rows[i, s, j]) if j < ranks[i, s] else 0

    Shape:
        x:      [N, IN]
        W:      [U, UNIT]
        a_rows: [N, S, R] int32
        ranks:  [N, S] int32
        y:      [N, S, R] f32     fully overwritten
        plan:   RowPlan from plan_rows(a_rows, b_rows, ranks), CPU path only (optional)
    """
    op = "mbgmv_shrink"
    rows, _ = _data(op, "x", x, DATA_DTYPES, x.device, (None, None))
    _data(op, "W", W, x.dtype, x.device, (None, None))
    _, slices, rank = _descriptors(op, "a_rows", a_rows, ranks, x.device, rows=rows)
    check.tensor(op, "y", y, (rows, slices, rank), F32, x.device)
    lookup(op, backend, x.device)(x, W, a_rows, ranks, y, plan=plan)


def mbgmv_expand(y, W, b_rows, ranks, scales, slice_offsets, out, *, plan: RowPlan | None = None,
                 backend: str | None = None) -> None:
    """Decode expand (S-LoRA MBGMV): out[i, slice s] += scale * sum_j y[i, s, j] * B_row(b_rows[i, s, j], s).

    Semantics:
        for i in range(N):
            for s in range(S):
                if ranks[i, s] == 0: continue                # columns left bit-identical
                cols = slice(slice_offsets[s], slice_offsets[s + 1])
                out[i, cols] += scales[i, s] * sum(y[i, s, j] * B_row(b_rows[i, s, j], s)
                                                   for j in range(ranks[i, s]))

    Shape:
        y:             [N, S, R] f32
        W:             [U, UNIT]
        b_rows:        [N, S, R] int32
        ranks:         [N, S] int32
        scales:        [N, S] f32
        slice_offsets: [S + 1] int32
        out:           [N, OUT_TOTAL]    accumulated in place
        plan:          RowPlan from plan_rows(a_rows, b_rows, ranks), CPU path only (optional)
    """
    op = "mbgmv_expand"
    rows, slices, rank = _data(op, "y", y, F32, y.device, (None, None, None))
    _data(op, "W", W, DATA_DTYPES, y.device, (None, None))
    _descriptors(op, "b_rows", b_rows, ranks, y.device, slices, rank, rows)
    _expand_common(op, W, scales, slice_offsets, out, rows, slices, rows)
    lookup(op, backend, y.device)(y, W, b_rows, ranks, scales, slice_offsets, out, plan=plan)


def mbgmv_expand_split(y, W, b_rows, ranks, scales, slice_offsets, out_lo, out_hi, *,
                       backend: str | None = None) -> None:
    """mbgmv_expand whose output is two buffers, split at a slice boundary (the engine's qkv:
    q in one, k|v in the KV staging rows), accumulated in place with no scratch on Triton.

    Semantics (out = the columns of out_lo followed by those of out_hi):
        delta = zeros(N, OUT_TOTAL); mbgmv_expand(y, W, b_rows, ranks, scales, slice_offsets, delta)
        out_lo += delta[:, :OUT_lo]; out_hi += delta[:, OUT_lo:]
    (columns of rank-0 slices and rows without adapter are left bit-identical on Triton.)

    Shape:
        y:             [N, S, R] f32
        W:             [U, UNIT]
        b_rows:        [N, S, R] int32
        ranks, scales: [N, S] int32, f32
        slice_offsets: [S + 1] int32
        out_lo:        [N, OUT_lo]              unit column stride (rows may be strided)
        out_hi:        [N, OUT_TOTAL - OUT_lo]  unit column stride
    """
    op = "mbgmv_expand_split"
    rows, slices, rank = _data(op, "y", y, F32, y.device, (None, None, None))
    _data(op, "W", W, DATA_DTYPES, y.device, (None, None))
    _descriptors(op, "b_rows", b_rows, ranks, y.device, slices, rank, rows)
    check.tensor(op, "scales", scales, (rows, slices), F32, W.device)
    check.tensor(op, "slice_offsets", slice_offsets, (slices + 1,), I32, W.device)
    for name, t in (("out_lo", out_lo), ("out_hi", out_hi)):
        if t.dim() != 2 or t.shape[0] != rows or t.dtype != W.dtype or t.device != W.device or t.stride(1) != 1:
            check.fail(op, f"{name} must be a {W.dtype} [{rows}, *] on {W.device} with unit column stride, got "
                           f"{t.dtype} {list(t.shape)} strides {t.stride()}")
    lookup(op, backend, y.device)(y, W, b_rows, ranks, scales, slice_offsets, out_lo, out_hi)


# -- shared checks ---------------------------------------------------------------------------

def _data(op, name, t, dtype, device, shape) -> torch.Size:
    """A contiguous data tensor (x / W / y / out); returns its shape."""
    check.tensor(op, name, t, shape, dtype, device)
    return t.shape


def _descriptors(op, name, rows_table, ranks, device, slices=None, rank=None, rows=None) -> tuple[int, int, int]:
    """a_rows / b_rows [N, S, R] and ranks [N, S] int32; returns (N, S, R)."""
    check.tensor(op, name, rows_table, (rows, slices, rank), I32, device)
    rows, slices, rank = rows_table.shape
    check.tensor(op, "ranks", ranks, (rows, slices), I32, device)
    return rows, slices, rank


def _expand_common(op, W, scales, slice_offsets, out, rows, slices, out_rows) -> None:
    check.tensor(op, "scales", scales, (rows, slices), F32, W.device)
    check.tensor(op, "slice_offsets", slice_offsets, (slices + 1,), I32, W.device)
    check.tensor(op, "out", out, (out_rows, None), W.dtype, W.device)
