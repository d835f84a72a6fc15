"""One registry from a model directory's family to the CaraServe model class that serves it.

Replaces the model-type if/elif chain of upstream `ModeBackend.init_model`
(`lightllm.server.router.model_infer.mode_backend.base_backend`), which picks one of 20
LightLLM models; CaraServe serves the families of `contracts.model_families`, all on its
patched llama path:

| family | class | upstream model it stands in for |
|---|---|---|
| llama (Llama 2, Llama 3.x incl. llama3 RoPE) | `model.CaraLlamaModel` | `LlamaTpPartModel` |
| qwen2 (Qwen2, Qwen2.5) | `qwen2.CaraQwen2Model` | `Qwen2TpPartModel` |
| mistral | `model.CaraLlamaModel` | `MistralTpPartModel` (llama weights and layers; its sliding-window attention is not needed: a window shorter than the context is refused) |
"""
from __future__ import annotations

import json
import os

from caraserve_router.contracts.model_families import ModelFamily, family_of
from lightllm_patches.model import CaraLlamaModel
from lightllm_patches.qwen2 import CaraQwen2Model

MODEL_CLASSES: dict[ModelFamily, type] = {
    ModelFamily.LLAMA: CaraLlamaModel,
    ModelFamily.QWEN2: CaraQwen2Model,
    ModelFamily.MISTRAL: CaraLlamaModel,
}


def read_config(model_dir: str) -> dict:
    with open(os.path.join(model_dir, "config.json"), encoding="utf-8") as f:
        return json.load(f)


def model_class_for(model_dir: str) -> type:
    """The model class of `model_dir`'s family (`UnsupportedModelError` naming the model type)."""
    return MODEL_CLASSES[family_of(read_config(model_dir)).family]
