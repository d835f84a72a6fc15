"""Triton decode kernels (mbgmv; bgmv = mbgmv over padded descriptors) under TRITON_INTERPRET=1 on small shapes.

Run by test_interpreter.py in a subprocess (TRITON_INTERPRET must be set before Triton is
imported); not collected by a plain pytest run (the file name does not start with test_).
"""
from __future__ import annotations

import os

import pytest
import torch

from tests.kernels.batches import MIXES, MODEL_GROUPS, SMALL_GROUPS
from tests.kernels.checks import check_decode_step, check_mbgmv, check_mbgmv_expand_split, geometry

assert os.environ.get("TRITON_INTERPRET") == "1", "run through tests/kernels/triton_ops/test_interpreter.py"

DTYPES = [torch.float32, torch.float16]  # bf16 gives wrong results in the interpreter
ROWS = {"distinct": 5, "single": 6, "uniform": 8, "zipf": 8}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("contiguous", [False, True], ids=["scattered", "contiguous"])
@pytest.mark.parametrize("mix", list(MIXES))
def test_mbgmv(gen, mix, contiguous, dtype):
    check_mbgmv(gen, "triton", geometry(SMALL_GROUPS, "qkv"), mix, ROWS[mix], 40, dtype, contiguous)


@pytest.mark.parametrize("group", ["o", "gate_up"])
def test_mbgmv_groups(gen, group):
    check_mbgmv(gen, "triton", geometry(SMALL_GROUPS, group), "zipf", 8, 40, torch.float32, False)


def test_mbgmv_ranks_up_to_256(gen):
    check_mbgmv(gen, "triton", geometry(SMALL_GROUPS, "qkv"), "distinct", 3, 256, torch.float16, False)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mix", list(MIXES))
def test_bgmv_padded(gen, mix, dtype):
    check_mbgmv(gen, "triton", geometry(SMALL_GROUPS, "qkv"), mix, ROWS[mix], 40, dtype, False, padded=True)


def test_bgmv_ranks_up_to_256(gen):
    check_mbgmv(gen, "triton", geometry(SMALL_GROUPS, "gate_up"), "uniform", 4, 256, torch.float32, False,
                padded=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_mbgmv_model_qkv_shapes(gen, dtype):
    """hidden 576 -> 576 / 192 / 192: several K and N blocks, column blocks straddling slices."""
    check_mbgmv(gen, "triton", geometry(MODEL_GROUPS, "qkv"), "uniform", 4, 40, dtype, False)


def test_bgmv_model_qkv_shapes(gen):
    check_mbgmv(gen, "triton", geometry(MODEL_GROUPS, "qkv"), "zipf", 4, 40, torch.float16, False, padded=True)


@pytest.mark.parametrize("mix", ["single", "zipf"])
def test_prepared_decode_step(gen, mix):
    """kernels.prepare_decode on the Triton backend: checked once, the two kernels per layer."""
    check_decode_step(gen, "triton", geometry(SMALL_GROUPS, "qkv"), mix, ROWS[mix], 40, torch.float32, False, layers=2)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("padded", [False, True], ids=["mbgmv", "bgmv"])
def test_expand_split_into_two_buffers(gen, dtype, padded):
    """The qkv delta straight into q and the KV staging rows (one launch, no scratch)."""
    check_mbgmv_expand_split(gen, "triton", geometry(MODEL_GROUPS, "qkv"), "zipf", 5, 40, dtype, padded=padded)
