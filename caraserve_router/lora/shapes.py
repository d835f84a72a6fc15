"""Projection shapes of a llama model, grouped the way the LoRA kernels fuse them.

A *group* is a set of projections (slices) that share an input: `qkv`, `o`, `gate_up`,
`down` (see docs/DESIGN.md). Everything that lays out adapter weights (host store, device
pool, sidecar) derives its offsets from `ModelShapes`.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

# PEFT module name -> (group, slice index within the group)
MODULE_SLOTS: dict[str, tuple[str, int]] = {
    "q_proj": ("qkv", 0),
    "k_proj": ("qkv", 1),
    "v_proj": ("qkv", 2),
    "o_proj": ("o", 0),
    "gate_proj": ("gate_up", 0),
    "up_proj": ("gate_up", 1),
    "down_proj": ("down", 0),
}
GROUPS: tuple[str, ...] = ("qkv", "o", "gate_up", "down")
GROUP_MODULES: dict[str, tuple[str, ...]] = {
    "qkv": ("q_proj", "k_proj", "v_proj"),
    "o": ("o_proj",),
    "gate_up": ("gate_proj", "up_proj"),
    "down": ("down_proj",),
}
MODULE_PARENT = {m: ("self_attn" if m in GROUP_MODULES["qkv"] + GROUP_MODULES["o"] else "mlp") for m in MODULE_SLOTS}


@dataclass(frozen=True)
class GroupShape:
    name: str
    in_features: int
    out_features: tuple[int, ...]  # per slice

    @property
    def num_slices(self) -> int:
        return len(self.out_features)

    @property
    def out_total(self) -> int:
        return sum(self.out_features)

    @property
    def slice_offsets(self) -> tuple[int, ...]:
        offsets = [0]
        for n in self.out_features:
            offsets.append(offsets[-1] + n)
        return tuple(offsets)

    def floats_per_rank(self) -> int:
        """Elements one rank row of this group occupies (A rows of every slice + B row)."""
        return self.num_slices * self.in_features + self.out_total


@dataclass(frozen=True)
class ModelShapes:
    num_layers: int
    hidden: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate: int

    @classmethod
    def from_config(cls, config: dict) -> "ModelShapes":
        heads = config["num_attention_heads"]
        return cls(
            num_layers=config["num_hidden_layers"],
            hidden=config["hidden_size"],
            num_heads=heads,
            num_kv_heads=config.get("num_key_value_heads", heads),
            head_dim=config.get("head_dim") or config["hidden_size"] // heads,
            intermediate=config["intermediate_size"],
        )

    @classmethod
    def from_model_dir(cls, model_dir: str) -> "ModelShapes":
        with open(os.path.join(model_dir, "config.json")) as f:
            return cls.from_config(json.load(f))

    def group(self, name: str) -> GroupShape:
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        table = {
            "qkv": GroupShape("qkv", self.hidden, (q, kv, kv)),
            "o": GroupShape("o", q, (self.hidden,)),
            "gate_up": GroupShape("gate_up", self.hidden, (self.intermediate, self.intermediate)),
            "down": GroupShape("down", self.intermediate, (self.hidden,)),
        }
        return table[name]

    def module_shape(self, module: str) -> tuple[int, int]:
        """(in_features, out_features) of one projection."""
        group, slot = MODULE_SLOTS[module]
        g = self.group(group)
        return g.in_features, g.out_features[slot]

    def floats_per_rank_per_layer(self) -> int:
        return sum(self.group(g).floats_per_rank() for g in GROUPS)
