"""kernels.prepare_decode: one decode batch's shrink + expand prepared once, run per layer,
against the float64 reference (CPU fused path and the reference backend's two-op path)."""
from __future__ import annotations

import pytest
import torch

import kernels
from tests.kernels.batches import CPU_DTYPES as DTYPES, DECODE_ROWS as ROWS, MIXES, MODEL_GROUPS, make_batch, make_pool
from tests.kernels.checks import check_decode_step, geometry


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("contiguous", [False, True], ids=["scattered", "contiguous"])
@pytest.mark.parametrize("mix", list(MIXES))
@pytest.mark.parametrize("group", list(MODEL_GROUPS))
def test_decode_step_over_layers(gen, group, mix, contiguous, dtype):
    check_decode_step(gen, "cpu", geometry(MODEL_GROUPS, group), mix, ROWS[mix], 128, dtype, contiguous, msg=group)


@pytest.mark.parametrize("rows", [1, 2, 64])
@pytest.mark.parametrize("mix", ["single", "zipf"])
def test_decode_step_batch_sizes(gen, rows, mix):
    # single: the batch's only adapter goes through one matmul (a view of the pool when its rows
    # are one run, else gathered), whatever the row count
    for contiguous in (True, False):
        check_decode_step(gen, "cpu", geometry(MODEL_GROUPS, "qkv"), mix, rows, 64, torch.float32, contiguous)


@pytest.mark.parametrize("mix", ["single", "zipf"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_decode_step_padded_bgmv(gen, mix, dtype):
    check_decode_step(gen, "cpu", geometry(MODEL_GROUPS, "gate_up"), mix, ROWS[mix], 64, dtype, False, padded=True)


def test_decode_step_reference_backend(gen):
    check_decode_step(gen, "reference", geometry(MODEL_GROUPS, "qkv"), "zipf", 8, 32, torch.float32, False, layers=2)


def test_decode_step_refuses_what_it_was_not_prepared_for(gen):
    g = geometry(MODEL_GROUPS, "o")
    batch = make_batch(gen, g, "zipf", 4, 16)
    pool = make_pool(gen, batch, torch.float32, True)
    step = kernels.prepare_decode(batch.rows(pool, "A"), batch.rows(pool, "B"), batch.ranks(), batch.scales(gen),
                                  g.slice_offsets(), pool.W, g.in_features)
    x, out = torch.zeros(4, g.in_features), torch.zeros(4, g.out_total)
    with pytest.raises(kernels.KernelArgumentError, match="x must be"):
        step(torch.zeros(5, g.in_features), pool.W, out)                     # another batch size
    with pytest.raises(kernels.KernelArgumentError, match="W must be"):
        step(x, pool.W[:-1], out)                                           # another pool shape
    with pytest.raises(kernels.KernelArgumentError, match="out must be"):
        step(x, pool.W, torch.zeros(4, g.out_total, dtype=torch.float16))   # another dtype
    with pytest.raises(kernels.KernelArgumentError, match="ranks"):
        kernels.prepare_decode(batch.rows(pool, "A"), batch.rows(pool, "B"), batch.ranks()[:, :0],
                               batch.scales(gen), g.slice_offsets(), pool.W, g.in_features)
