"""What CaraServe's llama accepts in a model's config.json, checked in one place.

Used by model preparation (`caraserve_router.assets.model_prep.validate_model_dir`) and by the
instance at start (`lightllm_patches.model.CaraLlamaModel._verify_params`), so a directory
that preparation accepts is one the instance serves. Pure Python.
"""
from __future__ import annotations

from typing import Any, Optional

# RoPE variants `CaraLlamaModel._init_to_get_rotary` implements: plain, and linear position
# interpolation (`factor`). LightLLM's dynamic NTK branch is not carried over.
SUPPORTED_ROPE_TYPES = (None, "default", "linear")


def rope_type(d: Any) -> Optional[str]:
    """The scaling type of a `rope_scaling` / `rope_parameters` dict (None when absent)."""
    if not isinstance(d, dict):
        return None
    return d.get("rope_type") or d.get("type")


def rope_scaling_problem(config: dict) -> Optional[str]:
    """Why CaraServe cannot serve this config's rotary embedding, or None when it can."""
    scaling = config.get("rope_scaling")
    if scaling is not None and not isinstance(scaling, dict):
        return f"rope_scaling must be an object or null, got {scaling!r}"
    kind = rope_type(scaling)
    if kind not in SUPPORTED_ROPE_TYPES:
        return (f"rope_scaling type {kind!r} is not supported by CaraServe's llama (plain or linear RoPE "
                "only)")
    if kind == "linear":
        factor = scaling.get("factor")
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or factor <= 0:
            return f"rope_scaling factor must be a positive number, got {factor!r}"
    nested = rope_type(config.get("rope_parameters"))
    if nested not in (None, "default") and scaling is None:
        return (f"rope scaling {nested!r} is given only under rope_parameters; LightLLM reads rope_scaling "
                "and would silently ignore it")
    return None
