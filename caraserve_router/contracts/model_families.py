"""The model families CaraServe serves, and what it refuses in a config.json, in one registry.

One entry per HF `model_type`, read by the model-directory validator
(`caraserve_router.assets.model_dir`) and by the instance (`lightllm_patches.model_registry`
picks the model class, `CaraLlamaModel._verify_params` refuses what `config_problems` lists),
so what the validator accepts is what the instance serves. Pure Python.

Every family runs on the patched LightLLM llama path (rmsnorm, GQA attention, rotate-half
RoPE, SwiGLU MLP); they differ in what the table below records.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Mapping, Optional

from caraserve_router.contracts.model_config import rope_scaling_problem


class ModelFamily(str, enum.Enum):
    LLAMA = "llama"      # Llama 2 / 3.x, SmolLM, TinyLlama, ...
    QWEN2 = "qwen2"      # Qwen2 / Qwen2.5: q/k/v biases, often tied embeddings, vocab 151,936
    MISTRAL = "mistral"  # Mistral 7B v0.1-v0.3 (v0.1: a 4096-token sliding window)

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class FamilySpec:
    family: ModelFamily
    upstream: str  # the LightLLM 0.0.1 model of this model_type (what our override stands in for)
    qkv_bias: bool  # q/k/v projections always carry biases (loaded and added)
    tie_default: bool  # transformers' default of tie_word_embeddings when config.json omits it

    def sliding_window(self, cfg: Mapping[str, Any]) -> Optional[int]:
        """The attention window of the layers that slide (None: every layer attends to all).

        Mistral: `sliding_window` (null from v0.2 on). Qwen2: only with `use_sliding_window`,
        and only layers >= `max_window_layers` slide (transformers' Qwen2Config).
        """
        if self.family is ModelFamily.MISTRAL:
            window = cfg.get("sliding_window")
        elif self.family is ModelFamily.QWEN2 and cfg.get("use_sliding_window"):
            window = cfg.get("sliding_window")
            if int(cfg.get("max_window_layers", 0) or 0) >= int(cfg.get("num_hidden_layers") or 0):
                window = None  # no layer reaches the sliding ones
        else:
            window = None
        return None if window is None else int(window)


FAMILIES: dict[str, FamilySpec] = {
    "llama": FamilySpec(ModelFamily.LLAMA, "lightllm.models.llama.model.LlamaTpPartModel", qkv_bias=False,
                        tie_default=False),
    "qwen2": FamilySpec(ModelFamily.QWEN2, "lightllm.models.qwen2.model.Qwen2TpPartModel", qkv_bias=True,
                        tie_default=False),
    "mistral": FamilySpec(ModelFamily.MISTRAL, "lightllm.models.mistral.model.MistralTpPartModel", qkv_bias=False,
                          tie_default=False),
}

# Mixture-of-experts model types (and the config keys that give one away under another name):
# their MLP is a router over experts, which neither LightLLM's llama path nor the LoRA pool's
# gate/up/down slices model.
MOE_MODEL_TYPES = ("mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v3", "dbrx", "jamba", "olmoe",
                   "granitemoe", "phimoe")
MOE_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_intermediate_size")


class UnsupportedModelError(ValueError):
    """config.json describes a model CaraServe does not serve (the message says why)."""


def _supported_types() -> str:
    return ", ".join(repr(t) for t in FAMILIES)


def family_of(cfg: Mapping[str, Any]) -> FamilySpec:
    """The family entry of a config.json, or `UnsupportedModelError` naming the model type."""
    mt = cfg.get("model_type")
    if mt in FAMILIES:
        return FAMILIES[mt]
    if mt in MOE_MODEL_TYPES:
        raise UnsupportedModelError(f"model_type {mt!r} is a mixture-of-experts model; CaraServe serves dense "
                                    f"models only ({_supported_types()})")
    raise UnsupportedModelError(f"model_type is {mt!r}; CaraServe serves {_supported_types()} (LightLLM's llama "
                                "path)")


def config_problems(cfg: Mapping[str, Any], max_context: Optional[int] = None) -> list[str]:
    """Why CaraServe cannot serve this config.json (empty when it can): model type, MoE,
    activation, biases, rope scaling, sliding window. Shapes and weights are checked by the
    validator.

    `max_context`: the longest sequence the instance admits (prompt + output); a sliding
    window at least that long never slides, so it is served as full attention. None: the
    model's `max_position_embeddings`.
    """
    problems: list[str] = []
    try:
        spec = family_of(cfg)
    except UnsupportedModelError as exc:
        return [str(exc)]
    experts = [k for k in MOE_KEYS if cfg.get(k)]
    if experts:
        problems.append(f"config.json sets {', '.join(experts)}: a mixture-of-experts model; CaraServe serves dense "
                        "models only")
    act = cfg.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        problems.append(f"hidden_act is {act!r}; CaraServe's llama path computes silu")
    if spec.family is not ModelFamily.QWEN2 and cfg.get("attention_bias"):
        problems.append("attention_bias is true (biases on q/k/v/o); CaraServe adds q/k/v biases for qwen2 only")
    if cfg.get("mlp_bias"):
        problems.append("mlp_bias is true; CaraServe's MLP has no biases")
    rope = rope_scaling_problem(dict(cfg))
    if rope:
        problems.append(rope)
    window = spec.sliding_window(cfg)
    context = max_context if max_context is not None else cfg.get("max_position_embeddings")
    if window is not None and context is not None and window < int(context):
        problems.append(
            f"sliding_window is {window} tokens, shorter than the context served ({int(context)} tokens); CaraServe's "
            f"attention has no sliding window. Serve at most {window} tokens per request (--max-req-total-len "
            f"{window}) or use a model without a window (Mistral v0.2 and later)")
    return problems
