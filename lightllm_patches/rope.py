"""Rotary tables of the llama path: plain, linear and Llama 3.x ("llama3") RoPE.

Replaces the table building of `LlamaTpPartModel._init_to_get_rotary` (LightLLM 0.0.1), which
knows plain and linear scaling only, reads `rope_scaling` only, and allocates
`max_position_embeddings * factor + 128K` rows on "cuda" (for Llama 3.1: 1.2 M rows).

The tables are what both op sets read: `_cos_cached` / `_sin_cached` of shape
[positions, head_dim / 2], indexed by position id in `CaraInferState` and handed to the CPU
rotary op and to LightLLM's Triton `rotary_emb_fwd` alike, so the GPU kernel gets the same
scaled frequencies as the CPU path. Frequencies follow transformers'
`modeling_rope_utils` (`_compute_linear_scaling_rope_parameters`, `_compute_llama3_parameters`).
"""
from __future__ import annotations

import math

import torch

from caraserve_router.contracts.model_config import rope_scaling_of, rope_type


def inverse_frequencies(config: dict, head_dim: int, default_base: float = 10000.0) -> torch.Tensor:
    """inv_freq [head_dim / 2] (float32) of `config`'s rotary embedding, scaling applied."""
    base = float(config.get("rope_theta", default_base))
    # inv_freq: [head_dim / 2]; the int64 arange matches transformers bit for bit
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    scaling = rope_scaling_of(config) or {}
    kind = rope_type(scaling)
    if kind == "linear":
        return inv_freq / float(scaling["factor"])  # = positions / factor
    if kind == "llama3":
        return _llama3(inv_freq, scaling)
    return inv_freq


def _llama3(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    """Llama 3.1's scaling: wavelengths longer than original_context / low_freq_factor are
    divided by `factor`, shorter than original_context / high_freq_factor kept, and those in
    between interpolated smoothly."""
    factor = float(scaling["factor"])
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old_context = float(scaling["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_context / high) * ~(wavelen > old_context / low)
    return torch.where(medium, smoothed, scaled)


def rotary_tables(config: dict, head_dim: int, positions: int, dtype: torch.dtype,
                  device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin), each [positions, head_dim / 2] in `dtype` on `device`.

    `positions`: the longest sequence the instance admits (its request-table width), not
    `max_position_embeddings`: a Llama 3.1 instance serving 4K-token requests holds 4K rows,
    not 128K. Built in float32 on the CPU (like transformers), then cast and moved once.
    """
    inv_freq = inverse_frequencies(config, head_dim)
    t = torch.arange(positions, dtype=torch.float32)
    freqs = torch.outer(t, inv_freq)  # freqs: [positions, head_dim / 2]
    return torch.cos(freqs).to(dtype).to(device), torch.sin(freqs).to(dtype).to(device)
