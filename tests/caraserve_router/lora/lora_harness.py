"""The PEFT reference for engine tests (the engine itself is `lightllm_patches.offline`)."""
from __future__ import annotations

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from caraserve_router.contracts.configs import LoRAConfig, SidecarConfig
from lightllm_patches.offline import OfflineEngine


def lora_engine(model_dir, adapter_dirs, sidecar=None, **lora_kw) -> OfflineEngine:
    """An offline engine with `adapter_dirs` registered under their directory names."""
    lora_kw.setdefault("link_bandwidth_mbps", 1e5)
    return OfflineEngine(model_dir, lora=LoRAConfig(**lora_kw), sidecar=sidecar or SidecarConfig(workers=1),
                         adapters={d.name: d for d in adapter_dirs})


def peft_logits(model_dir, adapter_dir, prompt, tokens):
    """Logits of the last position after `prompt` and after each of `tokens` (teacher-forced)."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, str(adapter_dir))
    model.eval()
    ids = list(prompt)
    out = []
    with torch.no_grad():
        for step in range(len(tokens) + 1):
            out.append(model(torch.tensor([ids])).logits[0, -1])
            if step < len(tokens):
                ids.append(tokens[step])
    return out
