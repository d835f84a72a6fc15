"""Fast CPU prefill path (sgmv) at the default model's shapes vs the float64 reference."""
from __future__ import annotations

import pytest
import torch

from tests.kernels.batches import MIXES, MODEL_GROUPS
from tests.kernels.checks import check_sgmv, geometry


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("contiguous", [False, True], ids=["scattered", "contiguous"])
@pytest.mark.parametrize("mix", list(MIXES))
@pytest.mark.parametrize("group", list(MODEL_GROUPS))
def test_sgmv(gen, group, mix, contiguous, dtype):
    check_sgmv(gen, "cpu", geometry(MODEL_GROUPS, group), mix, segments=6, max_len=24, max_rank=256,
               dtype=dtype, contiguous=contiguous, msg=group)


def test_sgmv_bfloat16(gen):
    check_sgmv(gen, "cpu", geometry(MODEL_GROUPS, "qkv"), "uniform", 6, 24, 256, torch.bfloat16, False)


def test_sgmv_one_long_segment(gen):
    check_sgmv(gen, "cpu", geometry(MODEL_GROUPS, "gate_up"), "single", 1, 300, 64, torch.float32, True)
