"""What CaraServe's llama path accepts as a model's rotary embedding, checked in one place.

Used by the model-family registry (`caraserve_router.contracts.model_families.config_problems`,
which the model-directory validator and the instance both call) and by the rotary tables
(`lightllm_patches.rope`), so a directory that preparation accepts is one the instance serves.
Pure Python.
"""
from __future__ import annotations

from typing import Any, Optional

# RoPE variants `lightllm_patches.rope` implements: plain, linear position interpolation
# (`factor`), and Llama 3.x's frequency-dependent scaling. LightLLM's dynamic NTK and yarn
# branches are not carried over.
SUPPORTED_ROPE_TYPES = (None, "default", "linear", "llama3")
LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def rope_type(d: Any) -> Optional[str]:
    """The scaling type of a `rope_scaling` / `rope_parameters` dict (None when absent)."""
    if not isinstance(d, dict):
        return None
    return d.get("rope_type") or d.get("type")


def rope_scaling_of(config: dict) -> Optional[dict]:
    """The rope scaling block of a config.json: `rope_scaling` (what hub configs and
    transformers 4 write), else a scaled `rope_parameters` (what transformers 5 writes)."""
    scaling = config.get("rope_scaling")
    if scaling is not None:
        return scaling
    nested = config.get("rope_parameters")
    return nested if rope_type(nested) not in (None, "default") else None


def _positive(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and value > 0


def rope_scaling_problem(config: dict) -> Optional[str]:
    """Why CaraServe cannot serve this config's rotary embedding, or None when it can."""
    raw = config.get("rope_scaling")
    if raw is not None and not isinstance(raw, dict):
        return f"rope_scaling must be an object or null, got {raw!r}"
    scaling = rope_scaling_of(config)
    kind = rope_type(scaling)
    if kind not in SUPPORTED_ROPE_TYPES:
        where = "rope_scaling" if raw is not None else "rope_parameters"
        return (f"{where} type {kind!r} is not supported by CaraServe (default, linear or llama3 RoPE only; not "
                "dynamic, yarn, longrope)")
    if kind in ("linear", "llama3") and not _positive(scaling.get("factor")):
        return f"rope_scaling factor must be a positive number, got {scaling.get('factor')!r}"
    if kind == "llama3":
        missing = [k for k in LLAMA3_KEYS if not _positive(scaling.get(k))]
        if missing:
            return f"rope_scaling type 'llama3' needs positive {', '.join(missing)} (Llama 3.1's config has them)"
        if scaling["high_freq_factor"] <= scaling["low_freq_factor"]:
            return (f"rope_scaling llama3: high_freq_factor {scaling['high_freq_factor']} must exceed "
                    f"low_freq_factor {scaling['low_freq_factor']}")
    return None
