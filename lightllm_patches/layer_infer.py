"""The llama transformer layer with multi-LoRA deltas, on CUDA or on the CPU.

`CaraTransformerLayerInfer` overrides `LlamaTransformerLayerInfer`:

- `_bind_func`: upstream binds its Triton kernels as instance attributes in `__init__`;
  ours are plain methods that call the device's op set (`llama_ops.ops_for`), so nothing is
  bound there and `bind_ops` installs the op set.
- `_get_qkv`, `_get_o`, `_ffn`: the base projections as upstream, plus the LoRA delta of the
  step's `LoraBatch` (`infer_state.lora`; in a CUDA graph, its `GraphLora`) for every targeted
  projection, accumulated straight into the projection's output, and the family's q/k/v
  biases (`_add_qkv_bias`, a no-op here), before rotary. With
  `--cpu-weight-layout both` a projection of 2+ rows reads nn.Linear's [out, in] copy of the
  weight (`<name>_linear`), which the CPU's BLAS multiplies much faster for small batches.
- norms, KV copy and attention kernels: through the op set (upstream: Triton only).
- `_splitfuse_attention_kernel`: a mixed step of chunked prefill (`CaraMixedInferState`):
  the decode rows through the decode attention op, the prefill chunks through the
  prefix-aware `chunk_attention` op (upstream: `splitfuse_context_attention_fwd`, Triton only).
"""
from __future__ import annotations

import torch

from lightllm.models.llama.layer_infer.transformer_layer_infer import LlamaTransformerLayerInfer

# The base projections' weights ([in, out]) and the suffix of their optional [out, in] copies.
PROJECTION_WEIGHTS = ("q_weight_", "kv_weight_", "o_weight_", "gate_up_proj", "down_proj")
LINEAR_SUFFIX = "_linear"
LINEAR_NAMES = {name: name + LINEAR_SUFFIX for name in PROJECTION_WEIGHTS}  # no string work per call


def project(x: torch.Tensor, layer_weight, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
    """x @ W for the projection weight `name` ([in, out]); x: [tokens, in] -> [tokens, out].

    With an [out, in] copy (CPU, `cpu_weight_layout="both"`) and 2+ rows, computes (W^T @ x^T)^T
    from the copy: one row stays a matrix-vector product on LightLLM's layout (faster there)."""
    linear = getattr(layer_weight, LINEAR_NAMES[name], None)
    if linear is None or x.shape[0] < 2:
        return torch.mm(x, getattr(layer_weight, name), out=out)
    y = torch.mm(linear, x.t()).t()  # y: [tokens, out], a transposed view
    if out is None:
        return y.contiguous()
    out.copy_(y)
    return out


class CaraTransformerLayerInfer(LlamaTransformerLayerInfer):
    def _bind_func(self):
        self.ops = None

    def bind_ops(self, ops) -> None:
        self.ops = ops

    # ---- norms -------------------------------------------------------------------------

    def _att_norm(self, input, infer_state, layer_weight) -> torch.Tensor:
        return self.ops.rmsnorm(input, layer_weight.att_norm_weight_, self.eps_)

    def _ffn_norm(self, input, infer_state, layer_weight) -> torch.Tensor:
        return self.ops.rmsnorm(input, layer_weight.ffn_norm_weight_, self.eps_)

    # ---- projections with LoRA ---------------------------------------------------------

    def _get_qkv(self, input, cache_kv, infer_state, layer_weight):
        x = input.view(-1, self.embed_dim_)  # x: [tokens, hidden]
        kv_dim = (self.tp_k_head_num_ + self.tp_v_head_num_) * self.head_dim_
        lora = infer_state.lora
        if lora is not None:
            lora.begin(self.layer_num_, "qkv", x)  # CPU-assisted rows start before the base matmuls
        q = project(x, layer_weight, "q_weight_")  # q: [tokens, heads * head_dim]
        kv = cache_kv.view(-1, kv_dim)  # kv: [tokens, 2 * kv_heads * head_dim]
        project(x, layer_weight, "kv_weight_", out=kv)
        if lora is not None:
            # q and kv live in different buffers (kv is written straight into the KV cache):
            # the q|k|v delta accumulates into both (q: the q slice, kv: the k and v slices)
            # in one expand launch on the GPU's decode path; the family's biases add after.
            lora.add_delta(self.layer_num_, "qkv", x, q, out_hi=kv)
        self._add_qkv_bias(q, kv, layer_weight)
        self.ops.rotary(
            q.view(-1, self.tp_q_head_num_, self.head_dim_),
            cache_kv[:, 0 : self.tp_k_head_num_, :],
            infer_state.position_cos,
            infer_state.position_sin,
        )
        return q, cache_kv

    def _add_qkv_bias(self, q: torch.Tensor, kv: torch.Tensor, layer_weight) -> None:
        """Projection biases, before rotary (none in llama; `qwen2.CaraQwen2TransformerLayerInfer`)."""

    def _get_o(self, input, infer_state, layer_weight) -> torch.Tensor:
        x = input.view(-1, self.tp_o_head_num_ * self.head_dim_)  # x: [tokens, heads * head_dim]
        lora = infer_state.lora
        if lora is not None:
            lora.begin(self.layer_num_, "o", x)
        out = project(x, layer_weight, "o_weight_")  # out: [tokens, hidden]
        if lora is not None:
            lora.add_delta(self.layer_num_, "o", x, out)
        return out

    def _ffn(self, input, infer_state, layer_weight) -> torch.Tensor:
        x = input.view(-1, self.embed_dim_)  # x: [tokens, hidden]
        lora = infer_state.lora
        if lora is not None:
            lora.begin(self.layer_num_, "gate_up", x)
        gate_up = project(x, layer_weight, "gate_up_proj")  # gate_up: [tokens, 2 * intermediate]
        if lora is not None:
            lora.add_delta(self.layer_num_, "gate_up", x, gate_up)
        act = self.ops.silu_and_mul(gate_up)  # act: [tokens, intermediate]
        if lora is not None:
            lora.begin(self.layer_num_, "down", act)
        out = project(act, layer_weight, "down_proj")  # out: [tokens, hidden]
        if lora is not None:
            lora.add_delta(self.layer_num_, "down", act, out)
        return out

    # ---- KV cache and attention --------------------------------------------------------

    def _copy_kv_to_mem_cache(self, buffer, mem_index, mem_manager):
        self.ops.copy_kv(buffer, mem_index, mem_manager.kv_buffer[self.layer_num_])

    def _context_attention_kernel(self, q, kv, infer_state, layer_weight, out=None) -> torch.Tensor:
        if infer_state.use_dynamic_prompt_cache:
            raise NotImplementedError("CaraServe does not support LightLLM's dynamic prompt cache")
        o = torch.empty_like(q) if out is None else out
        shape = (-1, self.tp_q_head_num_, self.head_dim_)
        self.ops.prefill_attention(
            q.view(shape),
            kv[:, 0 : self.tp_k_head_num_, :],
            kv[:, self.tp_k_head_num_ : self.tp_k_head_num_ + self.tp_v_head_num_, :],
            o.view(shape),
            infer_state,
        )
        return o

    def _token_attention_kernel(self, q, infer_state, layer_weight, out=None) -> torch.Tensor:
        o = torch.empty_like(q) if out is None else out
        shape = (infer_state.batch_size, self.tp_q_head_num_, self.head_dim_)
        self.ops.decode_attention(
            q.view(shape), infer_state.mem_manager.kv_buffer[self.layer_num_], self.tp_k_head_num_,
            o.view(shape), infer_state,
        )
        return o

    def _splitfuse_attention_kernel(self, q, infer_state, layer_weight, out=None) -> torch.Tensor:
        o = torch.empty_like(q) if out is None else out
        heads = (self.tp_q_head_num_, self.head_dim_)
        q3, o3 = q.view((-1,) + heads), o.view((-1,) + heads)  # [tokens, H, d]
        kv_cache = infer_state.mem_manager.kv_buffer[self.layer_num_]
        d = infer_state.decode_num
        if d:
            self.ops.decode_attention(q3[:d], kv_cache, self.tp_k_head_num_, o3[:d], infer_state.decode_state)
        if infer_state.chunk_num:
            self.ops.chunk_attention(q3[d:], kv_cache, self.tp_k_head_num_, o3[d:], infer_state)
        return o
