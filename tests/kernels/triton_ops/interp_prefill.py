"""Triton prefill kernels (sgmv) under TRITON_INTERPRET=1 on small shapes (see interp_decode.py)."""
from __future__ import annotations

import os

import pytest
import torch

from tests.kernels.batches import MIXES, MODEL_GROUPS, SMALL_GROUPS
from tests.kernels.checks import check_prefill_step, check_sgmv, geometry

assert os.environ.get("TRITON_INTERPRET") == "1", "run through tests/kernels/triton_ops/test_interpreter.py"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("contiguous", [False, True], ids=["scattered", "contiguous"])
@pytest.mark.parametrize("mix", list(MIXES))
def test_sgmv(gen, mix, contiguous, dtype):
    check_sgmv(gen, "triton", geometry(SMALL_GROUPS, "qkv"), mix, segments=4, max_len=20, max_rank=40,
               dtype=dtype, contiguous=contiguous)


@pytest.mark.parametrize("group", ["o", "gate_up"])
def test_sgmv_groups(gen, group):
    check_sgmv(gen, "triton", geometry(SMALL_GROUPS, group), "uniform", 4, 20, 40, torch.float32, False)


def test_sgmv_ranks_up_to_256(gen):
    check_sgmv(gen, "triton", geometry(SMALL_GROUPS, "qkv"), "distinct", 2, 40, 256, torch.float16, True)


def test_sgmv_segments_longer_than_a_token_block(gen):
    """Segments of up to 80 tokens span several BLOCK_M (32) token blocks."""
    check_sgmv(gen, "triton", geometry(SMALL_GROUPS, "gate_up"), "distinct", 2, 80, 40, torch.float32, False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_sgmv_model_qkv_shapes(gen, dtype):
    check_sgmv(gen, "triton", geometry(MODEL_GROUPS, "qkv"), "uniform", 3, 16, 40, dtype, False)


def test_prepared_prefill_step(gen):
    """kernels.prepare_prefill on the Triton backend: checked once, the two kernels per layer."""
    check_prefill_step(gen, "triton", geometry(SMALL_GROUPS, "qkv"), "zipf", 4, 12, 40, torch.float32, False, layers=2)
