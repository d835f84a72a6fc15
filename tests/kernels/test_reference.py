"""The torch reference against a hand-computed example and an independent vectorised formula."""
from __future__ import annotations

import math

import pytest
import torch

from kernels import reference
from tests.testing import assert_close

from .batches import MIXES, SMALL_GROUPS, Geometry, live_mask, make_batch, make_pool, segment_starts
from .checks import geometry

NAN = math.nan
I32 = torch.int32


def hand_example():
    """IN 2, slices of 1 and 2 columns; row 0: pages [2, 0], slice ranks (2, 1); row 1: none."""
    A = torch.full((4, 2, 2), NAN, dtype=torch.float64)
    A[2, 0], A[0, 0], A[2, 1] = torch.tensor([1., 2.]), torch.tensor([3., 4.]), torch.tensor([5., 6.])
    B = torch.full((4, 3), NAN, dtype=torch.float64)
    B[2], B[0, 0] = torch.tensor([1., 10., 100.]), 2.
    page_table = torch.tensor([[2, 0], [-1, -1]], dtype=I32)
    ranks = torch.tensor([[2, 1], [0, 0]], dtype=I32)
    scales = torch.tensor([[1.0, 0.5], [7.0, 7.0]])
    offsets = torch.tensor([0, 1, 3], dtype=I32)
    x = torch.tensor([[1., 1.], [5., 5.]], dtype=torch.float64)
    y = torch.tensor([[[3., 7.], [11., 0.]], [[0., 0.], [0., 0.]]], dtype=torch.float64)
    delta = torch.tensor([[3. * 1 + 7. * 2, 0.5 * 11 * 10, 0.5 * 11 * 100], [0., 0., 0.]], dtype=torch.float64)
    return A, B, page_table, ranks, scales, offsets, x, y, delta


def test_hand_example_mbgmv():
    A, B, page_table, ranks, scales, offsets, x, y_expected, delta = hand_example()
    y = torch.full((2, 2, 2), NAN, dtype=torch.float64)
    reference.mbgmv_shrink(x, A, page_table, ranks, y)
    assert torch.equal(y, y_expected)
    out = torch.tensor([[1., 2., 3.], [-0.0, 4., 5.]], dtype=torch.float64)
    before = out.clone()
    reference.mbgmv_expand(y, B, page_table, ranks, scales, offsets, out)
    assert torch.equal(out, before + delta)
    assert math.copysign(1, out[1, 0]) == -1, "row without adapter must be untouched (-0.0 kept)"


def test_hand_example_sgmv():
    """The same two adapters as segments of 2 and 1 tokens."""
    A, B, page_table, ranks, scales, offsets, x, y_row, delta = hand_example()
    seg_starts = torch.tensor([0, 2, 3], dtype=I32)
    tokens = x[[0, 0, 1]]
    y = torch.full((3, 2, 2), NAN, dtype=torch.float64)
    reference.sgmv_shrink(tokens, A, seg_starts, page_table, ranks, y)
    assert torch.equal(y, y_row[[0, 0, 1]])
    out = torch.zeros(3, 3, dtype=torch.float64)
    reference.sgmv_expand(y, B, seg_starts, page_table, ranks, scales, offsets, out)
    assert torch.equal(out, delta[[0, 0, 1]])


def test_hand_example_bgmv():
    """Slot mode: 2 slots of 3 rank rows; slot 1 holds the adapter (its third row zero)."""
    A = torch.full((2, 3, 1, 2), NAN, dtype=torch.float64)
    A[1] = torch.tensor([[[1., 2.]], [[3., 4.]], [[0., 0.]]])
    B = torch.full((2, 3, 2), NAN, dtype=torch.float64)
    B[1] = torch.tensor([[1., 10.], [2., 20.], [0., 0.]])
    slots = torch.tensor([1, -1], dtype=I32)
    x = torch.tensor([[1., 1.], [9., 9.]], dtype=torch.float64)
    y = torch.full((2, 1, 2), NAN, dtype=torch.float64)                  # R = 2 < RS = 3
    reference.bgmv_shrink(x, A, slots, y)
    assert torch.equal(y, torch.tensor([[[3., 7.]], [[0., 0.]]], dtype=torch.float64))
    out = torch.tensor([[0., 0.], [-0.0, 1.]], dtype=torch.float64)
    reference.bgmv_expand(y, B, slots, torch.tensor([[2.0], [3.0]]), torch.tensor([0, 2], dtype=I32), out)
    assert torch.equal(out[0], torch.tensor([2 * (3. + 14.), 2 * (30. + 140.)], dtype=torch.float64))
    assert math.copysign(1, out[1, 0]) == -1


def vectorised(x, A, B, page_table, ranks, scales, g: Geometry, token_segment):
    """y and delta of every token at once (gather padded pages, mask, einsum), float64."""
    seg_pages = page_table[token_segment].long()                          # [T, R]
    seg_ranks = ranks[token_segment]                                      # [T, S]
    live = live_mask(seg_ranks, page_table.shape[1])                      # [T, S, R]
    a = A[seg_pages.clamp(min=0)].double().permute(0, 2, 1, 3)           # [T, S, R, IN]
    a = torch.where(live[..., None], a, 0.0)
    y = torch.einsum("tk,tsjk->tsj", x.double(), a)
    b = B[seg_pages.clamp(min=0)].double()                                # [T, R, OUT]
    col_slice = torch.repeat_interleave(torch.arange(g.slices), torch.tensor(g.out_features))
    b = torch.where(live[:, col_slice, :].transpose(1, 2), b, 0.0)        # only live rows of the column's slice
    weights = (y * scales[token_segment].double()[:, :, None])[:, col_slice, :]   # [T, OUT, R]
    delta = torch.einsum("tcj,tjc->tc", weights, b)
    return y, delta


@pytest.mark.parametrize("mix", list(MIXES))
def test_mbgmv_matches_vectorised_formula(gen, mix):
    g = geometry(SMALL_GROUPS, "qkv")
    batch = make_batch(gen, g, mix, 7, 30)
    pool = make_pool(gen, batch, torch.float32, contiguous=False)
    page_table, ranks, scales = batch.page_table(pool), batch.ranks(), batch.scales(gen)
    x = torch.randn(7, g.in_features, generator=gen)
    y_want, delta = vectorised(x, pool.A, pool.B, page_table, ranks, scales, g, torch.arange(7))
    y = torch.empty(y_want.shape, dtype=torch.float64)
    reference.mbgmv_shrink(x, pool.A, page_table, ranks, y)
    assert_close(y, y_want, msg=f"reference mbgmv shrink, ranks {ranks.tolist()}")
    out = torch.zeros(7, g.out_total, dtype=torch.float64)
    reference.mbgmv_expand(y.float(), pool.B, page_table, ranks, scales, g.slice_offsets(), out)
    assert_close(out, delta, dtype=torch.float32, msg="reference mbgmv expand")


def test_sgmv_matches_vectorised_formula(gen):
    g = geometry(SMALL_GROUPS, "gate_up")
    batch = make_batch(gen, g, "uniform", 5, 30)
    pool = make_pool(gen, batch, torch.float32, contiguous=True)
    page_table, ranks, scales = batch.page_table(pool), batch.ranks(), batch.scales(gen)
    seg_starts = segment_starts(gen, 5, 6)
    token_segment = torch.repeat_interleave(torch.arange(5), seg_starts.diff().long())
    x = torch.randn(len(token_segment), g.in_features, generator=gen)
    y_want, delta = vectorised(x, pool.A, pool.B, page_table, ranks, scales, g, token_segment)
    y = torch.empty(y_want.shape, dtype=torch.float64)
    reference.sgmv_shrink(x, pool.A, seg_starts, page_table, ranks, y)
    assert_close(y, y_want, msg="reference sgmv shrink")
    out = torch.zeros(len(token_segment), g.out_total, dtype=torch.float64)
    reference.sgmv_expand(y.float(), pool.B, seg_starts, page_table, ranks, scales, g.slice_offsets(), out)
    assert_close(out, delta, dtype=torch.float32, msg="reference sgmv expand")


def test_reference_refuses_missing_pages():
    A, B, page_table, ranks, scales, offsets, x, _, _ = hand_example()
    page_table[0, 1] = -1                                                 # below slice 0's rank 2
    with pytest.raises(AssertionError, match="page_table has -1"):
        reference.mbgmv_shrink(x, A, page_table, ranks, torch.empty(2, 2, 2, dtype=torch.float64))
