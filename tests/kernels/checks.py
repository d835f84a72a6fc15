"""One check per op family: run a path through its launcher, compare with the float64 reference.

shrink: y is NaN before the call; after it y must match the reference everywhere and be
        exactly 0 past every slice's rank (an unwritten element stays NaN and fails).
expand: fed the reference y with every element past the ranks set to NaN (must not be read);
        out_after must equal out_before + delta, and elements of rank-0 slices / rows without
        adapter must keep their exact bits (out_before holds -0.0 entries).
"""
from __future__ import annotations

import math

import torch

import kernels
from kernels import reference
from tests.testing import assert_close

from .batches import (Geometry, bits, fill_pool, inputs, live_mask, make_batch, make_pool, out_before,
                      segment_starts, touched_columns)


def nan_y(rows: int, slices: int, rank: int) -> torch.Tensor:
    return torch.full((rows, slices, rank), math.nan, dtype=torch.float32)


def check_shrink_result(y, y_ref, live, dtype, msg):
    assert_close(y, y_ref, dtype=dtype, msg=f"{msg}: shrink y")
    assert bool((y[~live] == 0).all()), f"{msg}: shrink left non-zero y past a slice's rank"


def expand_input(y_ref: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
    y = y_ref.float()
    y[~live] = math.nan
    return y


def check_expand_result(out, expected, out0, touched, dtype, msg):
    assert_close(out, expected, dtype=dtype, msg=f"{msg}: expand out")
    assert torch.equal(bits(out[~touched]), bits(out0[~touched])), \
        f"{msg}: expand changed elements of rank-0 slices / rows without adapter"


def _on(device, *tensors):
    """Copies of `tensors` on `device`: the kernel under test runs there (tests/cuda passes the
    GPU); batches and the float64 reference stay on the CPU."""
    return [t.to(device, copy=True) for t in tensors]


def check_mbgmv(gen, backend, geometry: Geometry, mix: str, rows: int, max_rank: int, dtype,
                contiguous: bool, make_plan=None, layers: int = 1, padded: bool = False, msg: str = "",
                device="cpu"):
    """mbgmv shrink + expand; with make_plan the plan is built once and reused for `layers` pools.
    padded: Punica's bgmv, the descriptors padded to the batch's max rank (kernels.pad_to_max_rank)."""
    batch = make_batch(gen, geometry, mix, rows, max_rank)
    pool = make_pool(gen, batch, dtype, contiguous)
    a_rows, b_rows, ranks = batch.rows(pool, "A"), batch.rows(pool, "B"), batch.ranks()
    if padded:
        a_rows, b_rows, ranks = kernels.pad_to_max_rank(a_rows, b_rows, ranks, pool.zero_unit)
    plan = make_plan(a_rows, b_rows, ranks) if make_plan else None
    live = live_mask(ranks, a_rows.shape[2])
    for layer in range(layers):
        if layer:
            pool = fill_pool(gen, batch, pool)
        where = f"{msg} mbgmv{' padded' if padded else ''} {backend} layer {layer} ranks {ranks.tolist()}"
        x = inputs(gen, rows, geometry.in_features, dtype)
        y = nan_y(rows, geometry.slices, a_rows.shape[2])
        W, d_a, d_b, d_ranks, y = _on(device, pool.W, a_rows, b_rows, ranks, y)
        kernels.mbgmv_shrink(*_on(device, x), W, d_a, d_ranks, y, plan=plan, backend=backend)
        y = y.cpu()
        y_ref = torch.empty(y.shape, dtype=torch.float64)
        reference.mbgmv_shrink(x, pool.W, a_rows, ranks, y_ref)
        check_shrink_result(y, y_ref, live, dtype, where)

        y_in = expand_input(y_ref, live)
        scales, offsets = batch.scales(gen), geometry.slice_offsets()
        out0 = out_before(gen, rows, geometry.out_total, dtype)
        out = out0.to(device, copy=True)
        kernels.mbgmv_expand(*_on(device, y_in), W, d_b, d_ranks, *_on(device, scales, offsets), out, plan=plan,
                             backend=backend)
        out = out.cpu()
        expected = out0.double()
        reference.mbgmv_expand(y_in, pool.W, b_rows, ranks, scales, offsets, expected)
        check_expand_result(out, expected, out0, touched_columns(ranks, geometry), dtype, where)


def check_mbgmv_expand_split(gen, backend, geometry: Geometry, mix: str, rows: int, max_rank: int, dtype,
                             padded: bool = False, device="cpu"):
    """mbgmv_expand_split: the expand's output in two buffers split after the first slice, the
    second one strided rows of a wider buffer (the engine's KV staging rows); against the float64
    reference expand into one buffer. On Triton, rank-0 columns keep their exact bits in both."""
    batch = make_batch(gen, geometry, mix, rows, max_rank)
    pool = make_pool(gen, batch, dtype, False)
    a_rows, b_rows, ranks = batch.rows(pool, "A"), batch.rows(pool, "B"), batch.ranks()
    if padded:
        a_rows, b_rows, ranks = kernels.pad_to_max_rank(a_rows, b_rows, ranks, pool.zero_unit)
    live = live_mask(ranks, a_rows.shape[2])
    x = inputs(gen, rows, geometry.in_features, dtype)
    y_ref = torch.empty((rows, geometry.slices, a_rows.shape[2]), dtype=torch.float64)
    reference.mbgmv_shrink(x, pool.W, a_rows, ranks, y_ref)
    y_in = expand_input(y_ref, live)
    scales, offsets = batch.scales(gen), geometry.slice_offsets()
    split = int(offsets[1])
    out0 = out_before(gen, rows, geometry.out_total, dtype)
    lo = out0[:, :split].contiguous().to(device)
    wide = torch.full((rows, geometry.out_total - split + 3), 7.0, dtype=dtype)   # 3 extra columns per row
    wide[:, : geometry.out_total - split] = out0[:, split:]
    wide = wide.to(device)
    hi = wide[:, : geometry.out_total - split]                                    # strided rows
    W, d_b, d_ranks = _on(device, pool.W, b_rows, ranks)
    kernels.mbgmv_expand_split(*_on(device, y_in), W, d_b, d_ranks, *_on(device, scales, offsets), lo, hi,
                               backend=backend)
    out = torch.cat([lo.cpu(), hi.cpu()], 1)
    expected = out0.double()
    reference.mbgmv_expand(y_in, pool.W, b_rows, ranks, scales, offsets, expected)
    where = f"mbgmv_expand_split {backend} ranks {ranks.tolist()}"
    if backend == "triton" or (backend is None and torch.device(device).type == "cuda"):
        # the fused store skips untouched columns; scratch + add turns -0.0 into 0.0
        check_expand_result(out, expected, out0, touched_columns(ranks, geometry), dtype, where)
    else:
        assert_close(out, expected, dtype=dtype, msg=f"{where}: expand out")
    assert bool((wide.cpu()[:, geometry.out_total - split:] == 7.0).all()), f"{where}: wrote past out_hi's columns"


def check_sgmv(gen, backend, geometry: Geometry, mix: str, segments: int, max_len: int, max_rank: int,
               dtype, contiguous: bool, msg: str = "", device="cpu"):
    batch = make_batch(gen, geometry, mix, segments, max_rank)
    pool = make_pool(gen, batch, dtype, contiguous)
    a_rows, b_rows, ranks = batch.rows(pool, "A"), batch.rows(pool, "B"), batch.ranks()
    seg_starts = segment_starts(gen, segments, max_len)
    tokens = int(seg_starts[-1])
    where = f"{msg} sgmv {backend} seg_starts {seg_starts.tolist()} ranks {ranks.tolist()}"
    token_ranks = ranks.repeat_interleave(seg_starts.diff().long(), dim=0)        # [T, S]
    live = live_mask(token_ranks, a_rows.shape[2])

    x = inputs(gen, tokens, geometry.in_features, dtype)
    y = nan_y(tokens, geometry.slices, a_rows.shape[2])
    W, d_seg, d_a, d_b, d_ranks, d_y = _on(device, pool.W, seg_starts, a_rows, b_rows, ranks, y)
    kernels.sgmv_shrink(*_on(device, x), W, d_seg, d_a, d_ranks, d_y, backend=backend)
    y = d_y.cpu()
    y_ref = torch.empty(y.shape, dtype=torch.float64)
    reference.sgmv_shrink(x, pool.W, seg_starts, a_rows, ranks, y_ref)
    check_shrink_result(y, y_ref, live, dtype, where)

    y_in = expand_input(y_ref, live)
    scales, offsets = batch.scales(gen), geometry.slice_offsets()
    out0 = out_before(gen, tokens, geometry.out_total, dtype)
    out = out0.to(device, copy=True)
    kernels.sgmv_expand(*_on(device, y_in), W, d_seg, d_b, d_ranks, *_on(device, scales, offsets), out,
                        backend=backend)
    out = out.cpu()
    expected = out0.double()
    reference.sgmv_expand(y_in, pool.W, seg_starts, b_rows, ranks, scales, offsets, expected)
    check_expand_result(out, expected, out0, touched_columns(token_ranks, geometry), dtype, where)


def geometry(groups: dict, name: str) -> Geometry:
    in_features, outs = groups[name]
    return Geometry(in_features, outs)


def check_decode_step(gen, backend, geometry: Geometry, mix: str, rows: int, max_rank: int, dtype,
                      contiguous: bool, layers: int = 3, padded: bool = False, msg: str = "", device="cpu"):
    """kernels.prepare_decode once, then one call per layer (fresh pool values each): out must
    equal out_before + the float64 reference's shrink-then-expand, untouched elements bit-equal."""
    batch = make_batch(gen, geometry, mix, rows, max_rank)
    pool = make_pool(gen, batch, dtype, contiguous)
    a_rows, b_rows, ranks = batch.rows(pool, "A"), batch.rows(pool, "B"), batch.ranks()
    if padded:
        a_rows, b_rows, ranks = kernels.pad_to_max_rank(a_rows, b_rows, ranks, pool.zero_unit)
    scales, offsets = batch.scales(gen), geometry.slice_offsets()
    W, d_a, d_b, d_ranks, d_scales, d_offsets = _on(device, pool.W, a_rows, b_rows, ranks, scales, offsets)
    step = kernels.prepare_decode(d_a, d_b, d_ranks, d_scales, d_offsets, W, geometry.in_features, backend=backend)
    for layer in range(layers):
        if layer:
            pool = fill_pool(gen, batch, pool)
        where = f"{msg} decode step{' padded' if padded else ''} {backend} layer {layer} ranks {ranks.tolist()}"
        x = inputs(gen, rows, geometry.in_features, dtype)
        out0 = out_before(gen, rows, geometry.out_total, dtype)
        out = out0.to(device, copy=True)
        step(*_on(device, x, pool.W), out)
        y_ref = torch.empty(a_rows.shape, dtype=torch.float64)
        reference.mbgmv_shrink(x, pool.W, a_rows, ranks, y_ref)
        expected = out0.double()
        reference.mbgmv_expand(y_ref, pool.W, b_rows, ranks, scales, offsets, expected)
        check_expand_result(out.cpu(), expected, out0, touched_columns(ranks, geometry), dtype, where)


def check_prefill_step(gen, backend, geometry: Geometry, mix: str, segments: int, max_len: int, max_rank: int,
                       dtype, contiguous: bool, layers: int = 3, msg: str = "", device="cpu"):
    """kernels.prepare_prefill once, then one call per layer (fresh pool values each): out must
    equal out_before + the float64 reference's sgmv shrink-then-expand, untouched elements bit-equal."""
    batch = make_batch(gen, geometry, mix, segments, max_rank)
    pool = make_pool(gen, batch, dtype, contiguous)
    a_rows, b_rows, ranks = batch.rows(pool, "A"), batch.rows(pool, "B"), batch.ranks()
    seg_starts = segment_starts(gen, segments, max_len)
    tokens = int(seg_starts[-1])
    token_ranks = ranks.repeat_interleave(seg_starts.diff().long(), dim=0)        # [T, S]
    scales, offsets = batch.scales(gen), geometry.slice_offsets()
    W, *prepared = _on(device, pool.W, seg_starts, a_rows, b_rows, ranks, scales, offsets)
    step = kernels.prepare_prefill(*prepared, W, geometry.in_features, backend=backend)
    for layer in range(layers):
        if layer:
            pool = fill_pool(gen, batch, pool)
        where = f"{msg} prefill step {backend} layer {layer} seg_starts {seg_starts.tolist()} ranks {ranks.tolist()}"
        x = inputs(gen, tokens, geometry.in_features, dtype)
        out0 = out_before(gen, tokens, geometry.out_total, dtype)
        out = out0.to(device, copy=True)
        step(*_on(device, x, pool.W), out)
        y_ref = torch.empty((tokens, geometry.slices, a_rows.shape[2]), dtype=torch.float64)
        reference.sgmv_shrink(x, pool.W, seg_starts, a_rows, ranks, y_ref)
        expected = out0.double()
        reference.sgmv_expand(y_ref, pool.W, seg_starts, b_rows, ranks, scales, offsets, expected)
        check_expand_result(out.cpu(), expected, out0, touched_columns(token_ranks, geometry), dtype, where)
