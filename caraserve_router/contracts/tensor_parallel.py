"""Whether a base model can be split over `tp` tensor-parallel ranks, checked in one place.

LightLLM 0.0.1's TP llama splits the attention heads, the KV heads and the MLP's intermediate
features evenly over the ranks, and q by `hidden_size // tp` (a head boundary only when
heads x head_dim = hidden_size). The front end asks before it starts anything
(`frontend/tp_capacity.py`); every rank asks again when it shards adapters
(`lora/tp_shard.TpShard.check`). Pure Python.
"""
from __future__ import annotations

from typing import Optional


def tp_split_problem(config: dict, tp: int) -> Optional[str]:
    """Why `config` (a config.json dict) cannot be split over `tp` ranks, or None."""
    if tp == 1:
        return None
    heads = int(config["num_attention_heads"])
    kv_heads = int(config.get("num_key_value_heads") or heads)
    hidden = int(config["hidden_size"])
    head_dim = int(config.get("head_dim") or hidden // heads)
    problems = [f"{name} {value} is not divisible by tp={tp}" for name, value in (
        ("num_attention_heads", heads), ("num_key_value_heads", kv_heads),
        ("intermediate_size", int(config["intermediate_size"]))) if value % tp]
    if heads * head_dim != hidden:
        problems.append(f"heads x head_dim ({heads} x {head_dim}) != hidden_size {hidden}")
    if not problems:
        return None
    return f"cannot split the base model over tp={tp} ranks: " + "; ".join(problems)
