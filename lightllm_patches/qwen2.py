"""Qwen2 / Qwen2.5 on the llama path: the llama model plus q/k/v projection biases.

Overrides (one level of subclassing each, on top of CaraServe's llama classes):

| ours | extends | upstream it stands in for | why |
|---|---|---|---|
| `CaraQwen2TransformerLayerWeight` | `CaraTransformerLayerWeight` | `lightllm.models.qwen2.layer_weights.transformer_layer_weight.Qwen2TransformerLayerWeight._load_qkvo_weights` | loads `q_proj.bias` -> `q_bias_` [q_out] and `k_proj.bias` / `v_proj.bias` -> `kv_bias_` [k_out + v_out] (upstream leaves `kv_bias_` on the CPU and requires `q_bias_` from one file); everything else is llama's. |
| `CaraQwen2TransformerLayerInfer` | `CaraTransformerLayerInfer` | `Qwen2TransformerLayerInfer._get_qkv` | adds the biases to q and to the k|v rows written into the KV cache, after the base projection and the LoRA delta (a LoRA delta on a biased projection is added to W x + b, as PEFT does) and before rotary. |
| `CaraQwen2Model` | `CaraLlamaModel` | `lightllm.models.qwen2.model.Qwen2TpPartModel` | the two classes above; tied embeddings, rope_theta 1e6 and the 151,936-token vocabulary need nothing beyond the llama model's loader and rotary tables. Upstream's sliding-window handling is not carried over: `contracts.model_families` refuses a window shorter than the context. |
"""
from __future__ import annotations

import torch

from lightllm_patches.layer_infer import CaraTransformerLayerInfer
from lightllm_patches.model import CaraLlamaModel, CaraTransformerLayerWeight


class CaraQwen2TransformerLayerWeight(CaraTransformerLayerWeight):
    q_bias_ = None
    kv_bias_ = None

    def load_hf_weights(self, weights):
        super().load_hf_weights(weights)
        prefix = f"model.layers.{self.layer_num_}.self_attn."
        names = [prefix + p + "_proj.bias" for p in ("q", "k", "v")]
        present = [n in weights for n in names]
        if not any(present):
            return  # a shard without this layer's attention
        if not all(present):
            missing = [n for n, p in zip(names, present) if not p]
            raise KeyError(f"qwen2 layer {self.layer_num_}: q/k/v biases must be in the same file, missing {missing}")
        self.q_bias_ = self._cuda(weights[names[0]])  # q_bias_: [heads * head_dim]
        self.kv_bias_ = self._cuda(torch.cat([weights[names[1]], weights[names[2]]]))  # [2 * kv_heads * head_dim]

    def verify_load(self):
        super().verify_load()
        if self.q_bias_ is None or self.kv_bias_ is None:
            raise KeyError(f"qwen2 layer {self.layer_num_}: q_proj/k_proj/v_proj biases are missing from the weights")


class CaraQwen2TransformerLayerInfer(CaraTransformerLayerInfer):
    def _add_qkv_bias(self, q: torch.Tensor, kv: torch.Tensor, layer_weight) -> None:
        # q: [tokens, heads * head_dim]; kv: [tokens, 2 * kv_heads * head_dim] (K then V, as kv_bias_)
        q.add_(layer_weight.q_bias_)
        kv.add_(layer_weight.kv_bias_)


class CaraQwen2Model(CaraLlamaModel):
    transformer_weight_class = CaraQwen2TransformerLayerWeight
    transformer_layer_infer_class = CaraQwen2TransformerLayerInfer
