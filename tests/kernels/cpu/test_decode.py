"""Fast CPU decode path (mbgmv, and bgmv = mbgmv over padded descriptors) at the default model's shapes vs the float64 reference."""
from __future__ import annotations

import pytest
import torch

import kernels
from tests.kernels.batches import CPU_DTYPES as DTYPES, DECODE_ROWS as ROWS, MIXES, MODEL_GROUPS
from tests.kernels.checks import check_mbgmv, check_mbgmv_expand_split, geometry


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("contiguous", [False, True], ids=["scattered", "contiguous"])
@pytest.mark.parametrize("mix", list(MIXES))
@pytest.mark.parametrize("group", list(MODEL_GROUPS))
def test_mbgmv_with_plan_reused_over_layers(gen, group, mix, contiguous, dtype):
    check_mbgmv(gen, "cpu", geometry(MODEL_GROUPS, group), mix, ROWS[mix], 256, dtype, contiguous,
                make_plan=kernels.plan_rows, layers=2, msg=group)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mix", list(MIXES))
def test_mbgmv_without_plan(gen, mix, dtype):
    check_mbgmv(gen, "cpu", geometry(MODEL_GROUPS, "qkv"), mix, ROWS[mix], 256, dtype, contiguous=False)


@pytest.mark.parametrize("rows", [1, 2, 64])
def test_mbgmv_batch_sizes(gen, rows):
    check_mbgmv(gen, "cpu", geometry(MODEL_GROUPS, "qkv"), "uniform", rows, 64, torch.float32, False,
                make_plan=kernels.plan_rows)


def test_mbgmv_bfloat16(gen):
    check_mbgmv(gen, "cpu", geometry(MODEL_GROUPS, "qkv"), "zipf", 16, 256, torch.bfloat16, False,
                make_plan=kernels.plan_rows)


@pytest.mark.parametrize("use_plan", [True, False], ids=["plan", "no-plan"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mix", list(MIXES))
@pytest.mark.parametrize("group", ["qkv", "gate_up"])
def test_bgmv_padded(gen, group, mix, dtype, use_plan):
    check_mbgmv(gen, "cpu", geometry(MODEL_GROUPS, group), mix, ROWS[mix], 256, dtype, contiguous=False,
                make_plan=kernels.plan_rows if use_plan else None, padded=True, msg=group)


@pytest.mark.parametrize("padded", [False, True], ids=["mbgmv", "bgmv"])
def test_expand_split_into_two_buffers(gen, padded):
    """The CPU route of the split launcher (scratch + two adds) gives the one-buffer expand."""
    check_mbgmv_expand_split(gen, "cpu", geometry(MODEL_GROUPS, "qkv"), "zipf", 5, 40, torch.float32, padded=padded)
