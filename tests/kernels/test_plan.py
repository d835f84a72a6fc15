"""RowPlan: grouping of rows by adapter, contiguity, index tensors, validation, reuse."""
from __future__ import annotations

import functools

import pytest
import torch

import kernels
from kernels import KernelArgumentError, plan_rows, plan_slots

from .batches import MIXES, MODEL_GROUPS
from .checks import check_mbgmv, geometry

I32 = torch.int32


def table(rows):
    width = max(len(r) for r in rows)
    return torch.tensor([r + [-1] * (width - len(r)) for r in rows], dtype=I32)


def test_dense_group_for_popular_adapter_and_sampled_rest():
    # adapter a: pages 10..13 (contiguous) used by 4 rows; b: scattered pages used by 2; one row none
    a, b = [10, 11, 12, 13], [7, 3]
    page_table = table([a, b, a, [], a, b, a])
    ranks = torch.tensor([[4, 2], [2, 2], [4, 2], [0, 0], [4, 2], [2, 1], [4, 2]], dtype=I32)
    plan = plan_rows(page_table, ranks, dense_min_rows=4)
    index = plan.shrink_index(compact=False)
    assert len(index.groups) == 1
    group = index.groups[0]
    assert group.rows.tolist() == [0, 2, 4, 6] and group.rank == 4
    assert group.pages is None and group.first_page == 10                # contiguous: a pool view
    assert len(group.dest) == 4 * (4 + 2)                                 # 4 rows x live (j, s)
    # sampled part: rows 1 and 5 only (ranks (2, 2) and (2, 1)), columns page * S + s
    assert index.crow.tolist() == [0, 0, 4, 4, 4, 4, 7, 7]
    assert index.col.tolist()[:4] == [7 * 2 + 0, 7 * 2 + 1, 3 * 2 + 0, 3 * 2 + 1]
    assert len(index.dest) == 7 + len(group.dest) and len(set(index.dest.tolist())) == len(index.dest)


def test_scattered_group_keeps_its_page_list():
    page_table = table([[5, 2, 9]] * 4)
    plan = plan_rows(page_table, torch.full((4, 1), 3, dtype=I32), dense_min_rows=2)
    group, = plan.shrink_index(compact=False).groups
    assert group.pages.tolist() == [5, 2, 9]


def test_compact_mode_gathers_each_page_once():
    page_table = table([[8, 4], [8, 4], [6]])
    ranks = torch.tensor([[2], [2], [1]], dtype=I32)
    index = plan_rows(page_table, ranks).shrink_index(compact=True)
    assert index.pages.tolist() == [4, 6, 8] and index.groups == ()
    assert index.col.tolist() == [2, 0, 2, 0, 1]                          # positions in index.pages


def test_expand_index_chunks_by_gcd_of_slice_offsets():
    plan = plan_rows(table([[0, 1], [2]]), torch.tensor([[2, 1, 0], [1, 1, 1]], dtype=I32))
    index = plan.expand_index((0, 576, 768, 960))
    assert index.width == 192                                             # 5 chunks: q q q k v
    # row 0: q chunks 3 x rank 2, k chunk rank 1, v untouched; row 1: 5 chunks x rank 1
    assert index.bags.tolist() == [0, 1, 2, 3, 5, 6, 7, 8, 9]
    assert index.idx.tolist()[:2] == [0 * 5 + 0, 1 * 5 + 0]
    full = plan_rows(table([[3]]), torch.ones(1, 3, dtype=I32)).expand_index((0, 576, 768, 960))
    assert full.bags is None                                              # every chunk touched: plain add_


def test_plan_slots_pages():
    plan = plan_slots(torch.tensor([2, -1, 0], dtype=I32), rank=3, slot_rank=5, num_slices=2)
    assert plan.page_table.tolist() == [[10, 11, 12], [-1, -1, -1], [0, 1, 2]]
    assert plan.ranks.tolist() == [[3, 3], [0, 0], [3, 3]]


@pytest.mark.parametrize("dense_min_rows", [1, 2, 10**9], ids=["all-dense", "pairs", "all-sampled"])
@pytest.mark.parametrize("mix", list(MIXES))
def test_every_split_matches_reference(gen, mix, dense_min_rows):
    make_plan = functools.partial(plan_rows, dense_min_rows=dense_min_rows)
    check_mbgmv(gen, "cpu", geometry(MODEL_GROUPS, "qkv"), mix, 24, 128, torch.float32, contiguous=False,
                make_plan=make_plan)


def test_plan_for_another_batch_is_refused():
    plan = plan_rows(table([[0, 1]]), torch.tensor([[2]], dtype=I32))
    A = torch.zeros(4, 1, 8)
    with pytest.raises(KernelArgumentError, match="plan is for N=1"):
        kernels.mbgmv_shrink(torch.zeros(2, 8), A, table([[0, 1], [2, 3]]), torch.full((2, 1), 2, dtype=I32),
                             torch.zeros(2, 1, 2), plan=plan)


def test_pages_outside_the_pool_are_refused():
    with pytest.raises(KernelArgumentError, match="reads page 9 of a pool of 4"):
        kernels.mbgmv_shrink(torch.zeros(1, 8), torch.zeros(4, 1, 8), table([[9]]), torch.ones(1, 1, dtype=I32),
                             torch.zeros(1, 1, 1))


def test_missing_page_below_rank_is_refused():
    with pytest.raises(KernelArgumentError, match="-1 below a row's rank"):
        plan_rows(table([[1, -1]]), torch.tensor([[2]], dtype=I32))
