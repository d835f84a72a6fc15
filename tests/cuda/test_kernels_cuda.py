"""The Triton LoRA kernels compiled on CUDA, fp16 and bf16, at Llama-2-7B shapes, against the
float64 torch reference (kernels/reference.py), on the poisoned random batches of
tests/kernels/batches.py (units no adapter owns and rank rows past a slice's rank hold NaN).

The checks are tests/kernels/checks.py's, with the kernels run on the GPU (`device=`): batches,
pools and the reference stay on the CPU, the kernels get device copies of the same tensors;
y is exactly 0 past every slice's rank, expand leaves rows without adapter and rank-0 slices
bit-identical. Punica's bgmv is mbgmv over descriptors padded to the batch's max rank.
"""
from __future__ import annotations

import pytest
import torch

import kernels
from tests.cuda.common import CUDA_TESTS, compiled_triton, cuda_device
from tests.kernels.batches import Geometry
from tests.kernels.checks import (check_decode_step, check_mbgmv, check_mbgmv_expand_split, check_prefill_step,
                                  check_sgmv)

pytestmark = CUDA_TESTS

# Llama-2-7B: hidden 4096, 32 heads x 128 (no GQA), MLP 11008
LLAMA7B = {
    "qkv": Geometry(4096, (4096, 4096, 4096)),
    "o": Geometry(4096, (4096,)),
    "gate_up": Geometry(4096, (11008, 11008)),
    "down": Geometry(11008, (4096,)),
}
FP16, BF16 = torch.float16, torch.bfloat16
# (rows, max rank, popularity mix, dtype): ranks are drawn in 1..max rank per adapter; every case
# in fp16, the widest in bf16 too (each new shape is a Triton compile on the GPU's clock)
DECODE_CASES = [(1, 8, "single", FP16), (16, 64, "zipf", FP16), (32, 32, "uniform", FP16),
                (64, 128, "distinct", FP16), (16, 64, "zipf", BF16), (64, 128, "distinct", BF16)]
# (segments, longest segment, max rank, mix, dtype)
PREFILL_CASES = [(1, 128, 8, "single", FP16), (4, 96, 64, "zipf", FP16), (8, 40, 128, "distinct", FP16),
                 (4, 96, 64, "zipf", BF16), (8, 40, 128, "distinct", BF16)]


@pytest.fixture(autouse=True)
def _compiled():
    assert compiled_triton(), "unset TRITON_INTERPRET: these tests exist to run the compiled kernels"


@pytest.mark.parametrize("rows,max_rank,mix,dtype", DECODE_CASES, ids=str)
def test_mbgmv_llama7b_qkv(gen, rows, max_rank, mix, dtype):
    check_mbgmv(gen, None, LLAMA7B["qkv"], mix, rows, max_rank, dtype, contiguous=False, device=cuda_device())


@pytest.mark.parametrize("rows,max_rank,mix,dtype", DECODE_CASES[1:3] + DECODE_CASES[4:5], ids=str)
def test_bgmv_llama7b_qkv(gen, rows, max_rank, mix, dtype):
    check_mbgmv(gen, None, LLAMA7B["qkv"], mix, rows, max_rank, dtype, contiguous=True, padded=True,
                device=cuda_device())


@pytest.mark.parametrize("segments,max_len,max_rank,mix,dtype", PREFILL_CASES, ids=str)
def test_sgmv_llama7b_qkv(gen, segments, max_len, max_rank, mix, dtype):
    check_sgmv(gen, None, LLAMA7B["qkv"], mix, segments, max_len, max_rank, dtype, contiguous=False,
               device=cuda_device())


@pytest.mark.parametrize("group", ["o", "gate_up", "down"])
def test_every_group_llama7b_fp16(gen, group):
    """The other module groups (one slice; two 11008-wide slices; an 11008-wide input)."""
    check_mbgmv(gen, None, LLAMA7B[group], "uniform", 16, 64, torch.float16, contiguous=False, device=cuda_device())
    check_mbgmv(gen, None, LLAMA7B[group], "zipf", 8, 32, torch.float16, contiguous=True, padded=True,
                device=cuda_device())
    check_sgmv(gen, None, LLAMA7B[group], "zipf", 3, 64, 64, torch.float16, contiguous=False, device=cuda_device())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("padded", [False, True], ids=["mbgmv", "bgmv"])
def test_expand_split_llama7b_qkv(gen, dtype, padded):
    """The qkv delta straight into q and the KV staging rows (the engine's two launches)."""
    check_mbgmv_expand_split(gen, None, LLAMA7B["qkv"], "zipf", 32, 64, dtype, padded=padded, device=cuda_device())


def test_prepared_decode_step_llama7b(gen):
    """kernels.prepare_decode on CUDA (the engine's decode path): prepared once, run per layer."""
    check_decode_step(gen, None, LLAMA7B["qkv"], "zipf", 16, 64, torch.float16, contiguous=False, layers=2,
                      device=cuda_device())


def test_prepared_prefill_step_llama7b(gen):
    """kernels.prepare_prefill on CUDA (the engine's prefill path): prepared once, run per layer."""
    check_prefill_step(gen, None, LLAMA7B["qkv"], "zipf", 4, 96, 64, torch.float16, contiguous=False, layers=2,
                       device=cuda_device())


def test_kernels_reject_mixed_devices():
    """The launchers refuse a CPU tensor among CUDA ones (a clear error, not a crash)."""
    dev = cuda_device()
    x = torch.randn(2, 64, dtype=torch.float16, device=dev)
    W = torch.zeros(16, 64, dtype=torch.float16, device=dev)
    y = torch.zeros(2, 1, 4, device=dev)
    with pytest.raises(kernels.KernelArgumentError, match="expected cuda"):
        kernels.mbgmv_shrink(x, W, torch.zeros(2, 1, 4, dtype=torch.int32), torch.zeros(2, 1, dtype=torch.int32,
                                                                                      device=dev), y)
