"""The torch reference against a hand-computed example and an independent vectorised formula."""
from __future__ import annotations

import math

import pytest
import torch

import kernels
from kernels import reference
from tests.testing import assert_close

from .batches import MIXES, SMALL_GROUPS, Geometry, live_mask, make_batch, make_pool, segment_starts
from .checks import geometry

NAN = math.nan
I32 = torch.int32


def hand_example():
    """IN 2, slices of 1 and 2 columns, UNIT 1; row 0: slice ranks (2, 1), row 1: none."""
    W = torch.full((16, 1), NAN, dtype=torch.float64)
    flat = W.view(-1)
    flat[4:6], flat[0:2], flat[8:10] = torch.tensor([1., 2.]), torch.tensor([3., 4.]), torch.tensor([5., 6.])
    flat[10], flat[11], flat[12:14] = 1., 2., torch.tensor([10., 100.])
    a_rows = torch.tensor([[[4, 0], [8, -1]], [[-1, -1], [-1, -1]]], dtype=I32)
    b_rows = torch.tensor([[[10, 11], [12, -1]], [[-1, -1], [-1, -1]]], dtype=I32)
    ranks = torch.tensor([[2, 1], [0, 0]], dtype=I32)
    scales = torch.tensor([[1.0, 0.5], [7.0, 7.0]])
    offsets = torch.tensor([0, 1, 3], dtype=I32)
    x = torch.tensor([[1., 1.], [5., 5.]], dtype=torch.float64)
    y = torch.tensor([[[3., 7.], [11., 0.]], [[0., 0.], [0., 0.]]], dtype=torch.float64)
    delta = torch.tensor([[3. * 1 + 7. * 2, 0.5 * 11 * 10, 0.5 * 11 * 100], [0., 0., 0.]], dtype=torch.float64)
    return W, a_rows, b_rows, ranks, scales, offsets, x, y, delta


def test_hand_example_mbgmv():
    W, a_rows, b_rows, ranks, scales, offsets, x, y_expected, delta = hand_example()
    y = torch.full((2, 2, 2), NAN, dtype=torch.float64)
    reference.mbgmv_shrink(x, W, a_rows, ranks, y)
    assert torch.equal(y, y_expected)
    out = torch.tensor([[1., 2., 3.], [-0.0, 4., 5.]], dtype=torch.float64)
    before = out.clone()
    reference.mbgmv_expand(y, W, b_rows, ranks, scales, offsets, out)
    assert torch.equal(out, before + delta)
    assert math.copysign(1, out[1, 0]) == -1, "row without adapter must be untouched (-0.0 kept)"


def test_hand_example_sgmv():
    """The same two adapters as segments of 2 and 1 tokens."""
    W, a_rows, b_rows, ranks, scales, offsets, x, y_row, delta = hand_example()
    seg_starts = torch.tensor([0, 2, 3], dtype=I32)
    tokens = x[[0, 0, 1]]
    y = torch.full((3, 2, 2), NAN, dtype=torch.float64)
    reference.sgmv_shrink(tokens, W, seg_starts, a_rows, ranks, y)
    assert torch.equal(y, y_row[[0, 0, 1]])
    out = torch.zeros(3, 3, dtype=torch.float64)
    reference.sgmv_expand(y, W, seg_starts, b_rows, ranks, scales, offsets, out)
    assert torch.equal(out, delta[[0, 0, 1]])


def test_hand_example_padded_bgmv():
    """Padded to R = 2: slice 1's second row reads the zero row (units 14..15); the delta is the
    same, and the row without adapter stays untouched."""
    W, a_rows, b_rows, ranks, scales, offsets, x, y_expected, delta = hand_example()
    W.view(-1)[14:16] = 0.0
    a_pad, b_pad, ranks_pad = kernels.pad_to_max_rank(a_rows, b_rows, ranks, zero_unit=14)
    assert ranks_pad.tolist() == [[2, 2], [0, 0]] and a_pad[0, 1].tolist() == [8, 14]
    assert a_pad[1].tolist() == [[-1, -1], [-1, -1]]
    y = torch.full((2, 2, 2), NAN, dtype=torch.float64)
    reference.mbgmv_shrink(x, W, a_pad, ranks_pad, y)
    assert torch.equal(y, y_expected)
    out = torch.tensor([[0., 0., 0.], [-0.0, 1., 1.]], dtype=torch.float64)
    reference.mbgmv_expand(y, W, b_pad, ranks_pad, scales, offsets, out)
    assert torch.equal(out[0], delta[0]) and math.copysign(1, out[1, 0]) == -1


def vectorised(x, W, a_rows, b_rows, ranks, scales, g: Geometry, token_segment):
    """y and delta of every token at once (element gathers, mask, einsum), float64."""
    flat, unit = W.view(-1).double(), W.shape[1]
    seg_ranks = ranks[token_segment]                                      # [T, S]
    live = live_mask(seg_ranks, a_rows.shape[2])                          # [T, S, R]
    a_start = a_rows[token_segment].long().clamp(min=0) * unit            # [T, S, R]
    a = flat[a_start[..., None] + torch.arange(g.in_features)]            # [T, S, R, IN]
    a = torch.where(live[..., None], a, 0.0)
    y = torch.einsum("tk,tsjk->tsj", x.double(), a)
    delta = torch.zeros(len(token_segment), g.out_total, dtype=torch.float64)
    offsets = g.offsets
    for s, n in enumerate(g.out_features):
        b_start = b_rows[token_segment][:, s].long().clamp(min=0) * unit  # [T, R]
        b = flat[b_start[..., None] + torch.arange(n)]                    # [T, R, n]
        b = torch.where(live[:, s, :, None], b, 0.0)
        weights = y[:, s] * scales[token_segment][:, s].double()[:, None]  # [T, R]
        delta[:, offsets[s]:offsets[s + 1]] = torch.einsum("tj,tjc->tc", weights, b)
    return y, delta


@pytest.mark.parametrize("mix", list(MIXES))
def test_mbgmv_matches_vectorised_formula(gen, mix):
    g = geometry(SMALL_GROUPS, "qkv")
    batch = make_batch(gen, g, mix, 7, 30)
    pool = make_pool(gen, batch, torch.float32, contiguous=False)
    a_rows, b_rows, ranks, scales = batch.rows(pool, "A"), batch.rows(pool, "B"), batch.ranks(), batch.scales(gen)
    x = torch.randn(7, g.in_features, generator=gen)
    y_want, delta = vectorised(x, pool.W, a_rows, b_rows, ranks, scales, g, torch.arange(7))
    y = torch.empty(y_want.shape, dtype=torch.float64)
    reference.mbgmv_shrink(x, pool.W, a_rows, ranks, y)
    assert_close(y, y_want, msg=f"reference mbgmv shrink, ranks {ranks.tolist()}")
    out = torch.zeros(7, g.out_total, dtype=torch.float64)
    reference.mbgmv_expand(y.float(), pool.W, b_rows, ranks, scales, g.slice_offsets(), out)
    assert_close(out, delta, dtype=torch.float32, msg="reference mbgmv expand")


def test_sgmv_matches_vectorised_formula(gen):
    g = geometry(SMALL_GROUPS, "gate_up")
    batch = make_batch(gen, g, "uniform", 5, 30)
    pool = make_pool(gen, batch, torch.float32, contiguous=True)
    a_rows, b_rows, ranks, scales = batch.rows(pool, "A"), batch.rows(pool, "B"), batch.ranks(), batch.scales(gen)
    seg_starts = segment_starts(gen, 5, 6)
    token_segment = torch.repeat_interleave(torch.arange(5), seg_starts.diff().long())
    x = torch.randn(len(token_segment), g.in_features, generator=gen)
    y_want, delta = vectorised(x, pool.W, a_rows, b_rows, ranks, scales, g, token_segment)
    y = torch.empty(y_want.shape, dtype=torch.float64)
    reference.sgmv_shrink(x, pool.W, seg_starts, a_rows, ranks, y)
    assert_close(y, y_want, msg="reference sgmv shrink")
    out = torch.zeros(len(token_segment), g.out_total, dtype=torch.float64)
    reference.sgmv_expand(y.float(), pool.W, seg_starts, b_rows, ranks, scales, g.slice_offsets(), out)
    assert_close(out, delta, dtype=torch.float32, msg="reference sgmv expand")


def test_reference_refuses_missing_rows():
    W, a_rows, b_rows, ranks, scales, offsets, x, _, _ = hand_example()
    a_rows[0, 0, 1] = -1                                                  # below slice 0's rank 2
    with pytest.raises(AssertionError, match="row table has -1"):
        reference.mbgmv_shrink(x, W, a_rows, ranks, torch.empty(2, 2, 2, dtype=torch.float64))
