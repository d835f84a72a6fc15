"""LightLLM 0.0.1's own llama Triton kernels, compiled by the device's Triton, op by op against
the torch ops of the CPU path (lightllm_patches/llama_ops.py) computed in float32 from the same
inputs. (Whole-model agreement with HF is test_engine_cuda.py; this pins a failure to one op.)
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lightllm_patches.llama_ops import CPU_OPS, ops_for
from tests.cuda.common import CUDA_TESTS, compiled_triton, cuda_device
from tests.testing import assert_close

pytestmark = CUDA_TESTS

DTYPES = [torch.float16, torch.bfloat16]


@pytest.fixture(scope="module")
def ops():
    assert compiled_triton(), "unset TRITON_INTERPRET"
    return ops_for(cuda_device())


def _randn(*shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rmsnorm(ops, dtype):
    x, w = _randn(37, 4096, dtype=dtype), 1 + 0.1 * _randn(4096, dtype=dtype, seed=1)
    got = ops.rmsnorm(x.to(cuda_device()), w.to(cuda_device()), 1e-5)
    assert_close(got, CPU_OPS.rmsnorm(x.float(), w.float(), 1e-5), dtype=dtype, msg="rmsnorm")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rotary(ops, dtype):
    tokens, heads, kv_heads, dim = 45, 32, 8, 128
    q, k = _randn(tokens, heads, dim, dtype=dtype), _randn(tokens, kv_heads, dim, dtype=dtype, seed=1)
    angles = torch.rand(tokens, dim // 2) * 2 * math.pi
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    q_ref, k_ref = q.float(), k.float()
    CPU_OPS.rotary(q_ref, k_ref, cos.float(), sin.float())
    q_dev, k_dev = q.to(cuda_device()), k.to(cuda_device())
    ops.rotary(q_dev, k_dev, cos.to(cuda_device()), sin.to(cuda_device()))
    assert_close(q_dev, q_ref, dtype=dtype, msg="rotary q")
    assert_close(k_dev, k_ref, dtype=dtype, msg="rotary k")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_silu_and_mul(ops, dtype):
    x = _randn(70, 2 * 11008, dtype=dtype)
    expected = CPU_OPS.silu_and_mul(x.float())
    got = ops.silu_and_mul(x.to(cuda_device(), copy=True))  # in place: returns a view of its input
    assert_close(got, expected, dtype=dtype, msg="silu_and_mul")


def test_copy_kv_and_request_table(ops):
    kv = _randn(12, 16, 128, dtype=torch.float16)
    slots = torch.randperm(100)[:12].int()
    cache_dev = torch.zeros(100, 16, 128, dtype=torch.float16, device=cuda_device())
    ops.copy_kv(kv.to(cuda_device()), slots.to(cuda_device()), cache_dev)
    cache = torch.zeros(100, 16, 128, dtype=torch.float16)
    CPU_OPS.copy_kv(kv, slots, cache)
    assert torch.equal(cache_dev.cpu(), cache)

    table_dev = torch.zeros(4, 64, dtype=torch.int32, device=cuda_device())
    table = torch.zeros(4, 64, dtype=torch.int32)
    req, seq, mem = torch.tensor([2, 0], dtype=torch.int32), torch.tensor([5, 9], dtype=torch.int32), \
        torch.tensor([77, 78], dtype=torch.int32)
    ops.copy_kv_index_to_req(table_dev, req.to(cuda_device()), seq.to(cuda_device()), mem.to(cuda_device()))
    CPU_OPS.copy_kv_index_to_req(table, req, seq, mem)
    assert torch.equal(table_dev.cpu(), table)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_prefill_attention_is_causal_gqa_attention(ops, dtype):
    lengths, heads, kv_heads, dim = [7, 130, 1, 33], 8, 2, 128
    total = sum(lengths)
    q = _randn(total, heads, dim, dtype=dtype)
    k, v = _randn(total, kv_heads, dim, dtype=dtype, seed=1), _randn(total, kv_heads, dim, dtype=dtype, seed=2)
    starts = torch.tensor([0] + lengths[:-1]).cumsum(0).int()
    state = type("State", (), {})()
    state.b_start_loc = starts.to(cuda_device())
    state.b_seq_len = torch.tensor(lengths, dtype=torch.int32, device=cuda_device())
    state.max_len_in_batch = max(lengths)
    out = torch.empty(total, heads, dim, dtype=dtype, device=cuda_device())
    ops.prefill_attention(q.to(cuda_device()), k.to(cuda_device()), v.to(cuda_device()), out, state)
    expected = torch.empty(total, heads, dim)
    for start, n in zip(starts.tolist(), lengths):
        rows = slice(start, start + n)
        o = F.scaled_dot_product_attention(q[rows].float().transpose(0, 1), k[rows].float().transpose(0, 1),
                                           v[rows].float().transpose(0, 1), is_causal=True, enable_gqa=True)
        expected[rows] = o.transpose(0, 1)
    assert_close(out, expected, dtype=dtype, msg="prefill attention")
