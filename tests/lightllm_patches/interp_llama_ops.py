"""The CUDA op set of lightllm_patches/llama_ops.py (LightLLM 0.0.1's own Triton kernels and our
adapters around them) under TRITON_INTERPRET=1 on CPU tensors, fp16: the same checks as
tests/cuda/test_llama_ops_cuda.py, so the glue (argument order, shapes, strides) is tested on
every CPU run too. Run by test_llama_ops_interpreted.py in a child process (the variable must
be set before Triton is imported); not collected by a plain pytest run.
"""
from __future__ import annotations

import os

import pytest
import torch

import lightllm_patches  # noqa: F401 - patches LightLLM before its kernels are imported
import tests.cuda.test_llama_ops_cuda as cuda_tests
from lightllm_patches import llama_ops

assert os.environ.get("TRITON_INTERPRET") == "1", "run through tests/lightllm_patches/test_llama_ops_interpreted.py"

HALF = torch.float16  # bf16 gives wrong results in the interpreter


@pytest.fixture(autouse=True)
def on_the_cpu(monkeypatch):
    monkeypatch.setattr(cuda_tests, "cuda_device", lambda: torch.device("cpu"))


@pytest.fixture(scope="module")
def ops():
    return llama_ops._OPS_FACTORIES["cuda"]()


def test_rmsnorm(ops):
    cuda_tests.test_rmsnorm(ops, HALF)


def test_rotary(ops):
    cuda_tests.test_rotary(ops, HALF)


def test_silu_and_mul(ops):
    cuda_tests.test_silu_and_mul(ops, HALF)


def test_silu_and_mul_gives_a_contiguous_activation(ops):
    """The down projection's LoRA kernels need a contiguous [T, I]; upstream returns a view."""
    out = ops.silu_and_mul(torch.randn(5, 2 * 64).to(HALF))
    assert out.shape == (5, 64) and out.is_contiguous()


def test_copy_kv_and_request_table(ops):
    cuda_tests.test_copy_kv_and_request_table(ops)


def test_prefill_attention(ops):
    cuda_tests.test_prefill_attention_is_causal_gqa_attention(ops, HALF)
