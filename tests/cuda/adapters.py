"""Random PEFT adapters for given model shapes, written straight to safetensors (no base model
loaded), for the CUDA tests of the link, the pool and the sidecar."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from caraserve_router.lora.shapes import MODULE_PARENT, ModelShapes

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def write_adapter(path: Path, shapes: ModelShapes, rank: int, targets=ALL, seed: int = 0) -> Path:
    """A PEFT LoRA directory: lora_A [r, in] ~ N(0, 1/in), lora_B [out, r] ~ N(0, 1), alpha = 2r."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(shapes.num_layers):
        for module in targets:
            in_f, out_f = shapes.module_shape(module)
            key = f"base_model.model.model.layers.{layer}.{MODULE_PARENT[module]}.{module}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, in_f, generator=g) / in_f ** 0.5
            tensors[f"{key}.lora_B.weight"] = torch.randn(out_f, rank, generator=g)
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "adapter_model.safetensors"))
    (path / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": rank, "lora_alpha": 2.0 * rank, "target_modules": list(targets)}))
    return path
