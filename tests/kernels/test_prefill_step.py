"""kernels.prepare_prefill: one prefill batch's sgmv shrink + expand prepared once, run per
layer, against the float64 reference (CPU path and the reference backend's two-op path)."""
from __future__ import annotations

import pytest
import torch

import kernels
from tests.kernels.batches import CPU_DTYPES as DTYPES, MIXES, MODEL_GROUPS, make_batch, make_pool, segment_starts
from tests.kernels.checks import check_prefill_step, geometry


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("contiguous", [False, True], ids=["scattered", "contiguous"])
@pytest.mark.parametrize("mix", list(MIXES))
@pytest.mark.parametrize("group", list(MODEL_GROUPS))
def test_prefill_step_over_layers(gen, group, mix, contiguous, dtype):
    check_prefill_step(gen, "cpu", geometry(MODEL_GROUPS, group), mix, 6, 24, 64, dtype, contiguous, msg=group)


def test_prefill_step_one_token_segments_and_many_segments(gen):
    check_prefill_step(gen, "cpu", geometry(MODEL_GROUPS, "qkv"), "zipf", 40, 1, 32, torch.float32, True)
    check_prefill_step(gen, "cpu", geometry(MODEL_GROUPS, "gate_up"), "uniform", 3, 130, 128, torch.float32, False)


def test_prefill_step_reference_backend(gen):
    check_prefill_step(gen, "reference", geometry(MODEL_GROUPS, "qkv"), "zipf", 4, 12, 32, torch.float32, False,
                       layers=2)


def test_prefill_step_refuses_what_it_was_not_prepared_for(gen):
    g = geometry(MODEL_GROUPS, "o")
    batch = make_batch(gen, g, "zipf", 3, 16)
    pool = make_pool(gen, batch, torch.float32, True)
    seg = segment_starts(gen, 3, 8)
    tokens = int(seg[-1])
    step = kernels.prepare_prefill(seg, batch.rows(pool, "A"), batch.rows(pool, "B"), batch.ranks(),
                                   batch.scales(gen), g.slice_offsets(), pool.W, g.in_features)
    x, out = torch.zeros(tokens, g.in_features), torch.zeros(tokens, g.out_total)
    with pytest.raises(kernels.KernelArgumentError, match="x must be"):
        step(torch.zeros(tokens + 1, g.in_features), pool.W, out)
    with pytest.raises(kernels.KernelArgumentError, match="W must be"):
        step(x, pool.W[:-1], out)
    with pytest.raises(kernels.KernelArgumentError, match="seg_starts"):
        kernels.prepare_prefill(seg[:-1], batch.rows(pool, "A"), batch.rows(pool, "B"), batch.ranks(),
                                batch.scales(gen), g.slice_offsets(), pool.W, g.in_features)
