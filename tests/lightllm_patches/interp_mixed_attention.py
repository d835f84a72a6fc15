"""The CUDA ops of a mixed step (chunked prefill) under TRITON_INTERPRET=1: LightLLM's decode
kernels for the decode rows and its prompt-cache context attention for the chunks, called the
way `llama_ops._cuda_ops` calls them, against the CPU ops and a plain softmax reference.

Run by test_mixed_attention_interp.py in a subprocess (see tests/kernels/triton_ops/test_interpreter.py).
"""
from __future__ import annotations

import os

import pytest
import torch

from lightllm_patches.llama_ops import CPU_OPS, _cuda_ops
from lightllm_patches.mixed_infer_state import CaraMixedInferState
from lightllm_patches.model import CaraInferState

assert os.environ.get("TRITON_INTERPRET") == "1", "run through test_mixed_attention_interp.py"

HEADS, KV_HEADS, DIM = 4, 2, 16


def reference(q_row, kv_cache, index, visible):
    """q_row [H, d] against the first `visible` slots of `index`; GQA by head groups."""
    kv = kv_cache[index[:visible].long()]  # [L, 2KVH, d]
    k = kv[:, :KV_HEADS].repeat_interleave(HEADS // KV_HEADS, dim=1)  # [L, H, d]
    v = kv[:, KV_HEADS:].repeat_interleave(HEADS // KV_HEADS, dim=1)
    att = torch.einsum("hd,lhd->hl", q_row, k) / DIM**0.5
    return torch.einsum("hl,lhd->hd", att.softmax(-1), v)


@pytest.mark.parametrize("decode_lens,chunks", [
    ([9, 3], [(0, 7), (5, 6)]),  # (KV cached before the chunk, chunk length)
    ([], [(130, 20)]),  # a prefix longer than one 128-token kernel block
    ([40], [(0, 1)]),
])
def test_mixed_attention_cuda_ops_match_cpu_and_reference(decode_lens, chunks):
    gen = torch.Generator().manual_seed(0)
    lengths = decode_lens + [ready + n for ready, n in chunks]
    table = torch.zeros((len(lengths) + 1, 256), dtype=torch.int32)
    slots = torch.randperm(sum(lengths) + 8, generator=gen)[: sum(lengths)]  # scattered KV slots
    kv_cache = torch.randn((sum(lengths) + 8, 2 * KV_HEADS, DIM), generator=gen)
    start = 0
    for i, n in enumerate(lengths):
        table[i + 1, :n] = slots[start : start + n]
        start += n
    req_manager = type("RM", (), {"req_to_token_indexs": table})()
    st = CaraMixedInferState()
    st.req_manager = req_manager
    st.decode_num, st.chunk_num = len(decode_lens), len(chunks)
    if decode_lens:
        st.init_decode(CaraInferState, torch.device("cpu"), torch.arange(1, len(decode_lens) + 1, dtype=torch.int32),
                       torch.tensor(decode_lens, dtype=torch.int32))
    st.chunk_req_idx = torch.arange(len(decode_lens) + 1, len(lengths) + 1, dtype=torch.int32)
    st.chunk_ready_len = torch.tensor([r for r, _ in chunks], dtype=torch.int32)
    st.chunk_seq_len = torch.tensor([r + n for r, n in chunks], dtype=torch.int32)
    st.init_chunks(torch.device("cpu"))
    tokens = len(decode_lens) + sum(n for _, n in chunks)
    q = torch.randn((tokens, HEADS, DIM), generator=gen)
    d = len(decode_lens)
    outs = {}
    for name, ops in (("cpu", CPU_OPS), ("cuda", _cuda_ops())):
        out = torch.zeros_like(q)
        if d:
            ops.decode_attention(q[:d], kv_cache, KV_HEADS, out[:d], st.decode_state)
        ops.chunk_attention(q[d:], kv_cache, KV_HEADS, out[d:], st)
        outs[name] = out
    expected = torch.zeros_like(q)
    for i, n in enumerate(decode_lens):
        expected[i] = reference(q[i], kv_cache, table[i + 1], n)
    row = d
    for j, (ready, n) in enumerate(chunks):
        for t in range(n):
            expected[row] = reference(q[row], kv_cache, table[d + j + 1], ready + t + 1)
            row += 1
    torch.testing.assert_close(outs["cpu"], expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outs["cuda"], expected, atol=1e-4, rtol=1e-4)
