"""The llama layout LightLLM 0.0.1 reads: config.json keys, the weights file name, and the name
and shape of every tensor it loads.

Used by the GGUF conversion (writes a directory in this layout), the model-directory validator
(checks one against it) and the test fixtures (draw a tiny random model in it).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from caraserve_router.assets.file_ops import write_json

WEIGHTS_NAME = "model.safetensors"

# LightLLM 0.0.1's llama reads these from config.json (KeyError or a wrong default otherwise).
REQUIRED_CONFIG_KEYS = (
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "num_hidden_layers",
    "rms_norm_eps",
    "vocab_size",
)


def write_llama_config(
    out_dir: Path | str,
    *,
    hidden_size: int,
    intermediate_size: int,
    num_hidden_layers: int,
    num_attention_heads: int,
    num_key_value_heads: int,
    vocab_size: int,
    max_position_embeddings: int,
    rms_norm_eps: float,
    rope_theta: float,
    bos_token_id: int | None,
    eos_token_id: int | list[int] | None,
    pad_token_id: int | None = None,
    tie_word_embeddings: bool = True,
    dtype: str = "float32",
    initializer_range: float = 0.02,
) -> dict:
    """Write a `config.json` that both LightLLM 0.0.1 and transformers 4.x/5.x read the same way.

    `rope_theta` is written at the top level (what LightLLM and transformers 4 read) and in
    `rope_parameters` (what transformers 5 writes); `rope_scaling` is null, so LightLLM takes
    its plain rotary path. Returns the dict written.
    """
    if hidden_size % num_attention_heads:
        raise ValueError(f"hidden_size {hidden_size} is not a multiple of num_attention_heads {num_attention_heads}")
    if num_attention_heads % num_key_value_heads:
        raise ValueError(
            f"num_attention_heads {num_attention_heads} is not a multiple of num_key_value_heads {num_key_value_heads}"
        )
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": int(hidden_size),
        "intermediate_size": int(intermediate_size),
        "num_hidden_layers": int(num_hidden_layers),
        "num_attention_heads": int(num_attention_heads),
        "num_key_value_heads": int(num_key_value_heads),
        "head_dim": int(hidden_size // num_attention_heads),
        "hidden_act": "silu",
        "max_position_embeddings": int(max_position_embeddings),
        "rms_norm_eps": float(rms_norm_eps),
        "rope_theta": float(rope_theta),
        "rope_scaling": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": float(rope_theta)},
        "vocab_size": int(vocab_size),
        "tie_word_embeddings": bool(tie_word_embeddings),
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "pretraining_tp": 1,
        "initializer_range": float(initializer_range),
        "use_cache": True,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "pad_token_id": pad_token_id,
        "torch_dtype": dtype,
    }
    write_json(Path(out_dir) / "config.json", cfg)
    return cfg


def expected_shapes(cfg: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """HF name -> shape of every tensor LightLLM's llama loads for config `cfg` (plus the
    q/k/v biases of a family that has them, e.g. qwen2)."""
    from caraserve_router.contracts.model_families import FAMILIES

    family = FAMILIES.get(cfg.get("model_type", "llama"))
    biases = family is not None and family.qkv_bias
    h = int(cfg["hidden_size"])
    nh = int(cfg["num_attention_heads"])
    nkv = int(cfg.get("num_key_value_heads") or nh)
    hd = h // nh
    inter = int(cfg["intermediate_size"])
    v = int(cfg["vocab_size"])
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (v, h),
        "model.norm.weight": (h,),
        "lm_head.weight": (v, h),
    }
    for i in range(int(cfg["num_hidden_layers"])):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (nh * hd, h),
            p + "self_attn.k_proj.weight": (nkv * hd, h),
            p + "self_attn.v_proj.weight": (nkv * hd, h),
            p + "self_attn.o_proj.weight": (h, nh * hd),
            p + "mlp.gate_proj.weight": (inter, h),
            p + "mlp.up_proj.weight": (inter, h),
            p + "mlp.down_proj.weight": (h, inter),
        })
        if biases:
            shapes.update({
                p + "self_attn.q_proj.bias": (nh * hd,),
                p + "self_attn.k_proj.bias": (nkv * hd,),
                p + "self_attn.v_proj.bias": (nkv * hd,),
            })
    return shapes
