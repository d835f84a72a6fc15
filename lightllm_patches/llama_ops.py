"""The llama path's kernels, per device: LightLLM's Triton kernels on CUDA, torch on the CPU.

LightLLM 0.0.1 only has Triton kernels for rmsnorm, rotary embedding, silu-and-mul, KV-cache
copies and attention; those need a GPU. `LLAMA_OPS[device.type]` gives the set to use; the CPU
set below is plain torch and is used only when the instance runs on the CPU.

All ops share one signature per op (the CUDA entries adapt LightLLM's functions to it).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class LlamaOps:
    rmsnorm: Callable  # (x [T, D], weight [D], eps) -> [T, D]
    rotary: Callable  # (q [T, H, d], k [T, KVH, d], cos [T, d/2], sin [T, d/2]) -> None (in place)
    silu_and_mul: Callable  # (x [T, 2I]) -> [T, I]
    copy_kv: Callable  # (kv [T, 2KVH, d], mem_index [T], kv_cache [S, 2KVH, d]) -> None
    copy_kv_index_to_req: Callable  # (req_to_token [R, L], b_req_idx [B], b_seq_len [B], mem_index [B])
    prefill_attention: Callable  # (q [T,H,d], k [T,KVH,d], v, out [T,H,d], infer_state) -> None
    decode_attention: Callable  # (q [B,H,d], kv_cache [S,2KVH,d], kv_heads, out [B,H,d], infer_state) -> None
    # Chunked prefill: chunk queries against the request's whole cached prefix (CaraMixedInferState).
    chunk_attention: Callable  # (q [T,H,d], kv_cache [S,2KVH,d], kv_heads, out [T,H,d], mixed_state) -> None


# --------------------------------------------------------------------------- CPU (torch)


def _rmsnorm_cpu(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


def _rotary_cpu(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    # LightLLM's (and HF llama's) "rotate half" convention: dims [0, d/2) pair with [d/2, d).
    c = cos.unsqueeze(1)  # [T, 1, d/2]
    s = sin.unsqueeze(1)
    for t in (q, k):
        half = t.shape[-1] // 2
        x0, x1 = t[..., :half], t[..., half:]
        r0 = torch.addcmul(x0 * c, x1, s, value=-1)  # from the original x0, x1
        x1.mul_(c).addcmul_(x0, s)  # x0 is still the original here
        x0.copy_(r0)


def _silu_and_mul_cpu(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return F.silu(x[:, :half]) * x[:, half:]


def _copy_kv_cpu(kv: torch.Tensor, mem_index: torch.Tensor, kv_cache: torch.Tensor) -> None:
    kv_cache.index_copy_(0, mem_index.long(), kv)


def _copy_kv_index_to_req_cpu(req_to_token, b_req_idx, b_seq_len, mem_index) -> None:
    req_to_token[b_req_idx.long(), (b_seq_len - 1).long()] = mem_index.to(req_to_token.dtype)


def _prefill_attention_cpu(q, k, v, out, infer_state) -> None:
    """Causal attention over each request's new tokens (no prompt-cache prefix).

    Shape: q [T, H, d], k/v [T, KVH, d], out [T, H, d]; request i owns the rows
    `infer_state.cpu_segments[i]` (a (start, length) pair computed once per step).
    """
    gqa = q.shape[1] != k.shape[1]
    for start, length in infer_state.cpu_segments:
        rows = slice(start, start + length)
        qi = q[rows].transpose(0, 1).unsqueeze(0)  # [1, H, L, d]
        ki = k[rows].transpose(0, 1).unsqueeze(0)  # [1, KVH, L, d]
        vi = v[rows].transpose(0, 1).unsqueeze(0)
        oi = F.scaled_dot_product_attention(qi, ki, vi, is_causal=True, enable_gqa=gqa)
        out[rows] = oi[0].transpose(0, 1)


def cpu_decode_plan(req_to_token, b_req_idx, b_seq_len, max_len):
    """Per-step (not per-layer) part of CPU decode attention: the KV gather index and mask.

    Returns (index [B*L] long, mask [B, 1, 1, L] bool).
    """
    batch = b_req_idx.shape[0]
    index = req_to_token[b_req_idx.long(), :max_len].long().reshape(-1)  # [B*L]
    positions = torch.arange(max_len, device=b_seq_len.device)
    mask = (positions[None, :] < b_seq_len[:, None]).view(batch, 1, 1, max_len)
    return index, mask


def _decode_attention_cpu(q, kv_cache, kv_heads, out, infer_state) -> None:
    """One query token per request against its cached keys/values.

    Shape: q [B, H, d], kv_cache [S, 2*KVH, d] (K heads first, then V), out [B, H, d].
    One gather (index from `cpu_decode_plan`) brings every request's K and V rows; positions
    past a request's length are masked.
    """
    batch, heads, dim = q.shape
    index, mask = infer_state.cpu_decode_index, infer_state.cpu_decode_mask
    max_len = mask.shape[-1]
    buffer = infer_state.cpu_decode_buffer  # reused by every layer of the step
    if buffer is None or buffer.shape[0] != index.shape[0] or buffer.dtype != kv_cache.dtype:
        buffer = infer_state.cpu_decode_buffer = kv_cache.new_empty((index.shape[0],) + kv_cache.shape[1:])
    kv = torch.index_select(kv_cache, 0, index, out=buffer).view(batch, max_len, 2 * kv_heads, dim)
    k = kv[:, :, :kv_heads].transpose(1, 2)  # [B, KVH, L, d]
    v = kv[:, :, kv_heads:].transpose(1, 2)
    o = F.scaled_dot_product_attention(q.unsqueeze(2), k, v, attn_mask=mask, enable_gqa=heads != kv_heads)
    out.copy_(o.squeeze(2))


def _chunk_attention_cpu(q, kv_cache, kv_heads, out, st) -> None:
    """Prefill chunks that attend to their request's cached prefix (earlier chunks) and,
    causally, to themselves. Shape: q/out [T, H, d] (the step's chunk rows), kv_cache
    [S, 2*KVH, d]; the gather index and mask of each chunk come from `st.cpu_chunk_plan`."""
    gqa = q.shape[1] != kv_heads
    for start, length, index, mask in st.cpu_chunk_plan:
        rows = slice(start, start + length)
        kv = kv_cache.index_select(0, index)  # [L, 2KVH, d]
        k = kv[:, :kv_heads].transpose(0, 1).unsqueeze(0)  # [1, KVH, L, d]
        v = kv[:, kv_heads:].transpose(0, 1).unsqueeze(0)
        qi = q[rows].transpose(0, 1).unsqueeze(0)  # [1, H, n, d]
        oi = F.scaled_dot_product_attention(qi, k, v, attn_mask=mask, enable_gqa=gqa)  # [1, H, n, d]
        out[rows] = oi[0].transpose(0, 1)


CPU_OPS = LlamaOps(
    rmsnorm=_rmsnorm_cpu,
    rotary=_rotary_cpu,
    silu_and_mul=_silu_and_mul_cpu,
    copy_kv=_copy_kv_cpu,
    copy_kv_index_to_req=_copy_kv_index_to_req_cpu,
    prefill_attention=_prefill_attention_cpu,
    decode_attention=_decode_attention_cpu,
    chunk_attention=_chunk_attention_cpu,
)


# --------------------------------------------------------------------------- CUDA (LightLLM Triton)


def _cuda_ops() -> LlamaOps:
    from lightllm.common.basemodel.triton_kernel.copy_kv_index_to_req import copy_kv_index_to_req
    from lightllm.common.basemodel.triton_kernel.destindex_copy_kv import destindex_copy_kv
    from lightllm.models.llama.triton_kernel.context_flashattention_nopad import (
        context_attention_fwd,
        context_attention_fwd_no_prompt_cache,
    )
    from lightllm.models.llama.triton_kernel.rmsnorm import rmsnorm_forward
    from lightllm.models.llama.triton_kernel.rotary_emb import rotary_emb_fwd
    from lightllm.models.llama.triton_kernel.silu_and_mul import silu_and_mul_fwd
    from lightllm.models.llama.triton_kernel.token_attention_nopad_att1 import token_att_fwd
    from lightllm.models.llama.triton_kernel.token_attention_softmax_and_reducev import (
        token_softmax_reducev_fwd,
    )

    def prefill_attention(q, k, v, out, st):
        context_attention_fwd_no_prompt_cache(q, k, v, out, st.b_start_loc, st.b_seq_len, st.max_len_in_batch)

    def decode_attention(q, kv_cache, kv_heads, out, st):
        # Same two kernels and arguments as LlamaTransformerLayerInfer._token_decode_attention_normal.
        att = torch.empty((q.shape[1], st.total_token_num), dtype=q.dtype, device=q.device)
        token_att_fwd(q, kv_cache[:, :kv_heads, :], att, st.req_manager.req_to_token_indexs,
                      st.b_req_idx, st.b_start_loc, st.b_seq_len, st.max_len_in_batch)
        token_softmax_reducev_fwd(att, kv_cache[:, kv_heads:, :], out, st.req_manager.req_to_token_indexs,
                                  st.b_req_idx, st.b_start_loc, st.b_seq_len, st.other_kv_index)

    def chunk_attention(q, kv_cache, kv_heads, out, st):
        # LightLLM's prompt-cache context attention: the queries are the chunk's tokens, the
        # keys/values are read through req_to_token_indexs up to b_seq_len, and
        # b_prompt_cache_len (here: the KV cached before the chunk) offsets the causal mask.
        context_attention_fwd(q, kv_cache[:, :kv_heads, :], kv_cache[:, kv_heads:, :], out, st.chunk_req_idx,
                              st.chunk_start_loc, st.chunk_seq_len, st.chunk_ready_len, st.chunk_max_len,
                              st.req_manager.req_to_token_indexs)

    return LlamaOps(
        rmsnorm=lambda x, w, eps: rmsnorm_forward(x, weight=w, eps=eps),
        rotary=rotary_emb_fwd,
        # upstream returns a strided view of its input ([T, 2I] -> [:, :I]); the down projection's
        # LoRA kernels and the sidecar read the activation as a contiguous [T, I]
        silu_and_mul=lambda x: silu_and_mul_fwd(x).contiguous(),
        copy_kv=destindex_copy_kv,
        copy_kv_index_to_req=copy_kv_index_to_req,
        prefill_attention=prefill_attention,
        decode_attention=decode_attention,
        chunk_attention=chunk_attention,
    )


_OPS_FACTORIES: dict[str, Callable[[], LlamaOps]] = {"cpu": lambda: CPU_OPS, "cuda": _cuda_ops}
_cache: dict[str, LlamaOps] = {}


def ops_for(device: torch.device) -> LlamaOps:
    """The op set for `device` ("cpu" or "cuda")."""
    if device.type not in _OPS_FACTORIES:
        raise ValueError(f"no llama ops for device type {device.type!r}")
    if device.type not in _cache:
        _cache[device.type] = _OPS_FACTORIES[device.type]()
    return _cache[device.type]
