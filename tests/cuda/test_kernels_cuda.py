"""The Triton LoRA kernels compiled on CUDA, fp16 and bf16, at Llama-2-7B shapes, against the
float64 torch reference (kernels/reference.py), on the poisoned random batches of
tests/kernels/batches.py (pages no adapter owns and rank rows past a slice's rank hold NaN).

Batches, pools and the reference live on the CPU; the kernels get device copies of the same
tensors. The checks of tests/kernels/checks.py apply unchanged: y is exactly 0 past every
slice's rank, expand leaves rows without adapter and rank-0 slices bit-identical.
"""
from __future__ import annotations

import torch
import pytest

import kernels
from kernels import reference
from tests.cuda.common import CUDA_TESTS, compiled_triton, cuda_device
from tests.kernels.batches import (Geometry, inputs, live_mask, make_batch, make_pool, make_slot_pool, out_before,
                                   segment_starts, slots_of, touched_columns)
from tests.kernels.checks import check_expand_result, check_shrink_result, expand_input, nan_y

pytestmark = CUDA_TESTS

# Llama-2-7B: hidden 4096, 32 heads x 128 (no GQA), MLP 11008
LLAMA7B = {
    "qkv": Geometry(4096, (4096, 4096, 4096)),
    "o": Geometry(4096, (4096,)),
    "gate_up": Geometry(4096, (11008, 11008)),
    "down": Geometry(11008, (4096,)),
}
HALF = [torch.float16, torch.bfloat16]
# (rows, max rank, popularity mix): ranks are drawn in 1..max rank per adapter
DECODE_CASES = [(1, 8, "single"), (16, 64, "zipf"), (32, 32, "uniform"), (64, 128, "distinct")]
# (segments, longest segment, max rank, mix)
PREFILL_CASES = [(1, 128, 8, "single"), (4, 96, 64, "zipf"), (8, 40, 128, "distinct")]


@pytest.fixture(autouse=True)
def _compiled():
    assert compiled_triton(), "unset TRITON_INTERPRET: these tests exist to run the compiled kernels"


def _dev(*tensors):
    device = cuda_device()
    return [t.to(device) for t in tensors]


def check_mbgmv_cuda(gen, g: Geometry, mix, rows, max_rank, dtype, contiguous=False):
    batch = make_batch(gen, g, mix, rows, max_rank)
    pool = make_pool(gen, batch, dtype, contiguous)
    page_table, ranks = batch.page_table(pool), batch.ranks()
    live = live_mask(ranks, page_table.shape[1])
    where = f"mbgmv {dtype} {mix} rows {rows} ranks {sorted(set(ranks.flatten().tolist()))}"
    A, B, pt, rk = _dev(pool.A, pool.B, page_table, ranks)
    x = inputs(gen, rows, g.in_features, dtype)
    y = nan_y(rows, g.slices, page_table.shape[1]).to(A.device)
    kernels.mbgmv_shrink(x.to(A.device), A, pt, rk, y)
    y_ref = torch.empty(y.shape, dtype=torch.float64)
    reference.mbgmv_shrink(x, pool.A, page_table, ranks, y_ref)
    check_shrink_result(y.cpu(), y_ref, live, dtype, where)

    y_in = expand_input(y_ref, live)
    scales, offsets = batch.scales(gen), g.slice_offsets()
    out0 = out_before(gen, rows, g.out_total, dtype)
    out = out0.to(A.device, copy=True)
    kernels.mbgmv_expand(*_dev(y_in), B, pt, rk, *_dev(scales, offsets), out)
    expected = out0.double()
    reference.mbgmv_expand(y_in, pool.B, page_table, ranks, scales, offsets, expected)
    check_expand_result(out.cpu(), expected, out0, touched_columns(ranks, g), dtype, where)


def check_bgmv_cuda(gen, g: Geometry, mix, rows, max_rank, dtype, spare_rank=3):
    batch = make_batch(gen, g, mix, rows, max_rank)
    rank = batch.max_rank()
    slot_rank = rank + spare_rank
    pool, slot_of = make_slot_pool(gen, batch, dtype, slot_rank)
    slots = slots_of(batch, slot_of)
    A_st = pool.A.view(-1, slot_rank, g.slices, g.in_features)
    B_st = pool.B.view(-1, slot_rank, g.out_total)
    where = f"bgmv {dtype} {mix} R={rank} RS={slot_rank}"
    dA, dB, dslots = _dev(A_st, B_st, slots)
    x = inputs(gen, rows, g.in_features, dtype)
    y = nan_y(rows, g.slices, rank).to(dA.device)
    kernels.bgmv_shrink(x.to(dA.device), dA, dslots, y)
    y_ref = torch.empty(y.shape, dtype=torch.float64)
    reference.bgmv_shrink(x, A_st, slots, y_ref)
    check_shrink_result(y.cpu(), y_ref, (slots >= 0)[:, None, None].expand(y.shape), dtype, where)

    scales, offsets = batch.scales(gen), g.slice_offsets()
    out0 = out_before(gen, rows, g.out_total, dtype)
    out = out0.to(dA.device, copy=True)
    y_in = y_ref.float()
    kernels.bgmv_expand(*_dev(y_in), dB, dslots, *_dev(scales, offsets), out)
    expected = out0.double()
    reference.bgmv_expand(y_in, B_st, slots, scales, offsets, expected)
    check_expand_result(out.cpu(), expected, out0, (slots >= 0)[:, None].expand(out0.shape), dtype, where)


def check_sgmv_cuda(gen, g: Geometry, mix, segments, max_len, max_rank, dtype, contiguous=False):
    batch = make_batch(gen, g, mix, segments, max_rank)
    pool = make_pool(gen, batch, dtype, contiguous)
    page_table, ranks = batch.page_table(pool), batch.ranks()
    seg_starts = segment_starts(gen, segments, max_len)
    tokens = int(seg_starts[-1])
    token_ranks = ranks.repeat_interleave(seg_starts.diff().long(), dim=0)  # [T, S]
    live = live_mask(token_ranks, page_table.shape[1])
    where = f"sgmv {dtype} {mix} seg_starts {seg_starts.tolist()}"
    A, B, pt, rk, seg = _dev(pool.A, pool.B, page_table, ranks, seg_starts)
    x = inputs(gen, tokens, g.in_features, dtype)
    y = nan_y(tokens, g.slices, page_table.shape[1]).to(A.device)
    kernels.sgmv_shrink(x.to(A.device), A, seg, pt, rk, y)
    y_ref = torch.empty(y.shape, dtype=torch.float64)
    reference.sgmv_shrink(x, pool.A, seg_starts, page_table, ranks, y_ref)
    check_shrink_result(y.cpu(), y_ref, live, dtype, where)

    y_in = expand_input(y_ref, live)
    scales, offsets = batch.scales(gen), g.slice_offsets()
    out0 = out_before(gen, tokens, g.out_total, dtype)
    out = out0.to(A.device, copy=True)
    kernels.sgmv_expand(*_dev(y_in), B, seg, pt, rk, *_dev(scales, offsets), out)
    expected = out0.double()
    reference.sgmv_expand(y_in, pool.B, seg_starts, page_table, ranks, scales, offsets, expected)
    check_expand_result(out.cpu(), expected, out0, touched_columns(token_ranks, g), dtype, where)


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("rows,max_rank,mix", DECODE_CASES)
def test_mbgmv_llama7b_qkv(gen, rows, max_rank, mix, dtype):
    check_mbgmv_cuda(gen, LLAMA7B["qkv"], mix, rows, max_rank, dtype)


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("rows,max_rank,mix", DECODE_CASES[1:3])
def test_bgmv_llama7b_qkv(gen, rows, max_rank, mix, dtype):
    check_bgmv_cuda(gen, LLAMA7B["qkv"], mix, rows, max_rank, dtype)


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("segments,max_len,max_rank,mix", PREFILL_CASES)
def test_sgmv_llama7b_qkv(gen, segments, max_len, max_rank, mix, dtype):
    check_sgmv_cuda(gen, LLAMA7B["qkv"], mix, segments, max_len, max_rank, dtype)


@pytest.mark.parametrize("group", ["o", "gate_up", "down"])
def test_every_group_llama7b_fp16(gen, group):
    """The other module groups (one slice; two 11008-wide slices; an 11008-wide input), with
    adapters scattered over the pool."""
    check_mbgmv_cuda(gen, LLAMA7B[group], "uniform", 16, 64, torch.float16, contiguous=False)
    check_sgmv_cuda(gen, LLAMA7B[group], "zipf", 3, 64, 64, torch.float16, contiguous=False)
    check_bgmv_cuda(gen, LLAMA7B[group], "zipf", 8, 32, torch.float16)


def test_kernels_reject_mixed_devices(gen):
    """The launchers refuse a CPU tensor among CUDA ones (a clear error, not a crash)."""
    g = LLAMA7B["o"]
    x = torch.randn(2, g.in_features, dtype=torch.float16, device=cuda_device())
    A = torch.zeros(4, 1, g.in_features, dtype=torch.float16, device=cuda_device())
    y = torch.zeros(2, 1, 4, device=cuda_device())
    with pytest.raises(kernels.KernelArgumentError, match="expected cuda"):
        kernels.mbgmv_shrink(x, A, torch.zeros(2, 4, dtype=torch.int32), torch.zeros(2, 1, dtype=torch.int32,
                                                                                      device=cuda_device()), y)
