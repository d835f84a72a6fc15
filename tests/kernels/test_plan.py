"""RowPlan: grouping of rows by adapter, in-place vs gathered reads, index tensors, validation."""
from __future__ import annotations

import functools

import pytest
import torch

import kernels
from kernels import KernelArgumentError, plan_rows

from .batches import MIXES, MODEL_GROUPS
from .checks import check_mbgmv, geometry

I32 = torch.int32


def rows_table(rows, slices):
    """[[units of slice 0], [units of slice 1], ...] per row -> int32 [N, S, R], -1 padded."""
    width = max([len(units) for row in rows for units in row] or [0])
    return torch.tensor([[units + [-1] * (width - len(units)) for units in row] + [[-1] * width] * (slices - len(row))
                         for row in rows], dtype=I32)


def test_dense_group_for_popular_adapter_and_sampled_rest():
    # UNIT 4, IN 8: lora_A rows aligned at multiples of 2 units. Adapter a: 4 rows; b: 2 rows; one none.
    a = [[10, 12], [14]]
    b = [[20], [22]]
    a_rows = rows_table([a, b, a, [], a, b, a], 2)
    ranks = torch.tensor([[2, 1], [1, 1], [2, 1], [0, 0], [2, 1], [1, 1], [2, 1]], dtype=I32)
    plan = plan_rows(a_rows, a_rows, ranks, dense_min_rows=4)
    index = plan.shrink_index(unit=4, in_features=8, compact=False)
    assert index.gathered is None                                         # aligned: read in place
    group, = index.groups
    assert group.rows.tolist() == [0, 2, 4, 6] and group.units.tolist() == [10, 12, 14]
    assert len(group.dest) == 4 * 3
    # sampled part: rows 1 and 5 only; columns = row of the pool viewed as [*, 8] = unit * 4 / 8
    assert index.crow.tolist() == [0, 0, 2, 2, 2, 2, 4, 4]
    assert index.col.tolist() == [10, 11, 10, 11]
    assert len(index.dest) == 4 + len(group.dest) and len(set(index.dest.tolist())) == len(index.dest)


def test_unaligned_rows_are_gathered_once():
    a_rows = rows_table([[[9, 3]], [[9, 3]], [[5]]], 1)
    ranks = torch.tensor([[2], [2], [1]], dtype=I32)
    index = plan_rows(a_rows, a_rows, ranks).shrink_index(unit=4, in_features=8, compact=False)
    assert index.gathered.tolist() == [3, 5, 9] and index.groups == ()
    assert index.col.tolist() == [2, 0, 2, 0, 1]                          # positions in `gathered`


def test_repeated_rows_are_sampled_once():
    """Padded descriptors name the zero row for several (s, j) of one row."""
    a_rows = rows_table([[[6, 0], [0, 0]], [[2]]], 2)   # a second adapter: not the one-adapter dense case
    ranks = torch.tensor([[2, 2], [1, 0]], dtype=I32)
    index = plan_rows(a_rows, a_rows, ranks).shrink_index(4, 8, False)
    assert index.col.tolist() == [0, 3, 1] and index.repeat.tolist() == [1, 0, 0, 0, 2]


def test_the_batch_only_adapter_is_one_matmul_over_a_view_of_its_run():
    # one adapter, 2 rows (< dense_min_rows): still a dense group; its lora_A rows at units
    # 10, 12, 14 are rows 5, 6, 7 of the pool viewed as [*, 8]: one run, read as a view
    a_rows = rows_table([[[10, 12], [14]], [[10, 12], [14]]], 2)
    ranks = torch.tensor([[2, 1], [2, 1]], dtype=I32)
    index = plan_rows(a_rows, a_rows, ranks).shrink_index(4, 8, False)
    group, = index.groups
    assert group.rows.tolist() == [0, 1] and group.first == 5 and index.col.numel() == 0
    gaps = rows_table([[[10, 16], [14]]], 2)                             # rows 5, 8, 7: no run, gathered
    group, = plan_rows(gaps, gaps, ranks[:1]).shrink_index(4, 8, False).groups
    assert group.first == -1 and group.units.tolist() == [10, 16, 14]


def test_expand_index_chunks_by_gcd_of_slice_offsets_and_unit():
    # qkv 576 / 192 / 192, UNIT 192: row 0 q rank 2 (units 0, 3), k rank 1 (unit 6); row 1 rank 1 each
    b_rows = rows_table([[[0, 3], [6]], [[9], [12], [13]]], 3)
    ranks = torch.tensor([[2, 1, 0], [1, 1, 1]], dtype=I32)
    index = plan_rows(b_rows, b_rows, ranks).expand_index(192, (0, 576, 768, 960))
    assert index.width == 192                                             # 5 chunks: q q q k v
    assert index.bags.tolist() == [0, 1, 2, 3, 5, 6, 7, 8, 9]
    assert index.idx.tolist()[:6] == [0, 3, 1, 4, 2, 5]                   # q chunk c of rows at units 0, 3
    assert index.idx.tolist()[6:] == [6, 9, 10, 11, 12, 13]
    full = plan_rows(b_rows[1:], b_rows[1:], ranks[1:]).expand_index(192, (0, 576, 768, 960))
    assert full.bags is None                                              # every chunk touched: plain add_


def test_pad_to_max_rank():
    a_rows = rows_table([[[4, 8], [12]], []], 2)
    b_rows = rows_table([[[5, 9], [13]], []], 2)
    ranks = torch.tensor([[2, 1], [0, 0]], dtype=I32)
    a, b, r = kernels.pad_to_max_rank(a_rows, b_rows, ranks, zero_unit=0)
    assert a.tolist() == [[[4, 8], [12, 0]], [[-1, -1], [-1, -1]]]
    assert b.tolist() == [[[5, 9], [13, 0]], [[-1, -1], [-1, -1]]]
    assert r.tolist() == [[2, 2], [0, 0]]


@pytest.mark.parametrize("dense_min_rows", [1, 2, 10**9], ids=["all-dense", "pairs", "all-sampled"])
@pytest.mark.parametrize("mix", list(MIXES))
def test_every_split_matches_reference(gen, mix, dense_min_rows):
    make_plan = functools.partial(plan_rows, dense_min_rows=dense_min_rows)
    check_mbgmv(gen, "cpu", geometry(MODEL_GROUPS, "qkv"), mix, 24, 128, torch.float32, contiguous=True,
                make_plan=make_plan)


def test_plan_for_another_batch_is_refused():
    a_rows = rows_table([[[0, 1]]], 1)
    plan = plan_rows(a_rows, a_rows, torch.tensor([[2]], dtype=I32))
    other = rows_table([[[0, 1]], [[2, 3]]], 1)
    with pytest.raises(KernelArgumentError, match="plan is for N=1"):
        kernels.mbgmv_shrink(torch.zeros(2, 8), torch.zeros(8, 8), other, torch.full((2, 1), 2, dtype=I32),
                             torch.zeros(2, 1, 2), plan=plan)


def test_rows_outside_the_pool_are_refused():
    with pytest.raises(KernelArgumentError, match="runs past the pool of 4 units"):
        kernels.mbgmv_shrink(torch.zeros(1, 8), torch.zeros(4, 8), rows_table([[[3, 9]]], 1),
                             torch.full((1, 1), 2, dtype=I32), torch.zeros(1, 1, 2))


def test_missing_row_below_rank_is_refused():
    a_rows = rows_table([[[1, -1]]], 1)
    with pytest.raises(KernelArgumentError, match="-1 below a row's rank"):
        plan_rows(a_rows, a_rows, torch.tensor([[2]], dtype=I32))
